//! The hub's side of the proxy: the route table from the store and the
//! minions' reports, and a way to wait until it may have changed.

use super::{ApiError, Hub};
use crate::lock;
use crate::routes::{RouteSpec, route_table};
use phoenix_model::proto::{RouteInstanceView, RouteView, RoutesView};

impl Hub {
    /// The proxy's route table now (see [`crate::routes`]).
    pub fn route_table(&self) -> Result<Vec<RouteSpec>, ApiError> {
        let services = self.store().read()?.services()?;
        let observed = lock(&self.observed.state);
        Ok(route_table(&services, |name| observed.statuses.get(name)))
    }

    /// What `phoenix routes` shows.
    pub fn routes_view(&self) -> Result<RoutesView, ApiError> {
        let table = self.route_table()?;
        Ok(match self.front.get() {
            Some(front) => front.view(&table),
            None => RoutesView {
                proxy: None,
                routes: table
                    .iter()
                    .map(|r| RouteView {
                        host: r.host.clone(),
                        path: r.path.clone(),
                        auth: !r.auth.is_empty(),
                        instances: r
                            .instances
                            .iter()
                            .map(|i| RouteInstanceView {
                                service: i.service.clone(),
                                machine: i.machine.clone(),
                                addr: i.addr,
                                up: i.up,
                                outstanding: 0,
                                requests: 0,
                                failures: 0,
                                down_for_ms: None,
                            })
                            .collect(),
                        certificate: None,
                    })
                    .collect(),
            },
        })
    }

    /// Resolves when the route table may have changed: a change to the
    /// services (deploy, update, del, restart) or a service's reported
    /// state. `seen` is the last observed-change counter the caller saw.
    pub async fn routes_may_change(&self, seen: &mut u64) {
        let mut reports = self.observed.changes.subscribe();
        tokio::select! {
            _ = self.routes_changed.notified() => {}
            _ = reports.wait_for(|v| *v != *seen) => {}
        }
        *seen = *reports.borrow();
    }
}

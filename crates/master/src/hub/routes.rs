//! The hub's side of the proxy: the route table from the store and the
//! minions' reports, and a way to wait until it may have changed.

use super::{ApiError, Hub};
use crate::lock;
use crate::routes::{Moving, RouteSpec, route_table};
use crate::store::Service;
use phoenix_model::proto::RoutesView;

/// The switching and deleting sets at one moment ([`Hub::moving_now`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MovingNow {
    switching: std::collections::HashSet<String>,
    deleting: std::collections::HashSet<String>,
}

/// What may have changed the route table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RoutesChange {
    /// The services (deploy, update, del, restart): read them again.
    Services,
    /// Only what minions report (states, health).
    Reports,
}

impl Hub {
    /// The stored services the proxy serves (those with a `proxyname`).
    /// Reading specs is not free (each is parsed and checked again), so
    /// the route keeper reads them only when services change.
    pub fn proxied_services(&self) -> Result<Vec<Service>, ApiError> {
        let mut services = self.store().read()?.services()?;
        services.retain(|s| s.spec.proxyname.is_some());
        Ok(services)
    }

    /// Which services are switching or being deleted now: taken before
    /// the services are read, and compared again when the table is
    /// computed ([`route_table_of`](Self::route_table_of)).
    pub fn moving_now(&self) -> MovingNow {
        let rollouts = lock(&self.rollouts);
        MovingNow {
            switching: rollouts.switching.clone(),
            deleting: rollouts.deleting.clone(),
        }
    }

    /// The route table for `services` (read after `moving` was taken) and
    /// what their minions reported; `None` when an update or a delete
    /// switched since `moving`: the services must be read again. An update
    /// is stored as switched before it leaves `switching`, so old services
    /// with the new sets would route to the old run as if it were current,
    /// not draining, after it drained (and as its address goes away).
    pub fn route_table_of(
        &self,
        services: &[Service],
        moving: &MovingNow,
    ) -> Option<Vec<RouteSpec>> {
        let rollouts = lock(&self.rollouts);
        if rollouts.switching != moving.switching || rollouts.deleting != moving.deleting {
            return None;
        }
        let moving = Moving {
            switching: Some(&rollouts.switching),
            deleting: Some(&rollouts.deleting),
        };
        let observed = lock(&self.observed.state);
        Some(route_table(
            services,
            |key| observed.statuses.get(key),
            moving,
        ))
    }

    /// The proxy's route table now (see [`crate::routes`]).
    pub fn route_table(&self) -> Result<Vec<RouteSpec>, ApiError> {
        loop {
            let moving = self.moving_now();
            let services = self.proxied_services()?;
            if let Some(table) = self.route_table_of(&services, &moving) {
                return Ok(table);
            }
        }
    }

    /// What `phoenix routes` shows.
    pub fn routes_view(&self) -> Result<RoutesView, ApiError> {
        let table = self.route_table()?;
        Ok(match self.front.get() {
            Some(front) => front.view(&table),
            None => crate::front::routes_view(&table, None, &[], None),
        })
    }

    /// Resolves when the route table may have changed, and says why: a
    /// change to the services, or a service's reported state. `seen` is
    /// the last observed-change counter the caller saw.
    pub async fn routes_may_change(&self, seen: &mut u64) -> RoutesChange {
        let mut reports = self.observed.changes.subscribe();
        let change = tokio::select! {
            _ = self.routes_changed.notified() => RoutesChange::Services,
            _ = reports.wait_for(|v| *v != *seen) => RoutesChange::Reports,
        };
        *seen = *reports.borrow();
        change
    }
}

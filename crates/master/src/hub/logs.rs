//! Log streams: a CLI's `phoenix logs` relayed from the minion that runs
//! the service. The master keeps no logs; it only routes a stream's lines
//! from the minion's link to the waiting CLI connection.

use std::collections::HashMap;
use std::sync::Mutex;

use phoenix_model::proto::ToMinion;
use tokio::sync::mpsc;

use super::{ApiError, Hub, desired_sets};
use crate::lock;

/// Log output on its way from a minion to a CLI.
pub enum LogEvent {
    Data(String),
    End(Option<String>),
}

/// Open streams: id → (node, where the lines go).
#[derive(Default)]
pub(super) struct LogStreams(Mutex<HashMap<u64, (String, mpsc::UnboundedSender<LogEvent>)>>);

impl Hub {
    /// Opens a log stream from the minion that runs `name`.
    pub fn open_logs(
        &self,
        name: &str,
        tail: usize,
        follow: bool,
    ) -> Result<(u64, String, mpsc::UnboundedReceiver<LogEvent>), ApiError> {
        let placed = {
            let mut store = self.store();
            let tx = store.read()?;
            let svc = tx
                .service(name)?
                .ok_or_else(|| ApiError::no_service(name))?;
            // The run that serves it (an update's new version logs under
            // its own key until the switch).
            let key = svc.instance().to_owned();
            desired_sets(&tx)?
                .into_iter()
                .find(|(_, set)| set.services.iter().any(|a| a.key() == key))
                .map(|(node, _)| (node, key))
        };
        let Some((node, key)) = placed else {
            return Err(ApiError::Unavailable(format!(
                "service {name:?} is placed on no accepted machine now, so no machine holds its logs"
            )));
        };
        self.open_logs_at(&node, key, name, tail, follow)
    }

    /// The last `lines` lines of the log of run `key` on `node`, or `None`
    /// when they do not come within `limit` (the minion is away, say).
    pub(super) async fn log_tail_at(
        &self,
        node: &str,
        key: &str,
        lines: usize,
        limit: std::time::Duration,
    ) -> Option<String> {
        let (stream, node, mut rx) = self
            .open_logs_at(node, key.to_owned(), key, lines, false)
            .ok()?;
        let mut text = String::new();
        let collected = tokio::time::timeout(limit, async {
            loop {
                match rx.recv().await {
                    Some(LogEvent::Data(data)) => text.push_str(&data),
                    Some(LogEvent::End(None)) | None => return true,
                    Some(LogEvent::End(Some(_))) => return false,
                }
            }
        })
        .await;
        self.close_logs(stream, &node);
        matches!(collected, Ok(true)).then_some(text)
    }

    fn open_logs_at(
        &self,
        node: &str,
        key: String,
        name: &str,
        tail: usize,
        follow: bool,
    ) -> Result<(u64, String, mpsc::UnboundedReceiver<LogEvent>), ApiError> {
        let node = node.to_owned();
        let stream = self.next_id();
        let (tx, rx) = mpsc::unbounded_channel();
        lock(&self.logs.0).insert(stream, (node.clone(), tx));
        let sent = self.send(
            &node,
            ToMinion::Logs {
                stream,
                service: key,
                tail,
                follow,
            },
        );
        if !sent {
            lock(&self.logs.0).remove(&stream);
            return Err(ApiError::Unavailable(format!(
                "machine {node:?}, which runs {name:?}, is not connected to the master; its logs are on that machine"
            )));
        }
        Ok((stream, node, rx))
    }

    pub fn close_logs(&self, stream: u64, node: &str) {
        if lock(&self.logs.0).remove(&stream).is_some() {
            self.send(node, ToMinion::LogsCancel { stream });
        }
    }

    pub fn log_event(&self, stream: u64, event: LogEvent) {
        let mut streams = lock(&self.logs.0);
        let end = matches!(event, LogEvent::End(_));
        if let Some((_, tx)) = streams.get(&stream) {
            let _ = tx.send(event);
        }
        if end {
            streams.remove(&stream);
        }
    }

    /// Ends every stream from a node whose link went away.
    pub(super) fn end_streams_of(&self, node: &str) {
        lock(&self.logs.0).retain(|_, (from, tx)| {
            if from != node {
                return true;
            }
            let _ = tx.send(LogEvent::End(Some(format!(
                "machine {node:?} disconnected"
            ))));
            false
        });
    }
}

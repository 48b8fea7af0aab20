//! The proxy end to end on 127.0.0.1: real listeners, real backends,
//! real clients. One test binary; modules by concern.

mod common;

mod balancing;
mod hooks;
mod hostile;
mod limits;
mod routing;
mod shards;
mod streaming;
mod tls;

//! Runs the proxy by hand: a route table from a JSON file, HTTP on one
//! address, optionally HTTPS with one certificate.
//!
//! ```text
//! cargo run -p phoenix-proxy --example serve -- routes.json 127.0.0.1:8080 \
//!     [127.0.0.1:8443 HOST chain.pem key.pem]
//! ```
//!
//! `routes.json` is a `Routes` value, e.g.
//! `{"routes":[{"host":"localhost","instances":[{"id":"web","addr":"127.0.0.1:8000"}]}]}`.
//! The file is read again on SIGHUP; Ctrl-C shuts down gracefully.
//!
//! It runs the proxy as the master does: [`Shards`], one proxy a thread on
//! its own current-thread runtime, all accepting from the same listeners;
//! `PROXY_THREADS=N` sets how many (default: the CPUs, at most 4, like the
//! master's `--proxy-threads`). This thread only handles signals.

use std::error::Error;

use phoenix_proxy::{ProxyConfig, Routes, Shards};
use tokio::signal::unix::{SignalKind, signal};

fn load(path: &str) -> Result<Routes, Box<dyn Error>> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("reading {path}: {e}"))?;
    Ok(serde_json::from_str(&text).map_err(|e| format!("{path}: {e}"))?)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [routes_path, http_addr, rest @ ..] = args.as_slice() else {
        return Err(
            "usage: serve ROUTES.json HTTP_ADDR [HTTPS_ADDR HOST CHAIN.pem KEY.pem]".into(),
        );
    };
    let threads = match std::env::var("PROXY_THREADS") {
        Ok(n) => n.parse().map_err(|e| format!("PROXY_THREADS={n}: {e}"))?,
        Err(_) => Shards::default_threads(),
    };
    let https_addr: Option<(std::net::SocketAddr, &String, &String, &String)> = match rest {
        [addr, host, chain, key] => Some((addr.parse()?, host, chain, key)),
        _ => None,
    };
    // HTTP redirects hosts with a certificate to the HTTPS listener's port.
    let config = ProxyConfig {
        https_port: https_addr.map_or(443, |(a, ..)| a.port()),
        ..ProxyConfig::default()
    };
    let proxy = Shards::new(config, threads)?;
    proxy.set_routes(load(routes_path)?)?;
    if let Some((_, host, chain, key)) = https_addr {
        proxy
            .certs()
            .set(host, &std::fs::read(chain)?, &std::fs::read(key)?)?;
    }
    let https_addr = https_addr.map(|(a, host, ..)| (a, host));
    let at = proxy.serve(Some(http_addr.parse()?), https_addr.map(|(a, _)| a))?;
    println!("{threads} proxy threads");
    if let Some(http) = at.http {
        println!("http on {http}");
    }
    if let (Some(https), Some((_, host))) = (at.https, https_addr) {
        println!("https on {https} for {host}");
    }

    let mut hangup = signal(SignalKind::hangup())?;
    loop {
        tokio::select! {
            _ = hangup.recv() => match load(routes_path).and_then(|r| Ok(proxy.set_routes(r)?)) {
                Ok(()) => println!("routes reloaded"),
                Err(e) => eprintln!("routes kept: {e}"),
            },
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    proxy.shutdown();
    proxy.stopped().await;
    println!("{}", serde_json::to_string_pretty(&proxy.snapshot())?);
    Ok(())
}

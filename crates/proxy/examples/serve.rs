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

use std::error::Error;

use phoenix_proxy::{Proxy, ProxyConfig, Routes};
use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};

fn load(path: &str) -> Result<Routes, Box<dyn Error>> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("reading {path}: {e}"))?;
    Ok(serde_json::from_str(&text).map_err(|e| format!("{path}: {e}"))?)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Box<dyn Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [routes_path, http_addr, rest @ ..] = args.as_slice() else {
        return Err(
            "usage: serve ROUTES.json HTTP_ADDR [HTTPS_ADDR HOST CHAIN.pem KEY.pem]".into(),
        );
    };
    let proxy = Proxy::new(ProxyConfig::default())?;
    proxy.set_routes(load(routes_path)?)?;

    let http = TcpListener::bind(http_addr).await?;
    println!("http on {}", http.local_addr()?);
    let mut tasks = vec![tokio::spawn(proxy.serve_http(http))];
    if let [https_addr, host, chain, key] = rest {
        proxy
            .certs()
            .set(host, &std::fs::read(chain)?, &std::fs::read(key)?)?;
        let https = TcpListener::bind(https_addr).await?;
        println!("https on {} for {host}", https.local_addr()?);
        tasks.push(tokio::spawn(proxy.serve_https(https)));
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
    for task in tasks {
        task.await?;
    }
    println!("{}", serde_json::to_string_pretty(&proxy.snapshot())?);
    Ok(())
}

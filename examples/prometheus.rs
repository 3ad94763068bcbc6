//! The LLM stack under the mock load, its metrics served for Prometheus.
//!
//! ```text
//! cargo run --example prometheus --features semaforo-examples/metrics            # then: curl localhost:9000/metrics
//! cargo run --example prometheus --features semaforo-examples/metrics -- --serve # keep serving after the load
//! ```
//!
//! Metric names and labels are listed in `semaforo::observe`.

#[path = "common/http_client.rs"]
mod http_client;
#[path = "common/metrics_demo.rs"]
mod metrics_demo;
#[path = "common/mock_provider.rs"]
mod mock_provider;

use clap::Parser;
use semaforo::BoxError;
use std::net::SocketAddr;

/// The LLM stack's metrics on a Prometheus endpoint.
#[derive(Parser, Debug)]
#[command(version, about, long_about = None)]
struct Args {
    /// Where to serve `/metrics`.
    #[arg(long, default_value = "127.0.0.1:9000")]
    listen: SocketAddr,
    /// Chat requests sent at once.
    #[arg(long, default_value_t = 30)]
    calls: usize,
    /// Tokens per request.
    #[arg(long, default_value_t = 2_000)]
    tokens: u64,
    /// How many times faster than real time the mock runs.
    #[arg(long, default_value_t = 10.0, value_parser = mock_provider::time_scale)]
    time_scale: f64,
    /// Keep serving `/metrics` after the load, until Ctrl-C.
    #[arg(long)]
    serve: bool,
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let args = Args::parse();
    println!(
        "Serving http://{}/metrics; sending {} requests of {} tokens through the LLM stack…",
        args.listen, args.calls, args.tokens
    );
    let s = metrics_demo::run(args.listen, args.calls, args.tokens, args.time_scale).await?;
    println!(
        "{} succeeded, {} failed, {} retries; health: {:?}.",
        s.succeeded,
        s.failed,
        s.stack.retry().retries(),
        s.health.report().status
    );
    let body = reqwest::get(format!("http://{}/metrics", args.listen))
        .await?
        .text()
        .await?;
    for line in body.lines().filter(|l| l.starts_with("semaforo_")) {
        println!("  {line}");
    }
    if args.serve {
        println!(
            "Still serving http://{}/metrics; Ctrl-C to stop.",
            args.listen
        );
        tokio::signal::ctrl_c().await?;
    }
    Ok(())
}

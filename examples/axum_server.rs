//! An axum server guarded by semaforo — the template to copy
//! (`cargo run --example axum_server -- --port 3000`).
//!
//! `POST /work` reaches an expensive backend of capacity 50 through
//! shutdown → per-API-key quota (`x-api-key`) → bulkhead (50 at a time, 200 in
//! line, the rest refused at once) → timeout. Refusals are 429 (quota) or 503,
//! with `Retry-After` and `RateLimit` headers. `GET /readyz` turns 503 the moment
//! SIGTERM arrives; `GET /healthz` is the deep report. On SIGTERM or Ctrl-C the
//! server stops admitting, drains for up to 30 s, and exits 0.

#[path = "common/server.rs"]
mod server;

use clap::Parser;
use semaforo::BoxError;
use server::{app, ServerConfig};
use std::io::Write;
use std::time::Duration;

/// A semaforo-guarded axum server.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// The port on 127.0.0.1 (0 picks a free one).
    #[arg(long, default_value_t = 3000)]
    port: u16,
    /// Seconds to let in-flight calls finish after SIGTERM.
    #[arg(long, default_value_t = 30)]
    drain_secs: u64,
    /// Find the backend's capacity instead of the fixed 50: `vegas`
    /// (latency grows with load, as here), `aimd` (150 ms threshold) or
    /// `gradient2`; at most 500 at once.
    #[arg(long, value_enum)]
    adaptive: Option<Adaptive>,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum Adaptive {
    Aimd,
    Vegas,
    Gradient2,
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let args = Args::parse();
    let adaptive = args.adaptive.map(|a| -> semaforo::bulkhead::Limit {
        match a {
            // A floor of 10: the backend surely handles 10 (and the
            // baseline probes of Vegas and Gradient2 take one latency).
            Adaptive::Aimd => semaforo::bulkhead::Aimd::new()
                .min(10)
                .latency_threshold(Duration::from_millis(150))
                .into(),
            Adaptive::Vegas => semaforo::bulkhead::Vegas::new().min(10).into(),
            Adaptive::Gradient2 => semaforo::bulkhead::Gradient2::new().min(10).into(),
        }
    });
    let (router, guards) = app(ServerConfig {
        adaptive,
        ..ServerConfig::default()
    })?;
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", args.port)).await?;
    // Handlers in place before we say we listen: an early SIGTERM still drains.
    let stop = semaforo::shutdown::signal()?;
    println!("listening on http://{}", listener.local_addr()?);
    std::io::stdout().flush()?;
    let shutdown = guards.shutdown.clone();
    let server = tokio::spawn(async move {
        axum::serve(listener, router)
            .with_graceful_shutdown(async move {
                stop.await;
                shutdown.trigger(); // readiness flips, new calls are refused
            })
            .await
    });
    // Wait for the signal, then bound the drain: axum alone would wait forever.
    let trigger = guards.shutdown.clone();
    while trigger.is_ready() {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let report = guards
        .shutdown
        .drain(Duration::from_secs(args.drain_secs))
        .await;
    // stdout may be gone (a supervisor that stopped reading): never panic on it.
    let _ = writeln!(
        std::io::stdout(),
        "drained: {} completed, {} cancelled at the deadline, {} refused, {} released from the line",
        report.completed,
        report.cancelled,
        report.rejected,
        report.queued_released
    );
    server.abort();
    Ok(())
}

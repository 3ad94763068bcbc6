//! One logical model over three deployments, against three in-process mock
//! providers: a primary and a secondary of 30,000 tokens a minute each, and
//! a long-context model behind them. Each call goes to the deployment that
//! could start it soonest (the pacers say when), a `529` fails over at once,
//! and a request too long for the small model's context falls back, once,
//! to the long-context one (which gets its own model name).
//!
//! ```text
//! cargo run --example router
//! cargo run --example router -- --calls 60 --overloaded 0.2
//! ```

#[path = "common/http_client.rs"]
mod http_client;
#[path = "common/mock_provider.rs"]
mod mock_provider;

use bytes::Bytes;
use clap::Parser;
use http_client::{chat_request, HttpClient};
use mock_provider::{MockConfig, MockProvider, Stats};
use semaforo::classify::Permanent;
use semaforo::llm::{LlmDeployment, LlmStack, Tier};
use semaforo::observe::{EventKind, RouteReason};
use semaforo::BoxError;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tower::ServiceExt;

/// A primary, a secondary and a long-context fallback behind one router.
#[derive(Parser, Debug)]
#[command(version, about, long_about = None)]
struct Args {
    /// Calls sent at once.
    #[arg(long, default_value_t = 40)]
    calls: usize,
    /// Tokens per call (prompt + max_tokens).
    #[arg(long, default_value_t = 2_000)]
    tokens: u64,
    /// Every this-many-th call carries a prompt too long for the small
    /// model's 8,000-token context (0: none).
    #[arg(long, default_value_t = 10)]
    long_every: usize,
    /// Share of the primary's answers that are `529 overloaded`.
    #[arg(long, default_value_t = 0.1)]
    overloaded: f64,
    /// How many times faster than real time the mocks run.
    #[arg(long, default_value_t = 10.0, value_parser = mock_provider::time_scale)]
    time_scale: f64,
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let args = Args::parse();
    if !(0.0..=1.0).contains(&args.overloaded) {
        return Err(format!("--overloaded must be in [0, 1], got {}", args.overloaded).into());
    }
    let tier = Tier {
        requests_per_minute: 500,
        tokens_per_minute: 30_000,
    };
    let mock = |overloaded_rate: f64, max_context: u64, seed: u64| MockConfig {
        tokens_per_minute: tier.tokens_per_minute,
        requests_per_minute: tier.requests_per_minute,
        time_scale: args.time_scale,
        service_time: Duration::from_secs(5),
        overloaded_rate,
        max_context: Some(max_context),
        seed,
        ..MockConfig::default()
    };
    let primary = MockProvider::start(mock(args.overloaded, 8_000, 1)).await?;
    let secondary = MockProvider::start(mock(0.0, 8_000, 2)).await?;
    let long = MockProvider::start(mock(0.0, 128_000, 3)).await?;

    // What the router did, from its events.
    let routed: Arc<Mutex<BTreeMap<String, usize>>> = Arc::default();
    let stack = |tpm: u64| {
        LlmStack::openai(Tier {
            requests_per_minute: 500,
            tokens_per_minute: tpm,
        })
        .time_scale(args.time_scale)
    };
    let router = LlmStack::router()
        .name("chat")
        .deployment(LlmDeployment::new(
            "primary",
            stack(tier.tokens_per_minute),
            HttpClient::new(&primary.base_url(), None),
        ))
        .deployment(LlmDeployment::new(
            "secondary",
            stack(tier.tokens_per_minute),
            HttpClient::new(&secondary.base_url(), None),
        ))
        .deployment(
            LlmDeployment::new(
                "long-context",
                stack(tier.tokens_per_minute),
                HttpClient::new(&long.base_url(), None),
            )
            .group("long")
            .model("gpt-4.1"),
        )
        .fallback(Permanent::ContextLengthExceeded, "long")
        .on_event({
            let routed = routed.clone();
            move |e| {
                if let EventKind::Routed {
                    deployment, why, ..
                } = &e.kind
                {
                    let what = match why {
                        RouteReason::FailedOver { from, class } => {
                            format!("{from} → {deployment} (failed over: {})", class.as_str())
                        }
                        RouteReason::FellBack { from, reason } => {
                            format!("{from} → {deployment} (fell back: {})", reason.as_str())
                        }
                        _ => format!("{deployment} ({})", why.as_str()),
                    };
                    *routed
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .entry(what)
                        .or_default() += 1;
                }
            }
        })
        .build()?;

    println!(
        "{} calls of {} tokens at once over a primary and a secondary of {} TPM each \
         ({:.0} % of the primary's answers are 529), every {}th too long for their 8,000-token context.",
        args.calls,
        args.tokens,
        tier.tokens_per_minute,
        args.overloaded * 100.0,
        args.long_every
    );
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for i in 1..=args.calls {
        let mut req = chat_request("gpt-4o-mini", args.tokens, i, None);
        if args.long_every > 0 && i % args.long_every == 0 {
            // A prompt of about 10,000 tokens.
            let body = serde_json::json!({
                "model": "gpt-4o-mini",
                "max_tokens": args.tokens,
                "messages": [{"role": "user", "content": "palabra ".repeat(5_000)}],
            });
            *req.body_mut() = Bytes::from(serde_json::to_vec(&body)?);
        }
        let router = router.clone();
        tasks.push(tokio::spawn(async move {
            let started = Instant::now();
            let res = router.oneshot(req).await;
            (res.map(|r| r.status().as_u16()), started.elapsed())
        }));
    }
    let (mut ok, mut failed) = (0, BTreeMap::<String, usize>::new());
    let mut slowest = Duration::ZERO;
    for t in tasks {
        match t.await? {
            (Ok(200), took) => {
                ok += 1;
                slowest = slowest.max(took);
            }
            (Ok(status), _) => *failed.entry(format!("status {status}")).or_default() += 1,
            (Err(e), _) => *failed.entry(e.to_string()).or_default() += 1,
        }
    }
    let scale = args.time_scale;
    println!();
    println!(
        "{ok}/{} answered, in {:.1} s (simulated); the slowest call took {:.1} s.",
        args.calls,
        t0.elapsed().as_secs_f64() * scale,
        slowest.as_secs_f64() * scale
    );
    for (why, n) in &failed {
        println!("  failed: {why} ×{n}");
    }
    println!();
    println!("| deployment   | requests | answered | 429s | 529s | too long | models seen |");
    println!("|--------------|----------|----------|------|------|----------|-------------|");
    for (name, m) in [
        ("primary", &primary),
        ("secondary", &secondary),
        ("long-context", &long),
    ] {
        let s = &m.stats;
        let models = s
            .models
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(m, n)| format!("{m} ×{n}"))
            .collect::<Vec<_>>()
            .join(", ");
        println!(
            "| {:<12} | {:>8} | {:>8} | {:>4} | {:>4} | {:>8} | {} |",
            name,
            Stats::get(&s.requests),
            Stats::get(&s.completed),
            Stats::get(&s.throttled),
            Stats::get(&s.overloaded),
            Stats::get(&s.too_long),
            models
        );
    }
    println!();
    println!("What the router did (its events):");
    for (what, n) in routed.lock().unwrap_or_else(|e| e.into_inner()).iter() {
        println!("  {what}: {n}");
    }
    Ok(())
}

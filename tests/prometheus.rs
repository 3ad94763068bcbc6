//! The Prometheus example's load, scraped over HTTP: the documented series
//! exist, with values that match what the run did.
#![cfg(feature = "metrics")]

#[path = "../examples/common/http_client.rs"]
mod http_client;
#[path = "../examples/common/metrics_demo.rs"]
mod metrics_demo;
#[path = "../examples/common/mock_provider.rs"]
mod mock_provider;

use std::collections::HashMap;

/// `series{labels}` → value, from Prometheus' text format.
fn parse(body: &str) -> HashMap<String, f64> {
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_owned(), v.parse().ok()?))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_documented_series_exist_with_plausible_values() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    // 20 × 2,000 tokens against 30k TPM (×20 time): 15 at once, then paced.
    let calls = 20;
    let s = metrics_demo::run(listen, calls, 2_000, 20.0).await.unwrap();
    assert_eq!((s.succeeded, s.failed), (calls, 0));

    let body = reqwest::get(format!("http://{listen}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let m = parse(&body);
    let get = |k: &str| {
        *m.get(k)
            .unwrap_or_else(|| panic!("no series {k} in:\n{body}"))
    };
    // Levels, sampled from the health report after the load: idle and full.
    assert_eq!(get("semaforo_ready"), 1.0);
    assert_eq!(get("semaforo_in_flight"), 0.0);
    assert_eq!(get(r#"semaforo_bulkhead_in_flight{name="openai"}"#), 0.0);
    assert_eq!(get(r#"semaforo_bulkhead_limit{name="openai"}"#), 5.0);
    assert_eq!(get(r#"semaforo_bulkhead_waiting{name="openai"}"#), 0.0);
    assert_eq!(get(r#"semaforo_breaker_open{name="openai"}"#), 0.0);
    // One pacer per model: its component is named `openai/<model>`.
    let tokens = get(r#"semaforo_pace_available_tokens{name="openai/gpt-4o-mini"}"#);
    assert!((0.0..=30_000.0).contains(&tokens), "{tokens}");
    // 20 calls, 5 at a time: 15 waited in the bulkhead's line.
    assert_eq!(
        get(r#"semaforo_queued_total{layer="bulkhead",name="openai"}"#),
        15.0
    );
    assert_eq!(
        get(r#"semaforo_wait_seconds_count{layer="bulkhead",name="openai"}"#),
        15.0
    );
    // Every call's latency, classified by the breaker: 20 successes.
    assert_eq!(
        get(r#"semaforo_call_seconds_count{layer="breaker",name="openai",class="success"}"#),
        calls as f64
    );
    // Histograms with the recommended buckets (10 ms … 10 min), not
    // summaries: they add up across a fleet.
    for h in semaforo::observe::HISTOGRAMS {
        assert!(
            body.contains(&format!("# TYPE {h} histogram")),
            "{h} is not a histogram:\n{body}"
        );
    }
    assert!(!body.contains("quantile="), "no summaries:\n{body}");
    let bucket = |le: &str| {
        get(&format!(
            r#"semaforo_call_seconds_bucket{{layer="breaker",name="openai",class="success",le="{le}"}}"#
        ))
    };
    for le in semaforo::observe::LATENCY_BUCKETS {
        let _ = bucket(&le.to_string());
    }
    assert_eq!(bucket("+Inf"), calls as f64);
    // A completion takes 5 s simulated = 0.25 s real at ×20: the median
    // lies between 0.1 s and 5 s, and none took 10 ms.
    assert_eq!(bucket("0.01"), 0.0);
    assert!(bucket("0.1") < calls as f64 / 2.0, "{}", bucket("0.1"));
    assert!(bucket("5") >= calls as f64 / 2.0, "{}", bucket("5"));
    // Nothing was refused or retried on this healthy run.
    assert!(!body.contains("semaforo_rejected_total"), "{body}");
    assert!(!body.contains("semaforo_retries_total"), "{body}");
    assert_eq!(s.stack.retry().retries(), 0);
    assert!(s.health.is_ready());
}

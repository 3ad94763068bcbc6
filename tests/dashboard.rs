//! `dashboards/semaforo.json` parses as a Grafana dashboard and its queries
//! name only series the crate exports: the event metrics of
//! `semaforo::observe`, the gauges `Health` derives from its components
//! (`semaforo_<kind>_<detail>`), and `_bucket` / `_count` / `_sum` of the
//! histograms.

use semaforo::breaker::Breaker;
use semaforo::bulkhead::Bulkhead;
use semaforo::cache::Cache;
use semaforo::degrade::Degrade;
use semaforo::health::Health;
use semaforo::pace::Pace;
use semaforo::quota::{Quota, Rate};
use semaforo::shutdown::Shutdown;
use std::collections::BTreeSet;

/// Every `semaforo_…` word in `text`.
fn names(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("semaforo_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        out.insert(tail[..end].to_string());
        rest = &tail[end..];
    }
    out
}

/// What the crate records: the names written in the recording code, and
/// the gauges of a health report with one component of every kind.
fn exported() -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for src in [
        include_str!("../src/observe/mod.rs"),
        include_str!("../src/health/mod.rs"),
    ] {
        // Only string literals: `"semaforo_…"`.
        for piece in src.split('"').skip(1).step_by(2) {
            if piece.starts_with("semaforo_") && !piece.contains('{') {
                out.insert(piece.to_string());
            }
        }
    }
    let shutdown = Shutdown::new();
    let pace = Pace::builder()
        .requests_per_minute(500)
        .tokens_per_minute(30_000)
        .build()
        .unwrap();
    let quota = Quota::builder()
        .plan("free", Rate::per_minute(60))
        .build::<String>()
        .unwrap();
    let cache: Cache<String, String> = Cache::builder().build().unwrap();
    let health = Health::new(&shutdown)
        .breaker("b", &Breaker::builder().build().unwrap())
        .bulkhead("k", &Bulkhead::builder(4).build().unwrap())
        .degrade("d", &Degrade::builder().build().unwrap())
        .cache("c", &cache)
        .quota("q", &quota)
        .pace("p", &pace);
    let report = health.report();
    let kinds: BTreeSet<_> = report.components.iter().map(|c| c.kind).collect();
    assert_eq!(kinds.len(), 6, "one component of every kind: {kinds:?}");
    for c in &report.components {
        for (detail, _) in &c.details {
            out.insert(format!("semaforo_{}_{detail}", c.kind));
        }
    }
    out
}

#[test]
fn the_dashboard_parses_and_names_only_exported_series() {
    let text = include_str!("../dashboards/semaforo.json");
    let dash: serde_json::Value = serde_json::from_str(text).expect("valid JSON");
    assert_eq!(dash["title"], "semaforo");
    let panels = dash["panels"].as_array().expect("panels");
    assert!(panels.len() >= 10, "{} panels", panels.len());
    let exported = exported();
    let mut used = BTreeSet::new();
    for p in panels {
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "panel {} has no query", p["title"]);
        for t in targets {
            let expr = t["expr"].as_str().expect("a PromQL expr");
            used.extend(names(expr));
        }
    }
    let histograms: BTreeSet<_> = semaforo::observe::HISTOGRAMS.iter().copied().collect();
    for name in &used {
        let base = ["_bucket", "_count", "_sum"]
            .iter()
            .find_map(|s| name.strip_suffix(s).filter(|b| histograms.contains(b)))
            .unwrap_or(name);
        assert!(
            exported.contains(base),
            "the dashboard names {name}, which semaforo does not export; exported: {exported:?}"
        );
    }
    // The template variable lists instance names from a real series.
    let vars = dash["templating"]["list"].as_array().unwrap();
    for v in vars {
        if let Some(q) = v["query"].as_str() {
            for n in names(q) {
                let base = n.strip_suffix("_count").unwrap_or(&n);
                assert!(exported.contains(base), "{n}");
            }
        }
    }
    // The headline series are all there.
    for needed in [
        "semaforo_call_seconds_bucket",
        "semaforo_wait_seconds_bucket",
        "semaforo_rejected_total",
        "semaforo_retries_total",
        "semaforo_breaker_open",
        "semaforo_bulkhead_in_flight",
        "semaforo_pace_available_tokens",
        "semaforo_shared_total",
    ] {
        assert!(used.contains(needed), "no panel shows {needed}");
    }
}

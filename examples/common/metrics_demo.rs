//! The LLM stack under the mock load, with its metrics on a Prometheus
//! endpoint: shared by `examples/prometheus.rs` and `tests/prometheus.rs`.

use crate::http_client::{chat_request, HttpClient};
use crate::mock_provider::{MockConfig, MockProvider};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
use semaforo::bulkhead::Bulkhead;
use semaforo::health::Health;
use semaforo::llm::{LlmStack, Tier};
use semaforo::BoxError;
use std::net::SocketAddr;
use std::time::Duration;
use tower::{Service, ServiceBuilder, ServiceExt};

/// What a run did, to compare with what `/metrics` says.
#[derive(Debug)]
pub struct Summary {
    pub succeeded: usize,
    pub failed: usize,
    pub stack: LlmStack,
    pub health: Health,
}

/// Serves `/metrics` on `listen` (for as long as the process lives), then
/// sends `calls` chat requests of `tokens` at once through the LLM stack to a
/// mock provider with a 30k TPM / 500 RPM tier running `time_scale` × faster.
pub async fn run(
    listen: SocketAddr,
    calls: usize,
    tokens: u64,
    time_scale: f64,
) -> Result<Summary, BoxError> {
    // Buckets, not quantiles: histograms add up across instances.
    PrometheusBuilder::new()
        .with_http_listener(listen)
        .set_buckets_for_metric(
            Matcher::Suffix("_seconds".into()),
            semaforo::observe::LATENCY_BUCKETS,
        )?
        .install()?;
    let tier = Tier {
        requests_per_minute: 500,
        tokens_per_minute: 30_000,
    };
    let mock = MockProvider::start(MockConfig {
        tokens_per_minute: tier.tokens_per_minute,
        requests_per_minute: tier.requests_per_minute,
        time_scale,
        ..MockConfig::default()
    })
    .await?;
    let stack = LlmStack::openai(tier)
        .name("openai")
        .time_scale(time_scale)
        .bulkhead(
            Bulkhead::builder(5)
                .name("openai")
                .max_queue(calls as u32)
                .build()?,
        )
        .build()?;
    let health = Health::new(stack.shutdown())
        .bulkhead("openai", stack.bulkhead())
        .breaker("openai", stack.breaker())
        .keyed_pace("openai", stack.pace());
    let sampler = health.spawn_metrics(Duration::from_millis(100))?;
    let client = HttpClient::new(&mock.base_url(), None);
    let svc = ServiceBuilder::new().layer(stack.layer()).service(client);
    let mut tasks = Vec::new();
    for n in 1..=calls {
        let mut svc = svc.clone();
        let req = chat_request("gpt-4o-mini", tokens, n, None);
        tasks.push(tokio::spawn(async move {
            svc.ready().await?.call(req).await.map(|r| r.status())
        }));
    }
    let (mut succeeded, mut failed) = (0, 0);
    for t in tasks {
        match t.await {
            Ok(Ok(status)) if status.is_success() => succeeded += 1,
            _ => failed += 1,
        }
    }
    // One last sample after the load, so the gauges show the idle state.
    sampler.abort();
    health.record_metrics();
    Ok(Summary {
        succeeded,
        failed,
        stack,
        health,
    })
}

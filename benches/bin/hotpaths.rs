//! Runs N calls through one layer's healthy path (or the whole stack), for
//! `scripts/instructions`, which counts the instructions under callgrind —
//! a count that does not depend on what else the machine is doing, unlike a
//! time.
//!
//! ```text
//! hotpaths <layer> <calls>     layer: bulkhead breaker retry retry-budget timeout rate-limit quota pace stack llm
//! hotpaths <peer> <calls>      peer: tower-rate-limit tower-retry-shared governor-keyed-tokio (the peers of
//!                              benches/, counted the same way to see where instructions differ; not in the guard)
//! SIZES=1 hotpaths <layer> 1    also prints the size of the layer's response future
//! ```

#[path = "../common/mod.rs"]
mod common;
use common::{bare, once};

use semaforo::breaker::Breaker;
use semaforo::bulkhead::Bulkhead;
use semaforo::pace::{Cost, Pace};
use semaforo::quota::{Quota, Rate};
use semaforo::retry::Retry;
use semaforo::timeout::Timeout;
use std::hint::black_box;
use std::time::Duration;
use tower::{Service, ServiceBuilder};

fn run<S>(mut svc: S, calls: u64)
where
    S: Service<u64, Response = u64>,
    S::Error: std::fmt::Debug,
{
    if std::env::var_os("SIZES").is_some() {
        let f = svc.call(0);
        eprintln!(
            "future {} bytes: {}",
            std::mem::size_of_val(&f),
            std::any::type_name_of_val(&f)
        );
        drop(f);
    }
    for i in 0..calls {
        black_box(once(&mut svc, black_box(i)));
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let layer = args.next().unwrap_or_default();
    let calls: u64 = args.next().and_then(|n| n.parse().ok()).unwrap_or(1_000);
    let rt = common::runtime();
    let _guard = rt.enter();
    let big = u32::MAX as u64 * 60;
    let pace = || {
        Pace::builder()
            .requests_per_minute(big)
            .tokens_per_minute(big)
            .build()
            .expect("pace")
            .layer()
            .weigh(|_: &u64| Cost::tokens(7))
    };
    match layer.as_str() {
        "bulkhead" => run(
            ServiceBuilder::new()
                .layer(Bulkhead::builder(1_000).build().expect("bulkhead").layer())
                .service(bare()),
            calls,
        ),
        "breaker" => run(
            ServiceBuilder::new()
                .layer(Breaker::builder().build().expect("breaker").layer())
                .service(bare()),
            calls,
        ),
        "retry" => run(
            ServiceBuilder::new()
                .layer(
                    Retry::builder()
                        .max_attempts(3)
                        .no_budget()
                        .build()
                        .expect("retry")
                        .layer(),
                )
                .service(bare()),
            calls,
        ),
        "retry-budget" => run(
            ServiceBuilder::new()
                .layer(
                    Retry::builder()
                        .max_attempts(3)
                        .build()
                        .expect("retry")
                        .layer(),
                )
                .service(bare()),
            calls,
        ),
        "timeout" => run(
            ServiceBuilder::new()
                .layer(
                    Timeout::builder()
                        .attempt(Duration::from_secs(30))
                        .build()
                        .expect("timeout")
                        .layer(),
                )
                .service(bare()),
            calls,
        ),
        "rate-limit" => run(
            ServiceBuilder::new()
                .layer(common::semaforo_rate_limit())
                .service(bare()),
            calls,
        ),
        "quota" => {
            let q = Quota::builder()
                .plan("p", Rate::new(3_000_000_000, Duration::from_secs(60)))
                .build::<u64>()
                .expect("quota");
            let plan = q.plan_id("p").expect("plan");
            run(
                ServiceBuilder::new()
                    .layer(q.layer(move |_: &u64| (7u64, plan)))
                    .service(bare()),
                calls,
            )
        }
        "pace" => run(ServiceBuilder::new().layer(pace()).service(bare()), calls),
        "stack" => run(common::semaforo_stack(), calls),
        "tower-rate-limit" => run(
            ServiceBuilder::new()
                .rate_limit(u64::MAX / 4, Duration::from_secs(1))
                .service(bare()),
            calls,
        ),
        "tower-retry-shared" => run(
            ServiceBuilder::new()
                .layer(tower::retry::RetryLayer::new(common::SharedAttempts {
                    config: std::sync::Arc::new(common::AttemptsConfig {
                        first_delay: Duration::from_millis(500),
                        retries: std::sync::atomic::AtomicU64::new(0),
                    }),
                    left: 3,
                }))
                .service(bare()),
            calls,
        ),
        "governor-keyed-tokio" => {
            let gov = common::governor_tokio_keyed();
            for _ in 0..calls {
                black_box(gov.check_key(black_box(&7)).is_ok());
            }
        }
        "llm" => llm(calls),
        other => {
            eprintln!("unknown layer {other:?}");
            std::process::exit(2);
        }
    }
}

/// The LLM preset (`LlmStack::openai`) on a 2 KB chat request answered at
/// once with a success whose `usage` is read (as `benches/llm.rs`'s "success,
/// 2 KB request").
fn llm(calls: u64) {
    use bytes::Bytes;
    use futures::FutureExt;
    use semaforo::llm::{LlmStack, Tier};
    use tower::ServiceExt;
    const SUCCESS: &[u8] = br#"{"id":"chatcmpl-1","object":"chat.completion","model":"gpt-4o-mini","choices":[{"index":0,"message":{"role":"assistant","content":"Bien, gracias."},"finish_reason":"stop"}],"usage":{"prompt_tokens":12,"completion_tokens":5,"total_tokens":17}}"#;
    let tier = Tier {
        requests_per_minute: 1 << 40,
        tokens_per_minute: 1 << 50,
    };
    let stack = LlmStack::openai(tier).build().expect("a stack");
    let mut svc = ServiceBuilder::new()
        .layer(stack.layer())
        .service(tower::service_fn(|_req: http::Request<Bytes>| {
            std::future::ready(Ok::<_, std::convert::Infallible>(http::Response::new(
                Bytes::from_static(SUCCESS),
            )))
        }));
    let body = Bytes::from(format!(
        r#"{{"messages":[{{"role":"user","content":"{}"}}],"max_tokens":100,"model":"gpt-4o-mini"}}"#,
        "a".repeat(2_000)
    ));
    for _ in 0..calls {
        let req = http::Request::post("/v1/chat/completions")
            .body(body.clone())
            .expect("a request");
        let ready = svc
            .ready()
            .now_or_never()
            .expect("ready at once")
            .expect("no error");
        let res = ready
            .call(req)
            .now_or_never()
            .expect("completes at once")
            .expect("an answer");
        black_box(res.status());
    }
}

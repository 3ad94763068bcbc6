//! The LLM preset end to end over real HTTP on 127.0.0.1, against the mock
//! provider with time compressed (a simulated minute lasts 60 / SCALE seconds).

#[path = "../examples/common/http_client.rs"]
mod http_client;
#[path = "../examples/common/mock_provider.rs"]
mod mock_provider;

use http_client::{chat_request, HttpClient};
use mock_provider::{MockConfig, MockProvider, Stats};
use semaforo::breaker::{Breaker, BreakerState};
use semaforo::llm::{LlmStack, Tier};
use semaforo::observe::EventKind;
use semaforo::retry::Retry;
use semaforo::{BoxError, RejectKind, Rejected};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tower::{Service, ServiceBuilder, ServiceExt};

const TIER: Tier = Tier {
    requests_per_minute: 500,
    tokens_per_minute: 30_000,
};

/// The tier's bound for 50 × 2,000 tokens, plus one plan's 5 s, in simulated time.
const BOUND: Duration = Duration::from_secs(145);

async fn mock(scale: f64, overloaded: f64, midstream: f64) -> MockProvider {
    MockProvider::start(MockConfig {
        time_scale: scale,
        overloaded_rate: overloaded,
        midstream_error_rate: midstream,
        seed: 7,
        ..MockConfig::default()
    })
    .await
    .expect("mock provider starts")
}

/// 50 teachers at once; returns (succeeded, simulated makespan).
async fn sunday_night<S>(svc: S, scale: f64) -> (usize, Duration)
where
    S: Service<
            http::Request<bytes::Bytes>,
            Response = http::Response<bytes::Bytes>,
            Error = BoxError,
        > + Clone
        + Send
        + 'static,
    S::Future: Send,
{
    let t0 = Instant::now();
    let tasks: Vec<_> = (1..=50)
        .map(|i| {
            let mut svc = svc.clone();
            tokio::spawn(async move {
                svc.ready()
                    .await?
                    .call(chat_request("gpt-4o-mini", 2_000, i, None))
                    .await
            })
        })
        .collect();
    let mut ok = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(r) if r.status() == 200 => ok += 1,
            Ok(r) => eprintln!("failed: status {}", r.status()),
            Err(e) => eprintln!("failed: {e}"),
        }
    }
    (ok, t0.elapsed().mul_f64(scale))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_000_direct_fails_stacked_succeeds_near_the_bound() {
    let scale = 20.0;
    let direct = mock(scale, 0.0, 0.0).await;
    let (ok, _) = sunday_night(HttpClient::new(&direct.base_url(), None), scale).await;
    assert!(
        50 - ok >= 30,
        "direct: {} of 50 failed (seed 000 saw 35)",
        50 - ok
    );
    assert_eq!(Stats::get(&direct.stats.throttled), 35);

    let provider = mock(scale, 0.0, 0.0).await;
    let stack = LlmStack::openai(TIER).time_scale(scale).build().unwrap();
    let svc = ServiceBuilder::new()
        .layer(stack.layer())
        .service(HttpClient::new(&provider.base_url(), None));
    let (ok, makespan) = sunday_night(svc, scale).await;
    assert_eq!(ok, 50);
    assert_eq!(
        Stats::get(&provider.stats.throttled),
        0,
        "zero provider 429s"
    );
    assert!(
        makespan <= BOUND.mul_f64(1.1),
        "makespan {makespan:?} vs bound {BOUND:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injected_529s_and_midstream_errors_are_retried_and_429s_never_open_the_breaker() {
    let scale = 20.0;
    // 10 % overloaded, 5 % cut mid-body; and a tier configured 50 % too optimistic,
    // so the provider answers 429 too.
    // The first call finds the token bucket spent by another client: the
    // stack meets 429s whatever the machine's load (the pacer, which learns
    // the real limit from the first answer, makes none of its own).
    let provider = MockProvider::start(MockConfig {
        time_scale: scale,
        overloaded_rate: 0.10,
        midstream_error_rate: 0.05,
        spent_before_first_request: true,
        seed: 7,
        ..MockConfig::default()
    })
    .await
    .expect("mock provider starts");
    let opened = Arc::new(AtomicUsize::new(0));
    let breaker = Breaker::builder()
        .consecutive_failures(5)
        .open_for(Duration::from_secs_f64(30.0 / scale))
        .on_event({
            let opened = opened.clone();
            move |e| {
                if let EventKind::BreakerTransition {
                    to: BreakerState::Open,
                    ..
                } = e.kind
                {
                    opened.fetch_add(1, Ordering::SeqCst);
                }
            }
        })
        .build()
        .unwrap();
    let optimistic = Tier {
        requests_per_minute: 500,
        tokens_per_minute: 45_000,
    };
    let stack = LlmStack::openai(optimistic)
        .time_scale(scale)
        .breaker(breaker)
        .retry(
            Retry::builder()
                .max_attempts(8)
                .retry_after_ceiling(Duration::from_secs(10))
                .build()
                .unwrap(),
        )
        .build()
        .unwrap();
    let client = HttpClient::new(&provider.base_url(), None);
    let svc = ServiceBuilder::new()
        .layer(stack.layer())
        .service(client.clone());
    let (ok, _) = sunday_night(svc, scale).await;
    assert_eq!(ok, 50, "50/50 through retries");
    assert!(
        Stats::get(&provider.stats.throttled) > 0,
        "the optimistic tier did meet 429s"
    );
    assert!(Stats::get(&provider.stats.overloaded) > 0);
    assert!(Stats::get(&provider.stats.midstream_errors) > 0);
    assert_eq!(opened.load(Ordering::SeqCst), 0, "the breaker never opened");
    // The retry budget: 20 % of the requests plus 1 per second over its 10 s window.
    let retries = stack.retry().retries() as f64;
    let budget = stack.retry().budget().unwrap();
    assert!(
        retries <= 0.2 * budget.requests() as f64 + 10.0 * 2.0,
        "{retries} retries"
    );
}

/// The provider down: the chaos layer answers the `503 server_error` the
/// mock used to send while its `down` flag was set; "reached" counts the
/// calls that got to the chaos layer, where the network is.
#[cfg(feature = "chaos")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_down_breaker_opens_fails_fast_and_recovers_within_a_probe() {
    let scale = 60.0; // 5 simulated minutes = 5 s
    let provider = mock(scale, 0.0, 0.0).await;
    let open_for = Duration::from_secs_f64(30.0 / scale);
    let breaker = Breaker::builder()
        .consecutive_failures(5)
        .open_for(open_for)
        .build()
        .unwrap();
    let stack = LlmStack::openai(TIER)
        .time_scale(scale)
        .breaker(breaker.clone())
        .retry(Retry::builder().max_attempts(1).build().unwrap()) // see the breaker itself
        .bulkhead(
            semaforo::bulkhead::Bulkhead::builder(8)
                .max_queue(100)
                .build()
                .unwrap(),
        )
        .build()
        .unwrap();
    let down = semaforo::chaos::Chaos::builder()
        .fault(semaforo::chaos::Fault::respond(|| {
            let body = r#"{"error":{"message":"The server is temporarily unavailable.","type":"server_error","param":null,"code":null}}"#;
            http::Response::builder()
                .status(503)
                .header("content-type", "application/json")
                .body(bytes::Bytes::from_static(body.as_bytes()))
                .unwrap()
        }))
        .build()
        .unwrap();
    let mut svc = ServiceBuilder::new()
        .layer(stack.layer())
        .layer(down.layer())
        .service(HttpClient::new(&provider.base_url(), None));
    down.enable();
    let outage_end = Instant::now() + Duration::from_secs(5);
    let (mut fast_rejections, mut slowest_rejection) = (0, Duration::ZERO);
    let mut reached_while_open = 0;
    let mut n = 0;
    while Instant::now() < outage_end {
        n += 1;
        let before = down.calls();
        // Open and not yet due for a probe (with a margin for the call's own time).
        let was_open = breaker
            .snapshot()
            .retry_after
            .is_some_and(|d| d > Duration::from_millis(20));
        let t0 = Instant::now();
        let res = svc
            .ready()
            .await
            .unwrap()
            .call(chat_request("m", 100, n, None))
            .await;
        let took = t0.elapsed();
        if let Err(e) = &res {
            if Rejected::from_box(e).is_some_and(|r| r.kind() == RejectKind::CircuitOpen) {
                fast_rejections += 1;
                slowest_rejection = slowest_rejection.max(took);
            }
        }
        if was_open {
            reached_while_open += down.calls() - before;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        fast_rejections > 100,
        "{fast_rejections} calls refused by the open breaker"
    );
    // A refusal makes no network call (`reached_while_open` below counts any
    // that did); its wall time on a loaded 2-core machine is scheduling
    // noise (7 ms seen under a clean-clone CI), far below a round trip.
    assert!(
        slowest_rejection < Duration::from_millis(50),
        "slowest refusal {slowest_rejection:?}"
    );
    assert_eq!(
        reached_while_open, 0,
        "no request reached the provider while open"
    );
    // The provider comes back: traffic recovers within one probe period.
    down.disable();
    let back = Instant::now();
    loop {
        let res = svc
            .ready()
            .await
            .unwrap()
            .call(chat_request("m", 100, 0, None))
            .await;
        if matches!(res, Ok(r) if r.status() == 200) {
            break;
        }
        assert!(
            back.elapsed() < open_for + Duration::from_millis(300),
            "not recovered after {:?}",
            back.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(breaker.state(), BreakerState::Closed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_over_quota_is_refused_before_the_line_and_the_budget() {
    use semaforo::quota::{HeaderKey, Quota, Rate};
    let provider = mock(20.0, 0.0, 0.0).await;
    let quota = Quota::builder()
        .plan("teacher", Rate::per_minute(2))
        .build::<String>()
        .unwrap();
    let plan = quota.plan_id("teacher").unwrap();
    let stack = LlmStack::openai(TIER)
        .time_scale(20.0)
        .quota(
            quota,
            HeaderKey::new(http::HeaderName::from_static("x-user"), plan),
        )
        .build()
        .unwrap();
    let mut svc = ServiceBuilder::new()
        .layer(stack.layer())
        .service(HttpClient::new(&provider.base_url(), None));
    let as_user = |user: &str| {
        let mut req = chat_request("gpt-4o-mini", 500, 1, None);
        req.headers_mut()
            .insert("x-user", http::HeaderValue::from_str(user).unwrap());
        req
    };
    for _ in 0..2 {
        assert_eq!(
            svc.ready()
                .await
                .unwrap()
                .call(as_user("ana"))
                .await
                .unwrap()
                .status(),
            200
        );
    }
    let before = Stats::get(&provider.stats.requests);
    let t0 = Instant::now();
    let err = svc
        .ready()
        .await
        .unwrap()
        .call(as_user("ana"))
        .await
        .unwrap_err();
    // Refused before any network call: scheduling noise only on a loaded machine.
    assert!(t0.elapsed() < Duration::from_millis(50));
    assert_eq!(
        Rejected::from_box(&err).unwrap().kind(),
        RejectKind::QuotaExceeded
    );
    assert_eq!(
        Stats::get(&provider.stats.requests),
        before,
        "nothing reached the provider"
    );
    assert_eq!(
        svc.ready()
            .await
            .unwrap()
            .call(as_user("luis"))
            .await
            .unwrap()
            .status(),
        200
    );
}

/// The base URL as OpenAI's SDKs spell it (`…/v1`) reaches the same endpoint
/// as the bare host: no `/v1/v1/chat/completions` 404s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_base_url_with_v1_reaches_the_endpoint() {
    use http_client::endpoint;
    assert_eq!(
        endpoint("http://127.0.0.1:8080/v1", "/v1/chat/completions"),
        "http://127.0.0.1:8080/v1/chat/completions"
    );
    assert_eq!(
        endpoint("https://api.openai.com/v1/", "/v1/chat/completions"),
        "https://api.openai.com/v1/chat/completions"
    );
    assert_eq!(
        endpoint("http://127.0.0.1:8080", "/v1/chat/completions"),
        "http://127.0.0.1:8080/v1/chat/completions"
    );
    assert_eq!(
        endpoint("http://proxy/openai", "/v1/chat/completions"),
        "http://proxy/openai/v1/chat/completions"
    );
    let provider = mock(20.0, 0.0, 0.0).await;
    for base in [provider.base_url(), format!("{}/v1", provider.base_url())] {
        let res = HttpClient::new(&base, None)
            .oneshot(chat_request("gpt-4o-mini", 100, 1, None))
            .await
            .unwrap();
        assert_eq!(res.status(), 200, "{base}");
    }
}

/// `n` calls of 2,000 tokens (a dozen of prompt, the rest `max_tokens`) at
/// once through `stack` against `provider`; (succeeded, simulated makespan).
async fn through(
    stack: &LlmStack,
    provider: &MockProvider,
    n: usize,
    scale: f64,
) -> (usize, Duration) {
    let svc = ServiceBuilder::new()
        .layer(stack.layer())
        .service(HttpClient::new(&provider.base_url(), None));
    let t0 = Instant::now();
    let tasks: Vec<_> = (1..=n)
        .map(|i| {
            let svc = svc.clone();
            tokio::spawn(async move { svc.oneshot(chat_request("m", 2_000, i, None)).await })
        })
        .collect();
    let mut ok = 0;
    for t in tasks {
        if let Ok(Ok(r)) = t.await {
            ok += usize::from(r.status() == 200);
        }
    }
    (ok, t0.elapsed().mul_f64(scale))
}

/// The mock enforcing an Anthropic account (RPM, ITPM, OTPM with output
/// charged at `max_tokens` and given back at the end, `anthropic-ratelimit-*`
/// headers) and an Azure deployment (10 s windows: buckets of a sixth of the
/// minute): the preset of each profile meets zero 429s, near the binding
/// limit's bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anthropic_and_azure_shaped_mocks_see_zero_429s_near_the_bound() {
    use mock_provider::Shape;
    // Anthropic: 20 × ~1,988 output tokens against 8,000 OTPM: the first
    // 8,000 at once, the rest at 8,000 a minute (+ one plan's 5 s).
    let scale = 100.0;
    let provider = MockProvider::start(MockConfig {
        time_scale: scale,
        requests_per_minute: 50,
        shape: Shape::Anthropic {
            input_tokens_per_minute: 30_000,
            output_tokens_per_minute: 8_000,
        },
        ..MockConfig::default()
    })
    .await
    .expect("mock provider starts");
    let stack = LlmStack::anthropic(50, 30_000, 8_000)
        .time_scale(scale)
        .build()
        .unwrap();
    let (ok, makespan) = through(&stack, &provider, 20, scale).await;
    let bound = Duration::from_secs_f64((20.0 * 1_988.0 - 8_000.0) / 8_000.0 * 60.0 + 5.0);
    println!("anthropic: {ok}/20, makespan {makespan:?}, bound {bound:?}");
    assert_eq!(ok, 20);
    assert_eq!(Stats::get(&provider.stats.throttled), 0, "zero 429s");
    assert!(makespan <= bound.mul_f64(1.1), "{makespan:?} vs {bound:?}");

    // Azure: 30 × 2,000 tokens against 30,000 TPM evaluated over 10 s: a
    // bucket of 5,000, refilled at 30,000 a minute.
    let scale = 50.0;
    let provider = MockProvider::start(MockConfig {
        time_scale: scale,
        shape: Shape::Azure,
        ..MockConfig::default()
    })
    .await
    .expect("mock provider starts");
    let stack = LlmStack::azure_openai(30_000)
        .time_scale(scale)
        .build()
        .unwrap();
    let (ok, makespan) = through(&stack, &provider, 30, scale).await;
    let bound = Duration::from_secs_f64((30.0 * 2_000.0 - 5_000.0) / 30_000.0 * 60.0 + 5.0);
    println!("azure: {ok}/30, makespan {makespan:?}, bound {bound:?}");
    assert_eq!(ok, 30);
    assert_eq!(Stats::get(&provider.stats.throttled), 0, "zero 429s");
    assert!(makespan <= bound.mul_f64(1.1), "{makespan:?} vs {bound:?}");
}

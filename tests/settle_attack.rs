//! Outside trial: conservation of a pacer's budget across everything that
//! charges, refunds or reconciles a call's cost. Public API only; written
//! from the docs by a tester who did not read the implementation (file:line
//! references in comments are as of 35e5f70). It found no conservation
//! fault; its four doc findings (a streamed answer cut short keeps its
//! estimate, a token debt at most empties a cell, what a dropped LLM call
//! keeps, the 1 s pause of a 429 without `Retry-After`) were fixed in the
//! docs the tests cite.
#![cfg(feature = "llm")]

#[path = "support/midnight.rs"]
mod midnight;
use bytes::Bytes;
use futures::FutureExt;
use midnight::secs_to_utc_midnight;
use semaforo::classify::HttpClassifier;
use semaforo::pace::{Cost, KeyedPace, Limit, Observed, Pace, Unit};
use semaforo::BoxError;
use std::time::Duration;
use tokio::time::Instant;
use tower::{service_fn, Service, ServiceBuilder, ServiceExt};

#[path = "support/llm_stack.rs"]
mod llm_stack;

// ---------------------------------------------------------------- helpers

/// A period so long that nothing measurable refills while a test runs
/// (1 unit per 1,000 s for a limit of 100,000).
const LONG: Duration = Duration::from_secs(100_000_000);

fn avail(p: &Pace, unit: Unit) -> f64 {
    p.snapshot()
        .dims
        .iter()
        .find(|d| d.unit == unit)
        .unwrap_or_else(|| panic!("no {unit:?} dim"))
        .available
}

/// Whether a call of `cost` would start right now.
fn fits_now(p: &Pace, cost: Cost) -> bool {
    p.start_for(&cost) == Some(Instant::now())
}

/// What the inner service is asked to answer.
#[derive(Clone, Debug)]
struct Call {
    est: Cost,
    status: u16,
    usage: Option<Cost>,
    /// A `retry-after` header, if any.
    ra: Option<&'static str>,
}

impl Call {
    fn ok(est: Cost, usage: Option<Cost>) -> Self {
        Call::answered(est, 200, usage)
    }

    /// Answered `status`, with `usage` if any, without `retry-after`.
    fn answered(est: Cost, status: u16, usage: Option<Cost>) -> Self {
        Call {
            est,
            status,
            usage,
            ra: None,
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct Usage(Cost);

fn answer(c: Call) -> http::Response<Bytes> {
    let mut res = http::Response::builder().status(c.status);
    if let Some(ra) = c.ra {
        res = res.header("retry-after", ra);
    }
    let mut res = res.body(Bytes::new()).unwrap();
    if let Some(u) = c.usage {
        res.extensions_mut().insert(Usage(u));
    }
    res
}

fn observe(res: &http::Response<Bytes>) -> Observed {
    Observed {
        usage: res.extensions().get::<Usage>().map(|u| u.0),
        ..Observed::default()
    }
}

/// One call through `pace`'s layer (weighed by `Call::est`, usage from the
/// response, classified as HTTP).
async fn run(pace: &Pace, c: Call) -> Result<http::Response<Bytes>, BoxError> {
    let svc = ServiceBuilder::new()
        .layer(
            pace.layer()
                .weigh(|c: &Call| c.est)
                .observe(observe)
                .classify(HttpClassifier),
        )
        .service(service_fn(|c: Call| async move {
            Ok::<_, std::io::Error>(answer(c))
        }));
    svc.oneshot(c).await
}

async fn run_keyed(
    pace: &KeyedPace,
    key: &'static str,
    c: Call,
) -> Result<http::Response<Bytes>, BoxError> {
    let svc = ServiceBuilder::new()
        .layer(
            pace.layer()
                .key(move |_: &Call| Some(key.to_string()))
                .weigh(|c: &Call| c.est)
                .observe(observe)
                .classify(HttpClassifier),
        )
        .service(service_fn(|c: Call| async move {
            Ok::<_, std::io::Error>(answer(c))
        }));
    svc.oneshot(c).await
}

fn tpm_rpm(tokens: u64, requests: u64) -> Pace {
    Pace::builder()
        .tokens_per_minute(tokens)
        .requests_per_minute(requests)
        .build()
        .unwrap()
}

// ------------------------------------------------ reconcile on a success

/// mod.rs:30-32: "when the response says what the call really cost ... the
/// estimate is replaced on every dimension — refund or debt".
#[tokio::test(start_paused = true)]
async fn usage_larger_smaller_and_zero_replace_the_estimate_exactly() {
    let pace = tpm_rpm(1_000, 100);
    run(&pace, Call::ok(Cost::tokens(100), Some(Cost::tokens(150))))
        .await
        .unwrap();
    run(&pace, Call::ok(Cost::tokens(100), Some(Cost::tokens(40))))
        .await
        .unwrap();
    run(&pace, Call::ok(Cost::tokens(100), Some(Cost::tokens(0))))
        .await
        .unwrap();
    run(&pace, Call::ok(Cost::tokens(100), None)).await.unwrap(); // estimate stands
                                                                  // 150 + 40 + 0 + 100 = 290 tokens, 4 requests.
    assert_eq!(avail(&pace, Unit::Tokens), 710.0);
    assert_eq!(avail(&pace, Unit::Requests), 96.0);
    assert!(fits_now(&pace, Cost::tokens(710)));
    assert!(!fits_now(&pace, Cost::tokens(711)));
}

/// A usage that reports zero requests: the reconcile replaces the estimate
/// "on every dimension" — a `Cost::split` usage carries requests 1.
#[tokio::test(start_paused = true)]
async fn split_usage_with_cached_input_is_counted_per_unit() {
    let pace = Pace::builder()
        .limit(Limit::tokens_per_minute(10_000))
        .limit(Limit::input_tokens_per_minute(10_000))
        .limit(Limit::output_tokens_per_minute(10_000))
        .limit(Limit::new(
            Unit::PromptTokens,
            10_000,
            Duration::from_secs(60),
        ))
        .requests_per_minute(100)
        .build()
        .unwrap();
    let est = Cost::split(1_000, 2_000);
    let real = Cost::split(200, 300).with_cached_input(1_000);
    run(&pace, Call::ok(est, Some(real))).await.unwrap();
    assert_eq!(avail(&pace, Unit::Tokens), 10_000.0 - 1_500.0);
    assert_eq!(avail(&pace, Unit::InputTokens), 10_000.0 - 200.0);
    assert_eq!(avail(&pace, Unit::OutputTokens), 10_000.0 - 300.0);
    assert_eq!(avail(&pace, Unit::PromptTokens), 10_000.0 - 1_200.0);
    assert_eq!(avail(&pace, Unit::Requests), 99.0);
}

// ------------------------------------------------------------ 429 / 5xx

/// CHANGELOG.md:47 / mod.rs:39-42 / llm/mod.rs:254: a 429 gives its tokens
/// back (the upstream did not count them); its request stays spent.
#[tokio::test(start_paused = true)]
async fn a_429_without_usage_gives_its_tokens_back_once() {
    let pace = tpm_rpm(1_000, 100);
    run(&pace, Call::ok(Cost::tokens(300), None)).await.unwrap();
    let r = run(&pace, Call::answered(Cost::tokens(200), 429, None))
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    assert_eq!(avail(&pace, Unit::Tokens), 700.0);
    assert_eq!(avail(&pace, Unit::Requests), 98.0);
}

#[tokio::test(start_paused = true)]
async fn a_429_with_usage_gives_its_tokens_back_once() {
    let pace = tpm_rpm(1_000, 100);
    run(&pace, Call::ok(Cost::tokens(300), None)).await.unwrap();
    let r = run(
        &pace,
        Call::answered(Cost::tokens(200), 429, Some(Cost::tokens(50))),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 429);
    assert_eq!(avail(&pace, Unit::Tokens), 700.0);
    assert_eq!(avail(&pace, Unit::Requests), 98.0);
}

/// Observed::usage: "What the call really cost ... to replace the estimate";
/// CHANGELOG.md:47: "else the usage or the estimate, without spend when the
/// call failed".
#[tokio::test(start_paused = true)]
async fn a_5xx_with_usage_is_charged_its_usage_and_no_spend() {
    let pace = Pace::builder()
        .tokens_per_minute(1_000)
        .requests_per_minute(100)
        .limit(Limit::new(Unit::Spend, 10_000, LONG))
        .build()
        .unwrap();
    let r = run(
        &pace,
        Call::answered(
            Cost::tokens(200).with_spend(2_000),
            500,
            Some(Cost::tokens(50).with_spend(500)),
        ),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 500);
    let r = run(
        &pace,
        Call::answered(Cost::tokens(200).with_spend(2_000), 503, None),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(avail(&pace, Unit::Tokens), 1_000.0 - 50.0 - 200.0);
    assert_eq!(avail(&pace, Unit::Requests), 98.0);
    assert!(
        (avail(&pace, Unit::Spend) - 10_000.0).abs() < 0.01,
        "{}",
        avail(&pace, Unit::Spend)
    );
}

/// Spend: success charges the real spend; 429 and failures charge none.
#[tokio::test(start_paused = true)]
async fn spend_settles_once_per_outcome() {
    let pace = Pace::builder()
        .limit(Limit::new(Unit::Tokens, 100_000, LONG))
        .limit(Limit::new(Unit::Requests, 100_000, LONG))
        .limit(Limit::spend_per_day(10_000).resets_daily("UTC"))
        .build()
        .unwrap();
    let est = Cost::tokens(100).with_spend(1_000);
    run(
        &pace,
        Call::ok(est, Some(Cost::tokens(150).with_spend(1_500))),
    )
    .await
    .unwrap(); // 1,500
    run(&pace, Call::ok(est, Some(Cost::tokens(10).with_spend(100))))
        .await
        .unwrap(); // 100
    run(&pace, Call::ok(est, Some(Cost::tokens(10))))
        .await
        .unwrap(); // usage without spend: 0
    run(&pace, Call::ok(est, None)).await.unwrap(); // estimate: 1,000
    run(&pace, Call::answered(est, 429, None)).await.unwrap(); // 0
    run(
        &pace,
        Call::answered(est, 429, Some(Cost::tokens(10).with_spend(100))),
    )
    .await
    .unwrap(); // 0
    run(
        &pace,
        Call::answered(est, 500, Some(Cost::tokens(10).with_spend(100))),
    )
    .await
    .unwrap(); // 0
    run(&pace, Call::answered(est, 502, None)).await.unwrap(); // 0
    let spent = 1_500 + 100 + 1_000;
    assert_eq!(avail(&pace, Unit::Spend), (10_000 - spent) as f64);
    assert!(fits_now(
        &pace,
        Cost::requests(1).with_spend(10_000 - spent)
    ));
    assert!(!fits_now(
        &pace,
        Cost::requests(1).with_spend(10_000 - spent + 1)
    ));
    // Tokens: 150 + 10 + 10 + 100 + 0 + 0 + 10 + 100.
    let tok = avail(&pace, Unit::Tokens);
    assert!((tok - (100_000.0 - 380.0)).abs() < 0.01, "{tok}");
    let req = avail(&pace, Unit::Requests);
    assert!((req - (100_000.0 - 8.0)).abs() < 0.01, "{req}");
}

/// An inner error (no response, no usage): the estimate's tokens stand, its
/// spend is given back (a failed call is billed nothing).
#[tokio::test(start_paused = true)]
async fn an_inner_error_keeps_the_tokens_and_gives_the_spend_back() {
    let pace = Pace::builder()
        .tokens_per_minute(1_000)
        .limit(Limit::spend_per_day(10_000).resets_daily("UTC"))
        .build()
        .unwrap();
    let svc = ServiceBuilder::new()
        .layer(
            pace.layer()
                .weigh(|_: &()| Cost::tokens(100).with_spend(1_000)),
        )
        .service(service_fn(|_: ()| async move {
            Err::<(), BoxError>(Box::new(std::io::Error::new(
                std::io::ErrorKind::ConnectionReset,
                "reset",
            )))
        }));
    svc.oneshot(()).await.unwrap_err();
    assert_eq!(avail(&pace, Unit::Tokens), 900.0);
    assert_eq!(avail(&pace, Unit::Spend), 10_000.0);
}

// -------------------------------------------------------- cancellation

/// service.rs:618-620: "Dropped while waiting, it leaves the line (holding
/// nothing)".
#[tokio::test(start_paused = true)]
async fn a_call_dropped_while_waiting_holds_nothing() {
    let pace = tpm_rpm(1_000, 100);
    run(&pace, Call::ok(Cost::tokens(1_000), None))
        .await
        .unwrap();
    let t0 = Instant::now();
    assert_eq!(
        pace.start_for(&Cost::tokens(500)),
        Some(t0 + Duration::from_secs(30))
    );
    {
        let fut = run(&pace, Call::ok(Cost::tokens(500), None));
        let mut fut = Box::pin(fut);
        assert!((&mut fut).now_or_never().is_none());
        assert_eq!(pace.snapshot().waiting, 1);
    }
    assert_eq!(pace.snapshot().waiting, 0);
    assert_eq!(avail(&pace, Unit::Tokens), 0.0);
    assert_eq!(avail(&pace, Unit::Requests), 99.0);
    assert_eq!(
        pace.start_for(&Cost::tokens(500)),
        Some(t0 + Duration::from_secs(30))
    );
}

/// A waiter dropped after its start time passed but before it was polled
/// again (it may have reserved while others woke it).
#[tokio::test(start_paused = true)]
async fn a_waiter_dropped_at_its_start_instant_leaves_the_budget_as_if_never_there() {
    let pace = tpm_rpm(1_000, 100);
    run(&pace, Call::ok(Cost::tokens(1_000), None))
        .await
        .unwrap();
    let t0 = Instant::now();
    let mut fut = Box::pin(run(&pace, Call::ok(Cost::tokens(500), None)));
    assert!((&mut fut).now_or_never().is_none());
    tokio::time::sleep(Duration::from_secs(31)).await; // past its start; not polled
    drop(fut);
    assert_eq!(pace.snapshot().waiting, 0);
    // 31 s of refill at 1,000/60 s: 516.66…; nothing of it taken by the dropped call.
    let tok = avail(&pace, Unit::Tokens);
    let expect = 1_000.0 * 31.0 / 60.0;
    assert!(
        (tok - expect).abs() < 1e-6,
        "tokens {tok}, expected {expect}"
    );
    assert_eq!(pace.start_for(&Cost::tokens(500)), Some(Instant::now()));
    let _ = t0;
}

/// "dropped while calling, the tokens stay spent": exactly the estimate,
/// once.
#[tokio::test(start_paused = true)]
async fn a_call_dropped_while_calling_keeps_exactly_its_estimate() {
    let pace = Pace::builder()
        .tokens_per_minute(1_000)
        .requests_per_minute(100)
        .limit(Limit::spend_per_day(10_000).resets_daily("UTC"))
        .build()
        .unwrap();
    let svc = ServiceBuilder::new()
        .layer(
            pace.layer()
                .weigh(|_: &()| Cost::tokens(100).with_spend(1_000)),
        )
        .service(service_fn(|_: ()| {
            std::future::pending::<Result<(), BoxError>>()
        }));
    let mut fut = Box::pin(svc.oneshot(()));
    assert!((&mut fut).now_or_never().is_none());
    drop(fut);
    assert_eq!(avail(&pace, Unit::Tokens), 900.0);
    assert_eq!(avail(&pace, Unit::Requests), 99.0);
    let s = avail(&pace, Unit::Spend);
    assert!(s == 9_000.0 || s == 10_000.0, "spend {s}");
}

/// A response future made by `call` but never polled, then dropped: the
/// upstream never saw the call. Whatever the pacer did, it charged at most
/// the estimate once.
#[tokio::test(start_paused = true)]
async fn a_call_never_polled_charges_at_most_its_estimate() {
    let pace = tpm_rpm(1_000, 100);
    let mut svc = ServiceBuilder::new()
        .layer(pace.layer().weigh(|c: &Call| c.est).observe(observe))
        .service(service_fn(|c: Call| async move {
            Ok::<_, std::io::Error>(answer(c))
        }));
    let fut = svc
        .ready()
        .await
        .unwrap()
        .call(Call::ok(Cost::tokens(100), Some(Cost::tokens(1))));
    drop(fut);
    let tok = avail(&pace, Unit::Tokens);
    assert!(tok == 900.0 || tok == 1_000.0, "tokens {tok}");
}

// ------------------------------------------------------ saturating values

/// Cost docs (mod.rs:133-134): every sum saturates at u64::MAX; such a cost
/// fits only a limit whose burst is u64::MAX.
#[tokio::test(start_paused = true)]
async fn a_u64_max_estimate_reconciled_down_gives_back_all_but_the_usage() {
    let pace = Pace::builder()
        .limit(Limit::new(Unit::Tokens, u64::MAX, Duration::from_secs(60)))
        .build()
        .unwrap();
    run(
        &pace,
        Call::ok(Cost::split(u64::MAX, u64::MAX), Some(Cost::tokens(10))),
    )
    .await
    .unwrap();
    assert!(fits_now(
        &pace,
        Cost::tokens(u64::MAX - 10 - (u64::MAX >> 20))
    ));
    assert!(!fits_now(&pace, Cost::tokens(u64::MAX)));
    run(&pace, Call::ok(Cost::tokens(5), Some(Cost::tokens(0))))
        .await
        .unwrap();
    assert!(!fits_now(&pace, Cost::tokens(u64::MAX)));
}

/// A usage of u64::MAX on a small limit: a debt, never a wrap to a refund.
#[tokio::test(start_paused = true)]
async fn a_u64_max_usage_is_a_debt_never_a_refund() {
    let pace = tpm_rpm(1_000, 100);
    run(
        &pace,
        Call::ok(Cost::tokens(100), Some(Cost::tokens(u64::MAX))),
    )
    .await
    .unwrap();
    run(
        &pace,
        Call::ok(
            Cost::tokens(100),
            Some(Cost::split(u64::MAX, u64::MAX).with_cached_input(u64::MAX)),
        ),
    )
    .await
    .ok();
    assert_eq!(avail(&pace, Unit::Tokens), 0.0);
    assert!(!fits_now(&pace, Cost::tokens(1)));
    assert!(pace.start_for(&Cost::tokens(1)).is_some());
}

// ------------------------------------------------------------- keyed pacer

/// keyed.rs:7-13, 186-188: a call reserves on its key's cells and the shared
/// cells; reconcile "here and on the parent".
#[tokio::test(start_paused = true)]
async fn keyed_reconcile_429_and_5xx_settle_on_key_and_shared_alike() {
    let keyed = KeyedPace::builder(
        Pace::builder()
            .tokens_per_minute(1_000)
            .requests_per_minute(100),
    )
    .shared(
        Pace::builder()
            .tokens_per_minute(1_500)
            .requests_per_minute(150),
    )
    .build()
    .unwrap();
    run_keyed(
        &keyed,
        "a",
        Call::ok(Cost::tokens(100), Some(Cost::tokens(250))),
    )
    .await
    .unwrap(); // a: 250
    run_keyed(
        &keyed,
        "b",
        Call::ok(Cost::tokens(100), Some(Cost::tokens(30))),
    )
    .await
    .unwrap(); // b: 30
    run_keyed(
        &keyed,
        "a",
        Call::answered(Cost::tokens(200), 500, Some(Cost::tokens(60))),
    )
    .await
    .unwrap(); // a: 60
    run_keyed(&keyed, "b", Call::answered(Cost::tokens(200), 500, None))
        .await
        .unwrap(); // b: 200
    run_keyed(
        &keyed,
        "a",
        Call::ok(Cost::tokens(100), Some(Cost::tokens(0))),
    )
    .await
    .unwrap(); // a: 0
               // The 429s last: each pauses its key (time would then move).
    let t0 = Instant::now();
    run_keyed(&keyed, "a", Call::answered(Cost::tokens(200), 429, None))
        .await
        .unwrap(); // a: 0
    run_keyed(
        &keyed,
        "b",
        Call::answered(Cost::tokens(200), 429, Some(Cost::tokens(7))),
    )
    .await
    .unwrap(); // b: 0
    assert_eq!(Instant::now(), t0);
    let a = keyed.peek("a").unwrap();
    let b = keyed.peek("b").unwrap();
    let shared = keyed.shared().unwrap();
    assert_eq!(
        (avail(&a, Unit::Tokens), avail(&a, Unit::Requests)),
        (1_000.0 - 310.0, 96.0)
    );
    assert_eq!(
        (avail(&b, Unit::Tokens), avail(&b, Unit::Requests)),
        (1_000.0 - 230.0, 97.0)
    );
    assert_eq!(
        (avail(shared, Unit::Tokens), avail(shared, Unit::Requests)),
        (1_500.0 - 540.0, 143.0),
        "shared"
    );
}

/// mod.rs:39-42: a Throttled result pauses until its retry_after and cuts
/// the rate ×0.75; the cut frees nothing and takes nothing at the instant.
#[tokio::test(start_paused = true)]
async fn a_429_cuts_the_rate_without_moving_the_budget() {
    let pace = Pace::builder()
        .limit(Limit::new(Unit::Tokens, 100_000, LONG))
        .limit(Limit::new(Unit::Requests, 100_000, LONG))
        .build()
        .unwrap();
    let now = Instant::now();
    run(
        &pace,
        Call {
            est: Cost::tokens(200),
            status: 429,
            usage: None,
            ra: Some("0"),
        },
    )
    .await
    .unwrap();
    let s = pace.snapshot();
    assert_eq!((s.paused_until, s.rate_factor), (None, 0.75));
    assert_eq!(avail(&pace, Unit::Tokens), 100_000.0);
    assert_eq!(avail(&pace, Unit::Requests), 99_999.0);
    let pace = Pace::builder()
        .limit(Limit::new(Unit::Tokens, 100_000, LONG))
        .limit(Limit::new(Unit::Requests, 100_000, LONG))
        .build()
        .unwrap();
    run(&pace, Call::answered(Cost::tokens(200), 429, None))
        .await
        .unwrap();
    let s = pace.snapshot();
    assert_eq!(s.rate_factor, 0.75);
    assert!(s.paused_until.is_some_and(|p| p > now));
    assert_eq!(avail(&pace, Unit::Tokens), 100_000.0);
    assert_eq!(avail(&pace, Unit::Requests), 99_999.0);
}

/// A keyed call dropped while it waits for the shared cells (its key had
/// room): holds nothing on either.
#[tokio::test(start_paused = true)]
async fn keyed_waiter_dropped_on_the_shared_line_holds_nothing() {
    let keyed = KeyedPace::builder(Pace::builder().tokens_per_minute(1_000))
        .shared(Pace::builder().tokens_per_minute(1_000))
        .build()
        .unwrap();
    run_keyed(&keyed, "a", Call::ok(Cost::tokens(900), None))
        .await
        .unwrap();
    {
        let mut fut = Box::pin(run_keyed(&keyed, "b", Call::ok(Cost::tokens(500), None)));
        assert!((&mut fut).now_or_never().is_none());
    }
    let b = keyed.peek("b").unwrap();
    assert_eq!(avail(&b, Unit::Tokens), 1_000.0);
    assert_eq!(avail(keyed.shared().unwrap(), Unit::Tokens), 100.0);
    assert_eq!(avail(&keyed.peek("a").unwrap(), Unit::Tokens), 100.0);
}

/// A keyed call dropped while calling keeps exactly its estimate on both.
#[tokio::test(start_paused = true)]
async fn keyed_call_dropped_while_calling_keeps_its_estimate_on_both() {
    let keyed = KeyedPace::builder(Pace::builder().tokens_per_minute(1_000))
        .shared(Pace::builder().tokens_per_minute(1_000))
        .build()
        .unwrap();
    let svc = ServiceBuilder::new()
        .layer(
            keyed
                .layer()
                .key(|_: &()| Some("a".to_string()))
                .weigh(|_: &()| Cost::tokens(300)),
        )
        .service(service_fn(|_: ()| {
            std::future::pending::<Result<(), BoxError>>()
        }));
    let mut fut = Box::pin(svc.oneshot(()));
    assert!((&mut fut).now_or_never().is_none());
    drop(fut);
    assert_eq!(avail(&keyed.peek("a").unwrap(), Unit::Tokens), 700.0);
    assert_eq!(avail(keyed.shared().unwrap(), Unit::Tokens), 700.0);
}

// ------------------------------------------------------------ concurrency

/// Several tasks on a multi-thread runtime, mixed outcomes; the totals at
/// the end equal the sum of what each outcome settles to (limits with a
/// 3-year window: nothing measurable refills meanwhile).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_mixed_outcomes_conserve_the_budget() {
    // 0.1 unit a second refills: under 1 in the few seconds this runs.
    const N: u64 = 10_000_000;
    let pace = Pace::builder()
        .limit(Limit::new(Unit::Tokens, N, LONG))
        .limit(Limit::new(Unit::Requests, N, LONG))
        .build()
        .unwrap();
    let keyed = KeyedPace::builder(Pace::builder().limit(Limit::new(Unit::Tokens, N, LONG)))
        .shared(Pace::builder().limit(Limit::new(Unit::Tokens, N, LONG)))
        .build()
        .unwrap();
    let mut tasks = Vec::new();
    for t in 0..8u64 {
        let pace = pace.clone();
        let keyed = keyed.clone();
        tasks.push(tokio::spawn(async move {
            let mut tok = 0u64;
            for i in 0..500u64 {
                let (c, settles) = match (t + i) % 5 {
                    0 => (
                        Call::ok(Cost::tokens(100), Some(Cost::tokens(i % 7 * 30))),
                        i % 7 * 30,
                    ),
                    1 => (Call::ok(Cost::tokens(100), None), 100),
                    2 => (
                        Call {
                            est: Cost::tokens(100),
                            status: 429,
                            usage: Some(Cost::tokens(5)),
                            ra: Some("0"),
                        },
                        0,
                    ),
                    3 => (
                        Call::answered(Cost::tokens(100), 500, Some(Cost::tokens(11))),
                        11,
                    ),
                    _ => (Call::answered(Cost::tokens(100), 503, None), 100),
                };
                run(&pace, c.clone()).await.unwrap();
                let key = if i % 2 == 0 { "a" } else { "b" };
                run_keyed(&keyed, key, c).await.unwrap();
                tok += settles;
            }
            tok
        }));
    }
    let mut total = 0u64;
    for t in tasks {
        total += t.await.unwrap();
    }
    let tok = avail(&pace, Unit::Tokens);
    let expect = N as f64 - total as f64;
    assert!(
        (tok - expect).abs() < 1.0,
        "pace tokens {tok}, expected {expect}"
    );
    let req = avail(&pace, Unit::Requests);
    assert!((req - (N as f64 - 4_000.0)).abs() < 1.0, "requests {req}");
    let shared = avail(keyed.shared().unwrap(), Unit::Tokens);
    assert!(
        (shared - expect).abs() < 1.0,
        "shared tokens {shared}, expected {expect}"
    );
    let a = avail(&keyed.peek("a").unwrap(), Unit::Tokens);
    let b = avail(&keyed.peek("b").unwrap(), Unit::Tokens);
    let keys_spent = (N as f64 - a) + (N as f64 - b);
    assert!(
        (keys_spent - total as f64).abs() < 1.0,
        "keys spent {keys_spent}, expected {total}"
    );
}

// ------------------------------------------------------------- debts

/// mod.rs:30-32 "refund or debt"; DimSnapshot::available (mod.rs:281-283):
/// "a debt ... shows as 0 and as a later `full_at`"; CHANGELOG:360: "A
/// server-reported usage can at most empty a cell" (tokens).
#[tokio::test(start_paused = true)]
async fn a_token_usage_above_what_is_left_empties_the_cell() {
    let pace = Pace::builder().tokens_per_minute(1_000).build().unwrap();
    let now = Instant::now();
    run(
        &pace,
        Call::ok(Cost::tokens(100), Some(Cost::tokens(1_500))),
    )
    .await
    .unwrap();
    let d = pace.snapshot().dims[0];
    assert_eq!(d.available, 0.0);
    assert_eq!(d.full_at - now, Duration::from_secs(60));
    // Partly spent, then a usage above its estimate beyond what is left.
    let pace = Pace::builder().tokens_per_minute(1_000).build().unwrap();
    run(&pace, Call::ok(Cost::tokens(900), None)).await.unwrap();
    run(&pace, Call::ok(Cost::tokens(50), Some(Cost::tokens(300))))
        .await
        .unwrap();
    let d = pace.snapshot().dims[0];
    assert_eq!(d.available, 0.0);
    assert!(
        d.full_at - now >= Duration::from_secs(60),
        "{:?}",
        d.full_at - now
    );
}

/// A spend debt far past the pacer's 36-year clock range (mod.rs:53-54):
/// the budget must still refuse, never wrap into "free".
#[tokio::test(start_paused = true)]
async fn a_huge_spend_debt_never_frees_the_budget() {
    for real in [10_000u64 * 365 * 40, u64::MAX / 2, u64::MAX] {
        let pace = Pace::builder()
            .limit(Limit::spend_per_day(10_000))
            .build()
            .unwrap();
        run(
            &pace,
            Call::ok(
                Cost::requests(1).with_spend(1_000),
                Some(Cost::requests(1).with_spend(real)),
            ),
        )
        .await
        .unwrap();
        assert_eq!(avail(&pace, Unit::Spend), 0.0, "real {real}");
        assert_eq!(
            pace.start_for(&Cost::requests(1).with_spend(1)),
            None,
            "real {real}: a spend of 1 admitted"
        );
        let r = run(&pace, Call::ok(Cost::requests(1).with_spend(1), None)).await;
        assert!(r.is_err(), "real {real}: a spend of 1 went through");
    }
}

/// llm/mod.rs:851-852: "a debt above the estimate is owed in full".
#[tokio::test(start_paused = true)]
async fn a_spend_debt_is_owed_in_full() {
    let pace = Pace::builder()
        .limit(Limit::spend_per_day(10_000))
        .build()
        .unwrap();
    let now = Instant::now();
    run(
        &pace,
        Call::ok(
            Cost::requests(1).with_spend(1_000),
            Some(Cost::requests(1).with_spend(15_000)),
        ),
    )
    .await
    .unwrap();
    let d = pace.snapshot().dims[0];
    assert_eq!(d.available, 0.0);
    // 15,000 µ$ at 8.64 s each: 129,600 s.
    assert_eq!(d.full_at - now, Duration::from_secs(129_600));
}

// ---------------------------------------------- reconcile across midnight

/// CHANGELOG:379 / mod.rs:530-540: a calendar window: a call charged
/// before midnight and reconciled after lands in its own day only: the
/// new day's budget is unchanged by its refund or its debt.
#[tokio::test(start_paused = true)]
async fn a_reconcile_after_midnight_lands_in_the_day_it_was_charged() {
    for real in [100u64, 3_000] {
        let pace = Pace::builder()
            .limit(Limit::spend_per_day(10_000).resets_daily("UTC"))
            .build()
            .unwrap();
        let to_midnight = Duration::from_secs(secs_to_utc_midnight());
        let p2 = pace.clone();
        let slow = tokio::spawn(async move {
            let svc = ServiceBuilder::new()
                .layer(
                    p2.layer()
                        .weigh(|c: &Call| c.est)
                        .observe(observe)
                        .classify(HttpClassifier),
                )
                .service(service_fn(move |c: Call| async move {
                    tokio::time::sleep(to_midnight + Duration::from_secs(10)).await;
                    Ok::<_, std::io::Error>(answer(c))
                }));
            svc.oneshot(Call::ok(
                Cost::requests(1).with_spend(1_000),
                Some(Cost::requests(1).with_spend(real)),
            ))
            .await
            .unwrap();
        });
        tokio::time::sleep(to_midnight + Duration::from_secs(5)).await;
        // The new day: 10,000 available; spend 5,000 of it.
        assert_eq!(avail(&pace, Unit::Spend), 10_000.0, "new day");
        run(&pace, Call::ok(Cost::requests(1).with_spend(5_000), None))
            .await
            .unwrap();
        slow.await.unwrap();
        assert_eq!(
            avail(&pace, Unit::Spend),
            5_000.0,
            "real {real}: the old day's reconcile moved the new day"
        );
    }
}

// --------------------------------------------------- Deliver / Pending

#[derive(Clone)]
struct Keep;
impl semaforo::pace::Deliver<http::Response<Bytes>> for Keep {
    type Response = (http::Response<Bytes>, semaforo::pace::Pending);
    fn deliver(
        &self,
        res: http::Response<Bytes>,
        pending: semaforo::pace::PendingRef<'_>,
    ) -> Self::Response {
        (res, pending.keep())
    }
}

async fn run_keep(pace: &Pace, c: Call) -> (http::Response<Bytes>, semaforo::pace::Pending) {
    let svc = ServiceBuilder::new()
        .layer(
            pace.layer()
                .weigh(|c: &Call| c.est)
                .observe(observe)
                .classify(HttpClassifier)
                .deliver(Keep),
        )
        .service(service_fn(|c: Call| async move {
            Ok::<_, std::io::Error>(answer(c))
        }));
    svc.oneshot(c).await.unwrap()
}

/// Deliver (service.rs:109-114) / Pending::reconcile: "Replaces the
/// estimate by the real cost"; CHANGELOG:47: "a later streamed reconcile
/// starts from" what the call was settled at.
#[tokio::test(start_paused = true)]
async fn a_kept_pending_reconciles_once_from_what_was_settled() {
    let pace = tpm_rpm(1_000, 100);
    // No usage at the response: stands at 100, later 30.
    let (_r, p) = run_keep(&pace, Call::ok(Cost::tokens(100), None)).await;
    assert_eq!(avail(&pace, Unit::Tokens), 900.0);
    p.reconcile(Cost::tokens(30));
    assert_eq!(avail(&pace, Unit::Tokens), 970.0);
    // Usage 50 at the response, later 70: 70 in all.
    let (_r, p) = run_keep(&pace, Call::ok(Cost::tokens(100), Some(Cost::tokens(50)))).await;
    assert_eq!(avail(&pace, Unit::Tokens), 920.0);
    p.reconcile(Cost::tokens(70));
    assert_eq!(avail(&pace, Unit::Tokens), 900.0);
    // A kept pending dropped: what was settled stands.
    let (_r, p) = run_keep(&pace, Call::ok(Cost::tokens(100), None)).await;
    drop(p);
    assert_eq!(avail(&pace, Unit::Tokens), 800.0);
    assert_eq!(avail(&pace, Unit::Requests), 97.0);
}

/// A 429 kept for later: settled at its requests; a later reconcile starts
/// from there (the tokens were given back once).
#[tokio::test(start_paused = true)]
async fn a_kept_pending_after_a_429_does_not_refund_twice() {
    let pace = tpm_rpm(1_000, 100);
    run(&pace, Call::ok(Cost::tokens(500), None)).await.unwrap();
    let (r, p) = run_keep(
        &pace,
        Call {
            est: Cost::tokens(200),
            status: 429,
            usage: None,
            ra: Some("0"),
        },
    )
    .await;
    assert_eq!(r.status(), 429);
    assert_eq!(avail(&pace, Unit::Tokens), 500.0);
    // The later usage says 0 tokens: nothing more to give back.
    p.reconcile(Cost::requests(1));
    assert_eq!(avail(&pace, Unit::Tokens), 500.0);
    assert_eq!(avail(&pace, Unit::Requests), 98.0);
}

// ------------------------------------- concurrency with cancellations

/// Multi-thread: callers time out at random while they wait or while the
/// upstream works, usages refund and wake waiters. At the end what is
/// spent equals, per call that reached the upstream, its usage (answered)
/// or its estimate (dropped while calling) — nothing for a call that never
/// reached it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_cancellations_and_refunds_conserve_the_budget() {
    use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
    use std::sync::Arc;
    const N: u64 = 20_000; // 0.0002 a second refills
    for keyed in [false, true] {
        let pace = Pace::builder()
            .limit(Limit::new(Unit::Tokens, N, LONG))
            .build()
            .unwrap();
        let kp = KeyedPace::builder(Pace::builder().limit(Limit::new(Unit::Tokens, N, LONG)))
            .shared(Pace::builder().limit(Limit::new(Unit::Tokens, N, LONG)))
            .build()
            .unwrap();
        let spent = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for t in 0..8u64 {
            let (pace, kp, spent) = (pace.clone(), kp.clone(), spent.clone());
            tasks.push(tokio::spawn(async move {
                for i in 0..300u64 {
                    let usage = (t * 7 + i * 13) % 1_000;
                    let est = 1_000u64;
                    let spent2 = spent.clone();
                    let inner = service_fn(move |c: Call| {
                        let spent = spent2.clone();
                        async move {
                            // Counts the estimate unless answered.
                            struct Guard(Arc<AtomicU64>, u64, bool);
                            impl Drop for Guard {
                                fn drop(&mut self) {
                                    if !self.2 {
                                        self.0.fetch_add(self.1, SeqCst);
                                    }
                                }
                            }
                            let mut g = Guard(spent.clone(), c.est.amount(Unit::Tokens), false);
                            tokio::time::sleep(Duration::from_micros(
                                200 + (c.est.input_tokens % 7) * 100,
                            ))
                            .await;
                            g.2 = true;
                            spent.fetch_add(c.usage.unwrap().amount(Unit::Tokens), SeqCst);
                            Ok::<_, std::io::Error>(answer(c))
                        }
                    });
                    let c = Call::ok(Cost::tokens(est + (i % 7)), Some(Cost::tokens(usage)));
                    let deadline = Duration::from_micros(100 + (t * 31 + i * 17) % 900);
                    if keyed {
                        let key = if (t + i) % 3 == 0 { "a" } else { "b" };
                        let svc = ServiceBuilder::new()
                            .layer(
                                kp.layer()
                                    .key(move |_: &Call| Some(key.to_string()))
                                    .weigh(|c: &Call| c.est)
                                    .observe(observe),
                            )
                            .service(inner);
                        let _ = tokio::time::timeout(deadline, svc.oneshot(c)).await;
                    } else {
                        let svc = ServiceBuilder::new()
                            .layer(pace.layer().weigh(|c: &Call| c.est).observe(observe))
                            .service(inner);
                        let _ = tokio::time::timeout(deadline, svc.oneshot(c)).await;
                    }
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        let want = spent.load(SeqCst) as f64;
        if keyed {
            let sh = N as f64 - avail(kp.shared().unwrap(), Unit::Tokens);
            let keys: f64 = kp
                .pacers()
                .iter()
                .map(|(_, p)| N as f64 - avail(p, Unit::Tokens))
                .sum::<f64>()
                + (N as f64 - avail(kp.overflow(), Unit::Tokens));
            assert!(
                (sh - want).abs() < 1.0,
                "shared spent {sh}, upstream {want}"
            );
            assert!(
                (keys - want).abs() < 1.0,
                "keys spent {keys}, upstream {want}"
            );
        } else {
            let got = N as f64 - avail(&pace, Unit::Tokens);
            assert!(
                (got - want).abs() < 1.0,
                "pacer spent {got}, upstream {want}"
            );
        }
    }
}

// ============================================================ LLM preset

mod preset {
    use super::*;
    use http_body_util::combinators::UnsyncBoxBody;
    use http_body_util::{BodyExt, Full, StreamBody};
    use semaforo::backoff::{Backoff, Jitter};
    use semaforo::llm::{LlmStack, Price, PriceTable, Profile, Tier};
    use semaforo::pace::Weigh;
    use semaforo::retry::Retry;
    use std::sync::{Arc, Mutex};
    use tower::Layer;

    pub const BODY: &[u8] = br#"{"model":"m","max_tokens":100,"messages":[]}"#;
    pub const SBODY: &[u8] = br#"{"model":"m","stream":true,"stream_options":{"include_usage":true},"max_tokens":100,"messages":[]}"#;

    pub fn req(body: &'static [u8]) -> http::Request<Bytes> {
        http::Request::post("/v1/chat/completions")
            .header("content-type", "application/json")
            .body(Bytes::from_static(body))
            .unwrap()
    }

    /// Tokens, requests and micro-dollars with a 3-year window (1 unit per
    /// 1,000 s: a 1 s pause or a 1 ms backoff refills under 0.001).
    pub fn long_pace() -> Pace {
        Pace::builder()
            .limit(Limit::new(Unit::Tokens, 100_000, LONG))
            .limit(Limit::new(Unit::Requests, 100_000, LONG))
            .limit(Limit::new(Unit::Spend, 100_000, LONG))
            .build()
            .unwrap()
    }

    /// $1 per million input tokens, $0.5 cached, $2 output: 1 µ$ an input
    /// token, 2 µ$ an output token.
    pub fn prices() -> PriceTable {
        PriceTable::new().price("m", Price::per_million_tokens(1.0, 0.5, 2.0))
    }

    pub fn retry(attempts: u32) -> Retry {
        Retry::builder()
            .max_attempts(attempts)
            .no_budget()
            .backoff(
                Backoff::exponential(Duration::from_millis(1))
                    .jitter(Jitter::None)
                    .cap(Duration::from_millis(1))
                    .build()
                    .unwrap(),
            )
            .build()
            .unwrap()
    }

    pub fn stack(pace: &Pace, attempts: u32) -> LlmStack {
        LlmStack::openai(Tier {
            requests_per_minute: 500,
            tokens_per_minute: 30_000,
        })
        .pace(pace.clone())
        .prices(prices())
        .retry(retry(attempts))
        .build()
        .unwrap()
    }

    /// (tokens, requests, spend) charged: the configured 100,000 less what
    /// is available, rounded to the unit (the refill of a test is < 0.01).
    pub fn charged(p: &Pace) -> (i64, i64, i64) {
        let c = |u| {
            let a = avail(p, u);
            let spent = 100_000.0 - a;
            assert!((spent - spent.round()).abs() < 0.01, "{u:?}: {a}");
            spent.round() as i64
        };
        (c(Unit::Tokens), c(Unit::Requests), c(Unit::Spend))
    }

    pub fn json(status: u16, body: &str) -> http::Response<Bytes> {
        http::Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .body(Bytes::from(body.to_string()))
            .unwrap()
    }

    pub fn usage(p: u64, c: u64) -> String {
        format!(
            r#"{{"choices":[{{"message":{{"content":"x"}}}}],"usage":{{"prompt_tokens":{p},"completion_tokens":{c},"total_tokens":{}}}}}"#,
            p + c
        )
    }

    pub const ERR429: &str = r#"{"error":{"message":"Rate limit reached","type":"requests","code":"rate_limit_exceeded"}}"#;

    /// A client answering the scripted responses in order.
    pub fn scripted(
        answers: Vec<http::Response<Bytes>>,
    ) -> impl Service<
        http::Request<Bytes>,
        Response = http::Response<Bytes>,
        Error = std::io::Error,
        Future = impl Send,
    > + Clone
           + Send
           + Sync
           + 'static {
        let q = Arc::new(Mutex::new(std::collections::VecDeque::from(answers)));
        service_fn(move |_r: http::Request<Bytes>| {
            let next = q.lock().unwrap().pop_front().expect("a scripted answer");
            async move { Ok::<_, std::io::Error>(next) }
        })
    }

    #[tokio::test(start_paused = true)]
    async fn the_estimate_is_what_the_docs_say() {
        let pace = long_pace();
        let st = stack(&pace, 1);
        assert_eq!(
            st.estimate().weigh(&req(BODY)),
            Cost::split(0, 100).with_spend(200)
        );
    }

    /// llm/mod.rs:55-61, 848-853: reserved at the estimate, reconciled with
    /// the answer's usage (tokens and priced spend).
    #[tokio::test(start_paused = true)]
    async fn whole_answers_settle_at_their_usage() {
        let pace = long_pace();
        let st = stack(&pace, 1);
        let client = scripted(vec![
            json(200, &usage(10, 300)),     // 310 tok, 10 + 600 µ$
            json(200, &usage(0, 5)),        // 5 tok, 10 µ$
            json(200, &usage(0, 0)),        // 0, 0
            json(200, r#"{"choices":[]}"#), // no usage: estimate 100 tok, 200 µ$
        ]);
        let svc = st.layer().layer(client);
        for _ in 0..4 {
            assert_eq!(svc.clone().oneshot(req(BODY)).await.unwrap().status(), 200);
        }
        assert_eq!(charged(&pace), ((310 + 5) + 100, 4, (610 + 10) + 200));
    }

    /// llm/mod.rs:254, 852-853: "a 429 gives back everything"; a call that
    /// failed is billed nothing; CHANGELOG:47: the 429's request stays.
    #[tokio::test(start_paused = true)]
    async fn a_429_with_and_without_usage_gives_back_tokens_and_spend() {
        let pace = long_pace();
        let st = stack(&pace, 1);
        let with_usage = r#"{"error":{"message":"Rate limit reached","code":"rate_limit_exceeded"},"usage":{"prompt_tokens":3,"completion_tokens":40}}"#;
        let client = scripted(vec![json(429, ERR429), json(429, with_usage)]);
        let svc = st.layer().layer(client);
        for _ in 0..2 {
            // Or handed on as an error (the retry layer gave up).
            if let Ok(r) = svc.clone().oneshot(req(BODY)).await {
                assert_eq!(r.status(), 429);
            }
        }
        assert_eq!(charged(&pace), (0, 2, 0));
    }

    /// ObserveResponse (service.rs:53): usage is read from a successful
    /// answer only; a failed call is billed nothing (spend), its tokens
    /// stand at the estimate.
    #[tokio::test(start_paused = true)]
    async fn a_5xx_with_usage_keeps_the_estimated_tokens_and_no_spend() {
        let pace = long_pace();
        let st = stack(&pace, 1);
        let with_usage = r#"{"error":{"message":"boom","type":"server_error"},"usage":{"prompt_tokens":3,"completion_tokens":40}}"#;
        let client = scripted(vec![json(500, with_usage), json(503, "{}")]);
        let svc = st.layer().layer(client);
        for _ in 0..2 {
            let _ = svc.clone().oneshot(req(BODY)).await;
        }
        let (tok, rq, spend) = charged(&pace);
        assert_eq!((rq, spend), (2, 0));
        // Either the estimate (100) or the usage (43) for the first.
        assert!(tok == 200 || tok == 143, "tokens {tok}");
    }

    /// llm/mod.rs:38-40: "pace inside retry: every attempt pays for its
    /// tokens"; each attempt settles on its own outcome.
    #[tokio::test(start_paused = true)]
    async fn retries_through_the_preset_settle_each_attempt_once() {
        let pace = long_pace();
        let st = stack(&pace, 4);
        let client = scripted(vec![
            json(429, ERR429), // 0 tok, 1 req, 0 µ$
            json(500, r#"{"error":{"message":"boom","type":"server_error"}}"#), // 100 tok (estimate), 0 µ$
            json(429, ERR429),                                                  // 0
            json(200, &usage(7, 50)), // 57 tok, 7 + 100 µ$
        ]);
        let svc = st.layer().layer(client);
        assert_eq!(svc.oneshot(req(BODY)).await.unwrap().status(), 200);
        assert_eq!(charged(&pace), (100 + 57, 4, 107));
    }

    /// A keyed preset (one pacer per model) with shared limits: the model's
    /// pacer and the shared one settle alike.
    #[tokio::test(start_paused = true)]
    async fn keyed_preset_with_shared_limits_settles_on_both() {
        let st = LlmStack::openai(Tier {
            requests_per_minute: 100_000,
            tokens_per_minute: 100_000,
        })
        .model(
            "m",
            Profile::openai(Tier {
                requests_per_minute: 100_000,
                tokens_per_minute: 100_000,
            }),
        )
        .shared_limit(Limit::new(Unit::Tokens, 100_000, LONG))
        .shared_limit(Limit::new(Unit::Requests, 100_000, LONG))
        .shared_limit(Limit::new(Unit::Spend, 100_000, LONG))
        .prices(prices())
        .retry(retry(3))
        .build()
        .unwrap();
        let client = scripted(vec![
            json(200, &usage(10, 300)),     // 310, 610
            json(200, &usage(0, 0)),        // 0, 0
            json(429, ERR429),              // 0, 0 (retried)
            json(200, &usage(0, 5)),        // 5, 10
            json(503, "{}"),                // 100, 0 (retried)
            json(200, r#"{"choices":[]}"#), // 100, 200
        ]);
        let svc = st.layer().layer(client);
        for _ in 0..4 {
            assert_eq!(svc.clone().oneshot(req(BODY)).await.unwrap().status(), 200);
        }
        let (tok, rq, spend) = (310 + 5 + 100 + 100, 6, 610 + 10 + 200);
        let shared = st.pace().shared().unwrap();
        assert_eq!(charged(shared), (tok, rq, spend), "shared");
        // The model's own pacer: per-minute cells, time moved by the 429's
        // pause and the backoffs; compare at the instant through capacity.
        assert!(st.pace().peek("m").is_some(), "the model has its pacer");
    }

    /// The model's pacer on a frozen instant (no retries, no 429).
    #[tokio::test(start_paused = true)]
    async fn keyed_preset_model_pacer_settles_like_the_shared_one() {
        let st = LlmStack::openai(Tier {
            requests_per_minute: 1_000,
            tokens_per_minute: 10_000,
        })
        .shared_limit(Limit::tokens_per_minute(20_000))
        .prices(prices())
        .retry(retry(1))
        .build()
        .unwrap();
        let client = scripted(vec![
            json(200, &usage(10, 300)),
            json(200, &usage(0, 0)),
            json(503, "{}"),
            json(200, r#"{"choices":[]}"#),
        ]);
        let svc = st.layer().layer(client);
        for _ in 0..4 {
            let _ = svc.clone().oneshot(req(BODY)).await;
        }
        let m = st.pace().peek("m").unwrap();
        let tok = |p: &Pace| {
            let d = p
                .snapshot()
                .dims
                .into_iter()
                .find(|d| d.unit == Unit::Tokens)
                .unwrap();
            d.capacity - d.available
        };
        let expect = (310 + 100 + 100) as f64;
        assert_eq!(tok(&m), expect, "model");
        assert_eq!(tok(st.pace().shared().unwrap()), expect, "shared");
        let rq = m
            .snapshot()
            .dims
            .into_iter()
            .find(|d| d.unit == Unit::Requests)
            .unwrap();
        assert_eq!(rq.capacity - rq.available, 4.0);
    }

    // ---------------------------------------------------------- streams

    pub type SBody = UnsyncBoxBody<Bytes, std::io::Error>;

    pub fn full(s: &str) -> SBody {
        Full::new(Bytes::from(s.to_string()))
            .map_err(|e: std::convert::Infallible| match e {})
            .boxed_unsync()
    }

    pub fn sse_ok(p: u64, c: u64) -> String {
        format!(
            "data: {{\"choices\":[{{\"delta\":{{\"content\":\"hola\"}}}}]}}\n\n\
             data: {{\"choices\":[],\"usage\":{{\"prompt_tokens\":{p},\"completion_tokens\":{c},\"total_tokens\":{}}}}}\n\n\
             data: [DONE]\n\n",
            p + c
        )
    }

    /// A client handing out prepared (status, body) answers in order.
    pub fn stream_client(
        answers: Vec<(u16, SBody)>,
    ) -> impl Service<
        http::Request<Bytes>,
        Response = http::Response<SBody>,
        Error = std::io::Error,
        Future = impl Send,
    > + Clone
           + Send
           + Sync
           + 'static {
        let q = Arc::new(Mutex::new(std::collections::VecDeque::from(answers)));
        service_fn(move |_r: http::Request<Bytes>| {
            let (status, body) = q.lock().unwrap().pop_front().expect("a scripted answer");
            let res = http::Response::builder()
                .status(status)
                .header(
                    "content-type",
                    if status == 200 {
                        "text/event-stream"
                    } else {
                        "application/json"
                    },
                )
                .body(body)
                .unwrap();
            async move { Ok::<_, std::io::Error>(res) }
        })
    }
    pub use crate::llm_stack::read_like_hyper;

    /// LlmStack::stream_layer (llm/mod.rs:72-80, 311-313): "reconciles the
    /// pacer with the stream's usage" when the body ends whole; read the
    /// way hyper reads it (stop at `is_end_stream`).
    #[tokio::test(start_paused = true)]
    async fn a_stream_read_to_its_end_like_hyper_settles_at_its_usage() {
        let pace = long_pace();
        let st = stack(&pace, 1);
        let svc = st
            .stream_layer()
            .layer(stream_client(vec![(200, full(&sse_ok(10, 30)))]));
        let res = svc.oneshot(req(SBODY)).await.unwrap();
        let (bytes, failed) = read_like_hyper(res.into_body()).await;
        assert!(!bytes.is_empty() && failed.is_none());
        tokio::task::yield_now().await;
        assert_eq!(charged(&pace), (40, 1, 10 + 60));
    }

    /// The same stream read until `frame()` answers `None`.
    #[tokio::test(start_paused = true)]
    async fn a_stream_collected_to_none_settles_at_its_usage() {
        let pace = long_pace();
        let st = stack(&pace, 1);
        let svc = st
            .stream_layer()
            .layer(stream_client(vec![(200, full(&sse_ok(10, 30)))]));
        let res = svc.oneshot(req(SBODY)).await.unwrap();
        res.into_body().collect().await.unwrap();
        assert_eq!(charged(&pace), (40, 1, 70));
    }

    /// A chunked stream (is_end_stream false until the end) dropped after
    /// its usage chunk but before its end: the estimate stands (service.rs:
    /// 161-166, 181-184), once.
    #[tokio::test(start_paused = true)]
    async fn a_stream_dropped_midway_keeps_its_estimate() {
        let pace = long_pace();
        let st = stack(&pace, 1);
        let (tx, rx) =
            futures::channel::mpsc::unbounded::<Result<http_body::Frame<Bytes>, std::io::Error>>();
        let body = StreamBody::new(rx).boxed_unsync();
        let svc = st.stream_layer().layer(stream_client(vec![(200, body)]));
        let res = svc.oneshot(req(SBODY)).await.unwrap();
        let mut body = res.into_body();
        let chunk = "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":2,\"total_tokens\":3}}\n\n";
        tx.unbounded_send(Ok(http_body::Frame::data(Bytes::from(chunk))))
            .unwrap();
        let f = body.frame().await.unwrap().unwrap();
        assert!(f.is_data());
        drop(body);
        tokio::task::yield_now().await;
        assert_eq!(charged(&pace), (100, 1, 200));
    }

    /// A chunked stream read to its end (the sender closes): its usage.
    #[tokio::test(start_paused = true)]
    async fn a_chunked_stream_read_to_its_end_settles_at_its_usage() {
        let pace = long_pace();
        let st = stack(&pace, 1);
        let (tx, rx) =
            futures::channel::mpsc::unbounded::<Result<http_body::Frame<Bytes>, std::io::Error>>();
        let body = StreamBody::new(rx).boxed_unsync();
        let svc = st.stream_layer().layer(stream_client(vec![(200, body)]));
        let res = svc.oneshot(req(SBODY)).await.unwrap();
        for part in sse_ok(20, 70).split_inclusive("\n\n") {
            tx.unbounded_send(Ok(http_body::Frame::data(Bytes::from(part.to_string()))))
                .unwrap();
        }
        drop(tx);
        read_like_hyper(res.into_body()).await;
        tokio::task::yield_now().await;
        assert_eq!(charged(&pace), (90, 1, 20 + 140));
    }

    /// A streamed request answered 429: tokens and spend back, the request
    /// stays.
    #[tokio::test(start_paused = true)]
    async fn a_stream_answered_429_gives_back_tokens_and_spend() {
        let pace = long_pace();
        let st = stack(&pace, 1);
        let svc = st
            .stream_layer()
            .layer(stream_client(vec![(429, full(ERR429))]));
        // Or handed on as an error (the retry layer gave up).
        if let Ok(res) = svc.oneshot(req(SBODY)).await {
            read_like_hyper(res.into_body()).await;
        }
        tokio::task::yield_now().await;
        assert_eq!(charged(&pace), (0, 1, 0));
    }

    /// LlmFuture (service.rs:413-414): dropping the future at any point
    /// releases what the call held; at most the estimate, once.
    #[tokio::test(start_paused = true)]
    async fn a_preset_call_dropped_in_flight_charges_at_most_its_estimate() {
        let pace = long_pace();
        let st = stack(&pace, 1);
        let client = service_fn(|_r: http::Request<Bytes>| {
            std::future::pending::<Result<http::Response<Bytes>, std::io::Error>>()
        });
        let svc = st.layer().layer(client);
        let mut fut = Box::pin(svc.oneshot(req(BODY)));
        assert!((&mut fut).now_or_never().is_none());
        drop(fut);
        tokio::task::yield_now().await;
        let c = charged(&pace);
        // Sent upstream: the whole estimate stays, spend included
        // (LlmFuture's docs).
        assert_eq!(c, (100, 1, 200));
    }

    // ---------------------------------------------------- budget layer

    /// LlmStack::budget_layer (llm/mod.rs:250-257): reserves the estimate on
    /// the key's pacer, reconciled with its priced usage; a failed call is
    /// billed nothing; a 429 gives back everything.
    #[tokio::test(start_paused = true)]
    async fn a_user_budget_settles_success_429_and_5xx() {
        let st = LlmStack::openai(Tier {
            requests_per_minute: 100_000,
            tokens_per_minute: 10_000_000,
        })
        .prices(prices())
        .retry(retry(1))
        .build()
        .unwrap();
        let users = KeyedPace::builder(
            Pace::builder().limit(Limit::spend_per_day(100_000).resets_daily("UTC")),
        )
        .build()
        .unwrap();
        let client = scripted(vec![
            json(200, &usage(10, 300)), // 610
            json(429, ERR429),          // 0
            json(
                500,
                r#"{"error":{"message":"boom","type":"server_error"},"usage":{"prompt_tokens":3,"completion_tokens":40}}"#,
            ), // 0
            json(200, r#"{"choices":[]}"#), // estimate 200
            json(200, &usage(0, 0)),    // 0
        ]);
        let svc = ServiceBuilder::new()
            .layer(st.budget_layer(&users, http::HeaderName::from_static("x-user-id")))
            .layer(st.layer())
            .service(client);
        for _ in 0..5 {
            let mut r = req(BODY);
            r.headers_mut()
                .insert("x-user-id", http::HeaderValue::from_static("ana"));
            let _ = svc.clone().oneshot(r).await;
        }
        let ana = users.peek("ana").unwrap();
        assert_eq!(avail(&ana, Unit::Spend), (100_000 - 610 - 200) as f64);
    }
}

mod preset_more {
    use super::preset::*;
    use super::*;
    use http_body_util::{BodyExt, StreamBody};
    use semaforo::llm::{LlmStack, Tier};
    use tower::Layer;

    /// A stream that reports its usage, then an `event: error` (a failure
    /// mid-stream): it did not end whole, so its estimate stands, spend
    /// included (service.rs:161-166, 181-184: "one cut short (dropped,
    /// failed, timed out) ... the estimate stands"; llm/mod.rs:311-313). (The
    /// general "a call that failed is billed nothing", llm/mod.rs:852-853,
    /// does not apply to a stream that failed after its headers.)
    #[tokio::test(start_paused = true)]
    async fn a_stream_failing_midway_keeps_its_whole_estimate_spend_included() {
        let pace = long_pace();
        let st = stack(&pace, 1);
        let sse = "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":2,\"total_tokens\":3}}\n\n\
                   event: error\ndata: {\"error\":{\"message\":\"overloaded\",\"type\":\"server_error\"}}\n\n";
        let svc = st
            .stream_layer()
            .layer(stream_client(vec![(200, full(sse))]));
        let res = svc.oneshot(req(SBODY)).await.unwrap();
        let mut body = res.into_body();
        let mut failed = false;
        while let Some(f) = body.frame().await {
            if f.is_err() {
                failed = true;
                break;
            }
        }
        assert!(failed);
        drop(body);
        tokio::task::yield_now().await;
        assert_eq!(charged(&pace), (100, 1, 200));
    }

    /// A keyed streaming preset with shared limits: one stream dropped
    /// midway (estimate), one read to its end like hyper (usage), on the
    /// model's pacer and the shared one.
    #[tokio::test(start_paused = true)]
    async fn keyed_streams_settle_on_model_and_shared() {
        let st = LlmStack::openai(Tier {
            requests_per_minute: 1_000,
            tokens_per_minute: 10_000,
        })
        .shared_limit(Limit::tokens_per_minute(20_000))
        .shared_limit(Limit::spend_per_day(100_000))
        .prices(prices())
        .retry(retry(1))
        .build()
        .unwrap();
        let (tx, rx) =
            futures::channel::mpsc::unbounded::<Result<http_body::Frame<Bytes>, std::io::Error>>();
        let client = stream_client(vec![
            (200, StreamBody::new(rx).boxed_unsync()),
            (200, full(&sse_ok(10, 30))),
        ]);
        let svc = st.stream_layer().layer(client);
        let a = svc.clone().oneshot(req(SBODY)).await.unwrap();
        tx.unbounded_send(Ok(http_body::Frame::data(Bytes::from_static(
            b"data: {\"choices\":[]}\n\n",
        ))))
        .unwrap();
        let mut a = a.into_body();
        a.frame().await.unwrap().unwrap();
        drop(a); // estimate: 100 tokens, 200 µ$
        let b = svc.clone().oneshot(req(SBODY)).await.unwrap();
        read_like_hyper(b.into_body()).await; // 40 tokens, 70 µ$
        tokio::task::yield_now().await;
        let spent = |p: &Pace, u: Unit| {
            let d = p.snapshot().dims.into_iter().find(|d| d.unit == u).unwrap();
            d.capacity - d.available
        };
        let m = st.pace().peek("m").unwrap();
        let shared = st.pace().shared().unwrap();
        assert_eq!(spent(&m, Unit::Tokens), 140.0, "model tokens");
        assert_eq!(spent(&m, Unit::Requests), 2.0, "model requests");
        assert_eq!(spent(shared, Unit::Tokens), 140.0, "shared tokens");
        assert_eq!(spent(shared, Unit::Spend), 270.0, "shared spend");
    }

    /// Retries through the preset when the spend budget refuses an attempt:
    /// a refused attempt charges nothing (mod.rs:26-29: "reserving nothing").
    #[tokio::test(start_paused = true)]
    async fn an_attempt_refused_by_the_budget_charges_nothing() {
        let pace = Pace::builder()
            .limit(Limit::new(Unit::Tokens, 100_000, LONG))
            .limit(Limit::new(Unit::Requests, 100_000, LONG))
            .limit(Limit::spend_per_day(300))
            .build()
            .unwrap();
        let st = stack(&pace, 3);
        // First call: 200 µ$ reserved, settled at 0 (a 500, then usage 0 on
        // the retry). Second call: 200 fits, answered with 90 µ$ of usage.
        let client = scripted(vec![
            json(500, r#"{"error":{"message":"boom","type":"server_error"}}"#),
            json(200, &usage(0, 0)),
            json(200, &usage(0, 45)),
        ]);
        let svc = st.layer().layer(client);
        assert_eq!(svc.clone().oneshot(req(BODY)).await.unwrap().status(), 200);
        assert_eq!(svc.clone().oneshot(req(BODY)).await.unwrap().status(), 200);
        // 90 µ$ spent: a call of 210 fits, 211 does not.
        assert_eq!(avail(&pace, Unit::Spend).round(), 210.0);
        assert!(fits_now(&pace, Cost::requests(1).with_spend(210)));
        assert_eq!(pace.start_for(&Cost::requests(1).with_spend(211)), None);
        // A third call (150 output tokens: 300 µ$) is refused before it is
        // sent (no scripted answer is left for it); nothing charged.
        let e = svc
            .clone()
            .oneshot(req(br#"{"model":"m","max_tokens":150,"messages":[]}"#))
            .await
            .unwrap_err();
        assert!(semaforo::Rejected::from_box(&e).is_some(), "{e}");
        assert_eq!(avail(&pace, Unit::Spend).round(), 210.0);
        let tok = 100_000.0 - avail(&pace, Unit::Tokens);
        assert!((tok - (100.0 + 0.0 + 45.0)).abs() < 0.01, "tokens {tok}");
    }
}

mod more {
    use super::preset::*;
    use super::*;
    use semaforo::llm::{LlmStack, Tier};
    use tower::Layer;

    /// keyed.rs:194-200: keys past `max_keys` share the overflow pacer,
    /// which "also reserves on the shared limits" (keyed.rs:55-58).
    #[tokio::test(start_paused = true)]
    async fn keys_past_max_keys_settle_on_the_overflow_and_shared() {
        let keyed = KeyedPace::builder(Pace::builder().tokens_per_minute(1_000))
            .shared(Pace::builder().tokens_per_minute(5_000))
            .max_keys(1)
            .build()
            .unwrap();
        run_keyed(
            &keyed,
            "a",
            Call::ok(Cost::tokens(100), Some(Cost::tokens(70))),
        )
        .await
        .unwrap();
        run_keyed(
            &keyed,
            "b",
            Call::ok(Cost::tokens(100), Some(Cost::tokens(20))),
        )
        .await
        .unwrap();
        run_keyed(
            &keyed,
            "c",
            Call {
                est: Cost::tokens(300),
                status: 429,
                usage: None,
                ra: Some("0"),
            },
        )
        .await
        .unwrap();
        run_keyed(
            &keyed,
            "d",
            Call::answered(Cost::tokens(300), 500, Some(Cost::tokens(9))),
        )
        .await
        .unwrap();
        assert_eq!(keyed.keys(), vec!["a".to_string()]);
        assert_eq!(avail(&keyed.peek("a").unwrap(), Unit::Tokens), 930.0);
        assert_eq!(avail(keyed.overflow(), Unit::Tokens), 1_000.0 - 29.0);
        assert_eq!(avail(keyed.shared().unwrap(), Unit::Tokens), 5_000.0 - 99.0);
    }

    /// Pace::close (mod.rs:1033-1037) refuses new calls; a call already in
    /// flight still settles at its usage.
    #[tokio::test(start_paused = true)]
    async fn a_call_in_flight_at_close_still_settles() {
        let pace = tpm_rpm(1_000, 100);
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let rx = std::sync::Arc::new(std::sync::Mutex::new(Some(rx)));
        let svc = ServiceBuilder::new()
            .layer(
                pace.layer()
                    .weigh(|c: &Call| c.est)
                    .observe(observe)
                    .classify(HttpClassifier),
            )
            .service(service_fn(move |c: Call| {
                let rx = rx.lock().unwrap().take().unwrap();
                async move {
                    let _ = rx.await;
                    Ok::<_, std::io::Error>(answer(c))
                }
            }));
        let h = tokio::spawn(svc.oneshot(Call::ok(Cost::tokens(400), Some(Cost::tokens(10)))));
        tokio::task::yield_now().await;
        assert_eq!(avail(&pace, Unit::Tokens), 600.0);
        pace.close();
        tx.send(()).unwrap();
        h.await.unwrap().unwrap();
        assert_eq!(avail(&pace, Unit::Tokens), 990.0);
        assert_eq!(avail(&pace, Unit::Requests), 99.0);
    }

    /// The preset's attempt timeout (innermost, llm/mod.rs:41): the attempt
    /// failed — its tokens stand at the estimate (the upstream may have
    /// worked), its spend is billed nothing (llm/mod.rs:852-853).
    #[tokio::test(start_paused = true)]
    async fn an_attempt_timed_out_keeps_its_tokens_and_bills_nothing() {
        let pace = long_pace();
        let st = LlmStack::openai(Tier {
            requests_per_minute: 500,
            tokens_per_minute: 30_000,
        })
        .pace(pace.clone())
        .prices(prices())
        .retry(retry(2))
        .timeout(
            semaforo::timeout::Timeout::builder()
                .attempt(Duration::from_millis(50))
                .build()
                .unwrap(),
        )
        .build()
        .unwrap();
        let client = service_fn(|_r: http::Request<Bytes>| {
            std::future::pending::<Result<http::Response<Bytes>, std::io::Error>>()
        });
        st.layer()
            .layer(client)
            .oneshot(req(BODY))
            .await
            .unwrap_err();
        assert_eq!(charged(&pace), (200, 2, 0));
    }
}

mod stream_budget {
    use super::preset::*;
    use super::*;
    use http_body_util::{BodyExt, StreamBody};
    use semaforo::llm::{LlmStack, Tier};

    /// LlmStack::stream_budget_layer (llm/mod.rs:311-313): "a streamed
    /// answer is reconciled when its body ends whole (cut short, its
    /// estimate stands)" — on the user's budget and the stack's pacer.
    #[tokio::test(start_paused = true)]
    async fn a_user_stream_budget_settles_whole_and_cut_streams() {
        let pace = long_pace();
        let st = LlmStack::openai(Tier {
            requests_per_minute: 500,
            tokens_per_minute: 30_000,
        })
        .pace(pace.clone())
        .prices(prices())
        .retry(retry(1))
        .build()
        .unwrap();
        let users = KeyedPace::builder(
            Pace::builder().limit(Limit::spend_per_day(100_000).resets_daily("UTC")),
        )
        .build()
        .unwrap();
        let (tx, rx) =
            futures::channel::mpsc::unbounded::<Result<http_body::Frame<Bytes>, std::io::Error>>();
        let client = stream_client(vec![
            (200, full(&sse_ok(10, 30))),              // 70 µ$, 40 tokens
            (200, StreamBody::new(rx).boxed_unsync()), // cut: 200 µ$, 100 tokens
            (200, full(&sse_ok(0, 0))),                // 0
        ]);
        let svc = ServiceBuilder::new()
            .layer(st.stream_budget_layer(&users, http::HeaderName::from_static("x-user-id")))
            .layer(st.stream_layer())
            .service(client);
        let call = || {
            let mut r = req(SBODY);
            r.headers_mut()
                .insert("x-user-id", http::HeaderValue::from_static("ana"));
            r
        };
        read_like_hyper(svc.clone().oneshot(call()).await.unwrap().into_body()).await;
        let res = svc.clone().oneshot(call()).await.unwrap();
        tx.unbounded_send(Ok(http_body::Frame::data(Bytes::from_static(
            b"data: {\"choices\":[]}\n\n",
        ))))
        .unwrap();
        let mut b = res.into_body();
        b.frame().await.unwrap().unwrap();
        drop(b);
        read_like_hyper(svc.clone().oneshot(call()).await.unwrap().into_body()).await;
        tokio::task::yield_now().await;
        assert_eq!(
            avail(&users.peek("ana").unwrap(), Unit::Spend),
            (100_000 - 70 - 200) as f64,
            "user"
        );
        assert_eq!(charged(&pace), (140, 3, 270), "stack");
    }
}

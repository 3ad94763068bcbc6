//! Spend limits in dollars: a call reserves its largest spend (prompt
//! estimate and `max_tokens` at its model's prices), is refused before it is
//! sent when the budget cannot pay it — with the exact time until it can —
//! and is reconciled with the spend of its real usage, both ways. Rolling and
//! calendar days (tokio time, paused; the wall clock read once at build).
#![cfg(feature = "llm")]

#[path = "support/midnight.rs"]
mod midnight;
use bytes::Bytes;
use midnight::until_utc_midnight;
use semaforo::llm::{LlmStack, Price, PriceTable, Profile, Tier};
use semaforo::pace::{Cost, Limit, Pace, Unit};
use semaforo::{RejectKind, Rejected};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tower::{Layer, ServiceExt};

/// $1.00 per million input tokens, $2.00 per million output tokens.
fn prices() -> PriceTable {
    PriceTable::new().price("m", Price::per_million_tokens(1.0, 0.5, 2.0))
}

/// A call of model "m" with no prompt and `max_tokens` 100,000: at most
/// 100,000 × $2.00 / 1M = $0.20.
fn call() -> http::Request<Bytes> {
    http::Request::post("/v1/chat/completions")
        .body(Bytes::from_static(
            br#"{"model":"m","max_tokens":100000,"messages":[]}"#,
        ))
        .expect("a request")
}

/// A provider answering `output` output tokens (set by the test), counting
/// the calls it saw.
#[derive(Clone, Default)]
struct Provider {
    seen: Arc<AtomicUsize>,
    output: Arc<AtomicU64>,
}

impl Provider {
    fn client(
        &self,
    ) -> impl tower::Service<
        http::Request<Bytes>,
        Response = http::Response<Bytes>,
        Error = std::io::Error,
        Future = impl Send,
    > + Clone
           + Send {
        let me = self.clone();
        tower::service_fn(move |_req: http::Request<Bytes>| {
            let me = me.clone();
            async move {
                me.seen.fetch_add(1, Ordering::SeqCst);
                let out = me.output.load(Ordering::SeqCst);
                let body = format!(
                    r#"{{"usage":{{"prompt_tokens":0,"completion_tokens":{out},"total_tokens":{out}}}}}"#
                );
                Ok::<_, std::io::Error>(http::Response::new(Bytes::from(body)))
            }
        })
    }
}

fn stack(budget: Limit) -> LlmStack {
    LlmStack::with_profile(Profile::openai(Tier {
        requests_per_minute: 10_000,
        tokens_per_minute: 100_000_000,
    }))
    .prices(prices())
    .shared_limit(budget)
    .build()
    .unwrap()
}

/// Micro-dollars left in the stack's spend budget.
fn left(stack: &LlmStack) -> f64 {
    stack
        .pace()
        .shared()
        .expect("a shared budget")
        .snapshot()
        .dims
        .iter()
        .find(|d| d.unit == Unit::Spend)
        .map(|d| d.available)
        .expect("a spend limit")
}

/// `$1.00` a rolling day: five calls of $0.20 fit, the sixth is refused
/// before it is sent, with the exact time until $0.20 is back (a fifth of a
/// day: 17,280 s).
#[tokio::test(start_paused = true)]
async fn a_rolling_dollar_a_day_refuses_the_call_that_would_exceed_it() {
    let stack = stack(Limit::spend_per_day(1_000_000));
    let provider = Provider::default();
    provider.output.store(100_000, Ordering::SeqCst);
    let svc = stack.layer().layer(provider.client());
    for _ in 0..5 {
        svc.clone().oneshot(call()).await.unwrap();
    }
    assert_eq!(left(&stack), 0.0);
    let err = svc.clone().oneshot(call()).await.unwrap_err();
    let r = Rejected::from_box(&err).expect("refused by the budget");
    assert_eq!(r.kind(), RejectKind::BudgetExceeded);
    assert_eq!(r.retry_after(), Some(Duration::from_secs(17_280)));
    assert_eq!(provider.seen.load(Ordering::SeqCst), 5, "never sent");
    // After exactly that long, it goes.
    tokio::time::advance(Duration::from_secs(17_280)).await;
    svc.oneshot(call()).await.unwrap();
    assert_eq!(provider.seen.load(Ordering::SeqCst), 6);
}

/// Reconciliation moves the dollar cell both ways: an answer shorter than
/// `max_tokens` gives the difference back, a prompt billed above its
/// estimate takes more.
#[tokio::test(start_paused = true)]
async fn reconciliation_moves_the_dollar_cell_both_ways() {
    let stack = stack(Limit::spend_per_day(1_000_000));
    let provider = Provider::default();
    let svc = stack.layer().layer(provider.client());
    // Reserved $0.20, billed 25,000 output tokens: $0.05.
    provider.output.store(25_000, Ordering::SeqCst);
    svc.clone().oneshot(call()).await.unwrap();
    assert_eq!(left(&stack), 950_000.0);
    // Billed above the reservation (a provider counting more than asked):
    // 150,000 output tokens, $0.30.
    provider.output.store(150_000, Ordering::SeqCst);
    svc.clone().oneshot(call()).await.unwrap();
    assert_eq!(left(&stack), 650_000.0);
    // Reserved and billed exactly: $0.20 each; three fit in $0.65, not four.
    provider.output.store(100_000, Ordering::SeqCst);
    for _ in 0..3 {
        svc.clone().oneshot(call()).await.unwrap();
    }
    assert_eq!(left(&stack), 50_000.0);
    let err = svc.oneshot(call()).await.unwrap_err();
    let r = Rejected::from_box(&err).unwrap();
    // $0.15 missing at $1.00 a day: 0.15 × 86,400 s.
    assert_eq!(r.retry_after(), Some(Duration::from_secs(12_960)));
}

/// `$1.00` a calendar day (UTC): the call that would exceed it is refused
/// until midnight, and the whole dollar is back at midnight.
#[tokio::test(start_paused = true)]
async fn a_calendar_day_refuses_until_midnight_then_has_the_whole_dollar() {
    let expected = until_utc_midnight();
    let stack = stack(Limit::spend_per_day(1_000_000).resets_daily("UTC"));
    let provider = Provider::default();
    provider.output.store(100_000, Ordering::SeqCst);
    let svc = stack.layer().layer(provider.client());
    for _ in 0..5 {
        svc.clone().oneshot(call()).await.unwrap();
    }
    let err = svc.clone().oneshot(call()).await.unwrap_err();
    let r = Rejected::from_box(&err).unwrap();
    assert_eq!(r.kind(), RejectKind::BudgetExceeded);
    let wait = r.retry_after().expect("until midnight").as_secs_f64();
    // The wall clock moved a little (real time) since `expected` was read.
    assert!(
        (wait - expected).abs() < 2.0,
        "retry after {wait} s, midnight in {expected} s"
    );
    assert_eq!(provider.seen.load(Ordering::SeqCst), 5);
    tokio::time::advance(r.retry_after().unwrap()).await;
    assert_eq!(left(&stack), 1_000_000.0, "the whole dollar at midnight");
    for _ in 0..5 {
        svc.clone().oneshot(call()).await.unwrap();
    }
    assert!(svc.oneshot(call()).await.is_err());
}

/// A call that could never be paid (its largest spend above the whole
/// budget) is refused without a retry-after, as a request too large.
#[tokio::test(start_paused = true)]
async fn a_call_above_the_whole_budget_is_refused_for_good() {
    let stack = stack(Limit::spend_per_day(100_000)); // $0.10
    let provider = Provider::default();
    let svc = stack.layer().layer(provider.client());
    let err = svc.oneshot(call()).await.unwrap_err();
    let r = Rejected::from_box(&err).unwrap();
    assert_eq!(
        (r.kind(), r.retry_after()),
        (RejectKind::BudgetExceeded, None)
    );
    assert_eq!(provider.seen.load(Ordering::SeqCst), 0);
}

/// The spend limit of a plain pacer: `Cost::spend` as the user weighs it.
#[tokio::test(start_paused = true)]
async fn a_pacer_counts_spend_in_micro_dollars() {
    let pace = Pace::builder()
        .limit(Limit::spend_per_month(3_000_000).resets_monthly("Europe/Madrid"))
        .build()
        .unwrap();
    let svc = pace
        .layer()
        .weigh(|n: &u64| Cost::requests(1).with_spend(*n))
        .layer(tower::service_fn(|n: u64| async move {
            Ok::<_, std::io::Error>(n)
        }));
    svc.clone().oneshot(2_000_000).await.unwrap();
    svc.clone().oneshot(1_000_000).await.unwrap();
    let err = svc.oneshot(1).await.unwrap_err();
    let r = Rejected::from_box(&err).unwrap();
    let wait = r.retry_after().unwrap();
    // Until the first of next month in Madrid: at most 31 days.
    assert!(
        wait > Duration::ZERO && wait <= Duration::from_secs(31 * 86_400),
        "{wait:?}"
    );
}

/// A dollar a day per user (`x-user-id`), around the preset: one user's
/// budget spent does not touch another's; answers shorter than `max_tokens`
/// give their difference back to their user; streamed answers too.
#[tokio::test(start_paused = true)]
async fn a_dollar_a_day_per_user_around_the_preset() {
    use http_body_util::{BodyExt, Full};
    use semaforo::pace::KeyedPace;
    let stack = LlmStack::with_profile(Profile::openai(Tier {
        requests_per_minute: 10_000,
        tokens_per_minute: 100_000_000,
    }))
    .prices(prices())
    .build()
    .unwrap();
    let users = KeyedPace::builder(Pace::builder().limit(Limit::spend_per_day(1_000_000)))
        .build()
        .unwrap();
    let provider = Provider::default();
    let user = http::HeaderName::from_static("x-user-id");
    let svc = stack
        .budget_layer(&users, user.clone())
        .layer(stack.layer().layer(provider.client()));
    let as_user = |user: &str| {
        let mut req = call();
        req.headers_mut().insert("x-user-id", user.parse().unwrap());
        req
    };
    let left = |user: &str| users.peek(user).unwrap().snapshot().dims[0].available;
    provider.output.store(100_000, Ordering::SeqCst);
    for _ in 0..5 {
        svc.clone().oneshot(as_user("ana")).await.unwrap();
    }
    assert!(svc.clone().oneshot(as_user("ana")).await.is_err());
    // Luis has his own dollar; his short answer gives $0.15 back.
    provider.output.store(25_000, Ordering::SeqCst);
    svc.clone().oneshot(as_user("luis")).await.unwrap();
    assert_eq!(left("luis"), 950_000.0);
    assert_eq!(left("ana"), 0.0);

    // Streamed: the usage arrives in the body; reconciled when it ends.
    let sse = "data: {\"choices\":[{\"delta\":{\"content\":\"hola\"}}]}\n\n\
               data: {\"choices\":[],\"usage\":{\"prompt_tokens\":0,\"completion_tokens\":50000,\"total_tokens\":50000}}\n\n\
               data: [DONE]\n\n";
    let streamer = tower::service_fn(move |_req: http::Request<Bytes>| async move {
        Ok::<_, std::io::Error>(http::Response::new(Full::new(Bytes::from(sse))))
    });
    let streams = stack
        .stream_budget_layer(&users, user.clone())
        .layer(stack.stream_layer().layer(streamer));
    let res = streams.oneshot(as_user("eva")).await.unwrap();
    // Reserved $0.20 while the body flows…
    assert_eq!(left("eva"), 800_000.0);
    res.into_body().collect().await.unwrap();
    // …billed 50,000 output tokens: $0.10.
    assert_eq!(left("eva"), 900_000.0);

    // A call the provider refuses (400: nothing billed) costs its user nothing.
    let refusing = tower::service_fn(|_req: http::Request<Bytes>| async {
        let body = r#"{"error":{"type":"invalid_request_error","message":"bad"}}"#;
        Ok::<_, std::io::Error>(
            http::Response::builder()
                .status(400)
                .body(Bytes::from_static(body.as_bytes()))
                .unwrap(),
        )
    });
    let failing = stack
        .budget_layer(&users, user)
        .layer(stack.layer().layer(refusing));
    let res = failing.oneshot(as_user("eva")).await.unwrap();
    assert_eq!(res.status(), 400);
    assert_eq!(left("eva"), 900_000.0);
}

//! At the edges (from an outside attack): spend in the LLM preset: pricing, per-model vs
//! shared budgets, failures, time_scale, Gemini.
#![cfg(feature = "llm")]

use bytes::Bytes;
use semaforo::llm::{usage_cost, LlmStack, Price, PriceTable, Profile, Prompt, Tier};
use semaforo::pace::{Cost, Limit, Pace, Unit};
use semaforo::retry::Retry;
use semaforo::{RejectKind, Rejected};
use std::sync::atomic::{AtomicU16, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tower::{Layer, ServiceExt};

#[derive(Clone)]
struct Provider {
    seen: Arc<AtomicUsize>,
    output: Arc<AtomicU64>,
    status: Arc<AtomicU16>,
    gemini: bool,
}

impl Provider {
    fn new(gemini: bool) -> Self {
        Provider {
            seen: Default::default(),
            output: Default::default(),
            status: Arc::new(AtomicU16::new(200)),
            gemini,
        }
    }

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
                let status = me.status.load(Ordering::SeqCst);
                let body = if status != 200 {
                    r#"{"error":{"message":"boom","type":"server_error"}}"#.to_string()
                } else if me.gemini {
                    format!(
                        r#"{{"usageMetadata":{{"promptTokenCount":1,"candidatesTokenCount":{out},"totalTokenCount":{}}}}}"#,
                        out + 1
                    )
                } else {
                    format!(
                        r#"{{"usage":{{"prompt_tokens":0,"completion_tokens":{out},"total_tokens":{out}}}}}"#
                    )
                };
                Ok::<_, std::io::Error>(
                    http::Response::builder()
                        .status(status)
                        .body(Bytes::from(body))
                        .unwrap(),
                )
            }
        })
    }
}

fn openai_call(model: &str, max_tokens: u64) -> http::Request<Bytes> {
    http::Request::post("/v1/chat/completions")
        .body(Bytes::from(format!(
            r#"{{"model":"{model}","max_tokens":{max_tokens},"messages":[]}}"#
        )))
        .unwrap()
}

fn spend_left(p: &Pace) -> f64 {
    p.snapshot()
        .dims
        .iter()
        .find(|d| d.unit == Unit::Spend)
        .map(|d| d.available)
        .unwrap()
}

fn big() -> Tier {
    Tier {
        requests_per_minute: 10_000,
        tokens_per_minute: 100_000_000,
    }
}

/// The Gemini API's native request: the model is in the URL, the output
/// maximum in `generationConfig.maxOutputTokens`. Neither is read: the
/// call is priced as "no model" (free without a fallback) and reserves the
/// profile's 65,536 output tokens whatever maxOutputTokens says.
#[tokio::test(start_paused = true)]
async fn gemini_native_requests_are_not_priced() {
    let native = Bytes::from_static(
        br#"{"contents":[{"role":"user","parts":[{"text":"hola"}]}],"generationConfig":{"maxOutputTokens":100}}"#,
    );
    let p = Prompt::read(native.clone());
    eprintln!(
        "native prompt: model {:?}, max_output {:?}",
        p.model(),
        p.max_output()
    );
    let stack = LlmStack::gemini(1_000, 1_000_000, 1_000)
        .shared_limit(Limit::spend_per_day(1_000_000))
        .retry(Retry::builder().max_attempts(1).build().unwrap())
        .build()
        .unwrap();
    let provider = Provider::new(true);
    provider.output.store(100_000, Ordering::SeqCst); // $1.00 each at gemini-2.5-pro's $10/M
    let svc = stack.layer().layer(provider.client());
    let mut ok = 0;
    for _ in 0..5 {
        let req = http::Request::post("/v1beta/models/gemini-2.5-pro:generateContent")
            .body(native.clone())
            .unwrap();
        if svc.clone().oneshot(req).await.is_ok() {
            ok += 1;
        }
    }
    let left = spend_left(stack.pace().shared().unwrap());
    assert!(
        ok <= 1,
        "{ok} calls of $1.00 (gemini-2.5-pro) went under a $1/day budget; spend left {left}"
    );
}

/// A spend limit in the stack's profile is per model name, as every limit of
/// a profile (each model gets its pacer): four names, four dollars. A
/// dollar for the account is a `shared_limit`.
#[tokio::test(start_paused = true)]
async fn a_profile_spend_limit_is_per_model_and_a_shared_one_per_account() {
    let names = [
        "gpt-4o",
        "gpt-4o-2024-08-06",
        "gpt-4o-2024-11-20",
        "gpt-4o-2024-05-13",
    ];
    let run = |stack: LlmStack| async move {
        let provider = Provider::new(false);
        provider.output.store(20_000, Ordering::SeqCst);
        let svc = stack.layer().layer(provider.client());
        let mut ok = 0;
        for model in names {
            for _ in 0..6 {
                if svc
                    .clone()
                    .oneshot(openai_call(model, 20_000))
                    .await
                    .is_ok()
                {
                    ok += 1;
                }
            }
        }
        ok
    };
    let per_model =
        LlmStack::with_profile(Profile::openai(big()).limit(Limit::spend_per_day(1_000_000)))
            .retry(Retry::builder().max_attempts(1).build().unwrap())
            .build()
            .unwrap();
    // $0.20 a call ($10/M output), $0.30 for the 2024-05-13 snapshot ($15/M):
    // 5 + 5 + 5 + 3 calls fit in a dollar each.
    assert_eq!(run(per_model).await, 18);
    let shared = LlmStack::with_profile(Profile::openai(big()))
        .shared_limit(Limit::spend_per_day(1_000_000))
        .retry(Retry::builder().max_attempts(1).build().unwrap())
        .build()
        .unwrap();
    assert_eq!(run(shared).await, 5);
}

/// A call that fails (500, nothing billed) keeps its whole reservation on
/// the spend budget; with the default retries, one failing logical call
/// eats four reservations.
#[tokio::test(start_paused = true)]
async fn failed_calls_keep_their_spend() {
    let stack = LlmStack::openai(big())
        .shared_limit(Limit::spend_per_day(1_000_000))
        .build()
        .unwrap();
    let provider = Provider::new(false);
    provider.status.store(500, Ordering::SeqCst);
    let svc = stack.layer().layer(provider.client());
    let _ = svc.clone().oneshot(openai_call("gpt-4o", 20_000)).await;
    let left = spend_left(stack.pace().shared().unwrap());
    eprintln!("attempts {}", provider.seen.load(Ordering::SeqCst));
    assert_eq!(
        left, 1_000_000.0,
        "nothing was billed, yet the budget shrank"
    );
}

/// time_scale: a rolling $1 a (simulated) day at ×10 refuses with the
/// exact retry_after in real time: $0.20 missing is 1,728 s.
#[tokio::test(start_paused = true)]
async fn time_scale_retry_after_is_exact() {
    let stack = LlmStack::openai(big())
        .time_scale(10.0)
        .shared_limit(Limit::spend_per_day(1_000_000))
        .retry(Retry::builder().max_attempts(1).build().unwrap())
        .build()
        .unwrap();
    let provider = Provider::new(false);
    provider.output.store(20_000, Ordering::SeqCst);
    let svc = stack.layer().layer(provider.client());
    for _ in 0..5 {
        svc.clone()
            .oneshot(openai_call("gpt-4o", 20_000))
            .await
            .unwrap();
    }
    let e = svc
        .clone()
        .oneshot(openai_call("gpt-4o", 20_000))
        .await
        .unwrap_err();
    let r = Rejected::from_box(&e).unwrap();
    assert_eq!(r.kind(), RejectKind::BudgetExceeded);
    assert_eq!(r.retry_after(), Some(Duration::from_secs(1_728)));
    tokio::time::advance(Duration::from_secs(1_728)).await;
    svc.clone()
        .oneshot(openai_call("gpt-4o", 20_000))
        .await
        .unwrap();
}

/// Gemini's RPD resets at midnight Pacific: the third call of an RPD of 2
/// is refused (preset max_wait 10 min) with retry_after = until midnight
/// less 10 min, and goes at midnight.
#[tokio::test(start_paused = true)]
async fn gemini_rpd_resets_at_pacific_midnight() {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    // PST (UTC−8) from November to March: midnight is 08:00 UTC.
    let until = (8.0 * 3_600.0 - now % 86_400.0).rem_euclid(86_400.0);
    let stack = LlmStack::gemini(1_000, 1_000_000, 2)
        .retry(Retry::builder().max_attempts(1).build().unwrap())
        .build()
        .unwrap();
    let provider = Provider::new(false);
    let svc = stack.layer().layer(provider.client());
    let call = || openai_call("gemini-2.5-flash", 10);
    svc.clone().oneshot(call()).await.unwrap();
    svc.clone().oneshot(call()).await.unwrap();
    let e = svc.clone().oneshot(call()).await.unwrap_err();
    let r = Rejected::from_box(&e).unwrap();
    let ra = r.retry_after().unwrap().as_secs_f64();
    assert!(
        (ra - (until - 600.0)).abs() < 2.0,
        "retry_after {ra}, midnight PT in {until}"
    );
    tokio::time::advance(r.retry_after().unwrap()).await;
    let t = tokio::time::Instant::now();
    svc.clone().oneshot(call()).await.unwrap();
    let waited = t.elapsed().as_secs_f64();
    assert!((waited - 600.0).abs() < 0.01, "waited {waited}");
}

/// Snapshot matching: `-` and a digit is taken for a date, but model
/// versions use the same shape (claude-opus-4 vs claude-opus-4-5, 3× cheaper).
#[test]
fn price_table_prefixes() {
    let opus4 = Price::per_million_tokens(15.0, 1.5, 75.0);
    let t = PriceTable::new().price("claude-opus-4", opus4);
    eprintln!("claude-opus-4-5 priced as {:?}", t.get("claude-opus-4-5"));
    eprintln!("claude-opus-4-1 priced as {:?}", t.get("claude-opus-4-1"));
    let e = PriceTable::new().price("", Price::per_million_tokens(1.0, 1.0, 1.0));
    eprintln!(
        "'' table: get('-1') = {:?}, get('x') = {:?}",
        e.get("-1"),
        e.get("x")
    );
    let d = PriceTable::defaults();
    eprintln!(
        "gpt-4o-2024-05-13 ($5/$15 at OpenAI) priced as {:?}",
        d.get("gpt-4o-2024-05-13")
    );
    eprintln!(
        "GPT-4o: {:?}; gemini-2.5-flash-lite: {:?}; models/gemini-2.5-pro: {:?}",
        d.get("GPT-4o"),
        d.get("gemini-2.5-flash-lite"),
        d.get("models/gemini-2.5-pro")
    );
    assert_eq!(
        t.get("claude-opus-4-5"),
        None,
        "another model priced as claude-opus-4"
    );
}

/// Price arithmetic extremes.
#[test]
fn price_extremes() {
    let max = Price {
        input: u64::MAX,
        cached_input: u64::MAX,
        output: u64::MAX,
    };
    assert_eq!(max.of(&Cost::split(1, 0)), u64::MAX.div_ceil(1_000_000));
    assert_eq!(max.of(&Cost::split(u64::MAX, u64::MAX)), u64::MAX);
    for x in [
        f64::NAN,
        f64::NEG_INFINITY,
        -0.0,
        -1e-300,
        f64::MIN_POSITIVE,
        1e300,
        f64::INFINITY,
        4.9999e-7,
        5e-7,
    ] {
        let p = Price::per_million_tokens(x, x, x);
        eprintln!("{x:e} -> {p:?}");
    }
    assert_eq!(Price::per_million_tokens(1e300, 0.0, 0.0).input, u64::MAX);
    // Anthropic's cache writes are billed at 1.25× input: the preset
    // prices them as input.
    let sonnet = PriceTable::defaults().get("claude-sonnet-4-5").unwrap();
    let c = usage_cost(br#"{"usage":{"input_tokens":0,"cache_creation_input_tokens":1000000,"cache_read_input_tokens":0,"output_tokens":0}}"#).unwrap();
    eprintln!(
        "1M cache-write tokens on sonnet priced {} µ$ (billed 3,750,000)",
        sonnet.of(&c)
    );
}

/// A price of u64::MAX and a max_tokens of u64::MAX through the preset:
/// refused for good, no panic.
#[tokio::test(start_paused = true)]
async fn preset_extreme_prices() {
    let max = Price {
        input: u64::MAX,
        cached_input: u64::MAX,
        output: u64::MAX,
    };
    let stack = LlmStack::openai(big())
        .prices(PriceTable::new().fallback(max))
        .shared_limit(Limit::spend_per_day(u64::MAX))
        .retry(Retry::builder().max_attempts(1).build().unwrap())
        .build()
        .unwrap();
    let provider = Provider::new(false);
    provider.output.store(u64::MAX, Ordering::SeqCst);
    let svc = stack.layer().layer(provider.client());
    for mt in [0u64, 1, 1_000_000, u64::MAX] {
        let r = svc.clone().oneshot(openai_call("x", mt)).await;
        eprintln!(
            "max_tokens {mt}: {:?}",
            r.map(|r| r.status()).map_err(|e| e.to_string())
        );
    }
    eprintln!("left {}", spend_left(stack.pace().shared().unwrap()));
}

/// Configurations at the edges: errors, never panics.
#[tokio::test(start_paused = true)]
async fn edge_configurations() {
    let r = LlmStack::gemini(0, 0, 0).build();
    eprintln!("gemini(0,0,0): {:?}", r.err().map(|e| e.to_string()));
    let r = LlmStack::gemini(1, 1, 1)
        .shared_limit(Limit::spend_per_day(0))
        .build();
    eprintln!("spend 0: {:?}", r.err().map(|e| e.to_string()));
    let r = LlmStack::gemini(1, 1, 1)
        .shared_limit(Limit::spend_per_day(1).resets_daily("Nowhere/Land"))
        .build();
    eprintln!("bad zone shared: {:?}", r.err().map(|e| e.to_string()));
    let r = LlmStack::with_profile(
        Profile::gemini(1, 1, 1).limit(Limit::spend_per_month(5).resets_monthly("")),
    )
    .build();
    eprintln!("bad zone profile: {:?}", r.err().map(|e| e.to_string()));
    let r = LlmStack::gemini(u64::MAX, u64::MAX, u64::MAX)
        .time_scale(1e6)
        .build();
    eprintln!(
        "max gemini ×1e6: {:?}",
        r.as_ref().err().map(|e| e.to_string())
    );
    let r = LlmStack::gemini(1, 1, 1)
        .time_scale(1e-3)
        .shared_limit(Limit::spend_per_day(u64::MAX).max_wait(Duration::MAX))
        .build();
    eprintln!(
        "scale 1e-3, max_wait MAX: {:?}",
        r.as_ref().err().map(|e| e.to_string())
    );
    // A time-scaled Gemini: the RPD resets at the real midnight Pacific.
    let stack = LlmStack::gemini(1_000, 1_000_000, 1)
        .time_scale(10.0)
        .retry(Retry::builder().max_attempts(1).build().unwrap())
        .build()
        .unwrap();
    let provider = Provider::new(false);
    let svc = stack.layer().layer(provider.client());
    svc.clone()
        .oneshot(openai_call("gemini-2.5-flash", 1))
        .await
        .unwrap();
    let e = svc
        .clone()
        .oneshot(openai_call("gemini-2.5-flash", 1))
        .await
        .unwrap_err();
    eprintln!("scaled gemini RPD: {e}");
}

/// The preset: a shared `$1 a day` and two models at 1 RPM each. Calls
/// queued in each model's line are admitted against the shared budget
/// without counting the other model's line: $1.60 is admitted, and the
/// late calls wait hours for the budget (the preset's max_wait is 10 min).
#[tokio::test(start_paused = true)]
async fn preset_shared_spend_over_admits_across_models() {
    let p = Price::per_million_tokens(0.0, 0.0, 10.0);
    let stack = LlmStack::openai(Tier {
        requests_per_minute: 1,
        tokens_per_minute: 100_000_000,
    })
    .prices(PriceTable::new().price("a", p).price("b", p))
    .shared_limit(Limit::spend_per_day(1_000_000))
    .retry(Retry::builder().max_attempts(1).build().unwrap())
    .build()
    .unwrap();
    let provider = Provider::new(false);
    provider.output.store(20_000, Ordering::SeqCst);
    let svc = stack.layer().layer(provider.client());
    let t0 = tokio::time::Instant::now();
    let mut tasks = Vec::new();
    for i in 0..8 {
        let s = svc.clone();
        let model = if i % 2 == 0 { "a" } else { "b" };
        tasks.push(tokio::spawn(async move {
            let r = s.oneshot(openai_call(model, 20_000)).await;
            (r.is_ok(), t0.elapsed())
        }));
        tokio::task::yield_now().await;
    }
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    eprintln!("{out:?}");
    assert!(
        out.iter()
            .all(|(ok, at)| !ok || *at <= Duration::from_secs(600)),
        "calls under a spend budget and max_wait 10 min started after hours: {out:?}"
    );
}

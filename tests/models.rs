//! The LLM preset per model: each model paced by its own profile, the sum by
//! an org-wide limit, and prompt estimates that learn each model's
//! characters per token — against a simulated account enforcing exactly that
//! (tokio time, paused).
#![cfg(feature = "llm")]

#[path = "support/account.rs"]
mod account;

use account::{Account, Counts, Shape};
use bytes::Bytes;
use semaforo::llm::{LlmStack, Profile, Tier};
use semaforo::pace::{KeyedPace, Limit, Pace, Unit};
use std::time::Duration;
use tokio::time::Instant;
use tower::{Layer, Service, ServiceBuilder, ServiceExt};

const SERVICE: Duration = Duration::from_secs(2);

fn chat(model: &str, prompt: &str, max_tokens: u64) -> http::Request<Bytes> {
    let body = format!(
        r#"{{"model":"{model}","max_tokens":{max_tokens},"messages":[{{"role":"user","content":"{prompt}"}}]}}"#
    );
    http::Request::post("/v1/chat/completions")
        .body(Bytes::from(body))
        .expect("a request")
}

fn tier(rpm: u64, tpm: u64) -> Tier {
    Tier {
        requests_per_minute: rpm,
        tokens_per_minute: tpm,
    }
}

fn available(pace: &Pace, unit: Unit) -> f64 {
    pace.snapshot()
        .dims
        .iter()
        .find(|d| d.unit == unit)
        .map(|d| d.available)
        .expect("the unit is paced")
}

/// Three models with their own token limits and an org-wide one, 10 calls
/// of 2,000 tokens each at once: no 429, and the makespan of the binding
/// budgets (each model's and the org's).
#[tokio::test(start_paused = true)]
async fn three_models_are_paced_by_their_own_budget_and_the_sum_by_the_org() {
    let account = Account::per_model(
        Shape::OpenAi,
        &[
            (Some("a"), Counts::Tokens, 10_000, 10_000),
            (Some("b"), Counts::Tokens, 20_000, 20_000),
            (Some("c"), Counts::Tokens, 30_000, 30_000),
            (None, Counts::Tokens, 30_000, 30_000),
        ],
        SERVICE,
    );
    let stack = LlmStack::openai(tier(10_000, 10_000))
        .model("b", Profile::openai(tier(10_000, 20_000)))
        .model("c", Profile::openai(tier(10_000, 30_000)))
        .shared_limit(Limit::tokens_per_minute(30_000).headroom(5))
        .build()
        .unwrap();
    let svc = ServiceBuilder::new()
        .layer(stack.layer())
        .service(account.service());
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for model in ["a", "b", "c"] {
        for _ in 0..10 {
            let svc = svc.clone();
            tasks.push(tokio::spawn(async move {
                let res = svc.oneshot(chat(model, "", 2_000)).await;
                (res.map(|r| r.status().as_u16()).ok(), t0.elapsed())
            }));
        }
    }
    let mut makespan = Duration::ZERO;
    for t in tasks {
        let (status, at) = t.await.unwrap();
        assert_eq!(status, Some(200));
        makespan = makespan.max(at);
    }
    assert_eq!(account.throttled(), 0, "no 429");
    assert_eq!(account.accepted(), 30);
    // The org's 60,000 tokens: a burst of 28,500 (5 % headroom), the rest at
    // 30,000 a minute; "a"'s 20,000: a burst of 9,500, the rest at 10,000 a
    // minute. Both bind at about a minute.
    let org = (60_000.0 - 28_500.0) / 30_000.0 * 60.0;
    let a = (20_000.0 - 9_500.0) / 10_000.0 * 60.0;
    let bound = f64::max(org, a) + SERVICE.as_secs_f64();
    let got = makespan.as_secs_f64();
    println!("three models: makespan {got:.1} s, bound {bound:.1} s");
    assert!(got <= 1.05 * bound, "{got} > 1.05 × {bound}");
    // One pacer per model, plus the shared one.
    assert_eq!(stack.pace().keys(), ["a", "b", "c"]);
    assert!(stack.pace().shared().is_some());
}

/// A model at its limit holds back only its own callers: 30 calls of "a"
/// wait for minutes, yet "b"'s calls sent behind them start at once.
#[tokio::test(start_paused = true)]
async fn a_model_at_its_limit_does_not_hold_back_another() {
    let account = Account::per_model(
        Shape::OpenAi,
        &[
            (Some("a"), Counts::Tokens, 10_000, 10_000),
            (Some("b"), Counts::Tokens, 10_000, 10_000),
            (None, Counts::Tokens, 100_000, 100_000),
        ],
        SERVICE,
    );
    // Enough permits that the bulkhead does not hold anyone.
    let stack = LlmStack::openai(tier(10_000, 10_000))
        .bulkhead(semaforo::bulkhead::Bulkhead::builder(64).build().unwrap())
        .shared_limit(Limit::tokens_per_minute(100_000))
        .build()
        .unwrap();
    let svc = ServiceBuilder::new()
        .layer(stack.layer())
        .service(account.service());
    let t0 = Instant::now();
    let a: Vec<_> = (0..30)
        .map(|_| {
            let svc = svc.clone();
            tokio::spawn(async move {
                svc.oneshot(chat("a", "", 2_000))
                    .await
                    .map(|_| t0.elapsed())
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(10)).await;
    let b: Vec<_> = (0..4)
        .map(|_| {
            let svc = svc.clone();
            tokio::spawn(async move {
                svc.oneshot(chat("b", "", 2_000))
                    .await
                    .map(|_| t0.elapsed())
            })
        })
        .collect();
    let mut b_last = Duration::ZERO;
    for t in b {
        b_last = b_last.max(t.await.unwrap().unwrap());
    }
    let mut a_last = Duration::ZERO;
    for t in a {
        a_last = a_last.max(t.await.unwrap().unwrap());
    }
    println!("a's 30 calls end at {a_last:?}, b's 4 at {b_last:?}");
    // b: 8,000 tokens of its 9,500 burst: answered one service time after
    // it was sent.
    assert!(b_last <= SERVICE + Duration::from_millis(100), "{b_last:?}");
    // a: 60,000 tokens at 10,000 a minute.
    assert!(a_last >= Duration::from_secs(5 * 60), "{a_last:?}");
    assert_eq!(account.throttled(), 0);
}

/// The preset with a pacer of 10M tokens a minute without headroom (a full
/// bucket shows what a call takes from it).
fn learning_stack() -> LlmStack {
    let models = KeyedPace::builder(Pace::builder().tokens_per_minute(10_000_000))
        .build()
        .unwrap();
    LlmStack::openai(tier(100_000, 1_000_000))
        .pace(models)
        .build()
        .unwrap()
}

/// The reservation of one call of `model` with `prompt`: what its model's
/// pacer holds while the call is upstream (`max_tokens` 0: input only).
async fn reserved<S>(stack: &LlmStack, svc: &mut S, model: &str, prompt: &str) -> u64
where
    S: Service<http::Request<Bytes>, Response = http::Response<Bytes>, Error = semaforo::BoxError>,
{
    let pace = stack.pace().get(Some(model));
    let before = available(&pace, Unit::Tokens);
    let call = svc.ready().await.unwrap().call(chat(model, prompt, 0));
    let mut call = Box::pin(call);
    // Upstream for SERVICE: look once it has left the pacer, before any
    // time passes (the bucket would refill).
    for _ in 0..20 {
        tokio::select! {
            biased;
            _ = &mut call => panic!("answered before it was looked at"),
            _ = tokio::task::yield_now() => {}
        }
    }
    let during = available(&pace, Unit::Tokens);
    call.await.unwrap();
    (before - during).round() as u64
}

/// A model whose real ratio is 3.2 characters per token: after 20 calls the
/// reservation is within 5 % of the billed prompt; then the ratio changes to
/// 2.5 and is followed; answers with a prompt of 0 tokens or no usage teach
/// nothing.
#[tokio::test(start_paused = true)]
async fn the_estimate_learns_each_models_characters_per_token() {
    let account = Account::new(
        Shape::OpenAi,
        &[(Counts::Tokens, 1_000_000, 1_000_000)],
        SERVICE,
    );
    account.set_chars_per_token(3.2);
    let stack = learning_stack();
    let mut svc = ServiceBuilder::new()
        .layer(stack.layer())
        .service(account.service());
    // Spanish-like text of 6,400 characters: 2,000 billed tokens at 3.2.
    let prompt = "¿dónde está? ".repeat(492);
    let chars = prompt.chars().count() as f64;
    let billed = |ratio: f64| (chars / ratio).ceil();
    let first = reserved(&stack, &mut svc, "m", &prompt).await;
    println!("first reservation {first}, billed {}", billed(3.2));
    for _ in 0..19 {
        svc.ready()
            .await
            .unwrap()
            .call(chat("m", &prompt, 0))
            .await
            .unwrap();
    }
    let after = reserved(&stack, &mut svc, "m", &prompt).await as f64;
    println!(
        "after 20 calls: reservation {after}, billed {}",
        billed(3.2)
    );
    assert!(
        (after - billed(3.2)).abs() <= 0.05 * billed(3.2),
        "{after} vs {}",
        billed(3.2)
    );
    // Another model has learned nothing: characters ÷ 4.
    let other = reserved(&stack, &mut svc, "n", &prompt).await as f64;
    assert!(
        (other - (prompt.chars().count() as f64 / 4.0).ceil()).abs() <= 1.0,
        "{other}"
    );

    // The ratio changes: followed within 20 calls.
    account.set_chars_per_token(2.5);
    for _ in 0..20 {
        svc.ready()
            .await
            .unwrap()
            .call(chat("m", &prompt, 0))
            .await
            .unwrap();
    }
    let changed = reserved(&stack, &mut svc, "m", &prompt).await as f64;
    println!(
        "after the change: reservation {changed}, billed {}",
        billed(2.5)
    );
    assert!(
        (changed - billed(2.5)).abs() <= 0.05 * billed(2.5),
        "{changed}"
    );
}

/// Answers reporting a prompt of 0 tokens, or no usage at all, leave the
/// learned ratio where it was; a streamed answer that ends whole teaches it.
#[tokio::test(start_paused = true)]
async fn zero_or_missing_usage_does_not_poison_the_estimate_and_streams_teach_it() {
    use http_body_util::{BodyExt, Full};
    let stack = learning_stack();
    let answers = [
        r#"{"usage":{"prompt_tokens":0,"completion_tokens":0,"total_tokens":0}}"#,
        r#"{"choices":[]}"#,
        r#"not json"#,
        r#"{"usage":{"prompt_tokens":"many"}}"#,
    ];
    let prompt = "a".repeat(4_000);
    for answer in answers {
        let client = tower::service_fn(move |_req: http::Request<Bytes>| async move {
            tokio::time::sleep(SERVICE).await;
            Ok::<_, std::io::Error>(http::Response::new(Bytes::from(answer)))
        });
        let mut svc = stack.layer().layer(client);
        assert_eq!(
            reserved(&stack, &mut svc, "m", &prompt).await,
            1_000,
            "after {answer}"
        );
        let _ = svc.ready().await.unwrap().call(chat("m", &prompt, 0)).await;
    }
    let client = tower::service_fn(|_req: http::Request<Bytes>| async {
        tokio::time::sleep(SERVICE).await;
        Ok::<_, std::io::Error>(http::Response::new(Bytes::new()))
    });
    let mut svc = stack.layer().layer(client);
    assert_eq!(reserved(&stack, &mut svc, "m", &prompt).await, 1_000);

    // A stream reporting 2,000 prompt tokens for 4,000 characters (2.0).
    let sse = "data: {\"choices\":[{\"delta\":{\"content\":\"hola\"}}]}\n\n\
               data: {\"choices\":[],\"usage\":{\"prompt_tokens\":2000,\"completion_tokens\":1,\"total_tokens\":2001}}\n\n\
               data: [DONE]\n\n";
    let streamer = tower::service_fn(move |_req: http::Request<Bytes>| async move {
        Ok::<_, std::io::Error>(http::Response::new(Full::new(Bytes::from(sse))))
    });
    let streams = stack.stream_layer().layer(streamer);
    // Cut short: teaches nothing.
    let res = streams
        .clone()
        .oneshot(chat("m", &prompt, 0))
        .await
        .unwrap();
    drop(res);
    assert_eq!(reserved(&stack, &mut svc, "m", &prompt).await, 1_000);
    // Read to its end: 4.0 → 4.0 + 0.2 × (2.0 − 4.0) = 3.6 characters a token.
    let res = streams.oneshot(chat("m", &prompt, 0)).await.unwrap();
    res.into_body().collect().await.unwrap();
    assert_eq!(reserved(&stack, &mut svc, "m", &prompt).await, 1_112); // ceil(4,000 / 3.6)
}

/// With OpenAI's tokenizer (feature `tiktoken`), an OpenAI model's
/// reservation is its exact prompt count from the first call (Spanish text
/// included), and other models fall back to the learning estimate.
#[cfg(feature = "tiktoken")]
#[tokio::test(start_paused = true)]
async fn tiktoken_counts_openai_prompts_exactly_from_the_first_call() {
    use semaforo::llm::{Prompt, Tiktoken, TokenEstimator};
    let models = KeyedPace::builder(Pace::builder().tokens_per_minute(10_000_000))
        .build()
        .unwrap();
    let stack = LlmStack::openai(tier(100_000, 1_000_000))
        .pace(models)
        .estimator(Tiktoken::new())
        .build()
        .unwrap();
    let account = Account::new(
        Shape::OpenAi,
        &[(Counts::Tokens, 1_000_000, 1_000_000)],
        SERVICE,
    );
    let mut svc = ServiceBuilder::new()
        .layer(stack.layer())
        .service(account.service());
    let prompt = "¿Dónde está la biblioteca? El ciclo del agua, cuarto grado. ".repeat(50);
    let reserved_gpt = reserved(&stack, &mut svc, "gpt-4o-mini", &prompt).await;
    let exact =
        Tiktoken::new().text_tokens(&Prompt::read(chat("gpt-4o-mini", &prompt, 0).into_body()));
    assert_eq!(reserved_gpt, exact);
    // chars / 4 would be off by far more than the chat format's 6 tokens.
    let quarter = (prompt.chars().count() as f64 / 4.0).ceil() as u64;
    println!("tiktoken {exact} tokens vs chars/4 {quarter}");
    assert!(exact.abs_diff(quarter) > 20, "{exact} vs {quarter}");
    // A model without a known tokenizer: characters ÷ 4 at first.
    let other = reserved(&stack, &mut svc, "claude-sonnet-4-5", &prompt).await;
    assert_eq!(other, quarter);
}

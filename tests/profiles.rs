//! Provider profiles: each account paced the way its provider counts — an
//! Anthropic account by requests, input tokens not read from the cache and
//! output tokens; an Azure OpenAI deployment over its 10 s windows — against
//! a simulated account enforcing exactly that (tokio time, paused).

#[path = "support/account.rs"]
mod account;

use account::{Account, Counts, Shape};
use bytes::Bytes;
use proptest::prelude::*;
use semaforo::classify::RateLimitInfo;
use semaforo::llm::{LlmStack, Profile, Tier};
use semaforo::pace::{Cost, Pace, Unit};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};
use tokio::time::Instant;
use tower::{Service, ServiceBuilder, ServiceExt};

const SERVICE: Duration = Duration::from_secs(2);

fn chat(prompt_chars: usize, max_tokens: u64) -> http::Request<Bytes> {
    let body = format!(
        r#"{{"model":"m","max_tokens":{max_tokens},"messages":[{{"role":"user","content":"{}"}}]}}"#,
        "a".repeat(prompt_chars)
    );
    http::Request::post("/v1/messages")
        .body(Bytes::from(body))
        .expect("a request")
}

/// `n` calls at once through `stack`; (calls answered 200, makespan to the
/// last answer).
async fn run(
    stack: &LlmStack,
    account: &Account,
    n: usize,
    prompt_chars: usize,
    max_tokens: u64,
) -> (usize, Duration) {
    let svc = ServiceBuilder::new()
        .layer(stack.layer())
        .service(account.service());
    let t0 = Instant::now();
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let svc = svc.clone();
            tokio::spawn(async move { svc.oneshot(chat(prompt_chars, max_tokens)).await })
        })
        .collect();
    let mut ok = 0;
    for t in tasks {
        if let Ok(Ok(r)) = t.await {
            ok += usize::from(r.status() == 200);
        }
    }
    (ok, t0.elapsed())
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

/// 50 RPM, 30,000 ITPM, 8,000 OTPM; 50 calls of 500 input tokens asking for
/// 1,000 output tokens each.
fn anthropic_account(output_share: f64, cached_share: f64) -> Account {
    let mut a = Account::new(
        Shape::Anthropic,
        &[
            (Counts::Requests, 50, 50),
            (Counts::Input, 30_000, 30_000),
            (Counts::Output, 8_000, 8_000),
        ],
        SERVICE,
    );
    a.output_share = output_share;
    a.cached_share = cached_share;
    a
}

#[tokio::test(start_paused = true)]
async fn anthropic_otpm_binds_and_is_paced_to_its_bound() {
    let account = anthropic_account(1.0, 0.0);
    let stack = LlmStack::anthropic(50, 30_000, 8_000).build().unwrap();
    let (ok, makespan) = run(&stack, &account, 50, 2_000, 1_000).await;
    // 50,000 output tokens; the provider admits 8,000 at once and 8,000 a
    // minute after: the last call cannot start before 315 s.
    let bound = (50_000.0 - 8_000.0) / (8_000.0 / 60.0) + secs(SERVICE);
    eprintln!("anthropic OTPM: makespan {makespan:?}, bound {bound:.1} s");
    assert_eq!((ok, account.accepted(), account.throttled()), (50, 50, 0));
    assert!(
        secs(makespan) >= bound - 1e-3,
        "{makespan:?} beat the provider's bound {bound}"
    );
    assert!(
        secs(makespan) <= 1.05 * bound,
        "{makespan:?} vs OTPM bound {bound:.1} s"
    );
    // The input (25,000 tokens) never came near its 30,000 a minute.
    assert_eq!(account.charged(Counts::Input), 25_000.0);

    // The same account paced as an OpenAI-shaped tier (RPM + one TPM of
    // input + output) bursts past the output limit: the provider says 429.
    let account = anthropic_account(1.0, 0.0);
    let openai_shaped = LlmStack::openai(Tier {
        requests_per_minute: 50,
        tokens_per_minute: 38_000,
    })
    .build()
    .unwrap();
    let (ok, _) = run(&openai_shaped, &account, 50, 2_000, 1_000).await;
    eprintln!(
        "anthropic OTPM paced as one TPM: {ok} ok, {} 429s",
        account.throttled()
    );
    assert!(account.throttled() > 0, "one TPM cannot see the OTPM");
}

#[tokio::test(start_paused = true)]
async fn shorter_answers_give_their_output_back() {
    let full = anthropic_account(1.0, 0.0);
    let stack = LlmStack::anthropic(50, 30_000, 8_000).build().unwrap();
    let (_, long) = run(&stack, &full, 50, 2_000, 1_000).await;
    let half = anthropic_account(0.5, 0.0);
    let stack = LlmStack::anthropic(50, 30_000, 8_000).build().unwrap();
    let (ok, short) = run(&stack, &half, 50, 2_000, 1_000).await;
    assert_eq!((ok, half.throttled()), (50, 0));
    assert_eq!(
        half.charged(Counts::Output),
        25_000.0,
        "the provider billed half"
    );
    // Half the output: the makespan falls by more than 40 %, because the
    // pacer takes back what each answer did not use.
    assert!(
        secs(short) <= 0.6 * secs(long),
        "{short:?} with half the output vs {long:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn cached_input_is_not_charged_to_the_itpm() {
    // ITPM binds: 50 prompts of 4,000 tokens, little output.
    let account = |cached| {
        let mut a = Account::new(
            Shape::Anthropic,
            &[
                (Counts::Requests, 1_000, 1_000),
                (Counts::Input, 30_000, 30_000),
                (Counts::Output, 100_000, 100_000),
            ],
            SERVICE,
        );
        a.cached_share = cached;
        a
    };
    let stack = || LlmStack::anthropic(1_000, 30_000, 100_000).build().unwrap();
    let plain = account(0.0);
    let (ok, uncached) = run(&stack(), &plain, 50, 16_000, 100).await;
    assert_eq!((ok, plain.throttled()), (50, 0));
    let bound = (200_000.0 - 30_000.0) / 500.0 + secs(SERVICE);
    eprintln!("ITPM, no cache: {uncached:?}, bound {bound:.1} s");
    assert!(secs(uncached) <= 1.05 * bound, "{uncached:?} vs {bound}");

    // Half of each prompt read from the cache: the provider charges 2,000
    // input tokens a call, and so does the pacer once the usage says so.
    let cached = account(0.5);
    let (ok, with_cache) = run(&stack(), &cached, 50, 16_000, 100).await;
    assert_eq!((ok, cached.throttled()), (50, 0));
    assert_eq!(cached.charged(Counts::Input), 100_000.0);
    let bound = (100_000.0 - 30_000.0) / 500.0 + secs(SERVICE);
    eprintln!("ITPM, half cached: {with_cache:?}, bound {bound:.1} s");
    assert!(
        secs(with_cache) <= 1.1 * bound,
        "{with_cache:?} vs the cached bound {bound}"
    );
}

/// Azure: 60,000 TPM, so 360 RPM; both evaluated over 10 s windows, enforced
/// as buckets of a sixth of the minute refilling at the per-minute rate.
fn azure_account() -> Account {
    Account::new(
        Shape::OpenAi,
        &[
            (Counts::Requests, 60, 360),
            (Counts::Tokens, 10_000, 60_000),
        ],
        SERVICE,
    )
}

#[tokio::test(start_paused = true)]
async fn azure_ten_second_windows_are_not_burst() {
    let account = azure_account();
    let stack = LlmStack::azure_openai(60_000).build().unwrap();
    // 60 calls of 400 + 500 tokens: 54,000, within the minute's 60,000.
    let (ok, makespan) = run(&stack, &account, 60, 1_600, 500).await;
    let bound = (54_000.0 - 10_000.0) / 1_000.0 + secs(SERVICE);
    eprintln!("azure: {makespan:?}, bound {bound:.1} s");
    assert_eq!((ok, account.throttled()), (60, 0));
    assert!(secs(makespan) <= 1.05 * bound, "{makespan:?} vs {bound}");

    // Paced as the per-minute tier it nominally is, the burst earns 429s.
    let account = azure_account();
    let minute = LlmStack::openai(Tier {
        requests_per_minute: 360,
        tokens_per_minute: 60_000,
    })
    .build()
    .unwrap();
    let (ok, _) = run(&minute, &account, 60, 1_600, 500).await;
    eprintln!(
        "azure paced per minute: {ok} ok, {} 429s",
        account.throttled()
    );
    assert!(account.throttled() > 0);
}

fn available(pace: &Pace, unit: Unit) -> f64 {
    pace.snapshot()
        .dims
        .iter()
        .find(|d| d.unit == unit)
        .map(|d| d.available)
        .expect("a dimension of that unit")
}

#[tokio::test(start_paused = true)]
async fn each_profile_learns_from_its_own_headers_and_only_lowers() {
    let now = SystemTime::now();
    let stack = LlmStack::anthropic(50, 30_000, 8_000).build().unwrap();
    let pace = &stack.pace().get(Some("m"));
    pace.learn(&RateLimitInfo::from_headers(
        &[
            ("anthropic-ratelimit-output-tokens-remaining", "100"),
            ("anthropic-ratelimit-input-tokens-remaining", "5000"),
            ("anthropic-ratelimit-requests-remaining", "7"),
        ],
        now,
    ));
    assert!((available(pace, Unit::OutputTokens) - 100.0).abs() < 1.0);
    assert!((available(pace, Unit::InputTokens) - 5_000.0).abs() < 1.0);
    assert!((available(pace, Unit::Requests) - 7.0).abs() < 1.0);
    // A higher count does not raise ours.
    pace.learn(&RateLimitInfo::from_headers(
        &[("anthropic-ratelimit-output-tokens-remaining", "8000")],
        now,
    ));
    assert!(available(pace, Unit::OutputTokens) < 101.0);

    let stack = LlmStack::azure_openai(60_000).build().unwrap();
    let pace = &stack.pace().get(Some("m"));
    assert!(
        (available(pace, Unit::Tokens) - 9_500.0).abs() < 1.0,
        "a tenth-of-a-minute burst with headroom"
    );
    pace.learn(&RateLimitInfo::from_headers(
        &[
            ("x-ratelimit-remaining-tokens", "1200"),
            ("x-ratelimit-remaining-requests", "3"),
        ],
        now,
    ));
    assert!((available(pace, Unit::Tokens) - 1_200.0).abs() < 1.0);
    assert!((available(pace, Unit::Requests) - 3.0).abs() < 1.0);
}

#[test]
fn profiles_have_the_documented_limits() {
    let a = Profile::anthropic(50, 30_000, 8_000);
    let got: Vec<_> = a
        .limits()
        .iter()
        .map(|l| {
            (
                l.unit(),
                l.rate(),
                l.per(),
                l.capacity(),
                l.headroom_percent(),
            )
        })
        .collect();
    let minute = Duration::from_secs(60);
    assert_eq!(
        got,
        vec![
            (Unit::Requests, 50, minute, 50, 0),
            (Unit::InputTokens, 30_000, minute, 30_000, 5),
            (Unit::OutputTokens, 8_000, minute, 8_000, 5),
        ]
    );
    let z = Profile::azure_openai(60_000);
    let got: Vec<_> = z
        .limits()
        .iter()
        .map(|l| (l.unit(), l.rate(), l.capacity()))
        .collect();
    assert_eq!(
        got,
        vec![(Unit::Requests, 360, 60), (Unit::Tokens, 60_000, 10_000)]
    );
    // Tiny and huge quotas: no zero burst, no overflow.
    let z = Profile::azure_openai(1);
    assert!(z
        .limits()
        .iter()
        .all(|l| l.capacity() >= 1 && l.rate() >= 1));
    let z = Profile::azure_openai(u64::MAX);
    assert!(z.limits().iter().all(|l| l.capacity() >= 1));
    assert!(LlmStack::with_profile(Profile::azure_openai(u64::MAX))
        .build()
        .is_ok());
    // A zero limit is a configuration error, not a pacer that never admits.
    assert!(LlmStack::anthropic(50, 0, 8_000).build().is_err());
    // Without max_tokens, the profile's largest output is reserved…
    assert_eq!(
        Profile::openai(Tier {
            requests_per_minute: 1,
            tokens_per_minute: 1
        })
        .unset_max_output(),
        16_384
    );
}

#[tokio::test(start_paused = true)]
async fn a_request_without_max_tokens_reserves_the_largest_output_within_half_a_burst() {
    let reserved = |stack: LlmStack| async move {
        let svc = ServiceBuilder::new()
            .layer(stack.layer())
            .service(tower::service_fn(|_req: http::Request<Bytes>| async {
                Ok::<_, std::io::Error>(http::Response::new(Bytes::new()))
            }));
        let before = available(stack.pace().overflow(), Unit::Tokens);
        let req = http::Request::post("/v1/chat/completions")
            .body(Bytes::from_static(
                br#"{"messages":[{"role":"user","content":"abcdefgh"}]}"#,
            ))
            .unwrap();
        let res = svc.oneshot(req).await.unwrap();
        assert_eq!(res.status(), 200);
        (before - available(stack.pace().overflow(), Unit::Tokens)).round() as u64
    };
    // 2 input tokens + 16,384 (gpt-4o's largest output) on a 100k tier…
    let big = LlmStack::openai(Tier {
        requests_per_minute: 500,
        tokens_per_minute: 100_000,
    })
    .build()
    .unwrap();
    assert_eq!(reserved(big).await, 2 + 16_384);
    // …but on a 10k tier (burst 9,500) at most 4,750: the call still goes.
    let small = LlmStack::openai(Tier {
        requests_per_minute: 500,
        tokens_per_minute: 10_000,
    })
    .build()
    .unwrap();
    assert_eq!(reserved(small).await, 2 + 4_750);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// For every dimension of every profile: the cost admitted in any window
    /// W stays within `rate · W + burst`, whatever the split of the costs.
    #[test]
    fn every_dimension_of_every_profile_stays_within_rate_and_burst(
        which in 0usize..4,
        calls in prop::collection::vec((0u64..30_000, 0u64..4_000, 0u64..4_000, 0u64..2_000), 1..40),
        a in 20u64..200,
        b in 5_000u64..60_000,
        c in 2_000u64..20_000,
        d in 3u64..15,
    ) {
        let profile = match which {
            0 => Profile::openai(Tier { requests_per_minute: a, tokens_per_minute: b }),
            1 => Profile::azure_openai(b),
            2 => Profile::anthropic(a, b, c),
            _ => Profile::gemini(a, b, d),
        };
        let rt = tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build().unwrap();
        rt.block_on(async move {
            let mut builder = Pace::builder();
            for l in profile.limits() {
                builder = builder.limit(l.clone());
            }
            let pace = builder.build().unwrap();
            let log: Arc<Mutex<Vec<(Instant, Cost)>>> = Arc::default();
            let svc = ServiceBuilder::new()
                .layer(pace.layer().weigh(|c: &Cost| *c))
                .service(tower::service_fn({
                    let log = log.clone();
                    move |c: Cost| {
                        log.lock().unwrap().push((Instant::now(), c));
                        async move { Ok::<_, std::io::Error>(()) }
                    }
                }));
            let mut calls = calls;
            calls.sort_by_key(|c| c.0);
            let t0 = Instant::now();
            let mut tasks = Vec::new();
            let mut refused = 0;
            for (at_ms, input, cached, output) in calls.iter().copied() {
                tokio::time::sleep_until(t0 + Duration::from_millis(at_ms)).await;
                let cost = Cost::split(input, output).with_cached_input(cached);
                let mut s = svc.clone();
                let fut = s.ready().await.unwrap().call(cost);
                tasks.push(tokio::spawn(fut));
            }
            for t in tasks {
                // A cost above a burst is refused at once, never admitted.
                refused += usize::from(t.await.unwrap().is_err());
            }
            let log = log.lock().unwrap().clone();
            prop_assert_eq!(log.len() + refused, calls.len());
            for l in profile.limits() {
                let rate = l.rate() as f64 / l.per().as_secs_f64();
                let burst = l.capacity() as f64;
                if l.resets_on_calendar() {
                    // A calendar day (Gemini's RPD, midnight Pacific: 07:00
                    // or 08:00 UTC): at most the burst before the first of
                    // those; calls that did not fit wait for midnight.
                    let now = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .unwrap()
                        .as_secs()
                        % 86_400;
                    let cut = [7 * 3_600u64, 8 * 3_600]
                        .iter()
                        .map(|m| (m + 86_400 - now) % 86_400)
                        .min()
                        .unwrap_or(0)
                        .saturating_sub(2);
                    let sum: f64 = log
                        .iter()
                        .filter(|(at, _)| *at - t0 < Duration::from_secs(cut))
                        .map(|(_, c)| c.amount(l.unit()) as f64)
                        .sum();
                    prop_assert!(sum <= burst, "{sum} in a day of {burst}");
                    continue;
                }
                for i in 0..log.len() {
                    let mut sum = 0.0;
                    for j in i..log.len() {
                        sum += log[j].1.amount(l.unit()) as f64;
                        let w = (log[j].0 - log[i].0).as_secs_f64() + 1e-6;
                        prop_assert!(sum <= rate * w + burst + 1e-6, "{:?}: {sum} in {w}s", l.unit());
                    }
                }
            }
            Ok(())
        })?;
    }
}

/// Time running 10× faster (a mock whose minute lasts 6 s): ten times the
/// rate, the same bursts, the same window names.
#[test]
fn a_time_scale_speeds_the_rate_not_the_burst() {
    let stack = LlmStack::anthropic(50, 30_000, 8_000)
        .time_scale(10.0)
        .build()
        .unwrap();
    let dims = stack.pace().get(Some("m")).snapshot().dims;
    let got: Vec<_> = dims.iter().map(|d| (d.unit, d.per, d.capacity)).collect();
    let minute = Duration::from_secs(60);
    assert_eq!(
        got,
        vec![
            (Unit::Requests, minute, 50.0),
            (Unit::InputTokens, minute, 28_500.0),
            (Unit::OutputTokens, minute, 7_600.0),
        ]
    );
    // A rate of 1 a minute at a thousandth of the speed still admits.
    assert!(LlmStack::anthropic(1, 1, 1)
        .time_scale(0.001)
        .build()
        .is_ok());
}

/// A call of the whole limit is paid, not refused: the headroom only
/// plans; one call above what it leaves waits for a full bucket. A call
/// above the whole limit is refused at once, never retried.
#[tokio::test(start_paused = true)]
async fn a_call_of_the_whole_limit_goes_and_one_above_is_refused_at_once() {
    let account = anthropic_account(1.0, 0.0);
    let stack = LlmStack::anthropic(50, 30_000, 8_000).build().unwrap();
    let (ok, makespan) = run(&stack, &account, 2, 40, 8_000).await;
    assert_eq!((ok, account.throttled()), (2, 0));
    // The second waits for the first's 8,000 output tokens to refill: 60 s.
    assert!(
        secs(makespan) >= 60.0 && secs(makespan) <= 60.0 + 1.05 * secs(SERVICE),
        "{makespan:?}"
    );

    let svc = ServiceBuilder::new()
        .layer(stack.layer())
        .service(account.service());
    let t0 = Instant::now();
    let err = svc.oneshot(chat(40, 8_001)).await.unwrap_err();
    assert_eq!(t0.elapsed(), Duration::ZERO, "refused at once, not retried");
    assert_eq!(
        semaforo::classify::classify_error(err.as_ref()),
        semaforo::classify::Class::permanent(semaforo::classify::Permanent::RequestTooLarge)
    );
    assert_eq!(account.accepted(), 2, "the provider never saw it");
}

/// The output a request without `max_tokens` reserves is capped by the pacer
/// really in use, for all its choices together.
#[tokio::test(start_paused = true)]
async fn the_unset_output_cap_follows_the_pacer_in_use_and_all_choices() {
    let reserved = |stack: LlmStack, body: &'static [u8]| async move {
        let svc = ServiceBuilder::new()
            .layer(stack.layer())
            .service(tower::service_fn(|_req: http::Request<Bytes>| async {
                Ok::<_, std::io::Error>(http::Response::new(Bytes::new()))
            }));
        let before = available(stack.pace().overflow(), Unit::Tokens);
        let req = http::Request::post("/v1/chat/completions")
            .body(Bytes::from_static(body))
            .unwrap();
        let res = svc.oneshot(req).await.unwrap();
        assert_eq!(res.status(), 200);
        (before - available(stack.pace().overflow(), Unit::Tokens)).round() as u64
    };
    let tier = Tier {
        requests_per_minute: 500,
        tokens_per_minute: 30_000,
    };
    // A pacer of our own with a 10,000 burst: half of it, not of the profile's.
    let own = Pace::builder()
        .requests_per_minute(500)
        .tokens_per_minute(10_000)
        .build()
        .unwrap();
    let stack = LlmStack::openai(tier).pace(own).build().unwrap();
    let body = br#"{"messages":[{"role":"user","content":"abcd"}]}"#;
    assert_eq!(reserved(stack, body).await, 1 + 5_000);
    // Three choices without max_tokens: the cap holds for the three.
    let small = LlmStack::openai(Tier {
        requests_per_minute: 500,
        tokens_per_minute: 10_000,
    })
    .build()
    .unwrap();
    let body = br#"{"n":3,"messages":[{"role":"user","content":"abcd"}]}"#;
    assert_eq!(reserved(small, body).await, 1 + 4_750);
}

/// A streamed answer cut short keeps its estimate: Anthropic's
/// `message_start` says 1 output token, but the provider counts what it
/// generated before the client let go.
#[tokio::test(start_paused = true)]
async fn a_stream_dropped_before_its_final_usage_keeps_the_estimate() {
    use http_body_util::BodyExt;
    let stack = LlmStack::anthropic(50, 30_000, 8_000).build().unwrap();
    let events = [
        "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":10,\"output_tokens\":1}}}\n\n",
        "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"delta\":{\"text\":\"hola\"}}\n\n",
        "event: message_delta\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":900}}\n\n",
    ];
    let client = tower::service_fn(move |_req: http::Request<Bytes>| async move {
        let frames = futures::stream::iter(
            events.map(|e| Ok::<_, std::io::Error>(http_body::Frame::data(Bytes::from(e)))),
        );
        Ok::<_, std::io::Error>(http::Response::new(http_body_util::StreamBody::new(frames)))
    });
    let svc = ServiceBuilder::new()
        .layer(stack.stream_layer())
        .service(client);
    let full = available(&stack.pace().get(Some("m")), Unit::OutputTokens);
    // Read two events, then let go.
    let mut body = svc
        .clone()
        .oneshot(chat(40, 1_000))
        .await
        .unwrap()
        .into_body();
    body.frame().await.unwrap().unwrap();
    body.frame().await.unwrap().unwrap();
    drop(body);
    let kept = full - available(&stack.pace().get(Some("m")), Unit::OutputTokens);
    assert!((kept - 1_000.0).abs() < 1.0, "estimate kept: {kept}");
    // Read to the end: the final usage (900) replaces the estimate.
    let before = available(&stack.pace().get(Some("m")), Unit::OutputTokens);
    let body = svc.oneshot(chat(40, 1_000)).await.unwrap().into_body();
    body.collect().await.unwrap();
    let charged = before - available(&stack.pace().get(Some("m")), Unit::OutputTokens);
    assert!((charged - 900.0).abs() < 1.0, "reconciled: {charged}");
}

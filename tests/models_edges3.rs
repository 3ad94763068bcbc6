//! Adversarial tests of the per-model LLM preset, part 3 (attack session).
#![cfg(feature = "llm")]

use bytes::Bytes;
use semaforo::bulkhead::Bulkhead;
use semaforo::llm::{LlmStack, Profile, Tier};
use semaforo::pace::{Limit, Unit};
use std::time::Duration;
use tower::{Layer, ServiceExt};

fn tier(rpm: u64, tpm: u64) -> Tier {
    Tier {
        requests_per_minute: rpm,
        tokens_per_minute: tpm,
    }
}

fn body(s: String) -> http::Request<Bytes> {
    http::Request::post("/v1/chat/completions")
        .body(Bytes::from(s))
        .unwrap()
}

/// Calls refused at once (they never reach the upstream nor take budget)
/// still take the 1,024 pacer places for good.
#[tokio::test(start_paused = true)]
async fn refused_calls_take_the_model_places_for_good() {
    let stack = LlmStack::openai(tier(10_000, 100_000))
        .bulkhead(Bulkhead::builder(10_000).build().unwrap())
        .build()
        .unwrap();
    let svc = stack
        .layer()
        .layer(tower::service_fn(|_r: http::Request<Bytes>| async {
            Ok::<_, std::io::Error>(http::Response::new(Bytes::from_static(b"{}")))
        }));
    for i in 0..1_024 {
        let r = svc
            .clone()
            .oneshot(body(format!(
                r#"{{"model":"junk{i}","max_tokens":1e19,"messages":[]}}"#
            )))
            .await;
        assert!(r.is_err());
    }
    svc.clone()
        .oneshot(body(
            r#"{"model":"gpt-4o-mini","max_tokens":10,"messages":[]}"#.into(),
        ))
        .await
        .unwrap();
    println!(
        "keys {}; gpt-4o-mini has its own pacer: {}",
        stack.pace().keys().len(),
        stack.pace().peek("gpt-4o-mini").is_some()
    );
    assert!(stack.pace().peek("gpt-4o-mini").is_some());
}

/// Extreme configurations: build refuses or the stack works; no panic.
#[tokio::test(start_paused = true)]
async fn extreme_configurations_never_panic() {
    let limits = [
        Limit::tokens_per_minute(1),
        Limit::tokens_per_minute(u64::MAX),
        Limit::new(Unit::Tokens, u64::MAX, Duration::from_nanos(1)),
        Limit::new(Unit::OutputTokens, 1, Duration::MAX),
        Limit::new(Unit::InputTokens, 3, Duration::from_nanos(1))
            .burst(u64::MAX)
            .headroom(50),
        Limit::requests_per_day(1).burst(1),
        Limit::tokens_per_minute(0),
        Limit::tokens_per_minute(10).headroom(255),
    ];
    let scales = [0.001, 1.0, 1e6];
    let mut outcomes = Vec::new();
    for (i, l) in limits.iter().enumerate() {
        for (j, m) in limits.iter().enumerate() {
            for s in scales {
                let built = LlmStack::openai(tier(u64::MAX, u64::MAX))
                    .time_scale(s)
                    .model(
                        "m",
                        Profile::openai(tier(1, 1))
                            .limit(m.clone())
                            .max_output(u64::MAX),
                    )
                    .shared_limit(l.clone())
                    .build();
                let Ok(stack) = built else {
                    outcomes.push(format!("{i}/{j}/{s}: config error"));
                    continue;
                };
                let svc = stack.layer().layer(tower::service_fn(|_r: http::Request<Bytes>| async {
                    Ok::<_, std::io::Error>(http::Response::new(Bytes::from_static(
                        br#"{"usage":{"prompt_tokens":99999999999,"completion_tokens":18446744073709551615}}"#,
                    )))
                }));
                for model in ["m", "other"] {
                    for max in ["", r#""max_tokens":5,"#] {
                        let r = tokio::time::timeout(
                            Duration::from_secs(3_600),
                            svc.clone().oneshot(body(format!(
                                r#"{{"model":"{model}",{max}"messages":["hello"]}}"#
                            ))),
                        )
                        .await;
                        outcomes.push(format!(
                            "{i}/{j}/{s}/{model}/{}: {}",
                            !max.is_empty(),
                            match r {
                                Err(_) => "HANG".to_string(),
                                Ok(Ok(_)) => "ok".into(),
                                Ok(Err(e)) => format!("err {e}"),
                            }
                        ));
                    }
                }
                stack.shutdown().trigger();
            }
        }
    }
    let hangs: Vec<_> = outcomes.iter().filter(|o| o.contains("HANG")).collect();
    println!(
        "{} outcomes, {} hangs, {} ok",
        outcomes.len(),
        hangs.len(),
        outcomes.iter().filter(|o| o.ends_with(": ok")).count()
    );
    for o in outcomes.iter().filter(|o| o.ends_with(": ok")).take(20) {
        println!("{o}");
    }
    assert!(hangs.is_empty(), "{hangs:#?}");
}

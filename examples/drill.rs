//! A drill: the provider goes down for 30 s and comes back, and we watch the
//! LLM stack ride it out — on tokio's paused clock, so the 150 simulated
//! seconds take a moment.
//!
//! ```text
//! cargo run --example drill
//! ```
//!
//! - The client is wrapped in a chaos layer injecting Anthropic's
//!   `529 overloaded_error` from t = 60 s to t = 90 s (nothing else is
//!   fake: the stack is the LLM preset as you would build it).
//! - The preset keeps answers 5 s fresh and a day stale
//!   (`stale_if_error`); its breaker opens after 3 consecutive failures for
//!   30 s.
//! - A degradation switch goes to `Reduced` once the breaker has been open
//!   for 3 s, back to `Normal` 5 s after it closes (evaluated each second).
//! - 50 topics are asked in turn, five a second (each every 10 s). During
//!   the outage every one of them is answered with its last good plan,
//!   marked stale; none fails.
//!
//! The timeline printed is the one `tests/drill.rs` asserts.

use bytes::Bytes;
use semaforo::breaker::Breaker;
use semaforo::cache::Cache;
use semaforo::chaos::{overloaded, Chaos, Fault};
use semaforo::degrade::{self, Degrade, Level, Rule};
use semaforo::fallback::FellBack;
use semaforo::llm::{LlmCache, LlmStack, Tier};
use semaforo::observe::{BreakerState, EventKind};
use semaforo::BoxError;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;
use tower::{Layer, ServiceExt};

/// When the outage starts and ends.
pub const OUTAGE: (Duration, Duration) = (Duration::from_secs(60), Duration::from_secs(90));
/// How long the breaker stays open.
pub const OPEN_FOR: Duration = Duration::from_secs(30);
/// The breaker open this long before `Reduced`.
pub const REDUCED_AFTER: Duration = Duration::from_secs(3);
/// The breaker closed this long before `Normal`.
pub const NORMAL_AFTER: Duration = Duration::from_secs(5);
/// How often the degradation rules are evaluated.
pub const EVERY: Duration = Duration::from_secs(1);
/// Topics asked in turn.
pub const TOPICS: usize = 50;
/// The drill's length.
pub const LENGTH: Duration = Duration::from_secs(150);

/// What happened, and when (since the start).
#[derive(Debug, Clone, PartialEq)]
pub enum What {
    /// The chaos layer started failing calls.
    OutageStarts,
    /// It stopped.
    OutageEnds,
    /// The breaker changed state.
    Breaker(BreakerState),
    /// The degradation switch changed level.
    Level(Level),
}

/// One second of traffic.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Second {
    /// Answered by the provider (or the fresh cache).
    pub real: u64,
    /// Answered with a stale answer by the fallback.
    pub stale: u64,
    /// Failed.
    pub failed: u64,
}

/// The drill's record.
#[derive(Debug)]
pub struct Drill {
    /// Every change, in order.
    pub timeline: Vec<(Duration, What)>,
    /// Each second's answers (by when the call was sent).
    pub seconds: Vec<Second>,
    /// Calls that reached the provider.
    pub upstream_calls: u64,
    /// Calls the chaos layer failed (they never reached the provider).
    pub injected: u64,
}

impl Drill {
    /// When `what` first happened.
    pub fn first(&self, what: &What) -> Option<Duration> {
        self.timeline
            .iter()
            .find(|(_, w)| w == what)
            .map(|(t, _)| *t)
    }

    /// The answers of the calls sent in `[from, to)` seconds.
    pub fn between(&self, from: u64, to: u64) -> Second {
        let range = self.seconds.get(from as usize..to as usize).unwrap_or(&[]);
        range.iter().fold(Second::default(), |a, s| Second {
            real: a.real + s.real,
            stale: a.stale + s.stale,
            failed: a.failed + s.failed,
        })
    }
}

/// A provider answering each prompt after 500 ms.
fn provider(
    calls: &Arc<AtomicU64>,
) -> impl tower::Service<
    http::Request<Bytes>,
    Response = http::Response<Bytes>,
    Error = std::io::Error,
    Future = impl Send,
> + Clone
       + Send
       + 'static {
    let calls = calls.clone();
    tower::service_fn(move |_req: http::Request<Bytes>| {
        let n = calls.fetch_add(1, Ordering::Relaxed);
        async move {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let body = format!(
                r#"{{"id":"msg-{n}","choices":[{{"message":{{"content":"Plan de clase..."}}}}],"usage":{{"prompt_tokens":50,"completion_tokens":200,"total_tokens":250}}}}"#
            );
            Ok(http::Response::builder()
                .status(200)
                .header("content-type", "application/json")
                .body(Bytes::from(body))
                .expect("a valid response"))
        }
    })
}

fn ask(topic: usize) -> http::Request<Bytes> {
    http::Request::post("/v1/chat/completions")
        .header("authorization", "Bearer sk-drill")
        .body(Bytes::from(format!(
            r#"{{"model":"gpt-4o-mini","temperature":0,"max_tokens":200,"messages":[{{"role":"user","content":"Plan de clase {topic}"}}]}}"#
        )))
        .expect("a valid request")
}

/// Runs the drill on the current (paused) clock.
pub async fn run() -> Result<Drill, BoxError> {
    let start = Instant::now();
    let timeline: Arc<Mutex<Vec<(Duration, What)>>> = Arc::default();
    let note = {
        let t = timeline.clone();
        move |what: What| {
            if let Ok(mut t) = t.lock() {
                t.push((start.elapsed(), what));
            }
        }
    };

    let breaker = {
        let note = note.clone();
        Breaker::builder()
            .name("provider")
            .consecutive_failures(3)
            .open_for(OPEN_FOR)
            .on_event(move |e| {
                if let EventKind::BreakerTransition { to, .. } = e.kind {
                    note(What::Breaker(to));
                }
            })
            .build()?
    };
    let switch = {
        let note = note.clone();
        Degrade::builder()
            .name("lessons")
            .every(EVERY)
            .rule(
                Rule::new(Level::Reduced, degrade::breaker_open(&breaker))
                    .after(REDUCED_AFTER)
                    .recover_after(NORMAL_AFTER),
            )
            .on_event(move |e| {
                if let EventKind::LevelChanged { to, .. } = e.kind {
                    note(What::Level(to));
                }
            })
            .build()?
    };
    let cache: LlmCache = Cache::builder()
        .ttl(Duration::from_secs(5))
        .stale_for(Duration::from_secs(86_400))
        .build()?;
    let stack = LlmStack::openai(Tier {
        requests_per_minute: 10_000,
        tokens_per_minute: 10_000_000,
    })
    .breaker(breaker)
    .cache(cache)
    .stale_if_error(true)
    .build()?;
    let chaos = Chaos::builder()
        .seed(2026)
        .fault(Fault::respond(overloaded::<Bytes>()).between(OUTAGE.0, OUTAGE.1))
        .build()?;
    let upstream_calls = Arc::new(AtomicU64::new(0));
    let llm = stack
        .layer()
        .layer(chaos.layer().layer(provider(&upstream_calls)));

    let _evaluating = switch.spawn()?;
    chaos.enable();
    let seconds = Arc::new(Mutex::new(vec![
        Second::default();
        LENGTH.as_secs() as usize
    ]));
    let mut calls = Vec::new();
    let mut marked = (false, false);
    let mut i = 0usize;
    while start.elapsed() < LENGTH {
        let now = start.elapsed();
        if !marked.0 && now >= OUTAGE.0 {
            note(What::OutageStarts);
            marked.0 = true;
        }
        if !marked.1 && now >= OUTAGE.1 {
            note(What::OutageEnds);
            marked.1 = true;
        }
        let sec = now.as_secs() as usize;
        let (svc, seconds) = (llm.clone(), seconds.clone());
        calls.push(tokio::spawn(async move {
            let out = svc.oneshot(ask(i % TOPICS)).await;
            if let Ok(mut s) = seconds.lock() {
                if let Some(s) = s.get_mut(sec) {
                    match out {
                        Ok(res) if res.extensions().get::<FellBack>().is_some() => s.stale += 1,
                        Ok(res) if res.status().is_success() => s.real += 1,
                        _ => s.failed += 1,
                    }
                }
            }
        }));
        i += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for c in calls {
        c.await?;
    }
    let timeline = timeline.lock().map(|t| t.clone()).unwrap_or_default();
    let seconds = seconds.lock().map(|s| s.clone()).unwrap_or_default();
    Ok(Drill {
        timeline,
        seconds,
        upstream_calls: upstream_calls.load(Ordering::Relaxed),
        injected: chaos
            .calls()
            .saturating_sub(upstream_calls.load(Ordering::Relaxed)),
    })
}

#[allow(dead_code)]
#[tokio::main(flavor = "current_thread", start_paused = true)]
async fn main() -> Result<(), BoxError> {
    let drill = run().await?;
    println!(
        "Drill: provider outage from t = {:?} to t = {:?} (simulated time)\n",
        OUTAGE.0, OUTAGE.1
    );
    for (t, what) in &drill.timeline {
        let what = match what {
            What::OutageStarts => {
                "provider outage starts (chaos: 529 overloaded_error)".to_string()
            }
            What::OutageEnds => "provider outage ends".to_string(),
            What::Breaker(s) => format!("breaker → {s:?}"),
            What::Level(l) => format!("degradation level → {l}"),
        };
        println!("  t = {:>7.3} s  {what}", t.as_secs_f64());
    }
    println!("\n  seconds    real  stale  failed");
    for from in (0..LENGTH.as_secs()).step_by(10) {
        let s = drill.between(from, from + 10);
        println!(
            "  {:>3}–{:<3}  {:>6} {:>6} {:>7}",
            from,
            from + 10,
            s.real,
            s.stale,
            s.failed
        );
    }
    let all = drill.between(0, LENGTH.as_secs());
    println!(
        "\n  {} calls: {} real, {} stale from the cache, {} failed; {} reached the provider, {} failed by chaos",
        all.real + all.stale + all.failed,
        all.real,
        all.stale,
        all.failed,
        drill.upstream_calls,
        drill.injected
    );
    Ok(())
}

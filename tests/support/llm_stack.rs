//! Helpers of the LLM preset's attack tests (`tests/llm_attack3.rs`,
//! `tests/llm_attack4.rs`): a roomy tier, what a pacer has charged, the
//! stack idle, and a body read the way hyper reads it.
#![allow(dead_code)]

use bytes::Bytes;
use http_body::Body;
use http_body_util::BodyExt;
use semaforo::llm::{LlmStack, Tier};
use semaforo::pace::{Pace, Unit};
use semaforo::retry::Retry;
use semaforo::BoxError;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

/// A tier no test here runs out of.
pub fn big_tier() -> Tier {
    Tier {
        requests_per_minute: 100_000,
        tokens_per_minute: 1_000_000,
    }
}

/// Units charged on the first dimension of `unit` (capacity less available;
/// exact while paused time does not move).
pub fn charged(p: &Pace, unit: Unit) -> f64 {
    let s = p.snapshot();
    let d = s
        .dims
        .iter()
        .find(|d| d.unit == unit)
        .unwrap_or_else(|| panic!("no {unit:?} dim in {s:?}"));
    d.capacity - d.available
}

/// One attempt, no retry.
pub fn no_retry() -> Retry {
    Retry::builder().max_attempts(1).build().unwrap()
}

/// Nothing held: no call in the bulkhead or its line, none counted by the
/// shutdown.
pub fn assert_idle(stack: &LlmStack) {
    let b = stack.bulkhead().snapshot();
    assert_eq!((b.in_flight, b.waiting), (0, 0), "bulkhead not idle: {b:?}");
    assert_eq!(
        stack.shutdown().in_flight(),
        0,
        "shutdown in-flight count leaked"
    );
}

/// Reads a body the way hyper does: stops as soon as `is_end_stream()`.
pub async fn read_like_hyper<B>(body: B) -> (Vec<u8>, Option<BoxError>)
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    let mut body = Box::pin(body);
    let mut out = Vec::new();
    while !body.is_end_stream() {
        match body.frame().await {
            None => break,
            Some(Ok(f)) => {
                if let Some(d) = f.data_ref() {
                    out.extend_from_slice(d);
                }
            }
            Some(Err(e)) => return (out, Some(e.into())),
        }
    }
    (out, None)
}

/// One poll with a waker that does nothing.
pub fn noop_poll<F: Future + ?Sized>(f: Pin<&mut F>) -> Poll<F::Output> {
    let mut cx = Context::from_waker(std::task::Waker::noop());
    f.poll(&mut cx)
}

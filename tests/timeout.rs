//! Timeouts under paused time: attempt, first chunk, idle (no progress), total,
//! a streamed bulkhead permit released at the timeout, and a property test.

use futures::stream::{self, BoxStream, StreamExt};
use proptest::prelude::*;
use semaforo::bulkhead::Bulkhead;
use semaforo::classify::{classify_error, Class};
use semaforo::timeout::Timeout;
use semaforo::{BoxError, RejectKind, Rejected};
use std::time::Duration;
use tokio::time::Instant;
use tower::{Service, ServiceBuilder, ServiceExt};

type Chunks = BoxStream<'static, Result<usize, std::io::Error>>;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}
fn mins(n: u64) -> Duration {
    Duration::from_secs(60 * n)
}

/// A streaming upstream: answers after `headers`, then one chunk after each gap.
fn upstream() -> impl Service<
    (Duration, Vec<Duration>),
    Response = Chunks,
    Error = std::io::Error,
    Future = futures::future::BoxFuture<'static, Result<Chunks, std::io::Error>>,
> + Clone {
    tower::service_fn(|(headers, gaps): (Duration, Vec<Duration>)| {
        Box::pin(async move {
            tokio::time::sleep(headers).await;
            let s = stream::iter(gaps.into_iter().enumerate())
                .then(|(i, gap)| async move {
                    tokio::time::sleep(gap).await;
                    Ok::<_, std::io::Error>(i)
                })
                .boxed();
            Ok(s)
        }) as futures::future::BoxFuture<'static, _>
    })
}

/// Runs one call; returns when each chunk (or the error) arrived, from the call.
async fn run(
    timeout: &Timeout,
    headers: Duration,
    gaps: Vec<Duration>,
) -> (Vec<Duration>, Option<(Duration, BoxError)>) {
    let mut svc = ServiceBuilder::new()
        .layer(timeout.layer().until_stream_end())
        .service(upstream());
    let t0 = Instant::now();
    let mut s = match svc.ready().await.unwrap().call((headers, gaps)).await {
        Ok(s) => s,
        Err(e) => return (vec![], Some((t0.elapsed(), e))),
    };
    let mut at = Vec::new();
    while let Some(item) = s.next().await {
        match item {
            Ok(_) => at.push(t0.elapsed()),
            Err(e) => return (at, Some((t0.elapsed(), e))),
        }
    }
    (at, None)
}

fn detail(e: &BoxError) -> String {
    let r = Rejected::from_box(e).expect("a rejection");
    assert_eq!(r.kind(), RejectKind::Timeout);
    assert_eq!(classify_error(e.as_ref()), Class::Transient);
    r.detail().unwrap().to_owned()
}

#[tokio::test(start_paused = true)]
async fn attempt_timeout_fires_at_its_bound() {
    let t = Timeout::builder()
        .name("openai")
        .attempt(Duration::from_secs(30))
        .build()
        .unwrap();
    let (_, err) = run(&t, Duration::from_secs(100), vec![]).await;
    let (at, e) = err.unwrap();
    assert_eq!(at, Duration::from_secs(30));
    assert_eq!(e.to_string(), "timeout 'openai': timed out (attempt 30 s)");
}

#[tokio::test(start_paused = true)]
async fn first_chunk_timeout_fires_at_its_bound() {
    let t = Timeout::builder()
        .first_chunk(Duration::from_secs(60))
        .idle(mins(20))
        .build()
        .unwrap();
    let (chunks, err) = run(&t, Duration::from_secs(5), vec![Duration::from_secs(90)]).await;
    assert!(chunks.is_empty());
    let (at, e) = err.unwrap();
    assert_eq!(
        at,
        Duration::from_secs(65),
        "60 s after the headers (at 5 s)"
    );
    assert_eq!(detail(&e), "no first chunk within 1 min");
}

#[tokio::test(start_paused = true)]
async fn seed_004_no_progress_for_20_minutes_fails_at_that_instant() {
    let t = Timeout::builder()
        .idle(mins(20))
        .total(mins(30 * 10))
        .build()
        .unwrap();
    let (chunks, err) = run(&t, Duration::ZERO, vec![mins(1), mins(2), mins(21)]).await;
    assert_eq!(chunks, vec![mins(1), mins(3)]);
    let (at, e) = err.unwrap();
    assert_eq!(at, mins(23), "20 min after the last chunk");
    assert_eq!(detail(&e), "no progress for 20 min");
}

#[tokio::test(start_paused = true)]
async fn a_slow_but_steady_stream_succeeds() {
    // 1 chunk every 19 minutes for 2 hours, idle limit 20 minutes.
    let t = Timeout::builder()
        .idle(mins(20))
        .total(mins(150))
        .build()
        .unwrap();
    let (chunks, err) = run(&t, Duration::ZERO, vec![mins(19); 6]).await;
    assert!(err.is_none(), "{err:?}");
    assert_eq!(chunks.len(), 6);
    assert_eq!(*chunks.last().unwrap(), mins(114));
}

#[tokio::test(start_paused = true)]
async fn total_timeout_cuts_a_stream_that_keeps_producing() {
    let t = Timeout::builder()
        .idle(Duration::from_secs(5))
        .total(Duration::from_secs(10))
        .build()
        .unwrap();
    let (chunks, err) = run(
        &t,
        Duration::from_secs(2),
        vec![Duration::from_secs(1); 100],
    )
    .await;
    // Chunks at 3..=10 s: one arriving exactly at the deadline is still delivered.
    assert_eq!(chunks.len(), 8);
    let (at, e) = err.unwrap();
    assert_eq!(
        at,
        Duration::from_secs(10),
        "measured from the call, not the headers"
    );
    assert_eq!(detail(&e), "total 10 s");
}

#[tokio::test(start_paused = true)]
async fn a_streamed_bulkhead_slot_is_released_at_the_timeout() {
    let bulkhead = Bulkhead::builder(1).max_queue(1).build().unwrap();
    let timeout = Timeout::builder()
        .idle(Duration::from_secs(10))
        .build()
        .unwrap();
    let mut svc = ServiceBuilder::new()
        .layer(bulkhead.layer().release_on_stream_end())
        .layer(timeout.layer().until_stream_end())
        .service(upstream());
    let t0 = Instant::now();
    let mut s = svc
        .ready()
        .await
        .unwrap()
        .call((
            Duration::ZERO,
            vec![Duration::from_secs(1), Duration::from_secs(60)],
        ))
        .await
        .unwrap();
    assert!(s.next().await.unwrap().is_ok());
    assert_eq!(bulkhead.snapshot().in_flight, 1);
    assert!(s.next().await.unwrap().is_err());
    assert_eq!(t0.elapsed(), Duration::from_secs(11));
    assert_eq!(
        bulkhead.snapshot().in_flight,
        0,
        "released at the timeout, stream still held"
    );
    assert!(s.next().await.is_none());
}

#[test]
fn bad_configuration_is_an_error() {
    assert_eq!(Timeout::builder().build().unwrap_err().field, "limits");
    assert_eq!(
        Timeout::builder()
            .idle(Duration::ZERO)
            .build()
            .unwrap_err()
            .field,
        "idle"
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Random chunk timings: a stream never outlives its total deadline, never
    /// survives a gap over the idle limit, and is never cut when it respects both.
    #[test]
    fn deadlines_hold_for_random_chunk_timings(
        headers in 0u64..3_000,
        gaps in prop::collection::vec(0u64..3_000, 0..20),
        idle in 500u64..3_000,
        total in 1_000u64..40_000,
    ) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build().unwrap();
        rt.block_on(async move {
            let t = Timeout::builder().idle(ms(idle)).total(ms(total)).build().unwrap();
            let (chunks, err) = run(&t, ms(headers), gaps.iter().copied().map(ms).collect()).await;
            // Where the model says it must end.
            let mut now = headers;
            let mut expected_end = None;
            if headers >= total {
                expected_end = Some(total);
            } else {
                for g in &gaps {
                    let limit = (now + idle).min(total);
                    // A chunk arriving exactly at a deadline is delivered (the inner stream is
                    // polled before the deadline is checked).
                    if now + g > limit {
                        expected_end = Some(limit);
                        break;
                    }
                    now += g;
                }
            }
            match (expected_end, err) {
                (None, None) => prop_assert_eq!(chunks.len(), gaps.len()),
                (Some(end), Some((at, e))) => {
                    prop_assert_eq!(at, ms(end));
                    prop_assert!(at <= ms(total));
                    prop_assert_eq!(Rejected::from_box(&e).unwrap().kind(), RejectKind::Timeout);
                }
                (exp, got) => prop_assert!(false, "expected end {:?}, got {:?}", exp, got.map(|g| g.0)),
            }
            Ok(())
        })?;
    }
}

/// `Duration::MAX` ("no limit" as many spell it) neither panics nor fires:
/// a call that answers after 20 years answers (tokio's timers end at 30).
#[tokio::test(start_paused = true)]
async fn a_limit_of_duration_max_never_fires() {
    let t = Timeout::builder()
        .attempt(Duration::MAX)
        .total(Duration::MAX)
        .build()
        .unwrap();
    let years = Duration::from_secs(86_400 * 365 * 20);
    let (at, err) = run(&t, years, vec![ms(1)]).await;
    assert!(err.is_none(), "{err:?}");
    assert_eq!(at, vec![years + ms(1)]);
}

//! Fault injection: repeatable, at its rates, on its schedule, read by our
//! own classifiers and pacer; off is off.
#![cfg(feature = "chaos")]

use semaforo::chaos::{Chaos, Fault, Latency};
use semaforo::classify::{classify_error, Class};
use semaforo::BoxError;
use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;
use tower::{service_fn, Layer, Service, ServiceExt};

fn echo() -> impl Service<
    u32,
    Response = u32,
    Error = Infallible,
    Future = std::future::Ready<Result<u32, Infallible>>,
> + Clone {
    service_fn(|x: u32| std::future::ready(Ok(x)))
}

/// What each of `n` calls got: 0 passed, 1 error, 2 response.
async fn outcomes(chaos: &Chaos<u32>, n: usize) -> Vec<u8> {
    let mut svc = chaos.layer().layer(echo());
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let r = svc.ready().await.unwrap().call(i as u32).await;
        out.push(match r {
            Ok(x) if x == i as u32 => 0,
            Ok(_) => 2,
            Err(_) => 1,
        });
    }
    out
}

fn two_faults(seed: u64) -> Chaos<u32> {
    Chaos::builder()
        .seed(seed)
        .fault(Fault::error(Class::Transient).rate(0.2))
        .fault(Fault::respond(|| u32::MAX).rate(0.3))
        .build()
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn the_same_seed_gives_the_same_faults_and_enable_starts_again() {
    let a = outcomes(
        &{
            let c = two_faults(42);
            c.enable();
            c
        },
        1_000,
    )
    .await;
    let c = two_faults(42);
    c.enable();
    let b = outcomes(&c, 1_000).await;
    assert_eq!(a, b);
    // Enabling again restarts the sequence.
    c.enable();
    assert_eq!(outcomes(&c, 1_000).await, a);
    let other = two_faults(43);
    other.enable();
    assert_ne!(outcomes(&other, 1_000).await, a);
    // Both kinds happened.
    assert!(a.contains(&1) && a.contains(&2) && a.contains(&0));
}

#[tokio::test(start_paused = true)]
async fn each_rate_is_within_four_sigma_over_100_000_calls() {
    let n = 100_000usize;
    for (seed, p) in [(1u64, 0.001), (2, 0.01), (3, 0.1), (4, 0.5), (5, 0.9)] {
        let chaos = Chaos::builder()
            .seed(seed)
            .fault(Fault::error(Class::Overloaded { retry_after: None }).rate(p))
            .build()
            .unwrap();
        chaos.enable();
        let got = outcomes(&chaos, n)
            .await
            .iter()
            .filter(|&&o| o == 1)
            .count();
        let share = got as f64 / n as f64;
        let sigma = (p * (1.0 - p) / n as f64).sqrt();
        assert!(
            (share - p).abs() <= 4.0 * sigma,
            "rate {p}: {share} ({got} of {n}), 4σ = {}",
            4.0 * sigma
        );
    }
    // A second fault's rate does not depend on the first's hits: p = 0.5
    // after a fault at 0.5, measured on the calls the first did not take.
    let chaos = Chaos::builder()
        .seed(9)
        .fault(Fault::error(Class::Transient).rate(0.5))
        .fault(Fault::respond(|| u32::MAX).rate(0.5))
        .build()
        .unwrap();
    chaos.enable();
    let o = outcomes(&chaos, n).await;
    let rest = o.iter().filter(|&&x| x != 1).count() as f64;
    let second = o.iter().filter(|&&x| x == 2).count() as f64 / rest;
    let sigma = (0.25 / rest).sqrt();
    assert!((second - 0.5).abs() <= 4.0 * sigma, "{second}");
}

#[tokio::test(start_paused = true)]
async fn off_by_default_and_switched_at_run_time() {
    let chaos = Chaos::builder()
        .fault(Fault::error(Class::Transient))
        .build()
        .unwrap();
    assert!(!chaos.is_enabled());
    assert_eq!(outcomes(&chaos, 100).await, vec![0; 100]);
    assert_eq!(chaos.calls(), 0);
    chaos.enable();
    assert_eq!(outcomes(&chaos, 10).await, vec![1; 10]);
    chaos.disable();
    assert_eq!(outcomes(&chaos, 10).await, vec![0; 10]);
}

#[tokio::test(start_paused = true)]
async fn a_schedule_from_t1_to_t2_after_enable() {
    let chaos = Chaos::builder()
        .fault(
            Fault::error(Class::Overloaded { retry_after: None })
                .between(Duration::from_secs(60), Duration::from_secs(90)),
        )
        .build()
        .unwrap();
    let mut svc = chaos.layer().layer(echo());
    let start = Instant::now();
    chaos.enable();
    let mut failed = Vec::new();
    for s in 0..120u64 {
        tokio::time::sleep_until(start + Duration::from_secs(s)).await;
        if svc.ready().await.unwrap().call(1).await.is_err() {
            failed.push(s);
        }
    }
    assert_eq!(failed, (60..90).collect::<Vec<_>>());
}

#[tokio::test(start_paused = true)]
async fn latencies_fixed_uniform_and_a_long_tail() {
    async fn delays(latency: Latency, n: usize) -> Vec<Duration> {
        let chaos = Chaos::builder()
            .seed(11)
            .fault(Fault::latency(latency))
            .build()
            .unwrap();
        chaos.enable();
        let mut svc = chaos.layer().layer(echo());
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let t = Instant::now();
            svc.ready().await.unwrap().call(1).await.unwrap();
            out.push(t.elapsed());
        }
        out
    }
    let fixed = delays(Latency::Fixed(Duration::from_millis(250)), 100).await;
    assert!(fixed.iter().all(|&d| d == Duration::from_millis(250)));

    let (lo, hi) = (Duration::from_millis(100), Duration::from_millis(300));
    let uniform = delays(Latency::Uniform { min: lo, max: hi }, 2_000).await;
    assert!(uniform
        .iter()
        .all(|&d| d >= lo && d <= hi + Duration::from_millis(1)));
    let mean = uniform.iter().map(Duration::as_secs_f64).sum::<f64>() / 2_000.0;
    assert!((mean - 0.2).abs() < 0.01, "mean {mean}");

    let (median, p99) = (Duration::from_millis(100), Duration::from_secs(2));
    let mut tail = delays(Latency::LongTail { median, p99 }, 10_000).await;
    tail.sort();
    let m = tail[5_000].as_secs_f64();
    let q = tail[9_900].as_secs_f64();
    assert!((m - 0.1).abs() < 0.01, "median {m}");
    assert!((q / 2.0 - 1.0).abs() < 0.2, "p99 {q}");
}

#[tokio::test(start_paused = true)]
async fn a_hung_call_waits_for_the_timeout_and_drops_clean() {
    let chaos = Chaos::builder().fault(Fault::hang()).build().unwrap();
    chaos.enable();
    let drops = Arc::new(AtomicUsize::new(0));
    let svc = chaos.layer().layer(echo());
    let t = Instant::now();
    let r = tokio::time::timeout(Duration::from_secs(30), svc.oneshot(1)).await;
    assert!(r.is_err());
    assert_eq!(t.elapsed(), Duration::from_secs(30));

    // Dropped while delayed: the inner future goes too.
    struct Tracked(Arc<AtomicUsize>);
    impl Drop for Tracked {
        fn drop(&mut self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }
    let chaos = Chaos::builder()
        .fault(Fault::latency(Latency::Fixed(Duration::from_secs(5))))
        .build()
        .unwrap();
    chaos.enable();
    let d = drops.clone();
    let mut svc = chaos.layer().layer(service_fn(move |x: u32| {
        let t = Tracked(d.clone());
        async move {
            let _t = t;
            Ok::<_, Infallible>(x)
        }
    }));
    let mut fut = Box::pin(svc.ready().await.unwrap().call(1));
    use futures::FutureExt;
    assert!((&mut fut).now_or_never().is_none());
    drop(fut);
    assert_eq!(drops.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn injected_errors_carry_their_class() {
    for class in [
        Class::Transient,
        Class::Infrastructure,
        Class::Overloaded {
            retry_after: Some(Duration::from_secs(3)),
        },
        Class::Throttled { retry_after: None },
    ] {
        let chaos = Chaos::builder().fault(Fault::error(class)).build().unwrap();
        chaos.enable();
        let e: BoxError = chaos.layer().layer(echo()).oneshot(1).await.unwrap_err();
        assert_eq!(classify_error(&*e), class);
    }
    let chaos = Chaos::builder()
        .fault(Fault::connection_reset())
        .build()
        .unwrap();
    chaos.enable();
    let e = chaos.layer().layer(echo()).oneshot(1).await.unwrap_err();
    assert_eq!(classify_error(&*e), Class::Infrastructure);
    assert_eq!(
        e.downcast_ref::<std::io::Error>().map(|e| e.kind()),
        Some(std::io::ErrorKind::ConnectionReset)
    );
}

#[test]
fn the_builder_refuses_bad_settings() {
    let bad: [Fault<u32>; 6] = [
        Fault::hang().rate(1.5),
        Fault::hang().rate(f64::NAN),
        Fault::hang().rate(-0.1),
        Fault::hang().between(Duration::from_secs(9), Duration::from_secs(1)),
        Fault::latency(Latency::Uniform {
            min: Duration::from_secs(2),
            max: Duration::from_secs(1),
        }),
        Fault::latency(Latency::LongTail {
            median: Duration::ZERO,
            p99: Duration::from_secs(1),
        }),
    ];
    for f in bad {
        assert!(Chaos::builder().fault(f.clone()).build().is_err(), "{f:?}");
    }
    let many = (0..65).fold(Chaos::<u32>::builder(), |b, _| b.fault(Fault::hang()));
    assert!(many.build().is_err(), "at most 64 faults");
    // Extremes that are valid do not panic.
    let chaos = Chaos::builder()
        .fault(Fault::latency(Latency::LongTail {
            median: Duration::from_nanos(1),
            p99: Duration::MAX,
        }))
        .fault(Fault::latency(Latency::Uniform {
            min: Duration::ZERO,
            max: Duration::MAX,
        }))
        .build()
        .unwrap();
    chaos.enable();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .unwrap();
    rt.block_on(async {
        let t = Instant::now();
        chaos.layer().layer(echo()).oneshot(1).await.unwrap();
        assert!(t.elapsed() <= Duration::from_secs(2 * 3600));
    });
}

#[cfg(feature = "llm")]
mod http_faults {
    use super::*;
    use bytes::Bytes;
    use http_body_util::BodyExt;
    use semaforo::chaos::{overloaded, rate_limited, ChaosBody};
    use semaforo::classify::{Classify, LlmClassifier};
    use semaforo::pace::Pace;

    fn provider() -> impl Service<
        http::Request<()>,
        Response = http::Response<Bytes>,
        Error = Infallible,
        Future = std::future::Ready<Result<http::Response<Bytes>, Infallible>>,
    > + Clone {
        service_fn(|_: http::Request<()>| {
            std::future::ready(Ok(http::Response::new(Bytes::from_static(
                b"{\"ok\":true}",
            ))))
        })
    }

    #[tokio::test(start_paused = true)]
    async fn an_injected_429_is_read_by_the_classifier_and_pauses_the_pacer() {
        let chaos = Chaos::builder()
            .fault(Fault::respond(rate_limited::<Bytes>(Duration::from_secs(
                20,
            ))))
            .build()
            .unwrap();
        chaos.enable();
        let pace = Pace::builder().requests_per_minute(600).build().unwrap();
        let svc = pace
            .layer()
            .classify(LlmClassifier::new())
            .layer(chaos.layer().layer(provider()));
        let t0 = Instant::now();
        let res = svc.oneshot(http::Request::new(())).await.unwrap();
        assert_eq!(res.status(), 429);
        assert_eq!(
            LlmClassifier::new().classify(Ok::<_, &std::io::Error>(&res)),
            Class::Throttled {
                retry_after: Some(Duration::from_secs(20))
            }
        );
        assert_eq!(res.headers()["x-ratelimit-remaining-requests"], "0");
        assert_eq!(
            pace.snapshot().paused_until,
            Some(t0 + Duration::from_secs(20))
        );

        let chaos = Chaos::builder()
            .fault(Fault::respond(overloaded::<Bytes>()))
            .build()
            .unwrap();
        chaos.enable();
        let res = chaos
            .layer()
            .layer(provider())
            .oneshot(http::Request::new(()))
            .await
            .unwrap();
        assert_eq!(res.status(), 529);
        assert_eq!(
            LlmClassifier::new().classify(Ok::<_, &std::io::Error>(&res)),
            Class::Overloaded { retry_after: None }
        );
    }

    type Frames =
        futures::stream::Iter<std::vec::IntoIter<Result<http_body::Frame<Bytes>, Infallible>>>;
    type Streamed = http::Response<http_body_util::StreamBody<Frames>>;

    fn streaming(
    ) -> impl Service<http::Request<()>, Response = Streamed, Error = Infallible, Future = impl Send>
           + Clone {
        service_fn(|_: http::Request<()>| async {
            let frames: Vec<Result<http_body::Frame<Bytes>, Infallible>> = (0..10)
                .map(|i| Ok(http_body::Frame::data(Bytes::from(format!("chunk {i}\n")))))
                .collect();
            Ok(http::Response::new(http_body_util::StreamBody::new(
                futures::stream::iter(frames),
            )))
        })
    }

    #[tokio::test(start_paused = true)]
    async fn a_stream_cut_after_3_chunks_and_one_stalled_after_5() {
        let chaos: Chaos<http::Response<ChaosBody<_>>> = Chaos::builder()
            .fault(Fault::cut_stream(3))
            .build()
            .unwrap();
        chaos.enable();
        let res = chaos
            .stream_layer()
            .layer(streaming())
            .oneshot(http::Request::new(()))
            .await
            .unwrap();
        let mut body = res.into_body();
        let mut got = Vec::new();
        let err = loop {
            match body.frame().await {
                Some(Ok(f)) => got.push(f.into_data().unwrap()),
                Some(Err(e)) => break e,
                None => panic!("the stream ended instead of failing"),
            }
        };
        assert_eq!(got.len(), 3);
        assert_eq!(classify_error(&*err), Class::Transient);
        assert!(body.frame().await.is_none());

        let chaos: Chaos<http::Response<ChaosBody<_>>> = Chaos::builder()
            .fault(Fault::stall_stream(5))
            .build()
            .unwrap();
        chaos.enable();
        let res = chaos
            .stream_layer()
            .layer(streaming())
            .oneshot(http::Request::new(()))
            .await
            .unwrap();
        let mut body = res.into_body();
        for _ in 0..5 {
            body.frame().await.unwrap().unwrap();
        }
        assert!(!http_body::Body::is_end_stream(&body));
        let next = tokio::time::timeout(Duration::from_secs(3600), body.frame()).await;
        assert!(next.is_err(), "stalled for an hour");

        // Off: the stream untouched, read the way hyper does (it stops at
        // `is_end_stream`).
        chaos.disable();
        let res = chaos
            .stream_layer()
            .layer(streaming())
            .oneshot(http::Request::new(()))
            .await
            .unwrap();
        let mut body = res.into_body();
        let mut n = 0;
        while !http_body::Body::is_end_stream(&body) {
            match body.frame().await {
                Some(Ok(_)) => n += 1,
                _ => break,
            }
        }
        assert_eq!(n, 10);
    }
}

//! Singleflight: identical calls in flight share one upstream call.

use proptest::prelude::*;
use semaforo::classify::classify_error;
use semaforo::coalesce::CoalesceLayer;
use semaforo::observe::{EventKind, ShareOutcome};
use semaforo::retry::Retry;
use semaforo::{BoxError, RejectKind, Rejected};
use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tower::{Layer, Service, ServiceExt};

/// An upstream answering `"answer to {topic}"` after `work`; counts calls
/// and the most calls of one topic in flight at once.
#[derive(Clone, Default)]
struct Upstream {
    calls: Arc<AtomicUsize>,
    running: Arc<Mutex<HashMap<String, usize>>>,
    most_at_once: Arc<AtomicUsize>,
}

impl Upstream {
    fn service(
        &self,
        work: Duration,
    ) -> impl Service<String, Response = String, Error = std::io::Error, Future = impl Send> + Clone + Send
    {
        let up = self.clone();
        tower::service_fn(move |topic: String| {
            let up = up.clone();
            up.calls.fetch_add(1, Ordering::SeqCst);
            async move {
                // Running from the first poll.
                let n = {
                    let mut r = up.running.lock().unwrap();
                    let n = r.entry(topic.clone()).or_default();
                    *n += 1;
                    *n
                };
                up.most_at_once.fetch_max(n, Ordering::SeqCst);
                // Leaves the count when dropped too.
                struct Leave(Upstream, String);
                impl Drop for Leave {
                    fn drop(&mut self) {
                        *self.0.running.lock().unwrap().get_mut(&self.1).unwrap() -= 1;
                    }
                }
                let _leave = Leave(up.clone(), topic.clone());
                tokio::time::sleep(work).await;
                Ok::<_, std::io::Error>(format!("answer to {topic}"))
            }
        })
    }
}

#[allow(clippy::ptr_arg)] // a key of `String` requests reads `&String`
fn by_topic(t: &String) -> Option<String> {
    Some(t.clone())
}

/// The classroom scenario: 50 identical requests at once → one upstream
/// call, 50 identical answers; 50 different ones → 50 calls.
#[tokio::test(start_paused = true)]
async fn fifty_identical_calls_pay_once_and_fifty_different_pay_fifty() {
    let up = Upstream::default();
    let layer = CoalesceLayer::new(by_topic);
    let svc = layer.layer(up.service(Duration::from_secs(2)));
    let answers = futures::future::join_all(
        (0..50).map(|_| svc.clone().oneshot("el ciclo del agua".to_string())),
    )
    .await;
    assert_eq!(up.calls.load(Ordering::SeqCst), 1);
    assert!(answers
        .iter()
        .all(|a| a.as_deref().unwrap() == "answer to el ciclo del agua"));
    assert_eq!(layer.in_flight(), 0);

    let answers =
        futures::future::join_all((0..50).map(|i| svc.clone().oneshot(format!("tema {i}")))).await;
    assert_eq!(up.calls.load(Ordering::SeqCst), 51);
    for (i, a) in answers.iter().enumerate() {
        assert_eq!(a.as_deref().unwrap(), format!("answer to tema {i}"));
    }
    // A call after the first finished is a new call (nothing is cached).
    svc.clone()
        .oneshot("el ciclo del agua".to_string())
        .await
        .unwrap();
    assert_eq!(up.calls.load(Ordering::SeqCst), 52);
}

/// The caller whose call runs is dropped mid-flight with 10 waiting: one
/// of them takes over, all 10 get the answer, the upstream saw 2 calls.
#[tokio::test(start_paused = true)]
async fn a_dropped_leader_hands_over_to_a_follower() {
    let up = Upstream::default();
    let outcomes = Arc::new(Mutex::new(Vec::new()));
    let o = outcomes.clone();
    let layer = CoalesceLayer::new(by_topic).on_event(move |e| {
        if let EventKind::Shared { outcome } = e.kind {
            o.lock().unwrap().push(outcome);
        }
    });
    let svc = layer.layer(up.service(Duration::from_secs(2)));
    let leader = tokio::spawn(svc.clone().oneshot("x".to_string()));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let followers: Vec<_> = (0..10)
        .map(|_| tokio::spawn(svc.clone().oneshot("x".to_string())))
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    leader.abort();
    let t0 = tokio::time::Instant::now();
    for f in followers {
        assert_eq!(f.await.unwrap().unwrap(), "answer to x");
    }
    // The new call started when the first was dropped: a full 2 s.
    assert_eq!(t0.elapsed(), Duration::from_secs(2));
    assert_eq!(up.calls.load(Ordering::SeqCst), 2);
    assert_eq!(up.most_at_once.load(Ordering::SeqCst), 1);
    let outcomes = outcomes.lock().unwrap().clone();
    assert_eq!(
        outcomes
            .iter()
            .filter(|o| **o == ShareOutcome::TookOver)
            .count(),
        1
    );
    assert_eq!(
        outcomes
            .iter()
            .filter(|o| **o == ShareOutcome::Coalesced)
            .count(),
        9
    );
    assert_eq!(layer.in_flight(), 0);
}

#[derive(Debug)]
struct Busy;

impl std::fmt::Display for Busy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("upstream overloaded")
    }
}

impl std::error::Error for Busy {}

/// The call fails (`Overloaded`): every waiting caller gets that error,
/// classified the same (the original is the shared error's source).
#[tokio::test(start_paused = true)]
async fn followers_get_the_leaders_error() {
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let upstream = tower::service_fn(move |_: String| {
        c.fetch_add(1, Ordering::SeqCst);
        async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            Err::<String, _>(semaforo::BoxError::from(
                Rejected::new("upstream", RejectKind::QueueFull)
                    .with_retry_after(Duration::from_secs(7)),
            ))
        }
    });
    let svc = CoalesceLayer::new(by_topic).layer(upstream);
    let answers =
        futures::future::join_all((0..10).map(|_| svc.clone().oneshot("x".to_string()))).await;
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    for a in answers {
        let e = a.unwrap_err();
        let r = Rejected::from_box(&e).expect("the rejection is found through the share");
        assert_eq!(r.kind(), RejectKind::QueueFull);
        assert_eq!(r.retry_after(), Some(Duration::from_secs(7)));
        let original: BoxError = Rejected::new("upstream", RejectKind::QueueFull)
            .with_retry_after(Duration::from_secs(7))
            .into();
        assert_eq!(
            classify_error(e.as_ref()),
            classify_error(original.as_ref())
        );
        assert_eq!(e.to_string(), original.to_string());
    }
    // Alone, the caller gets the original error itself.
    let svc = CoalesceLayer::new(by_topic).layer(tower::service_fn(|_: String| async {
        Err::<String, _>(Busy)
    }));
    let e = svc.oneshot("y".to_string()).await.unwrap_err();
    assert!(e.downcast_ref::<Busy>().is_some());
}

/// Behind a retry layer inside it, the waiting callers ride along on the
/// retries: one retried call for all of them (2 upstream attempts, 10
/// answers).
#[tokio::test(start_paused = true)]
async fn a_retry_inside_serves_every_follower() {
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let upstream = tower::service_fn(move |t: String| {
        let n = c.fetch_add(1, Ordering::SeqCst);
        async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            if n == 0 {
                Err(std::io::Error::from(std::io::ErrorKind::ConnectionReset))
            } else {
                Ok(format!("answer to {t}"))
            }
        }
    });
    let retry = Retry::builder().max_attempts(3).build().unwrap();
    let svc = CoalesceLayer::new(by_topic).layer(retry.layer().layer(upstream));
    let answers =
        futures::future::join_all((0..10).map(|_| svc.clone().oneshot("x".to_string()))).await;
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    assert!(answers
        .iter()
        .all(|a| a.as_deref().unwrap() == "answer to x"));
}

/// `None` bypasses: every such call goes on its own.
#[tokio::test(start_paused = true)]
async fn no_key_no_sharing() {
    let up = Upstream::default();
    let svc = CoalesceLayer::new(|t: &String| (!t.starts_with("private")).then(|| t.clone()))
        .layer(up.service(Duration::from_secs(1)));
    futures::future::join_all((0..5).map(|_| svc.clone().oneshot("private x".to_string()))).await;
    assert_eq!(up.calls.load(Ordering::SeqCst), 5);
}

/// A future dropped at each point: as a follower before and after the
/// answer, as a leader before its first poll and mid-call, as a follower
/// that took over while it waits for readiness. Nothing stays in flight
/// and nobody else hangs.
#[tokio::test(start_paused = true)]
async fn dropped_at_every_await_leaves_nothing() {
    let up = Upstream::default();
    let layer = CoalesceLayer::new(by_topic);
    let mut svc = layer.layer(up.service(Duration::from_secs(1)));
    let waker = std::task::Waker::noop();
    let mut cx = Context::from_waker(waker);

    // A leader dropped before it was polled (its inner call is made in its
    // future, so none was): its follower takes over with the only call.
    let leader = svc.ready().await.unwrap().call("a".to_string());
    let mut follower = Box::pin(svc.ready().await.unwrap().call("a".to_string()));
    assert!(follower.as_mut().poll(&mut cx).is_pending());
    drop(leader);
    assert_eq!(follower.await.unwrap(), "answer to a");
    assert_eq!(up.calls.load(Ordering::SeqCst), 1);
    assert_eq!(up.most_at_once.load(Ordering::SeqCst), 1);

    // A follower dropped while waiting, another after the answer came
    // (before it polled again).
    let mut leader = Box::pin(svc.ready().await.unwrap().call("b".to_string()));
    let mut f1 = Box::pin(svc.ready().await.unwrap().call("b".to_string()));
    let mut f2 = Box::pin(svc.ready().await.unwrap().call("b".to_string()));
    assert!(leader.as_mut().poll(&mut cx).is_pending());
    assert!(f1.as_mut().poll(&mut cx).is_pending());
    assert!(f2.as_mut().poll(&mut cx).is_pending());
    drop(f1);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(leader.await.unwrap(), "answer to b");
    drop(f2);

    // Leader and every follower dropped mid-call: the call is dropped too.
    let mut leader = Box::pin(svc.ready().await.unwrap().call("c".to_string()));
    let mut f = Box::pin(svc.ready().await.unwrap().call("c".to_string()));
    assert!(leader.as_mut().poll(&mut cx).is_pending());
    assert!(f.as_mut().poll(&mut cx).is_pending());
    drop(leader);
    // The follower took over (it polls its own service ready, then calls).
    assert!(f.as_mut().poll(&mut cx).is_pending());
    drop(f);
    assert_eq!(layer.in_flight(), 0);
    assert!(up.running.lock().unwrap().values().all(|n| *n == 0));
    // Polled after completion: an error, no panic.
    let mut done = Box::pin(svc.ready().await.unwrap().call("d".to_string()));
    assert!(done.as_mut().poll(&mut cx).is_pending());
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(matches!(done.as_mut().poll(&mut cx), Poll::Ready(Ok(_))));
    assert!(matches!(done.as_mut().poll(&mut cx), Poll::Ready(Err(_))));
}

#[derive(Debug, Clone)]
struct Caller {
    key: u8,
    at_ms: u64,
    drop_after_ms: Option<u64>,
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Random callers of 3 keys arriving over 3 s, some dropped: at most
    /// one upstream call per key at any time; every caller not dropped
    /// gets the answer of its own key; nothing stays in flight.
    #[test]
    fn one_call_per_key_at_a_time_and_the_right_answer(
        callers in prop::collection::vec(
            (0u8..3, 0u64..3_000, prop::option::weighted(0.3, 0u64..2_000))
                .prop_map(|(key, at_ms, drop_after_ms)| Caller { key, at_ms, drop_after_ms }),
            1..60,
        ),
        work_ms in 1u64..1_500,
    ) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap();
        rt.block_on(async move {
            let up = Upstream::default();
            let layer = CoalesceLayer::new(by_topic);
            let svc = layer.layer(up.service(Duration::from_millis(work_ms)));
            let mut callers = callers;
            callers.sort_by_key(|c| c.at_ms);
            let t0 = tokio::time::Instant::now();
            let mut tasks = Vec::new();
            for c in &callers {
                tokio::time::sleep_until(t0 + Duration::from_millis(c.at_ms)).await;
                let fut = svc.clone().oneshot(format!("k{}", c.key));
                let drop_after = c.drop_after_ms;
                tasks.push(tokio::spawn(async move {
                    match drop_after {
                        Some(d) => tokio::time::timeout(Duration::from_millis(d), fut).await.ok(),
                        None => Some(fut.await),
                    }
                }));
            }
            for (c, t) in callers.iter().zip(tasks) {
                let out = tokio::time::timeout(Duration::from_secs(3_600), t)
                    .await
                    .map_err(|_| TestCaseError::fail("a caller hung"))?
                    .unwrap();
                if let Some(r) = out {
                    let r = r.map_err(|e: BoxError| e.to_string());
                    prop_assert_eq!(r, Ok(format!("answer to k{}", c.key)));
                } else {
                    prop_assert!(c.drop_after_ms.is_some());
                }
            }
            prop_assert!(up.most_at_once.load(Ordering::SeqCst) <= 1);
            prop_assert!(up.calls.load(Ordering::SeqCst) <= callers.len());
            prop_assert_eq!(layer.in_flight(), 0);
            Ok(())
        })?;
    }
}

/// A quota below refuses the caller whose call ran (its user is over its
/// quota): the waiting caller of another user is not handed that refusal;
/// it goes on with its own request and gets an answer.
#[tokio::test(start_paused = true)]
async fn a_quota_refusal_is_not_shared() {
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    // The "quota": user "over" is refused after 1 s; others are answered.
    let upstream = tower::service_fn(move |req: (String, String)| {
        let c = c.clone();
        async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            if req.0 == "over" {
                return Err(BoxError::from(Rejected::new(
                    "quota",
                    RejectKind::QuotaExceeded,
                )));
            }
            c.fetch_add(1, Ordering::SeqCst);
            Ok::<_, BoxError>(format!("answer to {}", req.1))
        }
    });
    let svc = CoalesceLayer::new(|r: &(String, String)| Some(r.1.clone())).layer(upstream);
    let leader = svc.clone().oneshot(("over".to_string(), "x".to_string()));
    let follower = svc.clone().oneshot(("fine".to_string(), "x".to_string()));
    let (l, f) = tokio::join!(leader, follower);
    let e = l.unwrap_err();
    assert_eq!(
        Rejected::from_box(&e).unwrap().kind(),
        RejectKind::QuotaExceeded
    );
    assert_eq!(f.unwrap(), "answer to x");
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

/// A call is in flight until the future of the caller whose call ran is
/// dropped: a caller coming after the answer but before that drop gets the
/// same answer (a cache above stores it in that interval); after the drop,
/// a new call goes upstream. An error is not given to a late caller.
#[tokio::test(start_paused = true)]
async fn an_answer_stays_joinable_until_its_callers_future_is_dropped() {
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let svc = CoalesceLayer::new(|t: &String| Some(t.clone())).layer(tower::service_fn(
        move |t: String| {
            let n = c.fetch_add(1, Ordering::SeqCst) + 1;
            async move {
                if t == "bad" {
                    return Err::<String, BoxError>("upstream failed".into());
                }
                Ok(format!("{t} #{n}"))
            }
        },
    ));
    let mut s1 = svc.clone();
    let mut first = Box::pin(s1.ready().await.unwrap().call("a".to_string()));
    match futures::poll!(first.as_mut()) {
        Poll::Ready(Ok(a)) => assert_eq!(a, "a #1"),
        other => panic!("{other:?}"),
    }
    // Answered, its future still held: a new caller gets that answer.
    assert_eq!(svc.clone().oneshot("a".to_string()).await.unwrap(), "a #1");
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    drop(first);
    assert_eq!(svc.clone().oneshot("a".to_string()).await.unwrap(), "a #2");
    // An error: a caller coming after it calls again.
    let mut bad = Box::pin(s1.ready().await.unwrap().call("bad".to_string()));
    assert!(matches!(futures::poll!(bad.as_mut()), Poll::Ready(Err(_))));
    assert!(svc.clone().oneshot("bad".to_string()).await.is_err());
    assert_eq!(calls.load(Ordering::SeqCst), 4);
}

//! One scripted scenario through every kind of event — queue, reject, retry,
//! breaker open / half-open / close, pace pause, drain — captured twice: by a
//! listener and by a tracing subscriber. Both must see the exact sequence.

use semaforo::breaker::Breaker;
use semaforo::bulkhead::Bulkhead;
use semaforo::observe::{Event, EventKind};
use semaforo::pace::{Cost, Pace};
use semaforo::retry::Retry;
use semaforo::shutdown::Shutdown;
use semaforo::{BoxError, Rejected};
use std::io;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tower::{service_fn, Layer, Service, ServiceExt};

/// `(layer, name, what)` of each event, in order.
type Seen = Arc<Mutex<Vec<String>>>;

fn listener(seen: &Seen) -> impl Fn(&Event<'_>) + Send + Sync + 'static {
    let seen = seen.clone();
    move |e: &Event<'_>| {
        let what = match &e.kind {
            EventKind::Queued { position } => format!("queued at {position}"),
            EventKind::Admitted { waited } => format!("admitted after {waited:?}"),
            EventKind::Rejected { kind, retry_after } => {
                format!("rejected {kind} retry_after={retry_after:?}")
            }
            EventKind::Retried { class, attempt, .. } => {
                format!("retried {} after attempt {attempt}", class.as_str())
            }
            EventKind::BreakerTransition { from, to, reason } => {
                format!("{from:?} -> {to:?} ({reason})")
            }
            EventKind::PacePaused { pause, reason } => format!("paused {pause:?} ({reason})"),
            EventKind::PaceResumed => "resumed".to_owned(),
            EventKind::Shutdown { phase } => format!("{phase:?}"),
            other => format!("{other:?}"),
        };
        seen.lock()
            .unwrap()
            .push(format!("{} {} {what}", e.layer, e.name.unwrap_or("-")));
    }
}

/// A tracing subscriber writing plain lines into a buffer.
#[derive(Clone, Default)]
struct Buffer(Arc<Mutex<Vec<u8>>>);

impl io::Write for Buffer {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Buffer {
    type Writer = Buffer;
    fn make_writer(&'a self) -> Buffer {
        self.clone()
    }
}

/// A DEBUG-level subscriber writing into a buffer, set for this thread.
/// A DEBUG subscriber for this thread, writing to the buffer returned.
///
/// Every test in this file must hold one while it emits events, even a test
/// that reads only a listener: `tracing` caches each event site's interest
/// when the site is first hit, computed over the subscribers alive at that
/// moment, and a rebuild started by another thread's new subscriber can miss a
/// site that is being registered. A test emitting with no subscriber of its
/// own could thus leave `pacer paused` cached as "never" while the test that
/// captures it runs (seen in 48 of 200 runs of this binary before every test
/// held one; 0 of 200 after).
fn capture(with_target: bool) -> (Buffer, tracing::subscriber::DefaultGuard) {
    let buffer = Buffer::default();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(buffer.clone())
        .with_max_level(tracing::Level::DEBUG)
        .with_ansi(false)
        .without_time()
        .with_target(with_target)
        .finish();
    (buffer, tracing::subscriber::set_default(subscriber))
}

fn timed_out() -> io::Error {
    io::Error::from(io::ErrorKind::TimedOut)
}

async fn scenario(seen: &Seen) {
    // 1. Bulkhead: one slot, a line of one. A holds the slot for 5 s, B waits,
    //    C finds the line full.
    let bulkhead = Bulkhead::builder(1)
        .name("db")
        .max_queue(1)
        .on_event(listener(seen))
        .build()
        .unwrap();
    let slow = bulkhead.layer().layer(service_fn(|d: u64| async move {
        tokio::time::sleep(Duration::from_secs(d)).await;
        Ok::<_, io::Error>(())
    }));
    let a = tokio::spawn(slow.clone().oneshot(5));
    tokio::task::yield_now().await;
    let b = tokio::spawn(slow.clone().oneshot(1));
    tokio::task::yield_now().await;
    let c = slow.clone().oneshot(1).await.unwrap_err();
    assert!(Rejected::from_box(&c).is_some());
    a.await.unwrap().unwrap();
    b.await.unwrap().unwrap();

    // 2. Retry: the first attempt times out, the second succeeds.
    let retry = Retry::builder()
        .name("api")
        .on_event(listener(seen))
        .build()
        .unwrap();
    let calls = Arc::new(AtomicU32::new(0));
    let n = calls.clone();
    let mut flaky = retry.layer().layer(service_fn(move |_: u32| {
        let first = n.fetch_add(1, Ordering::SeqCst) == 0;
        async move {
            if first {
                Err(timed_out())
            } else {
                Ok(())
            }
        }
    }));
    flaky.ready().await.unwrap().call(1).await.unwrap();

    // 3. Breaker: 2 failures open it for 10 s; a call is refused; after 10 s a
    //    probe succeeds and closes it.
    let breaker = Breaker::builder()
        .name("api")
        .consecutive_failures(2)
        .open_for(Duration::from_secs(10))
        .on_event(listener(seen))
        .build()
        .unwrap();
    let fail = Arc::new(AtomicU32::new(1));
    let f = fail.clone();
    let mut guarded = breaker.layer().layer(service_fn(move |_: u32| {
        let failing = f.load(Ordering::SeqCst) == 1;
        async move {
            if failing {
                Err(timed_out())
            } else {
                Ok(())
            }
        }
    }));
    for _ in 0..2 {
        let _ = guarded.ready().await.unwrap().call(1).await;
    }
    assert!(guarded.ready().await.unwrap().call(1).await.is_err());
    tokio::time::advance(Duration::from_secs(10)).await;
    fail.store(0, Ordering::SeqCst);
    guarded.ready().await.unwrap().call(1).await.unwrap();

    // 4. Pace: a 429 with retry-after 3 s pauses it; the next call after the
    //    pause resumes it.
    let pace = Pace::builder()
        .name("openai")
        .requests_per_minute(600)
        .on_event(listener(seen))
        .build()
        .unwrap();
    let throttle = Arc::new(AtomicU32::new(1));
    let t = throttle.clone();
    let mut paced = pace
        .layer()
        .weigh(|_: &u32| Cost::tokens(0))
        .classify(|r: Result<&(), &BoxError>| match r {
            Ok(()) => semaforo::classify::Class::Success,
            Err(_) => semaforo::classify::Class::Throttled {
                retry_after: Some(Duration::from_secs(3)),
            },
        })
        .layer(service_fn(move |_: u32| {
            let throttled = t.swap(0, Ordering::SeqCst) == 1;
            async move {
                if throttled {
                    Err::<(), BoxError>("429".into())
                } else {
                    Ok(())
                }
            }
        }));
    assert!(paced.ready().await.unwrap().call(1).await.is_err());
    tokio::time::advance(Duration::from_secs(3)).await;
    paced.ready().await.unwrap().call(1).await.unwrap();

    // 5. Shutdown: a drain with nothing in flight, then a refused call.
    let shutdown = Shutdown::new();
    shutdown.on_event(listener(seen));
    let mut svc = shutdown
        .layer()
        .layer(service_fn(|_: u32| async { Ok::<_, io::Error>(()) }));
    let report = shutdown.drain(Duration::from_secs(5)).await;
    assert_eq!(report.completed, 0);
    assert!(svc.ready().await.unwrap().call(1).await.is_err());
}

const EXPECTED: &[&str] = &[
    "bulkhead db queued at 0",
    "bulkhead db rejected queue full retry_after=Some(1s)",
    "bulkhead db admitted after 5s",
    "retry api retried transient after attempt 1",
    "breaker api Closed -> Open (consecutive failures)",
    "breaker api rejected circuit open retry_after=Some(10s)",
    "breaker api Open -> HalfOpen (open duration elapsed)",
    "breaker api HalfOpen -> Closed (probes succeeded)",
    "pace openai paused 3s (throttled by the upstream)",
    "pace openai resumed",
    "shutdown - Draining",
    "shutdown - Drained",
    "shutdown - rejected shutting down retry_after=Some(1s)",
];

#[tokio::test(start_paused = true)]
async fn listener_and_tracing_see_the_exact_sequence() {
    let seen: Seen = Default::default();
    let (buffer, _default) = capture(false);
    scenario(&seen).await;

    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen, EXPECTED, "listener");

    let text = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    // Each event is one line naming its layer and instance, in the same order.
    let wanted = [
        ("DEBUG", "bulkhead", "db", "queued"),
        ("DEBUG", "bulkhead", "db", "rejected"),
        ("DEBUG", "bulkhead", "db", "admitted after waiting"),
        ("DEBUG", "retry", "api", "retrying"),
        ("WARN", "breaker", "api", "breaker opened"),
        ("DEBUG", "breaker", "api", "rejected"),
        ("INFO", "breaker", "api", "breaker state"),
        ("INFO", "breaker", "api", "breaker state"),
        ("WARN", "pace", "openai", "pacer paused"),
        ("INFO", "pace", "openai", "pacer resumed"),
        ("INFO", "shutdown", "", "shutdown"),
        ("INFO", "shutdown", "", "shutdown"),
        ("DEBUG", "shutdown", "", "rejected"),
    ];
    assert_eq!(lines.len(), wanted.len(), "{text}");
    for (line, (level, layer, name, message)) in lines.iter().zip(wanted) {
        assert!(line.trim_start().starts_with(level), "{line}");
        assert!(line.contains(message), "{line}: want {message}");
        assert!(line.contains(&format!("layer=\"{layer}\"")), "{line}");
        assert!(line.contains(&format!("name=\"{name}\"")), "{line}");
    }
    // At INFO, nothing is logged per call: only state changes.
    let info: Vec<_> = lines.iter().filter(|l| !l.contains("DEBUG")).collect();
    assert_eq!(info.len(), 7, "{info:#?}");
}

#[tokio::test(start_paused = true)]
async fn a_waiting_call_runs_in_a_span_with_the_layer_name() {
    let (buffer, _default) = capture(true);
    let bulkhead = Bulkhead::builder(1)
        .name("db")
        .max_queue(5)
        .build()
        .unwrap();
    let svc = bulkhead.layer().layer(service_fn(|d: u64| async move {
        tokio::time::sleep(Duration::from_secs(d)).await;
        tracing::debug!("inner work");
        Ok::<_, io::Error>(())
    }));
    let a = tokio::spawn(svc.clone().oneshot(2));
    tokio::task::yield_now().await;
    svc.clone().oneshot(0).await.unwrap();
    a.await.unwrap().unwrap();
    let text = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
    let admitted = text
        .lines()
        .find(|l| l.contains("admitted after waiting"))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(
        admitted.contains("semaforo.wait{layer=\"bulkhead\" name=\"db\"}"),
        "{admitted}"
    );
}

/// A pacer's pauses are told in order: a 429 after a pause has run out but
/// before any call was admitted tells `resumed` first (it told `paused`,
/// `paused`, with no resume between); a later 429 that lengthens a running
/// pause is told with the time it now lasts; one that does not is not told.
#[tokio::test(start_paused = true)]
async fn pace_pauses_are_told_in_order() {
    // Every test of this file holds a DEBUG subscriber while it emits (see
    // `capture`), this one too although it reads only the listener.
    let (_buffer, _default) = capture(false);
    let seen: Seen = Arc::default();
    let pace = Pace::builder()
        .name("openai")
        .requests_per_minute(600)
        .on_event(listener(&seen))
        .build()
        .unwrap();
    // A request is (seconds the upstream takes, its Retry-After in seconds).
    let paced = pace
        .layer()
        .weigh(|_: &(u64, u64)| Cost::tokens(0))
        .classify(|r: Result<&u64, &BoxError>| match r {
            Ok(0) | Err(_) => semaforo::classify::Class::Success,
            Ok(s) => semaforo::classify::Class::Throttled {
                retry_after: Some(Duration::from_secs(*s)),
            },
        })
        .layer(service_fn(|(took, ra): (u64, u64)| async move {
            tokio::time::sleep(Duration::from_secs(took)).await;
            Ok::<u64, BoxError>(ra)
        }));
    // Three calls in flight, answering 429 at 2 s (5 s), 3 s (30 s) and
    // 4 s (1 s); a fourth answers 429 (1 s) at once.
    let late: Vec<_> = [(2, 5), (3, 30), (4, 1)]
        .into_iter()
        .map(|r| tokio::spawn(paced.clone().oneshot(r)))
        .collect();
    tokio::time::sleep(Duration::from_millis(1)).await;
    paced.clone().oneshot((0, 1)).await.unwrap();
    for l in late {
        l.await.unwrap().unwrap();
    }
    assert_eq!(
        *seen.lock().unwrap(),
        vec![
            "pace openai paused 1s (throttled by the upstream)".to_owned(),
            "pace openai resumed".to_owned(),
            "pace openai paused 5s (throttled by the upstream)".to_owned(),
            "pace openai paused 30s (throttled by the upstream)".to_owned(),
        ]
    );
}

//! At the edges (from an outside attack): spend limits, per-limit max_wait and calendar windows
//! on the plain pacer (no features).

#[path = "support/midnight.rs"]
mod midnight;
use midnight::until_utc_midnight;
use semaforo::classify::Class;
use semaforo::pace::{Cost, KeyedPace, Limit, Observed, Pace, Unit};
use semaforo::{RejectKind, Rejected};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::time::Instant;
use tower::{Layer, ServiceExt};

fn spend(n: u64) -> Cost {
    Cost::requests(1).with_spend(n)
}

fn echo() -> impl tower::Service<u64, Response = u64, Error = std::io::Error, Future = impl Send>
       + Clone
       + Send
       + 'static {
    tower::service_fn(|n: u64| async move { Ok::<_, std::io::Error>(n) })
}

fn rejected(e: &semaforo::BoxError) -> &Rejected {
    Rejected::from_box(e).unwrap_or_else(|| panic!("not a rejection: {e}"))
}

fn avail(p: &Pace, unit: Unit) -> f64 {
    p.snapshot()
        .dims
        .iter()
        .find(|d| d.unit == unit)
        .unwrap()
        .available
}

/// Two limits with their own max_wait: the retry_after must be the time
/// until *both* can take the call, not the first one found.
#[tokio::test(start_paused = true)]
async fn retry_after_is_the_latest_of_two_budgets() {
    let pace = Pace::builder()
        .limit(Limit::spend_per_day(1_000_000)) // $1 a rolling day
        .limit(Limit::spend_per_month(2_000_000)) // $2 a rolling 30 days
        .build()
        .unwrap();
    let svc = pace.layer().weigh(|n: &u64| spend(*n)).layer(echo());
    svc.clone().oneshot(1_000_000).await.unwrap();
    tokio::time::advance(Duration::from_secs(86_400)).await;
    svc.clone().oneshot(1_000_000).await.unwrap();
    // Daily: $0.50 back in 12 h. Monthly: 66,666 µ$ left, 433,334 more
    // needed at 2e6 µ$ / 2,592,000 s: 561,600 s.
    let err = svc.clone().oneshot(500_000).await.unwrap_err();
    let ra = rejected(&err).retry_after().unwrap();
    // Retrying after retry_after must succeed.
    tokio::time::advance(ra).await;
    let again = svc.clone().oneshot(500_000).await;
    assert!(
        again.is_ok(),
        "retry_after {ra:?} was too short: refused again with {:?}",
        again.err().map(|e| rejected(&e).retry_after())
    );
}

/// A keyed pacer whose shared limits hold a spend budget: calls waiting in
/// a key's own line (for the key's RPM) are not counted against the shared
/// budget at admission, so more are admitted than the budget can pay, and
/// the late ones then *wait hours* for the budget instead of being refused
/// at once.
#[tokio::test(start_paused = true)]
async fn shared_spend_budget_is_never_waited_for_keyed() {
    let keyed = KeyedPace::builder(Pace::builder().requests_per_minute(1))
        .shared(Pace::builder().limit(Limit::spend_per_day(1_000_000)))
        .build()
        .unwrap();
    let svc = keyed
        .layer()
        .key(|r: &(u8, u64)| Some(r.0.to_string()))
        .weigh(|r: &(u8, u64)| spend(r.1))
        .layer(tower::service_fn(|r: (u8, u64)| async move {
            Ok::<_, std::io::Error>(r.1)
        }));
    let t0 = Instant::now();
    // Ten calls of $0.20 for model "a": one goes, nine wait for a's RPM.
    // Only five can ever be paid today.
    let mut tasks = Vec::new();
    for _ in 0..10 {
        let s = svc.clone();
        tasks.push(tokio::spawn(async move {
            let r = s.oneshot((b'a', 200_000)).await;
            (r.map_err(|e| rejected(&e).kind()), Instant::now())
        }));
    }
    let mut late = Vec::new();
    for t in tasks {
        let (r, at) = t.await.unwrap();
        if r.is_ok() && at - t0 > Duration::from_secs(600) {
            late.push(at - t0);
        }
    }
    assert!(
        late.is_empty(),
        "calls under a spend budget (max_wait 0) waited for it: {late:?}"
    );
}

/// Single pacer: a call queued for the RPM, its spend admitted; the call
/// before it reconciles with a debt. At its turn the budget cannot pay it:
/// it waits ~4.8 hours (and beyond the pacer's own max_wait of 2 min)
/// instead of being refused.
#[tokio::test(start_paused = true)]
async fn a_debt_while_queued_makes_a_spend_call_wait_hours() {
    let pace = Pace::builder()
        .limit(Limit::spend_per_day(1_000_000))
        .requests_per_minute(1)
        .max_wait(Duration::from_secs(120))
        .build()
        .unwrap();
    let svc = pace
        .layer()
        .weigh(|r: &(u64, u64)| spend(r.0))
        .observe(|res: &u64| Observed {
            usage: Some(spend(*res)),
            info: None,
        })
        .layer(tower::service_fn(|r: (u64, u64)| async move {
            tokio::time::sleep(Duration::from_secs(10)).await;
            Ok::<_, std::io::Error>(r.1)
        }));
    let t0 = Instant::now();
    // Estimated $0.20, billed $1.00.
    let first = tokio::spawn(svc.clone().oneshot((200_000, 1_000_000)));
    tokio::task::yield_now().await;
    let second = tokio::spawn(svc.clone().oneshot((200_000, 200_000)));
    first.await.unwrap().unwrap();
    let r = second.await.unwrap();
    let waited = t0.elapsed();
    assert!(
        r.is_err() || waited <= Duration::from_secs(120),
        "admitted under max_wait 2 min and a spend budget, started after {waited:?}"
    );
}

/// A 429 cuts the AIMD rate factor of every dimension — the spend budget's
/// too. Its cell keeps its `tat` in seconds, so slowing the refill rate
/// *raises* what is available at once: after one 429 on a fully spent
/// `$1 a day`, $0.25 more can be spent immediately ($1.25 in one instant).
#[tokio::test(start_paused = true)]
async fn a_429_gives_a_spent_budget_a_quarter_more() {
    let pace = Pace::builder()
        .limit(Limit::spend_per_day(1_000_000))
        .build()
        .unwrap();
    let svc = pace
        .layer()
        .weigh(|r: &(u64, bool)| spend(r.0))
        .classify(|r: Result<&bool, &std::io::Error>| match r {
            Ok(true) => Class::Throttled {
                retry_after: Some(Duration::from_millis(1)),
            },
            _ => Class::Success,
        })
        .layer(tower::service_fn(|r: (u64, bool)| async move {
            Ok::<_, std::io::Error>(r.1)
        }));
    svc.clone().oneshot((1_000_000, false)).await.unwrap();
    assert_eq!(avail(&pace, Unit::Spend), 0.0);
    // A call that costs no money, answered 429.
    svc.clone().oneshot((0, true)).await.unwrap();
    tokio::time::advance(Duration::from_millis(2)).await;
    let more = svc.clone().oneshot((250_000, false)).await;
    assert!(
        more.is_err(),
        "$1.25 spent within 2 ms of a $1/day budget (available after the 429: {})",
        avail(&pace, Unit::Spend)
    );
}

/// A calendar day: a call charged to yesterday's window (started before
/// midnight) reconciled after midnight, once today's window has begun,
/// refunds *today's* window.
#[tokio::test(start_paused = true)]
async fn a_refund_of_yesterday_is_credited_to_today() {
    let until = until_utc_midnight();
    let pace = Pace::builder()
        .limit(Limit::spend_per_day(1_000_000).resets_daily("UTC"))
        .build()
        .unwrap();
    let svc = pace
        .layer()
        .weigh(|r: &(u64, u64, u64)| spend(r.0))
        .observe(|res: &u64| Observed {
            usage: Some(spend(*res)),
            info: None,
        })
        .layer(tower::service_fn(|r: (u64, u64, u64)| async move {
            tokio::time::sleep(Duration::from_secs(r.2)).await;
            Ok::<_, std::io::Error>(r.1)
        }));
    tokio::time::advance(Duration::from_secs_f64(until - 5.0)).await;
    // 23:59:55: reserves $0.50, answers after 60 s having billed nothing.
    let yesterday = tokio::spawn(svc.clone().oneshot((500_000, 0, 60)));
    tokio::task::yield_now().await;
    tokio::time::advance(Duration::from_secs(10)).await;
    // 00:00:05: today's first call, $0.50 billed.
    svc.clone().oneshot((500_000, 500_000, 0)).await.unwrap();
    assert_eq!(avail(&pace, Unit::Spend), 500_000.0);
    yesterday.await.unwrap().unwrap();
    assert_eq!(
        avail(&pace, Unit::Spend),
        500_000.0,
        "yesterday's refund went to today's window"
    );
}

/// The same for a call that waited in line: it reserves at 23:59:57, but
/// its inner service is ready only at 00:00:09 — the refund of what it did
/// not spend still goes to yesterday's window (charged at the reservation,
/// not when the inner service was ready).
#[tokio::test(start_paused = true)]
async fn a_queued_call_ready_after_midnight_is_refunded_to_its_reservations_day() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    use std::task::{Context, Poll, Waker};
    /// Answers `billed` (its request's second field). The service handed to
    /// the layer is ready (the call gets in line); the copy a waiter takes
    /// for its turn is ready only once the gate opens.
    #[derive(Default)]
    struct Gated {
        open: Arc<AtomicBool>,
        waker: Arc<Mutex<Option<Waker>>>,
        copy: bool,
    }
    impl Clone for Gated {
        fn clone(&self) -> Self {
            Gated {
                open: self.open.clone(),
                waker: self.waker.clone(),
                copy: true,
            }
        }
    }
    impl tower::Service<(u64, u64)> for Gated {
        type Response = u64;
        type Error = std::io::Error;
        type Future = std::future::Ready<Result<u64, std::io::Error>>;
        fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            if !self.copy || self.open.load(Ordering::SeqCst) {
                return Poll::Ready(Ok(()));
            }
            *self.waker.lock().unwrap() = Some(cx.waker().clone());
            Poll::Pending
        }
        fn call(&mut self, r: (u64, u64)) -> Self::Future {
            std::future::ready(Ok(r.1))
        }
    }
    let until = until_utc_midnight();
    let pace = Pace::builder()
        .limit(Limit::spend_per_day(1_000_000).resets_daily("UTC"))
        .limit(Limit::new(Unit::Requests, 1, Duration::from_secs(10)))
        .build()
        .unwrap();
    let paced = |inner: Gated| {
        pace.layer()
            .weigh(|r: &(u64, u64)| spend(r.0))
            .observe(|res: &u64| Observed {
                usage: Some(spend(*res)),
                info: None,
            })
            .layer(inner)
    };
    let gate = Gated::default();
    let open = Gated::default();
    open.open.store(true, Ordering::SeqCst);
    tokio::time::advance(Duration::from_secs_f64(until - 14.0)).await;
    // 23:59:46: the request cell's next slot is 23:59:56.
    paced(open.clone()).oneshot((0, 0)).await.unwrap();
    tokio::time::advance(Duration::from_secs(1)).await;
    // 23:59:47: waits in line (its turn is at 23:59:56), reserves $0.50
    // at 23:59:57; its service is not ready before the gate opens.
    let front = Gated {
        open: gate.open.clone(),
        waker: gate.waker.clone(),
        copy: false,
    };
    let queued = tokio::spawn(paced(front).oneshot((500_000, 0)));
    for _ in 0..4 {
        tokio::task::yield_now().await;
    }
    assert_eq!(pace.snapshot().waiting, 1);
    tokio::time::advance(Duration::from_secs(10)).await;
    for _ in 0..4 {
        tokio::task::yield_now().await;
    }
    assert_eq!(pace.snapshot().waiting, 0, "reserved at 23:59:57");
    assert_eq!(avail(&pace, Unit::Spend), 500_000.0);
    tokio::time::advance(Duration::from_secs(11)).await;
    // 00:00:08: today's first call (the request slot after 23:59:57), $0.50.
    paced(open.clone())
        .oneshot((500_000, 500_000))
        .await
        .unwrap();
    assert_eq!(avail(&pace, Unit::Spend), 500_000.0);
    // 00:00:09: the waiting call's service is ready; it spent nothing.
    tokio::time::advance(Duration::from_secs(1)).await;
    gate.open.store(true, Ordering::SeqCst);
    if let Some(w) = gate.waker.lock().unwrap().take() {
        w.wake();
    }
    assert_eq!(queued.await.unwrap().unwrap(), 0);
    assert_eq!(
        avail(&pace, Unit::Spend),
        500_000.0,
        "yesterday's refund went to today's window"
    );
}

/// The same at any hour (the test above catches the fault only in the first
/// hour after midnight UTC): a zone is chosen where midnight was less than an
/// hour ago, so the second call waits over 23 h for tomorrow and the third,
/// admitted by the fluid estimate, would wait a day more at the head of the
/// line — the head's check counts its wait since arrival and refuses it.
#[tokio::test(start_paused = true)]
async fn a_limit_max_wait_counts_the_wait_in_line_at_any_hour() {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    // Local time = UTC + offset hours: the local hour is 0 with an offset
    // of -(UTC hour), or 24 - (UTC hour) to stay within -12..=14.
    let hour = (now % 86_400 / 3_600) as i64;
    let offset = if hour <= 12 { -hour } else { 24 - hour };
    // IANA's Etc zones have the sign inverted: Etc/GMT-3 is UTC+3.
    let zone = match offset {
        0 => "Etc/GMT".to_string(),
        o if o > 0 => format!("Etc/GMT-{o}"),
        o => format!("Etc/GMT+{}", -o),
    };
    let local = (now as i64 + offset * 3_600).rem_euclid(86_400) as f64;
    let until = 86_400.0 - local;
    assert!(until > 82_800.0, "midnight in {zone} is {until} s away");
    fluid_calendar_case(&zone, until).await;
}

/// A calendar window with a max_wait: calls of 2 units on a window of 3
/// can only go one a day, but the admission check packs them as a fluid
/// (`used + ahead + n` over whole windows) and admits a call that would
/// really start a day later than max_wait allows: it is refused at the head
/// (before the fix, only in the first hour after midnight UTC).
#[tokio::test(start_paused = true)]
async fn calendar_admission_packs_calls_as_a_fluid() {
    fluid_calendar_case("UTC", until_utc_midnight()).await;
}

/// Calls of 2 units on a daily limit of 3 in `zone` (midnight `until`
/// seconds away), with a `max_wait` of `until` + 1 h: the first goes
/// today, the second tomorrow, the third — admitted by the fluid estimate —
/// would go the day after and is refused when it reaches the head of the
/// line at midnight.
async fn fluid_calendar_case(zone: &str, until: f64) {
    let max = Duration::from_secs_f64(until + 3_600.0);
    let pace = Pace::builder()
        .limit(
            Limit::new(Unit::Requests, 3, Duration::from_secs(86_400))
                .resets_daily(zone)
                .max_wait(max),
        )
        .build()
        .unwrap();
    let svc = pace
        .layer()
        .weigh(|n: &u64| Cost::requests(*n as u32))
        .layer(echo());
    let t0 = Instant::now();
    svc.clone().oneshot(2).await.unwrap(); // today
    let c2 = tokio::spawn(svc.clone().oneshot(2)); // tomorrow
    tokio::task::yield_now().await;
    let c3 = tokio::spawn(svc.clone().oneshot(2)); // the day after: refused
    tokio::task::yield_now().await;
    c2.await.unwrap().unwrap();
    let e = c3.await.unwrap().unwrap_err();
    assert_eq!(rejected(&e).kind(), RejectKind::BudgetExceeded);
    // Refused when it reached the head (midnight), not left to start late.
    let at = t0.elapsed().as_secs_f64();
    assert!(
        (at - until).abs() < 2.0,
        "{zone}: refused at {at} s, midnight at {until} s"
    );
}

/// The spend budget's refusals (and the pacer's max_wait) are checked before
/// a key is built? A call refused for the shared budget takes a key place.
#[tokio::test(start_paused = true)]
async fn calls_refused_for_the_shared_budget_take_key_places() {
    let keyed = KeyedPace::builder(Pace::builder().requests_per_minute(100))
        .shared(Pace::builder().limit(Limit::spend_per_day(1_000)))
        .max_keys(3)
        .build()
        .unwrap();
    let svc = keyed
        .layer()
        .key(|r: &(String, u64)| Some(r.0.clone()))
        .weigh(|r: &(String, u64)| spend(r.1))
        .layer(tower::service_fn(|r: (String, u64)| async move {
            Ok::<_, std::io::Error>(r.1)
        }));
    svc.clone().oneshot(("real".into(), 1_000)).await.unwrap();
    for k in ["x1", "x2"] {
        let e = svc.clone().oneshot((k.into(), 500)).await.unwrap_err();
        assert_eq!(rejected(&e).kind(), RejectKind::BudgetExceeded);
    }
    assert_eq!(keyed.keys(), ["real"], "refused calls took key places");
}

/// Waiting for midnight on a calendar day with no max_wait: the line crosses
/// midnight, the whole limit is back, and no more than the limit goes per day.
#[tokio::test(start_paused = true)]
async fn crossing_midnight_in_line() {
    let until = until_utc_midnight();
    let pace = Pace::builder()
        .limit(Limit::requests_per_day(2).resets_daily("UTC"))
        .build()
        .unwrap();
    let svc = pace.layer().layer(echo());
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..7u64 {
        let s = svc.clone();
        tasks.push(tokio::spawn(async move {
            s.oneshot(i).await.unwrap();
            Instant::now() - t0
        }));
        tokio::task::yield_now().await;
    }
    let mut starts = Vec::new();
    for t in tasks {
        starts.push(t.await.unwrap().as_secs_f64());
    }
    let day = |s: f64| {
        if s < until - 1e-3 {
            0
        } else {
            1 + ((s - until + 1e-3) / 86_400.0) as usize
        }
    };
    let days: Vec<usize> = starts.iter().map(|s| day(*s)).collect();
    assert_eq!(
        days,
        [0, 0, 1, 1, 2, 2, 3],
        "starts {starts:?}, midnight at {until}"
    );
    // Each start at the midnight, not later than a millisecond after.
    for (s, d) in starts.iter().zip(&days) {
        if *d > 0 {
            let m = until + (*d as f64 - 1.0) * 86_400.0;
            assert!((s - m).abs() < 0.01, "start {s}, midnight {m}");
        }
    }
}

/// A calendar dimension's snapshot: available and full_at.
#[tokio::test(start_paused = true)]
async fn calendar_snapshot() {
    let until = until_utc_midnight();
    let pace = Pace::builder()
        .limit(Limit::requests_per_day(3).resets_daily("UTC"))
        .build()
        .unwrap();
    let t0 = Instant::now();
    let d = pace.snapshot().dims[0];
    assert_eq!((d.available, d.full_at), (3.0, t0));
    let svc = pace.layer().layer(echo());
    svc.clone().oneshot(1).await.unwrap();
    let d = pace.snapshot().dims[0];
    assert_eq!(d.available, 2.0);
    let mid = (d.full_at - t0).as_secs_f64();
    assert!(
        (mid - until).abs() < 0.01,
        "full_at {mid} vs midnight {until}"
    );
    tokio::time::advance(Duration::from_secs_f64(until + 1.0)).await;
    let d = pace.snapshot().dims[0];
    assert_eq!(d.available, 3.0);
    assert!(d.full_at <= Instant::now() + Duration::from_micros(1));
}

/// Zones that are not IANA names: a ConfigError, never a panic.
#[tokio::test(start_paused = true)]
async fn odd_zones_never_panic() {
    let long = "A/".repeat(5_000);
    for zone in [
        "",
        " ",
        "UTC\0",
        "../../../../etc/passwd",
        "/etc/localtime",
        "utc",
        "Etc/GMT+14",
        "EST5EDT",
        "+05:00",
        "posixrules",
        "right/UTC",
        "Factory",
        long.as_str(),
        "America/Los_Angeles/..",
        "zone.tab",
    ] {
        for monthly in [false, true] {
            let l = Limit::spend_per_day(1);
            let l = if monthly {
                l.resets_monthly(zone)
            } else {
                l.resets_daily(zone)
            };
            let r = std::panic::catch_unwind(|| Pace::builder().limit(l).build());
            assert!(r.is_ok(), "panicked on zone {zone:?}");
            if let Ok(Ok(p)) = r {
                eprintln!("zone {zone:?} accepted: {:?}", p.snapshot().dims[0]);
            }
        }
    }
}

/// A calendar window is a day (or a month): a limit of another period is a
/// configuration error, not silently `n` a day.
#[tokio::test(start_paused = true)]
async fn calendar_window_of_another_period_is_refused() {
    let r = Pace::builder()
        .limit(Limit::requests_per_minute(2).resets_daily("UTC"))
        .build();
    assert_eq!(r.unwrap_err().field, "resets");
    let r = Pace::builder()
        .limit(Limit::spend_per_day(2).resets_monthly("UTC"))
        .build();
    assert_eq!(r.unwrap_err().field, "resets");
    assert!(Pace::builder()
        .limit(Limit::spend_per_month(2).resets_monthly("UTC"))
        .build()
        .is_ok());
}

/// Extremes: a spend budget of u64::MAX, a cost of u64::MAX; a limit
/// max_wait of Duration::MAX; none panic.
#[tokio::test(start_paused = true)]
async fn spend_extremes() {
    for budget in [1, 2, u64::MAX - 1, u64::MAX] {
        for calendar in [false, true] {
            let l = Limit::spend_per_month(budget).max_wait(Duration::MAX);
            let l = if calendar {
                l.resets_monthly("Pacific/Kiritimati")
            } else {
                l
            };
            let pace = Pace::builder().limit(l).build().unwrap();
            let svc = pace.layer().weigh(|n: &u64| spend(*n)).layer(echo());
            for c in [0, 1, budget / 2, budget, u64::MAX] {
                let _ = svc.clone().oneshot(c).await;
            }
            let _ = pace.snapshot();
        }
    }
    let pace = Pace::builder()
        .limit(Limit::spend_per_day(10).max_wait(Duration::from_nanos(1)))
        .build()
        .unwrap();
    let svc = pace.layer().weigh(|n: &u64| spend(*n)).layer(echo());
    svc.clone().oneshot(10).await.unwrap();
    let e = svc.clone().oneshot(1).await.unwrap_err();
    let ra = rejected(&e).retry_after().unwrap();
    assert_eq!(ra, Duration::from_micros(8_640_000_000), "{ra:?}");
}

/// Far future: the paused clock 9,000 years on (past jiff's year 9999),
/// calendar windows still answer, no panic, no hang.
#[tokio::test(start_paused = true)]
async fn calendar_far_future() {
    let pace = Pace::builder()
        .limit(Limit::requests_per_day(1).resets_daily("America/Los_Angeles"))
        .limit(Limit::spend_per_month(10).resets_monthly("Australia/Lord_Howe"))
        .max_wait(Duration::from_secs(7 * 86_400))
        .build()
        .unwrap();
    let svc = pace.layer().weigh(|n: &u64| spend(*n)).layer(echo());
    for years in [1u64, 100, 7_000, 9_000] {
        tokio::time::advance(Duration::from_secs(years * 365 * 86_400)).await;
        let a = svc.clone().oneshot(1).await;
        assert!(a.is_ok(), "+{years} y: a new day has its request");
        let b = svc.clone().oneshot(1).await;
        eprintln!(
            "+{years} y: {:?} {:?} {:?}",
            a.is_ok(),
            b.map_err(|e| rejected(&e).retry_after()),
            pace.snapshot().dims
        );
    }
}

/// Randomised: one spend budget (rolling, or a calendar day/month), calls
/// billed at most their estimate. Every call either goes at once or is
/// refused with a retry_after after which the same call goes at once.
#[tokio::test(start_paused = true)]
async fn spend_retry_after_round_trips() {
    let mut seed = 0x2545F4914F6CDD1Du64;
    let mut rnd = move |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    for case in 0..60 {
        let kind = case % 4;
        let budget = 1 + rnd(5_000_000);
        let limit = match kind {
            0 => Limit::spend_per_day(budget),
            1 => Limit::spend_per_month(budget),
            2 => Limit::spend_per_day(budget).resets_daily("America/Los_Angeles"),
            _ => Limit::spend_per_month(budget).resets_monthly("Asia/Kathmandu"),
        };
        let limit = if rnd(3) == 0 {
            limit.headroom(rnd(51) as u8)
        } else {
            limit
        };
        let pace = Pace::builder().limit(limit.clone()).build().unwrap();
        let svc = pace
            .layer()
            .weigh(|r: &(u64, u64)| spend(r.0))
            .observe(|res: &u64| Observed {
                usage: Some(spend(*res)),
                info: None,
            })
            .layer(tower::service_fn(|r: (u64, u64)| async move {
                Ok::<_, std::io::Error>(r.1)
            }));
        for step in 0..40 {
            let est = rnd(budget + 1);
            let real = rnd(est + 1);
            let t = Instant::now();
            match svc.clone().oneshot((est, real)).await {
                Ok(_) => assert_eq!(t.elapsed(), Duration::ZERO),
                Err(e) => {
                    let r = rejected(&e);
                    assert_eq!(r.kind(), RejectKind::BudgetExceeded);
                    let Some(ra) = r.retry_after() else {
                        // Above the planned budget: must be above the whole one.
                        continue;
                    };
                    tokio::time::advance(ra).await;
                    let again = svc.clone().oneshot((est, real)).await;
                    assert!(
                        again.is_ok(),
                        "case {case} ({limit:?}) step {step}: {est} refused again after retry_after {ra:?}: {:?}; {:?}",
                        again.err().map(|e| e.to_string()),
                        pace.snapshot().dims[0]
                    );
                }
            }
            tokio::time::advance(Duration::from_secs(rnd(40_000))).await;
        }
    }
}

/// A debt on a spend budget is owed in full (money is not a rate): $5 billed
/// for a call estimated at $0.01 on a `$1 a day` budget keeps the next call
/// out until the $4 beyond the budget are paid back (plus its own cent).
#[tokio::test(start_paused = true)]
async fn a_spend_debt_is_owed_in_full() {
    let pace = Pace::builder()
        .limit(Limit::spend_per_day(1_000_000))
        .build()
        .unwrap();
    let svc = pace
        .layer()
        .weigh(|r: &(u64, u64)| spend(r.0))
        .observe(|res: &u64| Observed {
            usage: Some(spend(*res)),
            info: None,
        })
        .layer(tower::service_fn(|r: (u64, u64)| async move {
            Ok::<_, std::io::Error>(r.1)
        }));
    svc.clone().oneshot((10_000, 5_000_000)).await.unwrap();
    tokio::time::advance(Duration::from_secs(86_400)).await;
    let err = svc.clone().oneshot((10_000, 10_000)).await.unwrap_err();
    let r = semaforo::Rejected::from_box(&err).unwrap();
    // Owed: 5 days of budget from the call; a day has passed; the next
    // cent fits once all but 0.99 day of it is paid: 3.01 days from now.
    let days = r.retry_after().unwrap().as_secs_f64() / 86_400.0;
    assert!((days - 3.01).abs() < 0.0001, "retry after {days} days");
}

//! The drill example's timeline, asserted on paused time: the provider is
//! down from t = 60 s to t = 90 s (chaos injecting 529s), the breaker opens,
//! the degradation switch goes to `Reduced`, the fallback answers every call
//! with its last good answer, and everything is back to `Normal` after the
//! breaker's open time and the switch's hysteresis.

#[allow(dead_code)]
#[path = "../examples/drill.rs"]
mod drill;

use drill::What;
use semaforo::degrade::Level;
use semaforo::observe::BreakerState;
use std::time::Duration;

#[tokio::test(start_paused = true)]
async fn the_drill_timeline() {
    let d = drill::run().await.unwrap();
    let secs = |s: f64| Duration::from_secs_f64(s);
    assert_eq!(d.first(&What::OutageStarts), Some(secs(60.0)));
    assert_eq!(d.first(&What::OutageEnds), Some(secs(90.0)));
    // The breaker opens by t = 61 s (3 consecutive 529s: the first calls
    // of the outage and their retries).
    let opened = d.first(&What::Breaker(BreakerState::Open)).unwrap();
    assert!(opened >= secs(60.0) && opened <= secs(61.0), "{opened:?}");
    // `Reduced` by t = 65 s: open for 3 s, seen by the 1 s evaluation.
    let reduced = d.first(&What::Level(Level::Reduced)).unwrap();
    assert!(reduced >= opened + drill::REDUCED_AFTER, "{reduced:?}");
    assert!(reduced <= secs(65.0), "{reduced:?}");
    // During the outage every call is answered, from the last good answers.
    let outage = d.between(60, 90);
    assert_eq!(outage.failed, 0);
    assert_eq!(outage.stale + outage.real, 150);
    // Stale, but for a call sent in the breaker's last 5 s open, which may
    // wait (the retry's 5 s ceiling) for its half-open probe.
    let open = d.between(61, 89);
    assert_eq!(open.stale + open.real, 140);
    assert!(open.stale >= 135, "{open:?}");
    assert_eq!(d.between(61, 85).stale, 120);
    assert!(
        d.injected <= 10,
        "the open breaker kept calls off: {}",
        d.injected
    );
    // Back: the breaker half-opens `open_for` after opening (past the
    // outage's end), its probe (0.5 s) closes it, and `Normal` follows
    // `recover_after` later, at the next evaluation: by
    // opened + 30 s + 0.5 s + 5 s + 1 s ≤ 97.5 s — within the bound
    // 90 s + open_for + hysteresis + one evaluation = 126 s.
    let closed = d.first(&What::Breaker(BreakerState::Closed)).unwrap();
    assert!(
        closed >= secs(90.0) && closed <= opened + drill::OPEN_FOR + secs(0.7),
        "{closed:?}"
    );
    let normal = d.first(&What::Level(Level::Normal)).unwrap();
    assert!(normal >= closed + drill::NORMAL_AFTER, "{normal:?}");
    assert!(
        normal <= closed + drill::NORMAL_AFTER + drill::EVERY,
        "{normal:?}"
    );
    assert!(normal <= secs(90.0) + drill::OPEN_FOR + drill::NORMAL_AFTER + drill::EVERY);
    // Exactly two level changes, no flapping.
    let levels: Vec<_> = d
        .timeline
        .iter()
        .filter(|(_, w)| matches!(w, What::Level(_)))
        .collect();
    assert_eq!(levels.len(), 2, "{:?}", d.timeline);
    // Every call of the 150 s answered; after the outage, real answers.
    let all = d.between(0, 150);
    assert_eq!(all.failed, 0);
    assert_eq!(all.real + all.stale, 750);
    assert_eq!(d.between(100, 150).stale, 0);
}

//! Seed 002's overload and seed 003's shutdown on a real axum server over TCP
//! (127.0.0.1), and the example binary receiving a real SIGTERM.

#[path = "../examples/common/server.rs"]
mod server;

use server::{app, ServerConfig};
use std::time::{Duration, Instant};

/// One test at a time: each measures latencies (p99, drain time) that the
/// 1,000-client storm of another would disturb on a 2-core machine.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn serve(cfg: ServerConfig) -> (String, server::Guards) {
    let (router, guards) = app(cfg).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    });
    (format!("http://{addr}"), guards)
}

#[derive(Debug, Default)]
struct Tally {
    ok: Vec<Duration>,
    refused: Vec<Duration>,
    refused_without_retry_after: usize,
    other: usize,
    no_answer: usize,
}

/// `n` clients at once, each one POST with a client timeout.
async fn storm(base: &str, n: usize, client_timeout: Duration) -> Tally {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(client_timeout)
        .build()
        .unwrap();
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let (client, url) = (client.clone(), format!("{base}/work"));
            tokio::spawn(async move {
                let t0 = Instant::now();
                let res = client
                    .post(url)
                    .header("x-api-key", format!("key-{}", i % 20))
                    .send()
                    .await;
                (res, t0.elapsed())
            })
        })
        .collect();
    let mut t = Tally::default();
    for task in tasks {
        match task.await.unwrap() {
            (Ok(r), d) if r.status() == 200 => t.ok.push(d),
            (Ok(r), d) if r.status() == 429 || r.status() == 503 => {
                if !r.headers().contains_key("retry-after") {
                    t.refused_without_retry_after += 1;
                }
                t.refused.push(d);
            }
            (Ok(_), _) => t.other += 1,
            (Err(_), _) => t.no_answer += 1,
        }
    }
    t
}

fn p99(v: &mut [Duration]) -> Duration {
    v.sort();
    v.get(((v.len() as f64 * 0.99).ceil() as usize).saturating_sub(1))
        .copied()
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_002_a_thousand_clients_guarded_and_unguarded() {
    let _serial = SERIAL.lock().await;
    let cfg = ServerConfig::default(); // capacity 50, 100 ms, line of 200
    let bound = cfg
        .service_time
        .mul_f64(cfg.queue as f64 / cfg.capacity as f64); // 400 ms
    let (base, guards) = serve(cfg.clone()).await;
    let t = storm(&base, 1_000, Duration::from_secs(10)).await;
    // Times measured in the server, from the request to its answer (the client
    // side adds a 1,000-connection storm on 2 cores).
    let answers = guards.answers.lock().unwrap().clone();
    let mut ok: Vec<Duration> = answers.iter().filter(|a| a.0 == 200).map(|a| a.1).collect();
    let refused: Vec<Duration> = answers
        .iter()
        .filter(|a| a.0 == 429 || a.0 == 503)
        .map(|a| a.1)
        .collect();
    eprintln!(
        "guarded: {} ok, {} refused, {} other, {} unanswered; in the server p99 ok {:?}, slowest refusal {:?}",
        t.ok.len(), t.refused.len(), t.other, t.no_answer, p99(&mut ok.clone()), refused.iter().max()
    );
    assert_eq!(t.no_answer, 0, "every client gets an answer");
    assert_eq!(t.ok.len() + t.refused.len() + t.other, 1_000);
    let admitted = t.ok.len() + t.other;
    assert!(
        t.ok.len() as f64 >= 0.99 * admitted as f64,
        "{} of {admitted} admitted calls succeeded",
        t.ok.len()
    );
    assert!(
        t.ok.len() >= 250,
        "capacity + line were used: {}",
        t.ok.len()
    );
    assert_eq!(t.refused_without_retry_after, 0);
    assert!(
        refused.iter().all(|d| *d < Duration::from_millis(50)),
        "a refusal took {:?}",
        refused.iter().max()
    );
    let p99_ok = p99(&mut ok);
    assert!(p99_ok <= bound * 2, "p99 {p99_ok:?} vs 2 × {bound:?}");
    assert_eq!(guards.bulkhead.snapshot().in_flight, 0);

    // The same load against an adaptive limit starting at 500 (Vegas, min
    // 10: its first baseline probe takes one latency): at least 90 % of the
    // static run's successes, every client answered.
    let (base, adaptive) = serve(ServerConfig {
        adaptive: Some(semaforo::bulkhead::Vegas::new().min(10).into()),
        adaptive_max: 500,
        ..cfg.clone()
    })
    .await;
    let a = storm(&base, 1_000, Duration::from_secs(10)).await;
    eprintln!(
        "adaptive: {} ok, {} refused, {} other, {} unanswered; limit now {}",
        a.ok.len(),
        a.refused.len(),
        a.other,
        a.no_answer,
        adaptive.bulkhead.snapshot().limit
    );
    assert_eq!(a.no_answer, 0, "every client gets an answer");
    assert!(
        a.ok.len() as f64 >= 0.9 * t.ok.len() as f64,
        "adaptive {} ok vs static {}",
        a.ok.len(),
        t.ok.len()
    );
    assert_eq!(a.refused_without_retry_after, 0);

    // The same load without the layers: everyone is admitted, everyone slows down.
    let (base, _) = serve(ServerConfig {
        unguarded: true,
        ..cfg
    })
    .await;
    let u = storm(&base, 1_000, Duration::from_secs(1)).await;
    eprintln!(
        "unguarded: {} ok within 1 s, {} unanswered",
        u.ok.len(),
        u.no_answer
    );
    // Seed 002's collapse: everyone admitted, everyone slowed down, a third or
    // more left without an answer (the guarded server answered all 1,000).
    assert!(
        u.no_answer >= 250,
        "only {} of 1,000 went unanswered within 1 s",
        u.no_answer
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_readiness_flips_in_flight_finish_new_calls_refused() {
    let _serial = SERIAL.lock().await;
    let cfg = ServerConfig {
        service_time: Duration::from_millis(500),
        capacity: 200,
        ..ServerConfig::default()
    };
    let (base, guards) = serve(cfg).await;
    let client = reqwest::Client::new();
    let calls: Vec<_> = (0..90)
        .map(|_| {
            let (c, url) = (client.clone(), format!("{base}/work"));
            tokio::spawn(async move { c.post(url).send().await.map(|r| r.status().as_u16()) })
        })
        .collect();
    // And 10 streamed answers: 5 of 1 s, 5 of 30 s (longer than the deadline).
    let streams: Vec<_> = (0..10)
        .map(|i| {
            let secs = if i < 5 { 1 } else { 30 };
            let (c, url) = (client.clone(), format!("{base}/stream?secs={secs}"));
            tokio::spawn(async move {
                let res = c.get(url).send().await?;
                let status = res.status().as_u16();
                let body = res.text().await?;
                Ok::<_, reqwest::Error>((secs, status, body))
            })
        })
        .collect();
    while guards.shutdown.in_flight() < 100 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(
        client
            .get(format!("{base}/readyz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let shutdown = guards.shutdown.clone();
    let t0 = Instant::now();
    let drain = tokio::spawn(async move { shutdown.drain(Duration::from_secs(5)).await });
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(
        client
            .get(format!("{base}/readyz"))
            .send()
            .await
            .unwrap()
            .status(),
        503,
        "readiness flips at once"
    );
    let late = client.post(format!("{base}/work")).send().await.unwrap();
    assert_eq!(late.status(), 503);
    assert!(late.headers().contains_key("retry-after"));
    let report = drain.await.unwrap();
    let drained_in = t0.elapsed();
    let mut answers = Vec::new();
    for c in calls {
        answers.push(c.await.unwrap().map_err(|e| e.to_string()));
    }
    let ok = answers.iter().filter(|a| matches!(a, Ok(200))).count();
    let others: Vec<_> = answers.iter().filter(|a| !matches!(a, Ok(200))).collect();
    assert_eq!(ok, 90, "every in-flight call finished with 200: {others:?}");
    let mut cut = 0;
    for s in streams {
        let (secs, status, body) = s.await.unwrap().unwrap();
        assert_eq!(status, 200);
        if secs == 1 {
            assert!(
                !body.contains("event: error"),
                "a short stream finished normally"
            );
        } else {
            assert!(
                body.ends_with(semaforo::shutdown::DRAIN_EVENT),
                "a long stream ends with an error event: {body}"
            );
            cut += 1;
        }
    }
    assert_eq!(cut, 5);
    assert!(
        drained_in >= Duration::from_secs(5) && drained_in < Duration::from_secs(6),
        "{drained_in:?}"
    );
    assert_eq!(
        (report.completed, report.cancelled, report.rejected),
        (95, 5, 1),
        "{report:?}"
    );
    assert_eq!(report.still_streaming, 0);
    let health: serde_json::Value = client
        .get(format!("{base}/healthz"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(health["status"], "down");
    assert_eq!(health["ready"], false);
}

#[test]
fn the_example_exits_0_after_draining_on_sigterm() {
    let _serial = SERIAL.blocking_lock();
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    let exe = std::env::current_exe().unwrap();
    let examples = exe.parent().unwrap().parent().unwrap().join("examples");
    let bin = examples.join(format!("axum_server{}", std::env::consts::EXE_SUFFIX));
    if !bin.exists() {
        panic!("{} not built (cargo test builds examples)", bin.display());
    }
    let mut child = Command::new(&bin)
        .args(["--port", "0", "--drain-secs", "2"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    out.read_line(&mut line).unwrap();
    assert!(line.starts_with("listening on http://127.0.0.1:"), "{line}");
    let t0 = Instant::now();
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let mut rest = String::new();
    out.read_line(&mut rest).unwrap();
    let exit = child.wait().unwrap();
    assert!(exit.success(), "exit status {exit}");
    assert!(rest.starts_with("drained: 0 completed"), "{rest}");
    assert!(
        t0.elapsed() < Duration::from_secs(3),
        "exited within deadline + 1 s: {:?}",
        t0.elapsed()
    );
}

/// The template's `/lesson` reads the degradation level: the full plan at
/// `Normal`, a simplified one (a quarter of the work) at `Reduced`, the level
/// in the `x-degrade-level` header and in `/healthz`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lesson_handler_serves_a_simplified_answer_when_reduced() {
    let _one = SERIAL.lock().await;
    let (base, guards) = serve(ServerConfig::default()).await;
    let client = reqwest::Client::new();
    let get = |path: &'static str| client.get(format!("{base}{path}")).send();
    let res = get("/lesson").await.unwrap();
    assert!(res.headers().get("x-degrade-level").is_none());
    assert!(res.text().await.unwrap().starts_with("full lesson plan"));

    guards.degrade.set(semaforo::degrade::Level::Reduced);
    let res = get("/lesson").await.unwrap();
    assert_eq!(res.headers()["x-degrade-level"], "reduced");
    assert_eq!(
        res.text().await.unwrap(),
        "lesson plan: objectives and activities"
    );
    let health: serde_json::Value = get("/healthz").await.unwrap().json().await.unwrap();
    let degrade = health["components"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["kind"] == "degrade")
        .unwrap();
    assert_eq!(degrade["status"], "degraded");
    assert_eq!(degrade["details"]["level"], 1.0);
    assert_eq!(degrade["details"]["manual"], 1.0);

    guards.degrade.release();
    let res = get("/lesson").await.unwrap();
    assert!(res.headers().get("x-degrade-level").is_none());
    assert!(res.text().await.unwrap().starts_with("full lesson plan"));
}

//! Sunday night in a classroom: 50 teachers press "generate" at once, the provider
//! takes 5 at a time, each plan takes 10 s. Everyone else waits in line and sees
//! where they stand — "you are 12th of 45, about 30 s".
//!
//! Runs on tokio's paused clock, so the 100 simulated seconds take a moment:
//! `cargo run --example queue_position`.

use semaforo::bulkhead::{Bulkhead, QueueTicket, TicketStatus};
use std::time::Duration;
use tower::{service_fn, Service, ServiceBuilder, ServiceExt};

/// Any request type works: the ticket just travels with it.
#[derive(Clone)]
struct PlanRequest {
    teacher: usize,
    ticket: QueueTicket,
}

#[tokio::main(flavor = "current_thread", start_paused = true)]
async fn main() -> Result<(), semaforo::BoxError> {
    let bulkhead = Bulkhead::builder(5)
        .name("openai")
        .max_queue(45)
        .expected_service_time(Duration::from_secs(10))
        .build()?;

    let provider = service_fn(|req: PlanRequest| async move {
        tokio::time::sleep(Duration::from_secs(10)).await; // the LLM call
        Ok::<_, std::io::Error>(format!("plan for teacher {}", req.teacher))
    });
    let mut svc = ServiceBuilder::new()
        .layer(
            bulkhead
                .layer()
                .ticket(|r: &PlanRequest| Some(r.ticket.clone())),
        )
        .service(provider);

    let start = tokio::time::Instant::now();
    let mut tickets = Vec::new();
    let mut calls = Vec::new();
    for teacher in 1..=50 {
        let ticket = QueueTicket::new();
        tickets.push(ticket.clone());
        let fut = svc.ready().await?.call(PlanRequest { teacher, ticket });
        calls.push(tokio::spawn(fut));
    }

    // What teacher 17 sees, polling every 3 s like the seed's front end did.
    let watched = tickets[16].clone();
    let watcher = tokio::spawn(async move {
        loop {
            let t = tokio::time::Instant::now() - start;
            match watched.status() {
                TicketStatus::Waiting(s) => println!("t={:>3}s  teacher 17: {s}", t.as_secs()),
                other => {
                    println!("t={:>3}s  teacher 17: {other:?}", t.as_secs());
                    break;
                }
            }
            tokio::time::sleep(Duration::from_secs(3)).await;
        }
    });

    let mut ok = 0;
    for c in calls {
        if c.await?.is_ok() {
            ok += 1;
        }
    }
    watcher.await?;
    let snap = bulkhead.snapshot();
    println!(
        "{ok}/50 plans generated in {} s (simulated); in flight now {}, waiting {}",
        start.elapsed().as_secs(),
        snap.in_flight,
        snap.waiting
    );
    Ok(())
}

//! A simulated LLM provider enforcing OpenAI-style buckets: tokens per minute
//! and requests per minute, refilled continuously, answering 429 with OpenAI's
//! headers when a request does not fit.

use semaforo::classify::headers::RateLimitInfo;
use semaforo::classify::Class;
use semaforo::pace::{Cost, Observed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};
use tokio::time::Instant;

#[derive(Debug, Clone, Copy)]
pub struct Chat {
    /// What the pacer is told the call will cost.
    pub estimate: u64,
    /// What the provider really counts (`usage.total_tokens`).
    pub real: u64,
}

#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub usage: u64,
}

impl Reply {
    pub fn class(&self) -> Class {
        let info = RateLimitInfo::from_headers(&self.headers, SystemTime::now());
        match self.status {
            200 => Class::Success,
            429 => Class::Throttled {
                retry_after: info.retry_after,
            },
            _ => Class::Transient,
        }
    }

    pub fn observed(&self) -> Observed {
        Observed {
            usage: (self.status == 200).then(|| Cost::tokens(self.usage)),
            info: Some(RateLimitInfo::from_headers(
                &self.headers,
                SystemTime::now(),
            )),
        }
    }
}

#[derive(Debug)]
struct Bucket {
    capacity: f64,
    per_sec: f64,
    level: f64,
    at: Instant,
}

impl Bucket {
    fn new(capacity: f64, per_sec: f64) -> Self {
        Bucket {
            capacity,
            per_sec,
            level: capacity,
            at: Instant::now(),
        }
    }
    fn refill(&mut self, now: Instant) {
        self.level = (self.level + (now - self.at).as_secs_f64() * self.per_sec).min(self.capacity);
        self.at = now;
    }
    fn wait_for(&self, n: f64) -> Duration {
        Duration::from_secs_f64(((n - self.level) / self.per_sec).max(0.0))
    }
}

#[derive(Debug)]
pub struct Books {
    tokens: Bucket,
    requests: Bucket,
    pub accepted: usize,
    pub throttled: usize,
    /// (admission instant, tokens) of every accepted call.
    pub admitted: Vec<(Instant, u64)>,
    /// When each 429 was answered.
    pub throttled_at: Vec<Instant>,
}

#[derive(Debug, Clone)]
pub struct Provider {
    pub books: Arc<Mutex<Books>>,
    pub service_time: Duration,
}

fn go_duration(d: Duration) -> String {
    format!("{}ms", d.as_millis())
}

impl Provider {
    /// `tpm` tokens and `rpm` requests per minute; every accepted call takes `service_time`.
    pub fn new(tpm: u64, rpm: u64, service_time: Duration) -> Self {
        Provider {
            books: Arc::new(Mutex::new(Books {
                tokens: Bucket::new(tpm as f64, tpm as f64 / 60.0),
                requests: Bucket::new(rpm as f64, rpm as f64 / 60.0),
                accepted: 0,
                throttled: 0,
                admitted: Vec::new(),
                throttled_at: Vec::new(),
            })),
            service_time,
        }
    }

    pub fn service(
        &self,
    ) -> impl tower::Service<
        Chat,
        Response = Reply,
        Error = std::io::Error,
        Future = impl std::future::Future<Output = Result<Reply, std::io::Error>> + Send,
    > + Clone
           + Send {
        let me = self.clone();
        tower::service_fn(move |chat: Chat| {
            let me = me.clone();
            async move {
                let now = Instant::now();
                let (ok, headers) = {
                    let mut b = me.books.lock().unwrap();
                    b.tokens.refill(now);
                    b.requests.refill(now);
                    let ok = b.tokens.level >= chat.real as f64 && b.requests.level >= 1.0;
                    let wait = b
                        .tokens
                        .wait_for(chat.real as f64)
                        .max(b.requests.wait_for(1.0));
                    if ok {
                        b.tokens.level -= chat.real as f64;
                        b.requests.level -= 1.0;
                        b.accepted += 1;
                        b.admitted.push((now, chat.real));
                    } else {
                        b.throttled += 1;
                        b.throttled_at.push(now);
                    }
                    let mut h = vec![
                        (
                            "x-ratelimit-limit-tokens".to_owned(),
                            format!("{}", b.tokens.capacity),
                        ),
                        (
                            "x-ratelimit-remaining-tokens".to_owned(),
                            format!("{}", b.tokens.level.floor() as u64),
                        ),
                        (
                            "x-ratelimit-reset-tokens".to_owned(),
                            go_duration(b.tokens.wait_for(b.tokens.capacity)),
                        ),
                        (
                            "x-ratelimit-limit-requests".to_owned(),
                            format!("{}", b.requests.capacity),
                        ),
                        (
                            "x-ratelimit-remaining-requests".to_owned(),
                            format!("{}", b.requests.level.floor() as u64),
                        ),
                        (
                            "x-ratelimit-reset-requests".to_owned(),
                            go_duration(b.requests.wait_for(b.requests.capacity)),
                        ),
                    ];
                    if !ok {
                        h.push((
                            "retry-after-ms".to_owned(),
                            format!("{}", wait.as_millis().max(1)),
                        ));
                        h.push((
                            "retry-after".to_owned(),
                            format!("{}", wait.as_secs_f64().ceil() as u64),
                        ));
                    }
                    (ok, h)
                };
                if !ok {
                    return Ok(Reply {
                        status: 429,
                        headers,
                        usage: 0,
                    });
                }
                tokio::time::sleep(me.service_time).await;
                Ok(Reply {
                    status: 200,
                    headers,
                    usage: chat.real,
                })
            }
        })
    }

    /// Another client of the account spends the whole token bucket now.
    pub fn spend_all_tokens(&self) {
        let mut b = self.books.lock().unwrap();
        let now = Instant::now();
        b.tokens.refill(now);
        b.tokens.level = 0.0;
    }

    pub fn throttled_at(&self) -> Vec<Instant> {
        self.books.lock().unwrap().throttled_at.clone()
    }

    pub fn accepted(&self) -> usize {
        self.books.lock().unwrap().accepted
    }

    pub fn throttled(&self) -> usize {
        self.books.lock().unwrap().throttled
    }

    pub fn admitted(&self) -> Vec<(Instant, u64)> {
        self.books.lock().unwrap().admitted.clone()
    }
}

//! Sunday night in a classroom: 50 teachers each ask for a 2,000-token lesson plan at
//! once, against a 30,000 tokens/min, 500 requests/min tier.
//!
//! Phase 1 calls the provider directly (as the seed's app did: most get 429).
//! Phase 2 goes through the semaforo LLM stack: everyone waits their turn, sees
//! it, and gets a plan. Then one table compares them.
//!
//! ```text
//! cargo run --example llm_client                                    # the in-process mock (time ×10)
//! cargo run --example llm_client -- --provider anthropic            # a mock Anthropic account: RPM, ITPM, OTPM
//! cargo run --example llm_client -- --provider azure                # a mock Azure deployment: 10 s windows
//! cargo run --example llm_client -- --deployments 2                 # phase 2 routed over two accounts of the tier
//! cargo run --example llm_client -- --same-prompt                   # everyone asks the same plan: cache + coalescing
//! cargo run --example llm_client -- --base-url https://api.openai.com/v1   # a real server, OPENAI_API_KEY
//! ```

#[path = "common/http_client.rs"]
mod http_client;
#[path = "common/mock_provider.rs"]
mod mock_provider;

use clap::Parser;
use http_client::{chat_request, HttpClient};
use indicatif::{ProgressBar, ProgressStyle};
use mock_provider::{MockConfig, MockProvider, Shape};
use semaforo::bulkhead::{Bulkhead, QueueTicket, TicketStatus};
use semaforo::cache::Cache;
use semaforo::llm::{LlmCache, LlmDeployment, LlmStack, LlmStackBuilder, Tier};
use semaforo::observe::{EventKind, RouteReason};
use semaforo::share::Served;
use semaforo::BoxError;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tower::{Service, ServiceBuilder, ServiceExt};

/// Sunday night in a classroom, without and with semaforo.
#[derive(Parser, Debug)]
#[command(version, about, long_about = None)]
struct Args {
    /// An OpenAI-compatible server, as OpenAI's SDKs spell it (e.g.
    /// https://api.openai.com/v1; without `/v1` works too). Without it, an
    /// in-process mock provider is started. The key comes from OPENAI_API_KEY.
    #[arg(long)]
    base_url: Option<String>,
    /// The model to ask.
    #[arg(long, default_value = "gpt-4o-mini")]
    model: String,
    /// Whose account is paced (and, with the mock, enforced): `openai` (RPM,
    /// TPM), `anthropic` (RPM, ITPM, OTPM: output charged at max_tokens) or
    /// `azure` (TPM and 6 RPM per 1,000 TPM, each over 10 s windows).
    #[arg(long, value_enum, default_value_t = Provider::Openai)]
    provider: Provider,
    /// Anthropic's input tokens per minute.
    #[arg(long, default_value_t = 30_000)]
    itpm: u64,
    /// Anthropic's output tokens per minute.
    #[arg(long, default_value_t = 8_000)]
    otpm: u64,
    /// How many teachers press "generate" at once.
    #[arg(long, default_value_t = 50)]
    teachers: usize,
    /// Tokens per plan (prompt + max_tokens).
    #[arg(long, default_value_t = 2_000)]
    tokens: u64,
    /// The tier's tokens per minute.
    #[arg(long, default_value_t = 30_000)]
    tpm: u64,
    /// The tier's requests per minute.
    #[arg(long, default_value_t = 500)]
    rpm: u64,
    /// How many times faster than real time the mock runs (a "minute" lasts
    /// 60/N s). Default: 10 with the mock, 1 (real time) with --base-url.
    #[arg(long, value_parser = mock_provider::time_scale)]
    time_scale: Option<f64>,
    /// At most this many calls in flight in phase 2 (the classroom's queue manager: 5).
    #[arg(long, default_value_t = 5)]
    max_concurrent: u32,
    /// Skip phase 1 (the direct calls), e.g. against a real, paid server.
    #[arg(long)]
    skip_direct: bool,
    /// Phase 2 over this many accounts of the tier (each its own mock
    /// provider), through semaforo's router: each call goes to the account
    /// that could start it soonest. With the mock only.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=8))]
    deployments: u32,
    /// Every teacher asks for the same plan ("El ciclo del agua",
    /// temperature 0); phase 2 adds the answer cache and coalescing: the
    /// first call pays, the others ride along.
    #[arg(long)]
    same_prompt: bool,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Provider {
    Openai,
    Anthropic,
    Azure,
}

impl Provider {
    fn name(self) -> &'static str {
        match self {
            Provider::Openai => "openai",
            Provider::Anthropic => "anthropic",
            Provider::Azure => "azure-openai",
        }
    }

    /// Each limit as (units one plan costs, per minute, burst).
    fn limits(self, args: &Args) -> Vec<(f64, f64, f64)> {
        let plan = args.tokens as f64;
        // The prompt is about a dozen tokens; the rest is max_tokens.
        let (input, output) = (12.0, (args.tokens.saturating_sub(12)) as f64);
        match self {
            Provider::Openai => vec![
                (plan, args.tpm as f64, args.tpm as f64),
                (1.0, args.rpm as f64, args.rpm as f64),
            ],
            Provider::Anthropic => vec![
                (1.0, args.rpm as f64, args.rpm as f64),
                (input, args.itpm as f64, args.itpm as f64),
                (output, args.otpm as f64, args.otpm as f64),
            ],
            Provider::Azure => {
                let rpm = (args.tpm / 1_000 * 6).max(1) as f64;
                vec![
                    (plan, args.tpm as f64, (args.tpm / 6).max(1) as f64),
                    (1.0, rpm, (rpm / 6.0).floor().max(1.0)),
                ]
            }
        }
    }
}

struct Phase {
    name: &'static str,
    ok: usize,
    failed: usize,
    /// Why calls failed: `status 404` or the error, with how many.
    failures: std::collections::BTreeMap<String, usize>,
    /// The first failed answer's body (its first 300 characters).
    first_failure: Option<String>,
    provider_429: u64,
    retries: u64,
    latencies: Vec<Duration>,
    makespan: Duration,
    /// Calls the provider saw (with `--same-prompt`).
    upstream_calls: Option<u64>,
    /// A line printed under the table.
    note: Option<String>,
}

/// What one call ended with: its status and body (or error) and how long it took.
type Outcome = Result<(Result<(u16, bytes::Bytes), BoxError>, Duration), tokio::task::JoinError>;

impl Phase {
    fn new(name: &'static str) -> Self {
        Phase {
            name,
            ok: 0,
            failed: 0,
            failures: Default::default(),
            first_failure: None,
            provider_429: 0,
            retries: 0,
            latencies: Vec::new(),
            makespan: Duration::ZERO,
            upstream_calls: None,
            note: None,
        }
    }

    fn record(&mut self, outcome: Outcome) {
        let (why, body) = match outcome {
            Ok((Ok((200, _)), latency)) => {
                self.ok += 1;
                self.latencies.push(latency);
                return;
            }
            Ok((Ok((status, body)), _)) => (format!("status {status}"), Some(body)),
            Ok((Err(e), _)) => (e.to_string(), None),
            Err(e) => (format!("task failed: {e}"), None),
        };
        self.failed += 1;
        if self.first_failure.is_none() {
            let text = body
                .map(|b| {
                    String::from_utf8_lossy(&b)
                        .chars()
                        .take(300)
                        .collect::<String>()
                })
                .unwrap_or_default();
            self.first_failure = Some(format!("{why} {text}").trim_end().to_owned());
        }
        *self.failures.entry(why).or_default() += 1;
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

async fn direct(client: HttpClient, args: &Args) -> Phase {
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for teacher in 1..=args.teachers {
        let mut c = client.clone();
        let req = request(args, teacher, None);
        tasks.push(tokio::spawn(async move {
            let start = Instant::now();
            let res = c.call(req).await;
            (
                res.map(|r| (r.status().as_u16(), r.into_body())),
                start.elapsed(),
            )
        }));
    }
    let mut phase = Phase::new("direct");
    for t in tasks {
        phase.record(t.await);
    }
    phase.makespan = t0.elapsed();
    phase.provider_429 = client.seen.throttled.load(Ordering::Relaxed);
    phase
}

/// The preset for the account of `args`, its time scaled.
fn stack_builder(args: &Args, scale: f64) -> Result<LlmStackBuilder, BoxError> {
    let tier = Tier {
        requests_per_minute: args.rpm,
        tokens_per_minute: args.tpm,
    };
    Ok(match args.provider {
        Provider::Openai => LlmStack::openai(tier),
        Provider::Anthropic => LlmStack::anthropic(args.rpm, args.itpm, args.otpm),
        Provider::Azure => LlmStack::azure_openai(args.tpm),
    }
    .time_scale(scale)
    .bulkhead(
        Bulkhead::builder(args.max_concurrent)
            .name(args.provider.name())
            .max_queue(args.teachers as u32)
            .expected_service_time(Duration::from_secs_f64(5.0 / scale))
            .build()?,
    ))
}

/// Teacher `teacher`'s request: their own plan, or with `--same-prompt`
/// everyone's same one (deterministic: temperature 0).
fn request(
    args: &Args,
    teacher: usize,
    ticket: Option<QueueTicket>,
) -> http::Request<bytes::Bytes> {
    if !args.same_prompt {
        return chat_request(&args.model, args.tokens, teacher, ticket);
    }
    let body = serde_json::json!({
        "model": args.model,
        "temperature": 0,
        "max_tokens": args.tokens.saturating_sub(12).max(1),
        "messages": [{"role": "user", "content": "Plan de clase: el ciclo del agua, 4º grado."}],
    });
    let mut req = http::Request::post("/v1/chat/completions")
        .body(bytes::Bytes::from(body.to_string()))
        .expect("a valid request");
    if let Some(t) = ticket {
        req.extensions_mut().insert(t);
    }
    req
}

async fn stacked(client: HttpClient, args: &Args, scale: f64) -> Result<Phase, BoxError> {
    let mut builder = stack_builder(args, scale)?;
    if args.same_prompt {
        let cache: LlmCache = Cache::builder()
            .ttl(Duration::from_secs_f64(3_600.0 / scale))
            .build()?;
        builder = builder.cache(cache).coalesce(true);
    }
    let stack = builder.build()?;
    let svc = ServiceBuilder::new()
        .layer(stack.layer())
        .service(client.clone());
    let mut phase = run("semaforo", svc, args, scale).await;
    phase.provider_429 = client.seen.throttled.load(Ordering::Relaxed);
    phase.retries = stack.retry().retries();
    if args.same_prompt {
        let calls = client.seen.ok.load(Ordering::Relaxed)
            + client.seen.throttled.load(Ordering::Relaxed)
            + client.seen.other.load(Ordering::Relaxed);
        phase.upstream_calls = Some(calls);
        // A second class asks the same a minute later: from the cache.
        let again = ServiceBuilder::new()
            .layer(stack.layer())
            .service(client.clone());
        let hit = again.oneshot(request(args, 0, None)).await?;
        let after = client.seen.ok.load(Ordering::Relaxed)
            + client.seen.throttled.load(Ordering::Relaxed)
            + client.seen.other.load(Ordering::Relaxed);
        let from_cache = hit.extensions().get::<Served>().is_some();
        phase.note = Some(format!(
            "{} teachers asked for the same plan: {calls} call{} upstream, {} saved; a later ask: {} ({} more calls).",
            args.teachers,
            if calls == 1 { "" } else { "s" },
            args.teachers as u64 - calls.min(args.teachers as u64),
            if from_cache { "from the cache" } else { "not from the cache" },
            after - calls,
        ));
    }
    Ok(phase)
}

/// Phase 2 over `clients` (one per account), through the router preset.
async fn routed(clients: Vec<HttpClient>, args: &Args, scale: f64) -> Result<Phase, BoxError> {
    let failovers = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut router = LlmStack::router().on_event({
        let failovers = failovers.clone();
        move |e| {
            if let EventKind::Routed {
                why: RouteReason::FailedOver { .. },
                ..
            } = &e.kind
            {
                failovers.fetch_add(1, Ordering::Relaxed);
            }
        }
    });
    for (i, client) in clients.iter().enumerate() {
        router = router.deployment(LlmDeployment::new(
            format!("account-{}", i + 1),
            stack_builder(args, scale)?,
            client.clone(),
        ));
    }
    let mut phase = run("router", router.build()?, args, scale).await;
    phase.provider_429 = clients
        .iter()
        .map(|c| c.seen.throttled.load(Ordering::Relaxed))
        .sum();
    phase.retries = failovers.load(Ordering::Relaxed);
    Ok(phase)
}

/// The teachers' calls through `svc`, all at once, with the last one's view
/// of the line.
async fn run<S>(name: &'static str, svc: S, args: &Args, scale: f64) -> Phase
where
    S: Service<
            http::Request<bytes::Bytes>,
            Response = http::Response<bytes::Bytes>,
            Error = BoxError,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let bar = ProgressBar::new(args.teachers as u64);
    bar.set_style(
        ProgressStyle::with_template("  {bar:30} {pos}/{len} plans · {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    let mut tickets = Vec::new();
    for teacher in 1..=args.teachers {
        let ticket = QueueTicket::new();
        tickets.push(ticket.clone());
        let req = request(args, teacher, Some(ticket));
        // The future made here, then spawned (see the README on rustc and
        // `BoxError` inner services in spawned async blocks).
        let call = svc.clone().oneshot(req);
        tasks.push(tokio::spawn(async move {
            let start = Instant::now();
            let res = call.await;
            (
                res.map(|r| (r.status().as_u16(), r.into_body())),
                start.elapsed(),
            )
        }));
    }
    // What the last teacher sees while the others are served.
    let watch = {
        let bar = bar.clone();
        let tickets = tickets.clone();
        tokio::spawn(async move {
            loop {
                let waiting = tickets
                    .iter()
                    .filter(|t| matches!(t.status(), TicketStatus::Waiting(_)))
                    .count();
                let last = tickets.iter().rev().find_map(|t| t.queue_status());
                let msg = match last {
                    Some(mut s) => {
                        s.eta = s.eta.map(|e| e.mul_f64(scale));
                        format!("{waiting} waiting · the last teacher sees: \"{s}\"")
                    }
                    None => format!("{waiting} waiting"),
                };
                bar.set_message(msg);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let mut phase = Phase::new(name);
    for t in tasks {
        phase.record(t.await);
        bar.inc(1);
    }
    watch.abort();
    bar.finish_and_clear();
    phase.makespan = t0.elapsed();
    phase
}

/// The tier's bound for a phase: the last plan can start once the tokens the
/// bucket did not hold have refilled, then takes one plan's generation time
/// (the phase's fastest successful call) — computed the same way for the mock
/// and for a real server.
fn bound(args: &Args, scale: f64, phase: &Phase) -> Duration {
    let n = args.teachers as f64;
    // The router's phase has `deployments` accounts: each limit that many
    // times (the direct phase calls one).
    let accounts = if phase.name == "router" {
        f64::from(args.deployments)
    } else {
        1.0
    };
    // The binding limit: what its burst did not hold, refilled at its rate.
    let refill = args
        .provider
        .limits(args)
        .iter()
        .map(|(per_plan, per_minute, burst)| {
            (n * per_plan - burst * accounts).max(0.0) / (per_minute.max(1.0) * accounts / 60.0)
        })
        .fold(0.0, f64::max)
        / scale;
    let generation = phase.latencies.iter().min().copied().unwrap_or_default();
    // Calls the tier paid for: with one call upstream, one plan's time.
    if phase.upstream_calls.is_some_and(|c| c <= 1) {
        return phase.latencies.iter().max().copied().unwrap_or_default();
    }
    Duration::from_secs_f64(refill) + generation
}

fn print_failures(phases: &[Phase]) {
    for p in phases.iter().filter(|p| p.failed > 0) {
        let reasons: Vec<String> = p
            .failures
            .iter()
            .map(|(why, n)| format!("{why} ×{n}"))
            .collect();
        println!(
            "{}: {} calls failed: {}",
            p.name,
            p.failed,
            reasons.join(", ")
        );
        if let Some(first) = &p.first_failure {
            println!("  first: {first}");
        }
    }
}

fn print_table(phases: &[Phase], scale: f64, bounds: &[Duration], teachers: usize, mocked: bool) {
    let s = |d: Duration| format!("{:.1} s", d.as_secs_f64() * scale);
    println!();
    println!(
        "| phase    | succeeded | failed | provider 429s | retries | p50      | p95      | makespan | bound    |"
    );
    println!(
        "|----------|-----------|--------|---------------|---------|----------|----------|----------|----------|"
    );
    for (p, bound) in phases.iter().zip(bounds) {
        let bound = *bound;
        let mut l = p.latencies.clone();
        l.sort();
        println!(
            "| {:<8} | {:>6}/{:<2} | {:>6} | {:>13} | {:>7} | {:>8} | {:>8} | {:>8} | {:>8} |",
            p.name,
            p.ok,
            teachers,
            p.failed,
            p.provider_429,
            p.retries,
            s(percentile(&l, 0.50)),
            s(percentile(&l, 0.95)),
            s(p.makespan),
            s(bound),
        );
    }
    println!();
    if mocked {
        println!("Times are simulated seconds (the mock runs {scale}× faster than real time).");
    } else {
        println!("Times are real seconds.");
    }
    println!(
        "The bound is what the tier allows: the first plans fit the token bucket, then one every"
    );
    println!("tokens/(TPM/60) s, plus one plan's generation time (the phase's fastest call).");
    for note in phases.iter().filter_map(|p| p.note.as_ref()) {
        println!("{note}");
    }
    print_failures(phases);
}

/// The server each phase calls: `--base-url`, or a fresh mock (kept alive by
/// the returned handle) so both phases start from a full bucket.
async fn provider(
    args: &Args,
    cfg: &MockConfig,
) -> Result<(String, Option<MockProvider>), BoxError> {
    match &args.base_url {
        Some(b) => Ok((b.clone(), None)),
        None => {
            let m = MockProvider::start(cfg.clone()).await?;
            Ok((m.base_url(), Some(m)))
        }
    }
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let args = Args::parse();
    let key: Option<Arc<str>> = std::env::var("OPENAI_API_KEY").ok().map(Arc::from);
    let service_time = Duration::from_secs(5);
    let mocked = args.base_url.is_none();
    if args.deployments > 1 && !mocked {
        return Err("--deployments runs against in-process mock accounts; drop --base-url".into());
    }
    // The mock's minute can be shortened; a real server runs in real time.
    let scale = args.time_scale.unwrap_or(if mocked { 10.0 } else { 1.0 });
    let mock_cfg = MockConfig {
        tokens_per_minute: args.tpm,
        requests_per_minute: args.rpm,
        shape: match args.provider {
            Provider::Openai => Shape::OpenAi,
            Provider::Anthropic => Shape::Anthropic {
                input_tokens_per_minute: args.itpm,
                output_tokens_per_minute: args.otpm,
            },
            Provider::Azure => Shape::Azure,
        },
        time_scale: scale,
        service_time,
        ..MockConfig::default()
    };
    let client = |base: String| HttpClient::new(&base, key.clone());

    println!(
        "Sunday night: {} teachers × {} tokens at once, {}{}.",
        args.teachers,
        args.tokens,
        match args.provider {
            Provider::Openai => format!("tier {} TPM / {} RPM", args.tpm, args.rpm),
            Provider::Anthropic => format!(
                "Anthropic {} RPM / {} ITPM / {} OTPM",
                args.rpm, args.itpm, args.otpm
            ),
            Provider::Azure => format!(
                "Azure OpenAI {} TPM / {} RPM over 10 s windows",
                args.tpm,
                (args.tpm / 1_000 * 6).max(1)
            ),
        },
        if mocked {
            format!(" (mock provider, time ×{scale})")
        } else {
            String::new()
        }
    );
    let mut phases = Vec::new();

    if !args.skip_direct {
        println!("Phase 1: calling the provider directly…");
        let (base, _mock) = provider(&args, &mock_cfg).await?;
        phases.push(direct(client(base), &args).await);
    }

    if args.deployments > 1 {
        println!(
            "Phase 2: through semaforo's router over {} accounts (each: bulkhead → breaker → pace → timeout)…",
            args.deployments
        );
        let mut mocks = Vec::new();
        for i in 0..args.deployments {
            let cfg = MockConfig {
                seed: u64::from(i),
                ..mock_cfg.clone()
            };
            mocks.push(MockProvider::start(cfg).await?);
        }
        let clients = mocks.iter().map(|m| client(m.base_url())).collect();
        phases.push(routed(clients, &args, scale).await?);
    } else {
        if args.same_prompt {
            println!("Phase 2: through semaforo (shutdown → cache → coalesce → quota → bulkhead → retry → breaker → pace → timeout)…");
        } else {
            println!("Phase 2: through semaforo (shutdown → quota → bulkhead → retry → breaker → pace → timeout)…");
        }
        let (base, _mock) = provider(&args, &mock_cfg).await?;
        phases.push(stacked(client(base), &args, scale).await?);
    }

    let bounds: Vec<Duration> = phases.iter().map(|p| bound(&args, scale, p)).collect();
    print_table(&phases, scale, &bounds, args.teachers, mocked);
    if let Some(p) = phases.last() {
        if p.ok < args.teachers {
            std::process::exit(1);
        }
    }
    Ok(())
}

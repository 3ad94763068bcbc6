//! Coalescing and the response cache next to what they stand on, in the same
//! run: a cache hit through the layer vs moka's `get` (same key type), a
//! coalesced miss with no concurrent caller vs the bare service, and the LLM
//! canonical request key of a 2 KB and an 8 KB request.

mod common;
use common::{bare, once};

use bytes::Bytes;
use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion};
use semaforo::cache::Cache;
use semaforo::coalesce::CoalesceLayer;
use semaforo::llm::LlmKey;
use semaforo::share::RequestKey;
use std::time::Duration;
use tower::Layer;

fn cache_and_coalesce(c: &mut Criterion) {
    let rt = common::runtime();
    let _guard = rt.enter();
    let mut g = c.benchmark_group("cache");
    g.warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));

    let mut s = bare();
    g.bench_function("bare service", |b| b.iter(|| once(&mut s, black_box(7))));

    let moka: moka::sync::Cache<u64, u64> = moka::sync::Cache::new(10_000);
    moka.insert(7, 8);
    g.bench_function("moka get (u64 key)", |b| b.iter(|| moka.get(black_box(&7))));

    g.bench_function("tokio::time::Instant::now (the cache's clock read)", |b| {
        b.iter(tokio::time::Instant::now)
    });

    let cache: Cache<u64, u64> = Cache::builder().build().unwrap();
    let mut s = cache.layer(|x: &u64| Some(*x)).layer(bare());
    once(&mut s, 7); // stored
    g.bench_function("semaforo Cache layer, hit (u64 key)", |b| {
        b.iter(|| once(&mut s, black_box(7)))
    });

    let mut s = CoalesceLayer::new(|x: &u64| Some(*x)).layer(bare());
    g.bench_function(
        "semaforo Coalesce, miss with no concurrent caller (u64 key)",
        |b| b.iter(|| once(&mut s, black_box(7))),
    );
    g.finish();

    let mut g = c.benchmark_group("llm_key");
    g.warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    let key = LlmKey::new();
    for kb in [2usize, 8] {
        // Messages of plain text adding up to about `kb` KB.
        let text =
            "El agua se evapora, se condensa en nubes y vuelve a caer. ".repeat(kb * 1024 / 58);
        let body = serde_json::json!({
            "model": "gpt-4o-mini",
            "temperature": 0,
            "max_tokens": 500,
            "messages": [
                {"role": "system", "content": "Eres un asistente para docentes."},
                {"role": "user", "content": text},
            ],
        })
        .to_string();
        let req = http::Request::post("/v1/chat/completions")
            .header("authorization", "Bearer sk-test")
            .body(Bytes::from(body.clone()))
            .unwrap();
        g.bench_with_input(
            BenchmarkId::new(
                "semaforo LlmKey (canonical request key)",
                format!("{} B", body.len()),
            ),
            &req,
            |b, req| b.iter(|| key.key(black_box(req))),
        );
    }
    g.finish();
}

criterion_group!(benches, cache_and_coalesce);
criterion_main!(benches);

//! Per-chunk cost of following a streamed response through the one body
//! wrapper, `guard::Tapped`: with a guard (what bulkhead/breaker hold until the
//! end) and with the timeout's deadlines, each next to the bare stream, on
//! 10,000 chunks.

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use futures::{stream, FutureExt, Stream, StreamExt};
use semaforo::guard::Tapped;
use semaforo::timeout::Timeout;
use std::convert::Infallible;
use std::time::Duration;
use tower::{service_fn, Layer, Service, ServiceExt};

const CHUNKS: u64 = 10_000;

fn chunks() -> impl Stream<Item = Result<u64, Infallible>> + Unpin {
    stream::iter(black_box(0..CHUNKS)).map(Ok)
}

fn drain<S: Stream<Item = Result<u64, E>> + Unpin, E>(mut s: S) -> u64 {
    let mut sum = 0;
    while let Some(Some(item)) = s.next().now_or_never() {
        sum += black_box(item.unwrap_or(0));
    }
    sum
}

fn per_chunk(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _guard = rt.enter();
    let mut g = c.benchmark_group("stream/10k_chunks");
    g.throughput(Throughput::Elements(CHUNKS));
    g.warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    g.bench_function("bare stream", |b| b.iter(|| black_box(drain(chunks()))));
    g.bench_function("guard::Tapped with a guard (hold until end)", |b| {
        b.iter(|| black_box(drain(Tapped::new(chunks(), |_end| {}))))
    });
    let timeout = Timeout::builder()
        .idle(Duration::from_secs(60))
        .total(Duration::from_secs(3600))
        .build()
        .unwrap();
    let mut svc = timeout
        .layer()
        .until_stream_end()
        .layer(service_fn(|_: ()| async { Ok::<_, Infallible>(chunks()) }));
    g.bench_function("guard::Tapped with timeout deadlines (idle + total)", |b| {
        b.iter(|| {
            let s = svc
                .ready()
                .now_or_never()
                .unwrap()
                .unwrap()
                .call(())
                .now_or_never()
                .unwrap()
                .unwrap();
            black_box(drain(s))
        })
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20);
    targets = per_chunk
}
criterion_main!(benches);

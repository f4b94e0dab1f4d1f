//! BLAKE3 of a 64 MiB upload body, fed in 1 MiB batches as ingest does, and in one call.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};

fn hashing(c: &mut Criterion) {
    let body: Vec<u8> = (0..64u32 * 1024 * 1024).map(|i| (i.wrapping_mul(2654435761) >> 24) as u8).collect();
    let mut group = c.benchmark_group("blake3");
    group.sample_size(20);
    group.throughput(Throughput::Bytes(body.len() as u64));
    group.bench_function("64MiB_in_1MiB_batches", |b| {
        b.iter(|| {
            let mut hasher = blake3::Hasher::new();
            for batch in body.chunks(1024 * 1024) {
                hasher.update(batch);
            }
            hasher.finalize()
        })
    });
    group.bench_function("64MiB_BlobId_of", |b| b.iter(|| types::BlobId::of(&body)));
    group.finish();
}

criterion_group!(benches, hashing);
criterion_main!(benches);

//! The whole image pipeline on a 12 MP camera-like JPEG: decode (with shrink-on-load), resize to
//! standard, thumb and preview, encode all three.

use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use transcode::photo::{self, Format};

fn pipeline(c: &mut Criterion) {
    let jpeg = benches::synthetic_jpeg(4000, 3000, 90);
    let png = {
        let mut out = Vec::new();
        benches::synthetic_rgb(2000, 1500)
            .write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)
            .expect("encoding to memory");
        out
    };
    let settings = photo::Settings::default();
    let limits = photo::Limits::default();
    let mut group = c.benchmark_group("image_pipeline");
    group.sample_size(20).measurement_time(Duration::from_secs(15));
    group.throughput(Throughput::Elements(1));
    group.bench_function("jpeg_12mp_to_standard_thumb_preview", |b| {
        b.iter(|| photo::transcode(&jpeg, Format::Jpeg, &settings, &limits, far()).expect("transcodes"))
    });
    group.bench_function("png_3mp_to_standard_thumb_preview", |b| {
        b.iter(|| photo::transcode(&png, Format::Png, &settings, &limits, far()).expect("transcodes"))
    });
    group.finish();
}

fn far() -> Instant {
    Instant::now() + Duration::from_secs(3600)
}

criterion_group!(benches, pipeline);
criterion_main!(benches);

//! Shared pieces of Courier's benchmarks: synthetic inputs that look enough like photos to give
//! realistic codec work, so large files never need committing.

use image::codecs::jpeg::JpegEncoder;

/// A deterministic photo-like RGB image: smooth gradients and soft shapes with sensor-like noise.
pub fn synthetic_rgb(width: u32, height: u32) -> image::RgbImage {
    let mut state: u32 = 0x9E37_79B9;
    image::RgbImage::from_fn(width, height, |x, y| {
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        let noise = (state % 9) as f32 - 4.0;
        let (fx, fy) = (x as f32 / width as f32, y as f32 / height as f32);
        let wave = ((fx * 9.0).sin() * (fy * 7.0).cos() + 1.0) * 60.0;
        let disc = if (fx - 0.6).powi(2) + (fy - 0.4).powi(2) < 0.04 { 70.0 } else { 0.0 };
        let channel = |base: f32| (base + noise).clamp(0.0, 255.0) as u8;
        image::Rgb([channel(40.0 + fx * 150.0 + disc), channel(wave + 30.0), channel(200.0 - fy * 150.0 + disc * 0.5)])
    })
}

/// [`synthetic_rgb`] as a JPEG of the given quality, as a camera would store it.
pub fn synthetic_jpeg(width: u32, height: u32, quality: u8) -> Vec<u8> {
    let mut out = Vec::new();
    JpegEncoder::new_with_quality(&mut out, quality)
        .encode_image(&synthetic_rgb(width, height))
        .expect("encoding to memory cannot fail");
    out
}

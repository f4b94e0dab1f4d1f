//! Mangled inputs: every fixture, truncated and with bytes flipped at seeded random places, goes
//! through the pipeline. Each must come back as a value — output or error — never a panic or a hang;
//! the errors must be ones that tell a user their file is bad.

use std::path::Path;
use std::time::{Duration, Instant};

use transcode::TranscodeError;
use transcode::photo::{self, Format};

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures").join(name)).unwrap()
}

/// xorshift32: reproducible damage without a dependency.
struct Damage(u32);

impl Damage {
    fn next(&mut self, below: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 17;
        self.0 ^= self.0 << 5;
        self.0 as usize % below.max(1)
    }
}

#[test]
fn mangled_images_fail_cleanly() {
    let inputs = [
        ("rocket.jpg", Format::Jpeg),
        ("phone-rotated-gps.jpg", Format::Jpeg),
        ("cmyk.jpg", Format::Jpeg),
        ("alpha.png", Format::Png),
        ("coffee.webp", Format::WebP),
        ("animated.gif", Format::Gif),
    ];
    let settings = photo::Settings::default();
    let limits = photo::Limits { max_pixels: 50_000_000, memory_bytes: 256 * 1024 * 1024 };
    let mut damage = Damage(0x2545_F491);
    let mut outcomes = (0, 0);
    for (name, format) in inputs {
        let original = fixture(name);
        for round in 0..12 {
            let mut bytes = original.clone();
            if round % 3 == 0 {
                bytes.truncate(damage.next(bytes.len()));
            }
            for _ in 0..(1 + round) {
                let at = damage.next(bytes.len());
                if let Some(b) = bytes.get_mut(at) {
                    *b ^= 1 << damage.next(8);
                }
            }
            let started = Instant::now();
            let result = photo::transcode(&bytes, format, &settings, &limits, Instant::now() + Duration::from_secs(30));
            assert!(started.elapsed() < Duration::from_secs(30), "{name} round {round} took {:?}", started.elapsed());
            match result {
                Ok(out) => {
                    outcomes.0 += 1;
                    assert!(out.standard.width <= 1600 && out.standard.height <= 1600);
                    assert!(out.preview.len() <= settings.preview_max_bytes);
                }
                Err(
                    TranscodeError::Corrupt(_)
                    | TranscodeError::Unsupported(_)
                    | TranscodeError::TooManyPixels { .. }
                    | TranscodeError::OverMemoryBudget(_),
                ) => outcomes.1 += 1,
                Err(other) => panic!("{name} round {round}: unexpected {other:?}"),
            }
        }
    }
    // The damage is real: some inputs survive it (a flipped bit in pixel data), many do not.
    assert!(outcomes.1 > 0, "no mangled input was refused: {outcomes:?}");
}

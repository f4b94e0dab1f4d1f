//! `make-image OUT.jpg [WIDTH HEIGHT [QUALITY]]`: writes a synthetic photo-like JPEG (default
//! 4000×3000, 12 MP, quality 90) for benchmarks and comparison scripts.

use anyhow::Context;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let out = args.first().context("usage: make-image OUT.jpg [WIDTH HEIGHT [QUALITY]]")?;
    let number = |i: usize, default: u32| args.get(i).map_or(Ok(default), |s| s.parse::<u32>());
    let (width, height, quality) = (number(1, 4000)?, number(2, 3000)?, number(3, 90)?);
    let quality = u8::try_from(quality.clamp(1, 100))?;
    std::fs::write(out, benches::synthetic_jpeg(width, height, quality)).with_context(|| format!("writing {out}"))?;
    Ok(())
}

//! `transcode-files OUT_DIR IN.jpg…`: runs Courier's image pipeline on each file, one after the
//! other on this thread, and writes `standard` and `thumb` next to each other in OUT_DIR. The
//! comparison script times it against `vipsthumbnail` doing the same work.

use std::path::Path;
use std::time::Instant;

use anyhow::Context;
use transcode::photo::{self, Format};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (out_dir, inputs) = args.split_first().context("usage: transcode-files OUT_DIR IN.jpg…")?;
    let settings = photo::Settings::default();
    let limits = photo::Limits::default();
    for input in inputs {
        let bytes = std::fs::read(input).with_context(|| format!("reading {input}"))?;
        let format = Format::sniff(&bytes).context("not an image")?;
        let deadline = Instant::now() + std::time::Duration::from_secs(60);
        let out = photo::transcode(&bytes, format, &settings, &limits, deadline)?;
        let stem = Path::new(input).file_stem().and_then(|s| s.to_str()).unwrap_or("out");
        std::fs::write(Path::new(out_dir).join(format!("{stem}-1600.jpg")), &out.standard.bytes)?;
        std::fs::write(Path::new(out_dir).join(format!("{stem}-320.jpg")), &out.thumb.bytes)?;
    }
    Ok(())
}

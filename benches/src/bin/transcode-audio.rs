//! `transcode-audio OUT_DIR IN…`: runs Courier's audio pipeline on each file (the container is
//! taken from the extension), one after the other on this thread, and writes `NAME.ogg` into
//! OUT_DIR. `benches/compare/audio.sh` times it against the ffmpeg CLI doing the same work.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use transcode::audio::{self, Container};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (out_dir, inputs) = args.split_first().context("usage: transcode-audio OUT_DIR IN…")?;
    for input in inputs {
        let path = Path::new(input);
        let container = match path.extension().and_then(|e| e.to_str()).unwrap_or_default() {
            "mp3" => Container::Mp3,
            "aac" => Container::Aac,
            "m4a" | "mp4" => Container::Mp4,
            "flac" => Container::Flac,
            "wav" => Container::Wav,
            "ogg" | "opus" => Container::Ogg,
            "webm" => Container::WebM,
            other => anyhow::bail!("{input}: no audio container for .{other}"),
        };
        let file = std::fs::File::open(path).with_context(|| format!("opening {input}"))?;
        let deadline = Instant::now() + Duration::from_secs(3600);
        let out = audio::transcode(file, container, &audio::Settings::default(), &audio::Limits::default(), deadline)?;
        let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("out");
        std::fs::write(Path::new(out_dir).join(format!("{stem}.ogg")), &out.bytes)?;
    }
    Ok(())
}

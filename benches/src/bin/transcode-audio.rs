//! `transcode-audio [--worker COURIER] OUT_DIR IN…`: runs Courier's audio pipeline on each file (the
//! container is taken from the extension), one after the other, and writes `NAME.ogg` into OUT_DIR.
//! `benches/compare/audio.sh` times it against the ffmpeg CLI doing the same work.
//!
//! Without `--worker` the pipeline runs on this thread; with it, in a warm sandboxed
//! `COURIER transcode-worker`, as `courier serve` runs voice notes (see `transcode-files`).

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use benches::SandboxedPool;
use transcode::audio::{self, Container};
use transcode::protocol::Task;
use transcode::{Body, Product};

const BUDGET: Duration = Duration::from_secs(3600);

fn main() -> anyhow::Result<()> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let worker = benches::worker_flag(&mut args);
    let (out_dir, inputs) = args.split_first().context("usage: transcode-audio [--worker COURIER] OUT_DIR IN…")?;
    let jobs =
        inputs.iter().map(|input| Ok((Path::new(input), container(input)?))).collect::<anyhow::Result<Vec<_>>>()?;
    let out = |path: &Path| {
        let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("out");
        Path::new(out_dir).join(format!("{stem}.ogg"))
    };
    let Some(program) = worker else {
        for (path, container) in jobs {
            let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
            let deadline = Instant::now() + BUDGET;
            let made =
                audio::transcode(file, container, &audio::Settings::default(), &audio::Limits::default(), deadline)?;
            std::fs::write(out(path), &made.bytes)?;
        }
        return Ok(());
    };
    tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(async {
        let sandboxed = SandboxedPool::start(program, 512 * 1024 * 1024).await?;
        for (path, container) in jobs {
            let mut lease = sandboxed.pool.checkout(BUDGET).await?;
            lease.stage(path).await?;
            let task =
                Task::Audio { container, settings: audio::Settings::default(), limits: audio::Limits::default() };
            let Product::Audio { standard, .. } = lease.run(task, BUDGET, |_| {}).await? else {
                anyhow::bail!("an audio job answered with another kind of product");
            };
            drop(lease);
            match standard.body {
                Body::Memory(bytes) => std::fs::write(out(path), &bytes)?,
                Body::File(file) => drop(std::fs::copy(file.path(), out(path))?),
            }
        }
        sandboxed.finish().await
    })
}

fn container(input: &str) -> anyhow::Result<Container> {
    Ok(match Path::new(input).extension().and_then(|e| e.to_str()).unwrap_or_default() {
        "mp3" => Container::Mp3,
        "aac" => Container::Aac,
        "m4a" | "mp4" => Container::Mp4,
        "flac" => Container::Flac,
        "wav" => Container::Wav,
        "ogg" | "opus" => Container::Ogg,
        "webm" => Container::WebM,
        other => anyhow::bail!("{input}: no audio container for .{other}"),
    })
}

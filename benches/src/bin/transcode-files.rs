//! `transcode-files [--worker COURIER] OUT_DIR IN.jpg…`: runs Courier's image pipeline on each
//! file, one after the other, and writes `standard` and `thumb` next to each other in OUT_DIR. The
//! comparison script times it against `vipsthumbnail` doing the same work.
//!
//! Without `--worker` the pipeline runs on this thread. With it, each file goes through a warm pool
//! of one sandboxed `COURIER transcode-worker` process, as `courier serve` runs photos: staged
//! into the worker's folder, transcoded there, and checked, copied and rehashed here. At the end
//! it prints its own peak resident memory and the worker's, and stops the worker so that a timer
//! around this program counts the worker's CPU too.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use benches::SandboxedPool;
use transcode::photo::{self, Format};
use transcode::protocol::Task;
use transcode::{Body, Product};

fn main() -> anyhow::Result<()> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let worker = benches::worker_flag(&mut args);
    let (out_dir, inputs) = args.split_first().context("usage: transcode-files [--worker COURIER] OUT_DIR IN.jpg…")?;
    let out_dir = Path::new(out_dir);
    match worker {
        None => in_process(out_dir, inputs),
        Some(program) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(in_worker(program, out_dir, inputs)),
    }
}

fn in_process(out_dir: &Path, inputs: &[String]) -> anyhow::Result<()> {
    let settings = photo::Settings::default();
    let limits = photo::Limits::default();
    for input in inputs {
        let bytes = std::fs::read(input).with_context(|| format!("reading {input}"))?;
        let format = Format::sniff(&bytes).context("not an image")?;
        let deadline = Instant::now() + Duration::from_secs(60);
        let out = photo::transcode(&bytes, format, &settings, &limits, deadline)?;
        write(out_dir, input, "1600", &out.standard.bytes)?;
        write(out_dir, input, "320", &out.thumb.bytes)?;
    }
    Ok(())
}

async fn in_worker(program: PathBuf, out_dir: &Path, inputs: &[String]) -> anyhow::Result<()> {
    let limits = photo::Limits::default();
    let sandboxed = SandboxedPool::start(program, limits.memory_bytes).await?;
    let budget = Duration::from_secs(60);
    for input in inputs {
        let head = std::fs::read(input).with_context(|| format!("reading {input}"))?;
        let format = Format::sniff(&head[..head.len().min(32)]).context("not an image")?;
        let mut lease = sandboxed.pool.checkout(budget).await?;
        lease.stage(Path::new(input)).await?;
        let task = Task::Photo { format, settings: photo::Settings::default(), limits: limits.clone() };
        let Product::Photo { standard, thumb, .. } = lease.run(task, budget, |_| {}).await? else {
            anyhow::bail!("a photo job answered with another kind of product");
        };
        drop(lease);
        for (size, variant) in [("1600", standard), ("320", thumb)] {
            match variant.body {
                Body::Memory(bytes) => write(out_dir, input, size, &bytes)?,
                Body::File(file) => write(out_dir, input, size, &std::fs::read(file.path())?)?,
            }
        }
    }
    sandboxed.finish().await
}

fn write(out_dir: &Path, input: &str, size: &str, bytes: &[u8]) -> anyhow::Result<()> {
    let stem = Path::new(input).file_stem().and_then(|s| s.to_str()).unwrap_or("out");
    std::fs::write(out_dir.join(format!("{stem}-{size}.jpg")), bytes)?;
    Ok(())
}

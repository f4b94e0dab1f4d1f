//! `transcode-video COURIER OUT_DIR IN…`: runs each video through a sandboxed `COURIER
//! transcode-worker`, as `courier serve` runs a video job (the worker also makes the poster, its
//! thumb and preview, and the parent checks and rehashes every output), and writes
//! `NAME-standard.mp4` and `NAME-poster.jpg` into OUT_DIR. `benches/compare/video.sh` times it
//! against the ffmpeg CLI doing the same work.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use benches::SandboxedPool;
use transcode::protocol::Task;
use transcode::{Body, Product, Variant, video};

const BUDGET: Duration = Duration::from_secs(3600);

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [program, out_dir, inputs @ ..] = args.as_slice() else {
        anyhow::bail!("usage: transcode-video COURIER OUT_DIR IN…");
    };
    let out_dir = Path::new(out_dir);
    tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(async {
        // As `serve`'s video pool: 3 GiB of address space, outputs up to 4 GiB.
        let sandboxed = SandboxedPool::start_with(PathBuf::from(program), 3 << 30, 4 << 30).await?;
        for input in inputs {
            let mut lease = sandboxed.pool.checkout(BUDGET).await?;
            lease.stage(Path::new(input)).await?;
            let task = Task::Video { settings: video::Settings::default(), limits: video::Limits::default() };
            let Product::Video { standard, poster, .. } = lease.run(task, BUDGET, |_| {}).await? else {
                anyhow::bail!("a video job answered with another kind of product");
            };
            drop(lease);
            let stem = Path::new(input).file_stem().and_then(|s| s.to_str()).context("an input file name")?;
            save(standard, &out_dir.join(format!("{stem}-standard.mp4")))?;
            save(poster, &out_dir.join(format!("{stem}-poster.jpg")))?;
        }
        sandboxed.finish().await
    })
}

fn save(variant: Variant, to: &Path) -> anyhow::Result<()> {
    match variant.body {
        Body::Memory(bytes) => std::fs::write(to, &bytes)?,
        Body::File(file) => drop(std::fs::copy(file.path(), to)?),
    }
    Ok(())
}

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

/// Takes a leading `--worker COURIER` off `args`: the comparison binaries' switch to run their
/// pipeline in a [`SandboxedPool`].
pub fn worker_flag(args: &mut Vec<String>) -> Option<std::path::PathBuf> {
    if args.len() > 1 && args[0] == "--worker" {
        return Some(args.drain(..2).nth(1).expect("two were there").into());
    }
    None
}

/// A warm pool of one sandboxed `courier transcode-worker`, set up as `courier serve` sets up its
/// photo and voice-note pool, for the comparison binaries' `--worker` mode.
pub struct SandboxedPool {
    pub pool: transcode::WorkerPool,
    _scratch: tempfile::TempDir,
}

impl SandboxedPool {
    /// Starts the worker (`program transcode-worker`) with `memory_bytes` of address space for jobs.
    pub async fn start(program: std::path::PathBuf, memory_bytes: u64) -> anyhow::Result<Self> {
        Self::start_with(program, memory_bytes, 256 * 1024 * 1024).await
    }

    /// [`SandboxedPool::start`], with `file_bytes` the largest output the worker may write.
    pub async fn start_with(program: std::path::PathBuf, memory_bytes: u64, file_bytes: u64) -> anyhow::Result<Self> {
        let scratch = tempfile::tempdir()?;
        let launch = transcode::Launch {
            program,
            args: vec!["transcode-worker".into()],
            root: scratch.path().join("work"),
            spool: scratch.path().to_owned(),
            user: None,
        };
        launch.prepare()?;
        let spec = transcode::PoolSpec {
            name: "quick",
            workers: 1,
            jobs_per_worker: u32::MAX,
            // Never replaced mid-run, so the worker measured at the end is the one that did the work.
            recycle_rss_bytes: u64::MAX,
            limits: transcode::sandbox::Limits { memory_bytes, file_bytes, open_files: 64, niceness: 0 },
        };
        let pool = transcode::WorkerPool::new(spec, launch);
        pool.warm_up().await?;
        Ok(Self { pool, _scratch: scratch })
    }

    /// Prints each process's resident high-water mark (`parent_peak_kib=… worker_peak_kib=…`, read
    /// from /proc while the worker lives), then stops the worker and waits for it, so a timer
    /// around this program (GNU time) counts the worker's CPU time too.
    pub async fn finish(self) -> anyhow::Result<()> {
        let pids = self.pool.idle_pids();
        anyhow::ensure!(pids.len() == 1, "expected one warm worker at the end, found {}", pids.len());
        let (worker, parent) = (peak_kib(pids[0])?, peak_kib(std::process::id())?);
        #[allow(clippy::print_stdout, reason = "the figures the comparison scripts read")]
        {
            println!("parent_peak_kib={parent} worker_peak_kib={worker}");
        }
        self.pool.shutdown().await;
        Ok(())
    }
}

/// The peak resident KiB of a live process (`VmHWM` in /proc).
fn peak_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no VmHWM in /proc/{pid}/status"))
}

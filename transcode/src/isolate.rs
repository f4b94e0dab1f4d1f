//! Video jobs run in a worker process of their own, never in the server.
//!
//! libav is a large C codebase parsing hostile bytes, so the server does not load a video into its
//! own address space. [`Worker::run_video`] starts `courier transcode-worker` (the same binary),
//! hands it the job as JSON on stdin and reads one JSON line per event from its stdout: progress,
//! then the result or the error. The worker caps its own address space (`RLIMIT_AS`, the memory
//! budget) and core dumps, and lowers its scheduling priority, before it reads a byte of input; the
//! parent kills it at the wall-clock budget or when the job is cancelled (dropping the future kills
//! the process). A crash, an abort on
//! a failed allocation or a kill ends that process alone: the server, its other jobs and the worker
//! threads are untouched, and nothing is leaked. The environment is cleared, so no proxy or
//! library setting reaches libav.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::Command;

use crate::{TranscodeError, video};

/// What the worker process is asked to do.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VideoJob {
    pub input: PathBuf,
    pub output_dir: PathBuf,
    pub settings: video::Settings,
    pub limits: video::Limits,
    /// The worker's address-space limit, in bytes.
    pub memory_bytes: u64,
}

/// The worker's scheduling niceness (0 is normal, 19 the lowest).
pub const WORKER_NICENESS: i32 = 10;

/// One line of the worker's stdout.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Event {
    Progress(f32),
    Done(Box<video::Output>),
    Failed(TranscodeError),
}

/// The worker's side: reads a [`VideoJob`] from stdin, runs it, reports on stdout. Returns the
/// process exit code.
pub fn worker_main() -> i32 {
    let mut job = String::new();
    if let Err(e) = std::io::Read::read_to_string(&mut std::io::stdin().lock(), &mut job) {
        return report(&Event::Failed(TranscodeError::Io(format!("reading the job: {e}"))));
    }
    let job: VideoJob = match serde_json::from_str(&job) {
        Ok(job) => job,
        Err(e) => return report(&Event::Failed(TranscodeError::Io(format!("a malformed job: {e}")))),
    };
    // The budget holds before a byte of the input is read.
    let limits = rlimit::setrlimit(rlimit::Resource::AS, job.memory_bytes, job.memory_bytes)
        .and_then(|()| rlimit::setrlimit(rlimit::Resource::CORE, 0, 0));
    if let Err(e) = limits {
        return report(&Event::Failed(TranscodeError::Io(format!("setting the worker's limits: {e}"))));
    }
    // Below the server in the scheduler: photos, voice notes and messages on the same cores go
    // first, and the video takes whatever CPU is left.
    if let Err(e) = rustix::process::setpriority_process(None, WORKER_NICENESS) {
        // Best effort: stderr reaches the parent's error message if the job fails.
        eprintln!("could not lower the worker's priority: {e}");
    }
    let outcome = video::transcode(&job.input, &job.output_dir, &job.settings, &job.limits, |done| {
        report(&Event::Progress(done));
    });
    match outcome {
        Ok(output) => report(&Event::Done(Box::new(output))),
        Err(e) => report(&Event::Failed(blame_budget(e, job.memory_bytes))),
    }
}

/// libav reports a failed allocation in many ways (ENOMEM, EAGAIN from a thread that could not
/// start, "generic error" from libx264). A failure after the process came within 10 % of its
/// address-space limit is the budget's doing, whatever it was called.
fn blame_budget(e: TranscodeError, limit: u64) -> TranscodeError {
    if e.is_permanent() && !matches!(e, TranscodeError::Corrupt(_)) {
        return e;
    }
    let peak = std::fs::read_to_string("/proc/self/status").ok().and_then(|status| {
        let line = status.lines().find(|l| l.starts_with("VmPeak:"))?;
        line.split_whitespace().nth(1)?.parse::<u64>().ok().map(|kib| kib * 1024)
    });
    match peak {
        Some(peak) if peak >= limit / 10 * 9 => {
            TranscodeError::OverMemoryBudget(format!("{e} (the worker reached {peak} of its {limit} bytes)"))
        }
        _ => e,
    }
}

fn report(event: &Event) -> i32 {
    let line = serde_json::to_string(event).expect("events serialise");
    let mut out = std::io::stdout().lock();
    match writeln!(out, "{line}").and_then(|()| out.flush()) {
        Ok(()) => 0,
        Err(_) => 1,
    }
}

/// The parent's side: how to start a worker and how long to let it run.
#[derive(Debug, Clone)]
pub struct Worker {
    /// The `courier` binary (or anything that runs [`worker_main`] for `args`).
    pub exe: PathBuf,
    pub args: Vec<String>,
    pub timeout: Duration,
}

/// How much of the worker's stderr is kept for the error message.
const STDERR_KEPT: usize = 4096;

impl Worker {
    /// Runs `job` in a fresh worker process. `progress` gets 0.0–1.0 as the worker reports it.
    /// Dropping the returned future kills the worker.
    pub async fn run_video(
        &self,
        job: &VideoJob,
        mut progress: impl FnMut(f32),
    ) -> Result<video::Output, TranscodeError> {
        let io = |what: &str, e: std::io::Error| TranscodeError::Io(format!("{what}: {e}"));
        let mut child = Command::new(&self.exe)
            .args(&self.args)
            .env_clear()
            // glibc keeps an arena per thread; a few keep the address space near what is in use.
            .env("MALLOC_ARENA_MAX", "2")
            .current_dir(&job.output_dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| io("starting the transcode worker", e))?;
        let mut stdin = child.stdin.take().expect("piped");
        let mut stdout = BufReader::new(child.stdout.take().expect("piped")).lines();
        let mut stderr = child.stderr.take().expect("piped");
        let job = serde_json::to_vec(job).expect("jobs serialise");

        let events = async {
            stdin.write_all(&job).await.map_err(|e| io("sending the job", e))?;
            drop(stdin);
            let mut last = None;
            while let Some(line) = stdout.next_line().await.map_err(|e| io("reading the worker", e))? {
                match serde_json::from_str::<Event>(&line) {
                    Ok(Event::Progress(done)) => progress(done),
                    Ok(event) => last = Some(event),
                    Err(_) => tracing::warn!(line, "the transcode worker printed something unexpected"),
                }
            }
            Ok::<_, TranscodeError>(last)
        };
        // Stderr is drained alongside, so a chatty worker never blocks on a full pipe.
        let errors = async {
            let (mut kept, mut chunk) = (Vec::new(), [0u8; 1024]);
            while let Ok(n @ 1..) = stderr.read(&mut chunk).await {
                kept.extend_from_slice(&chunk[..n]);
                let excess = kept.len().saturating_sub(STDERR_KEPT);
                kept.drain(..excess);
            }
            String::from_utf8_lossy(&kept).into_owned()
        };
        let work = async {
            let (last, stderr) = tokio::join!(events, errors);
            let status = child.wait().await.map_err(|e| io("waiting for the worker", e))?;
            Ok::<_, TranscodeError>((last?, status, stderr))
        };
        let (last, status, stderr) = match tokio::time::timeout(self.timeout, work).await {
            Ok(result) => result?,
            // The child is killed when it is dropped, on the way out of this function.
            Err(_) => return Err(TranscodeError::TimedOut),
        };
        match last {
            Some(Event::Done(output)) if status.success() => Ok(*output),
            Some(Event::Failed(e)) => Err(e),
            _ => Err(died(status, &stderr)),
        }
    }
}

/// Why a worker ended without a result.
fn died(status: std::process::ExitStatus, stderr: &str) -> TranscodeError {
    use std::os::unix::process::ExitStatusExt;
    let tail = stderr.lines().last().unwrap_or_default();
    // Rust aborts on a failed allocation; libav reports one as ENOMEM. Both mean the budget.
    if stderr.contains("memory allocation") || stderr.contains("Cannot allocate memory") {
        return TranscodeError::OverMemoryBudget(tail.to_string());
    }
    match status.signal() {
        Some(signal) => TranscodeError::Panicked(format!("the transcode worker died of signal {signal}: {tail}")),
        None => TranscodeError::Panicked(format!("the transcode worker exited with {status}: {tail}")),
    }
}

/// A folder for one job's outputs, removed with everything in it when dropped.
pub fn job_dir(parent: &Path) -> std::io::Result<tempfile::TempDir> {
    tempfile::Builder::new().prefix("video-").tempdir_in(parent)
}

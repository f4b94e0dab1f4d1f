//! The `courier transcode-worker` process: sandboxes itself, then runs jobs one at a time.
//!
//! Started by [`crate::WorkerPool`] with its folder, its parent's pid and its limits on the command
//! line. It enters its [`sandbox`] before it reads anything, then answers [`Request`]s on stdin
//! with [`Reply`] lines on stdout until stdin closes. Every probe, decode and encode of an upload
//! happens here, never in the server. A panic fails the job, not the process (the parent retires
//! a worker after any failure anyway); an abort, a kill by the sandbox or a limit ends the process,
//! and the parent reads that from its exit status.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::FileExt;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::protocol::{INPUT, MAX_LINE, Made, OutFile, Reply, Request, Task};
use crate::sandbox::{self, Landlock, OUT_DIR};
use crate::{TranscodeError, audio, photo, video};

/// Exit code of a worker that could not put up its sandbox (sysexits' EX_SOFTWARE).
pub const SANDBOX_FAILED: i32 = 70;
/// The niceness of video workers: photos, voice notes and messages on the same cores go first.
pub const VIDEO_NICENESS: i32 = 10;

/// The worker's main: returns the process exit code.
pub fn main(dir: &Path, parent: Option<i32>, limits: &sandbox::Limits) -> i32 {
    // Opened before Landlock, which would refuse /proc afterwards: the peak memory of each job is
    // read from it for the parent's recycling decision.
    let status = File::open("/proc/self/status").ok();
    let landlock = match sandbox::enter(dir, parent, limits) {
        Ok(landlock) => landlock,
        Err(e) => {
            eprintln!("transcode worker: could not enter the sandbox: {e}");
            return SANDBOX_FAILED;
        }
    };
    let worker = Worker { dir: dir.to_owned(), status, landlock };
    let mut requests = BufReader::new(std::io::stdin().lock());
    loop {
        let line = match read_line(&mut requests, MAX_LINE) {
            Ok(Some(line)) => line,
            Ok(None) => return 0,
            Err(e) => {
                eprintln!("transcode worker: reading a request: {e}");
                return 1;
            }
        };
        let request: Request = match serde_json::from_slice(&line) {
            Ok(request) => request,
            Err(e) => {
                eprintln!("transcode worker: a malformed request: {e}");
                return 1;
            }
        };
        if worker.answer(request).is_err() {
            // The parent stopped listening.
            return 1;
        }
    }
}

/// `courier sandbox-check`: enters the sandbox as a worker would, then tries what a worker must
/// not be able to do, printing one line per try (`open PATH: denied|opened`). With `socket`, it
/// last tries to open a TCP socket, which the seccomp filter answers by killing the process
/// (SIGSYS); reaching the line after it means the sandbox failed.
pub fn check(dir: &Path, parent: Option<i32>, limits: &sandbox::Limits, open: &[PathBuf], socket: bool) -> i32 {
    let mut out = std::io::stdout().lock();
    match sandbox::enter(dir, parent, limits) {
        Ok(landlock) => {
            let _ = writeln!(out, "landlock: {landlock:?}");
        }
        Err(e) => {
            let _ = writeln!(out, "sandbox: {e}");
            return SANDBOX_FAILED;
        }
    }
    for path in open {
        let verdict = if File::open(path).is_ok() { "opened" } else { "denied" };
        let _ = writeln!(out, "open {}: {verdict}", path.display());
    }
    if socket {
        let _ = writeln!(out, "socket: trying");
        let _ = out.flush();
        let outcome = std::net::TcpStream::connect(("127.0.0.1", 9));
        let _ = writeln!(out, "socket: the sandbox let it through ({outcome:?})");
        return 1;
    }
    let _ = out.flush();
    0
}

/// Reads one `\n`-terminated line of at most `max` bytes; `None` at the end of the stream.
pub fn read_line(reader: &mut impl BufRead, max: usize) -> std::io::Result<Option<Vec<u8>>> {
    let mut line = Vec::new();
    let n = std::io::Read::take(&mut *reader, max as u64 + 1).read_until(b'\n', &mut line)?;
    if n == 0 {
        return Ok(None);
    }
    if line.last() != Some(&b'\n') {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "a line too long, or cut short"));
    }
    line.pop();
    Ok(Some(line))
}

struct Worker {
    dir: PathBuf,
    status: Option<File>,
    landlock: Landlock,
}

impl Worker {
    fn answer(&self, request: Request) -> std::io::Result<()> {
        if let Err(e) = sandbox::allow_cpu(request.cpu_secs) {
            eprintln!("transcode worker: setting the CPU limit: {e}");
        }
        let deadline = Instant::now() + Duration::from_secs(request.cpu_secs.max(1));
        let outcome = catch_unwind(AssertUnwindSafe(|| self.run(request.task, deadline))).unwrap_or_else(|panic| {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            Err(TranscodeError::Panicked(what))
        });
        let peak_rss_bytes = self.peak("VmHWM:");
        let reply = match outcome {
            Ok(made) => Reply::Done { made, peak_rss_bytes, landlock: self.landlock },
            Err(error) => Reply::Failed { error: self.blame_budget(error), peak_rss_bytes, landlock: self.landlock },
        };
        send(&reply)
    }

    fn input(&self) -> PathBuf {
        self.dir.join(INPUT)
    }

    fn out(&self, name: &str) -> PathBuf {
        self.dir.join(OUT_DIR).join(name)
    }

    fn run(&self, task: Task, deadline: Instant) -> Result<Made, TranscodeError> {
        let io = |e: std::io::Error| TranscodeError::Io(e.to_string());
        match task {
            Task::ProbeImage { format, max_pixels } => {
                let input = BufReader::new(File::open(self.input()).map_err(io)?);
                let probe = photo::probe(input, format)?;
                photo::Limits { max_pixels, ..Default::default() }.check_pixels(probe.width, probe.height)?;
                Ok(Made::Probed)
            }
            Task::ProbeAudio { container, limits } => {
                audio::probe(File::open(self.input()).map_err(io)?, container, &limits)?;
                Ok(Made::Probed)
            }
            Task::Photo { format, settings, limits } => {
                let bytes = std::fs::read(self.input()).map_err(io)?;
                let made = photo::transcode(&bytes, format, &settings, &limits, deadline)?;
                drop(bytes);
                let standard = self.write("standard.jpg", &made.standard.bytes, made.standard.dimensions())?;
                let thumb = self.write("thumb.jpg", &made.thumb.bytes, made.thumb.dimensions())?;
                let preview = self.write("preview.jpg", &made.preview, None)?;
                Ok(Made::Photo { width: made.width, height: made.height, standard, thumb, preview })
            }
            Task::Audio { container, settings, limits } => {
                let input = File::open(self.input()).map_err(io)?;
                let made = audio::transcode(input, container, &settings, &limits, deadline)?;
                let standard = self.write("standard.ogg", &made.bytes, None)?;
                Ok(Made::Audio { duration_ms: made.duration_ms, waveform: made.waveform, standard })
            }
            Task::Video { settings, limits } => {
                let made = video::transcode(&self.input(), &self.dir.join(OUT_DIR), &settings, &limits, |done| {
                    // A parent that stopped listening kills this process soon enough.
                    let _ = send(&Reply::Progress(done));
                })?;
                let file = |f: &video::FileVariant| OutFile {
                    name: f.path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
                    width: Some(f.width),
                    height: Some(f.height),
                };
                let preview = self.write("preview.jpg", &made.preview, None)?;
                Ok(Made::Video {
                    width: made.width,
                    height: made.height,
                    duration_ms: made.duration_ms,
                    has_audio: made.has_audio,
                    standard: file(&made.standard),
                    poster: file(&made.poster),
                    thumb: file(&made.thumb),
                    preview,
                })
            }
        }
    }

    fn write(&self, name: &str, bytes: &[u8], size: Option<(u32, u32)>) -> Result<OutFile, TranscodeError> {
        std::fs::write(self.out(name), bytes).map_err(|e| TranscodeError::Io(format!("writing {name}: {e}")))?;
        Ok(OutFile { name: name.into(), width: size.map(|s| s.0), height: size.map(|s| s.1) })
    }

    /// A `kB` field of this process's status (VmHWM, VmPeak), in bytes; 0 when unreadable.
    fn peak(&self, field: &str) -> u64 {
        let Some(status) = &self.status else { return 0 };
        let mut buf = vec![0u8; 4096];
        let n = status.read_at(&mut buf, 0).unwrap_or(0);
        sandbox::status_field(&String::from_utf8_lossy(&buf[..n]), field).unwrap_or(0)
    }

    /// Decoders report a failed allocation in many ways (ENOMEM, EAGAIN from a thread that could
    /// not start, "generic error" from libx264). A failure after the process came within 10 % of
    /// its address-space limit is the budget's doing, whatever it was called.
    fn blame_budget(&self, e: TranscodeError) -> TranscodeError {
        if e.is_permanent() && !matches!(e, TranscodeError::Corrupt(_)) {
            return e;
        }
        let limit = rustix::process::getrlimit(rustix::process::Resource::As).current.unwrap_or(u64::MAX);
        match self.peak("VmPeak:") {
            peak if peak > 0 && peak >= limit / 10 * 9 => {
                TranscodeError::OverMemoryBudget(format!("{e} (the worker reached {peak} of its {limit} bytes)"))
            }
            _ => e,
        }
    }
}

fn send(reply: &Reply) -> std::io::Result<()> {
    let line = serde_json::to_string(reply).expect("replies serialise");
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")?;
    out.flush()
}

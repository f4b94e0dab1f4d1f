//! Pools of sandboxed `courier transcode-worker` processes, and the parent's side of their protocol.
//!
//! A [`WorkerPool`] keeps up to `workers` processes, started ahead so a photo never waits for one
//! to start. [`WorkerPool::checkout`] lends one ([`Lease`]) for one job: the caller puts the input
//! in place, [`Lease::run`] sends the [`Task`], waits for the answer under a wall-clock budget, and
//! hands back a [`Product`] whose every file was checked and hashed here. A worker is replaced
//! after `jobs_per_worker` jobs, after any failure, and once its resident memory has passed
//! `recycle_rss_bytes`; a lease dropped mid-job (a cancelled job) kills its worker.
//!
//! The parent trusts nothing a worker says. Output names must be plain file names in its `out/`
//! folder, opened with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`; each must be a regular
//! file within its size bound and start with its format's magic bytes; its bytes are copied out
//! through that descriptor while the parent hashes them, so what is stored is what was hashed,
//! whatever the worker does to its folder afterwards. Reply lines are bounded ([`MAX_LINE`]); the
//! worker's stderr goes to the log, never to a client.
//!
//! Workers are started from the runtime's own threads, never from the blocking pool:
//! `PR_SET_PDEATHSIG` fires when the *thread* that forked the child ends, and blocking-pool threads
//! end when idle.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use types::BlobId;

use crate::protocol::{INPUT, MAX_LINE, Made, OutFile, Reply, Request, Task};
use crate::sandbox::{self, Landlock, OUT_DIR};
use crate::{TranscodeError, audio, photo};

/// How to start a worker process.
#[derive(Debug, Clone)]
pub struct Launch {
    /// The program (this binary) and the arguments that make it a worker; the pool adds
    /// `--dir`, `--parent` and the limits.
    pub program: PathBuf,
    pub args: Vec<String>,
    /// The folder the workers' folders live in. It holds nothing else: no key, no database.
    pub root: PathBuf,
    /// Where outputs too large to hold in memory are copied to (the parent's own temp folder).
    pub spool: PathBuf,
    /// Run workers as this uid and gid (for a server running as root).
    pub user: Option<(u32, u32)>,
}

impl Launch {
    /// Empties `root` of whatever a previous run left (a crash mid-job) and makes it again.
    pub fn prepare(&self) -> std::io::Result<()> {
        match std::fs::remove_dir_all(&self.root) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        std::fs::DirBuilder::new().recursive(true).mode(0o711).create(&self.root)
    }
}

/// One pool's shape.
#[derive(Debug, Clone)]
pub struct PoolSpec {
    /// Names the workers' folders and log lines: `photo`, `video`, `probe`.
    pub name: &'static str,
    /// Processes at once: jobs beyond them wait in [`WorkerPool::checkout`].
    pub workers: usize,
    /// Jobs a process runs before it is replaced (1: a fresh process per job).
    pub jobs_per_worker: u32,
    /// A process whose resident high-water mark passed this is replaced after its job.
    pub recycle_rss_bytes: u64,
    pub limits: sandbox::Limits,
}

/// A pool of warm worker processes.
#[derive(Debug, Clone)]
pub struct WorkerPool(Arc<Inner>);

#[derive(Debug)]
struct Inner {
    spec: PoolSpec,
    launch: Launch,
    slots: Arc<Semaphore>,
    idle: Mutex<Vec<Process>>,
    next: AtomicU64,
}

/// Whether a worker has already said that Landlock is missing (said once per server process).
static LANDLOCK_REPORTED: AtomicBool = AtomicBool::new(false);

impl WorkerPool {
    /// A pool; its workers start with [`WorkerPool::warm_up`] or when first needed.
    pub fn new(spec: PoolSpec, launch: Launch) -> Self {
        let slots = Arc::new(Semaphore::new(spec.workers.max(1)));
        Self(Arc::new(Inner { spec, launch, slots, idle: Mutex::new(Vec::new()), next: AtomicU64::new(0) }))
    }

    pub fn spec(&self) -> &PoolSpec {
        &self.0.spec
    }

    /// Starts every worker ahead of the first job. Call from a runtime thread (see the module docs).
    pub async fn warm_up(&self) -> Result<(), TranscodeError> {
        for _ in 0..self.0.spec.workers.max(1) {
            let process = self.0.spawn().await?;
            self.0.park(process);
        }
        Ok(())
    }

    /// The worker processes alive and idle now.
    pub fn idle_pids(&self) -> Vec<u32> {
        self.0.idle.lock().expect("never poisoned").iter().map(|p| p.pid).collect()
    }

    /// Stops the idle workers and waits (up to two seconds each) until they have exited, so their
    /// resource usage is accounted to this process. Workers out on a lease end with it as usual.
    pub async fn shutdown(&self) {
        let idle = std::mem::take(&mut *self.0.idle.lock().expect("never poisoned"));
        for mut process in idle {
            process.kill();
            let _ = tokio::time::timeout(Duration::from_secs(2), process.child.wait()).await;
        }
    }

    /// Lends a worker for one job, waiting at most `wait` for one to be free ([`TranscodeError::Busy`]).
    pub async fn checkout(&self, wait: Duration) -> Result<Lease, TranscodeError> {
        let permit = tokio::time::timeout(wait, self.0.slots.clone().acquire_owned())
            .await
            .map_err(|_| TranscodeError::Busy)?
            .expect("the pool never closes its semaphore");
        let parked = self.0.idle.lock().expect("never poisoned").pop();
        let process = match parked {
            Some(mut process) => match process.child.try_wait() {
                Ok(None) => process,
                _ => {
                    tracing::warn!(pool = self.0.spec.name, pid = process.pid, "an idle transcode worker had died");
                    self.0.spawn().await?
                }
            },
            None => self.0.spawn().await?,
        };
        Ok(Lease { process: Some(process), reusable: false, pool: self.0.clone(), _permit: permit })
    }
}

impl Inner {
    async fn spawn(&self) -> Result<Process, TranscodeError> {
        let io = |what: &'static str| move |e: std::io::Error| TranscodeError::Io(format!("{what}: {e}"));
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let dir = self.launch.root.join(format!("{}-{n}", self.spec.name));
        let user = self.launch.user;
        let made = dir.clone();
        tokio::task::spawn_blocking(move || make_folder(&made, user))
            .await
            .map_err(|e| TranscodeError::Io(e.to_string()))?
            .map_err(io("making a worker's folder"))?;
        let limits = &self.spec.limits;
        let mut command = Command::new(&self.launch.program);
        command
            .args(&self.launch.args)
            .arg("--dir")
            .arg(&dir)
            .args(["--parent", &std::process::id().to_string()])
            .args(["--memory-bytes", &limits.memory_bytes.to_string()])
            .args(["--file-bytes", &limits.file_bytes.to_string()])
            .args(["--open-files", &limits.open_files.to_string()])
            .args(["--niceness", &limits.niceness.to_string()])
            .env_clear()
            // glibc keeps an arena per thread; a few keep the address space near what is in use.
            .env("MALLOC_ARENA_MAX", "2")
            .current_dir(&dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        if let Some((uid, gid)) = user {
            command.uid(uid).gid(gid);
        }
        let mut child = command.spawn().map_err(io("starting a transcode worker"))?;
        let pid = child.id().unwrap_or(0);
        let stdin = child.stdin.take().expect("piped");
        let stdout = BufReader::new(child.stdout.take().expect("piped"));
        let stderr = Arc::new(Mutex::new(VecDeque::new()));
        let errors =
            tokio::spawn(drain_stderr(child.stderr.take().expect("piped"), stderr.clone(), self.spec.name, pid));
        Ok(Process { child, pid, dir, stdin, stdout, stderr, errors, jobs: 0 })
    }

    /// Keeps `process` for the next job, unless the pool already holds enough.
    fn park(&self, process: Process) {
        let mut idle = self.idle.lock().expect("never poisoned");
        if idle.len() < self.spec.workers.max(1) {
            idle.push(process);
        }
    }
}

fn make_folder(dir: &Path, user: Option<(u32, u32)>) -> std::io::Result<()> {
    std::fs::DirBuilder::new().mode(0o700).create(dir)?;
    std::fs::DirBuilder::new().mode(0o700).create(dir.join(OUT_DIR))?;
    if let Some((uid, gid)) = user {
        std::os::unix::fs::chown(dir, Some(uid), Some(gid))?;
        std::os::unix::fs::chown(dir.join(OUT_DIR), Some(uid), Some(gid))?;
    }
    Ok(())
}

/// How much of a worker's stderr is kept to explain its death.
const STDERR_KEPT: usize = 4096;
/// The longest stderr line logged whole.
const STDERR_LINE: usize = 1024;
/// Stderr logged per process; past it, lines are only kept in the tail.
const STDERR_LOGGED: usize = 64 * 1024;

/// Logs a worker's stderr line by line and keeps its tail.
async fn drain_stderr(
    stderr: tokio::process::ChildStderr,
    tail: Arc<Mutex<VecDeque<u8>>>,
    pool: &'static str,
    pid: u32,
) {
    let mut lines = BufReader::new(stderr);
    let mut line = Vec::new();
    let mut logged = 0;
    loop {
        line.clear();
        match (&mut lines).take(STDERR_LINE as u64).read_until(b'\n', &mut line).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        logged += line.len();
        if logged <= STDERR_LOGGED {
            let text = String::from_utf8_lossy(&line);
            tracing::warn!(pool, pid, stderr = ?text.trim_end(), "transcode worker");
        }
        let mut kept = tail.lock().expect("never poisoned");
        kept.extend(line.iter());
        let excess = kept.len().saturating_sub(STDERR_KEPT);
        kept.drain(..excess);
    }
}

/// A running worker process. Dropping it kills the process (and its group) and removes its folder.
#[derive(Debug)]
struct Process {
    child: Child,
    pid: u32,
    dir: PathBuf,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    stderr: Arc<Mutex<VecDeque<u8>>>,
    errors: tokio::task::JoinHandle<()>,
    jobs: u32,
}

impl Process {
    /// SIGKILL to the worker's process group (a worker cannot fork, a wrapper might).
    fn kill(&mut self) {
        // Once reaped, the pid (and group id) may belong to someone else.
        if self.child.id().is_some()
            && let Some(pid) = rustix::process::Pid::from_raw(self.pid as i32)
        {
            let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
        }
        let _ = self.child.start_kill();
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
        if self.dir.as_os_str().is_empty() {
            return;
        }
        let dir = std::mem::take(&mut self.dir);
        let remove = move || {
            if let Err(e) = std::fs::remove_dir_all(&dir)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                tracing::warn!(dir = %dir.display(), error = %e, "removing a worker's folder failed");
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => drop(runtime.spawn_blocking(remove)),
            Err(_) => remove(),
        }
    }
}

/// One worker, lent for one job. Dropping it before [`Lease::run`] has returned kills the worker.
#[derive(Debug)]
pub struct Lease {
    process: Option<Process>,
    /// Set when a job ended with the worker fit for another: only then does it go back.
    reusable: bool,
    pool: Arc<Inner>,
    _permit: OwnedSemaphorePermit,
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(process) = self.process.take().filter(|_| self.reusable) {
            self.pool.park(process);
        } else {
            // Its worker was retired: start the next one now, so the next job finds it warm.
            let pool = self.pool.clone();
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(async move {
                    match pool.spawn().await {
                        Ok(process) => pool.park(process),
                        Err(e) => tracing::error!(pool = pool.spec.name, error = %e, "starting a transcode worker"),
                    }
                });
            }
        }
    }
}

impl Lease {
    /// Where the job's input goes.
    pub fn input(&self) -> PathBuf {
        self.process.as_ref().map(|p| p.dir.join(INPUT)).unwrap_or_default()
    }

    /// Puts `file` in place as the input: a hard link when it is on the same file system, a copy
    /// otherwise. The worker can read it, never change it.
    pub async fn stage(&self, file: &Path) -> Result<(), TranscodeError> {
        let (from, to) = (file.to_owned(), self.input());
        tokio::task::spawn_blocking(move || {
            if std::fs::hard_link(&from, &to).is_err() {
                std::fs::copy(&from, &to)?;
            }
            std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o444))
        })
        .await
        .map_err(|e| TranscodeError::Io(e.to_string()))?
        .map_err(|e| TranscodeError::Io(format!("staging a job's input: {e}")))
    }

    /// Runs `task` on the staged input under a wall-clock `budget`; `progress` hears 0.0–1.0 as
    /// the worker reports it. Past the budget the worker is killed and the job has
    /// [`TranscodeError::TimedOut`]. The worker's folder is emptied before this returns.
    pub async fn run(
        &mut self,
        task: Task,
        budget: Duration,
        mut progress: impl FnMut(f32),
    ) -> Result<Product, TranscodeError> {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get() as u64);
        let request = Request { task: task.clone(), cpu_secs: budget.as_secs().max(1) * cores };
        let process = self.process.as_mut().ok_or(TranscodeError::PoolClosed)?;
        self.reusable = false;
        process.jobs += 1;
        let exchange = async {
            let mut line = serde_json::to_vec(&request).expect("requests serialise");
            line.push(b'\n');
            if process.stdin.write_all(&line).await.and(process.stdin.flush().await).is_err() {
                return Ok(None);
            }
            loop {
                let Some(line) = read_line(&mut process.stdout).await? else { return Ok(None) };
                match serde_json::from_slice::<Reply>(&line) {
                    Ok(Reply::Progress(done)) if (0.0..=1.0).contains(&done) => progress(done),
                    Ok(Reply::Progress(_)) => {}
                    Ok(reply) => return Ok(Some(reply)),
                    Err(e) => return Err(misbehaved(format!("an unreadable reply: {e}"))),
                }
            }
        };
        let reply = match tokio::time::timeout(budget, exchange).await {
            Err(_) => {
                self.retire().await;
                return Err(TranscodeError::TimedOut);
            }
            Ok(Err(e)) => {
                self.retire().await;
                return Err(e);
            }
            Ok(Ok(None)) => {
                let error = self.death().await;
                self.retire().await;
                return Err(error);
            }
            Ok(Ok(Some(reply))) => reply,
        };
        let name = self.pool.spec.name;
        let (outcome, peak, landlock) = match reply {
            Reply::Done { made, peak_rss_bytes, landlock } => {
                (self.collect(&task, made).await, peak_rss_bytes, landlock)
            }
            Reply::Failed { error, peak_rss_bytes, landlock } => (Err(from_worker(error)), peak_rss_bytes, landlock),
            Reply::Progress(_) => unreachable!("progress is handled above"),
        };
        if landlock != Landlock::Full && !LANDLOCK_REPORTED.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                ?landlock,
                "this kernel does not enforce Landlock fully: transcode workers run with \
                                       seccomp and resource limits, without file system confinement"
            );
        }
        let process = self.process.as_ref().expect("still here");
        let spent = process.jobs >= self.pool.spec.jobs_per_worker || peak > self.pool.spec.recycle_rss_bytes;
        if outcome.is_err() || spent || self.empty_folder().await.is_err() {
            tracing::debug!(pool = name, pid = process.pid, jobs = process.jobs, peak, "retiring a transcode worker");
            self.retire().await;
        } else {
            self.reusable = true;
        }
        outcome
    }

    /// Kills the worker and removes its folder before returning; the lease's drop starts a new one.
    async fn retire(&mut self) {
        let Some(mut process) = self.process.take() else { return };
        process.kill();
        let _ = tokio::time::timeout(Duration::from_secs(2), process.child.wait()).await;
        let dir = std::mem::take(&mut process.dir);
        let _ = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(dir)).await;
    }

    /// Why the worker ended without a reply: its exit status and the tail of its stderr.
    async fn death(&mut self) -> TranscodeError {
        let process = self.process.as_mut().expect("still here");
        let status = match tokio::time::timeout(Duration::from_secs(2), process.child.wait()).await {
            Ok(Ok(status)) => Some(status),
            _ => None,
        };
        // The stderr reader ends with the process; wait for it a moment so the tail is whole.
        let _ = tokio::time::timeout(Duration::from_secs(1), &mut process.errors).await;
        let stderr: Vec<u8> = process.stderr.lock().expect("never poisoned").iter().copied().collect();
        let error = died(status, &String::from_utf8_lossy(&stderr));
        tracing::warn!(pool = self.pool.spec.name, pid = process.pid, ?status, %error, "a transcode worker died");
        error
    }

    async fn empty_folder(&self) -> std::io::Result<()> {
        let dir = self.process.as_ref().expect("still here").dir.clone();
        tokio::task::spawn_blocking(move || {
            match std::fs::remove_file(dir.join(INPUT)) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
            for entry in std::fs::read_dir(dir.join(OUT_DIR))? {
                let path = entry?.path();
                if std::fs::symlink_metadata(&path)?.is_dir() {
                    std::fs::remove_dir_all(&path)?;
                } else {
                    std::fs::remove_file(&path)?;
                }
            }
            Ok(())
        })
        .await
        .map_err(std::io::Error::other)?
    }

    /// Checks and copies out what the worker says it made for `task`.
    async fn collect(&self, task: &Task, made: Made) -> Result<Product, TranscodeError> {
        let out = self.process.as_ref().expect("still here").dir.join(OUT_DIR);
        let spool = self.pool.launch.spool.clone();
        let file_bytes = self.pool.spec.limits.file_bytes;
        let task = task.clone();
        tokio::task::spawn_blocking(move || Collector { out: &out, spool: &spool, file_bytes }.product(&task, made))
            .await
            .map_err(|e| TranscodeError::Io(e.to_string()))?
    }
}

/// Reads one reply line of at most [`MAX_LINE`] bytes; `None` when the worker's stdout closed.
async fn read_line(reader: &mut BufReader<ChildStdout>) -> Result<Option<Vec<u8>>, TranscodeError> {
    let mut line = Vec::new();
    let n = (&mut *reader)
        .take(MAX_LINE as u64 + 1)
        .read_until(b'\n', &mut line)
        .await
        .map_err(|e| TranscodeError::Io(format!("reading a worker: {e}")))?;
    match (n, line.last()) {
        (0, _) => Ok(None),
        (_, Some(b'\n')) => {
            line.pop();
            Ok(Some(line))
        }
        _ if n > MAX_LINE => Err(misbehaved(format!("a reply line over {MAX_LINE} bytes"))),
        _ => Ok(None),
    }
}

/// A failure as a worker reported it: only the kinds a job can meet there are taken at their word.
fn from_worker(error: TranscodeError) -> TranscodeError {
    match error {
        TranscodeError::Busy | TranscodeError::PoolClosed | TranscodeError::TooManyAttempts(_) => {
            misbehaved(format!("it reported {error:?}"))
        }
        error => error,
    }
}

fn misbehaved(what: String) -> TranscodeError {
    TranscodeError::Misbehaved(what)
}

/// Why a worker ended without a result, from its exit status and the tail of its stderr.
fn died(status: Option<ExitStatus>, stderr: &str) -> TranscodeError {
    use std::os::unix::process::ExitStatusExt;
    let tail = stderr.lines().last().unwrap_or_default().to_string();
    // Rust aborts on a failed allocation; libav reports one as ENOMEM. Both mean the budget.
    if stderr.contains("memory allocation") || stderr.contains("Cannot allocate memory") {
        return TranscodeError::OverMemoryBudget(tail);
    }
    let Some(status) = status else { return TranscodeError::Panicked("the worker stopped answering".into()) };
    match status.signal() {
        Some(libc::SIGXCPU) => TranscodeError::TimedOut,
        Some(libc::SIGXFSZ) => TranscodeError::OverLimit("an output over the worker's file size limit".into()),
        Some(libc::SIGSYS) => {
            tracing::error!("a transcode worker made a system call outside its sandbox's allow-list");
            TranscodeError::Panicked("killed by its seccomp filter".into())
        }
        Some(signal) => TranscodeError::Panicked(format!("died of signal {signal}: {tail}")),
        None if status.code() == Some(crate::worker::SANDBOX_FAILED) => {
            tracing::error!(%tail, "a transcode worker could not enter its sandbox");
            TranscodeError::Io(format!("the worker could not enter its sandbox: {tail}"))
        }
        None => TranscodeError::Panicked(format!("exited with {status}: {tail}")),
    }
}

/// A checked output: its bytes as the parent hashed them.
#[derive(Debug)]
pub struct Variant {
    pub blob: BlobId,
    pub len: u64,
    pub width: Option<u32>,
    pub height: Option<u32>,
    pub body: Body,
}

/// Where a checked output's bytes are.
#[derive(Debug)]
pub enum Body {
    Memory(Bytes),
    /// Too large for memory: a copy in the parent's temp folder, removed when dropped.
    File(tempfile::NamedTempFile),
}

/// What a job made, checked.
#[derive(Debug)]
pub enum Product {
    Probed,
    Photo {
        width: u32,
        height: u32,
        standard: Variant,
        thumb: Variant,
        preview: Vec<u8>,
    },
    Audio {
        duration_ms: u64,
        waveform: Vec<u8>,
        standard: Variant,
    },
    Video {
        width: u32,
        height: u32,
        duration_ms: u64,
        has_audio: bool,
        standard: Variant,
        poster: Variant,
        thumb: Variant,
        preview: Vec<u8>,
    },
}

/// Outputs up to this size are held in memory; larger ones are copied to a temp file.
const IN_MEMORY: u64 = 16 * 1024 * 1024;
/// A JPEG variant is never larger than this (a 1600 px q80 photo is well under 2 MB).
const MAX_JPEG: u64 = 32 * 1024 * 1024;
/// Sides reported for an original or a variant are at most this.
const MAX_SIDE: u32 = 1 << 16;

/// What an output must look like.
struct Expect {
    max_bytes: u64,
    magic: fn(&[u8]) -> bool,
    /// The longest side it may have, when it has sides.
    max_edge: Option<u32>,
}

fn is_jpeg(head: &[u8]) -> bool {
    head.starts_with(&[0xFF, 0xD8, 0xFF])
}

fn is_ogg(head: &[u8]) -> bool {
    head.starts_with(b"OggS")
}

fn is_mp4(head: &[u8]) -> bool {
    head.get(4..8) == Some(b"ftyp")
}

struct Collector<'a> {
    out: &'a Path,
    spool: &'a Path,
    file_bytes: u64,
}

impl Collector<'_> {
    fn product(&self, task: &Task, made: Made) -> Result<Product, TranscodeError> {
        let side = |what: &str, n: u32| {
            if n == 0 || n > MAX_SIDE { Err(misbehaved(format!("{what} {n} is out of range"))) } else { Ok(n) }
        };
        let jpeg = |max_edge| Expect { max_bytes: MAX_JPEG, magic: is_jpeg, max_edge: Some(max_edge) };
        match (task, made) {
            (Task::ProbeImage { .. } | Task::ProbeAudio { .. }, Made::Probed) => Ok(Product::Probed),
            (Task::Photo { settings, .. }, Made::Photo { width, height, standard, thumb, preview }) => {
                Ok(Product::Photo {
                    width: side("width", width)?,
                    height: side("height", height)?,
                    standard: self.variant(&standard, &jpeg(settings.standard_edge))?,
                    thumb: self.variant(&thumb, &jpeg(settings.thumb_edge))?,
                    preview: self.preview(&preview, settings.preview_max_bytes)?,
                })
            }
            (Task::Audio { limits, .. }, Made::Audio { duration_ms, waveform, standard }) => {
                if waveform.len() != audio::WAVEFORM_BUCKETS {
                    return Err(misbehaved(format!("a waveform of {} bars", waveform.len())));
                }
                // Encoder padding may add a frame or two; more than that was not in the input.
                if duration_ms > limits.max_duration_ms + 1000 {
                    return Err(misbehaved(format!("a voice note of {duration_ms} ms")));
                }
                let expect = Expect { max_bytes: self.file_bytes, magic: is_ogg, max_edge: None };
                Ok(Product::Audio { duration_ms, waveform, standard: self.variant(&standard, &expect)? })
            }
            (
                Task::Video { settings, limits },
                Made::Video { width, height, duration_ms, has_audio, standard, poster, thumb, preview },
            ) => {
                if duration_ms > limits.max_duration_ms + 1000 {
                    return Err(misbehaved(format!("a video of {duration_ms} ms")));
                }
                let mp4 = Expect { max_bytes: self.file_bytes, magic: is_mp4, max_edge: Some(settings.max_edge) };
                let photo = photo::Settings::default();
                Ok(Product::Video {
                    width: side("width", width)?,
                    height: side("height", height)?,
                    duration_ms,
                    has_audio,
                    standard: self.variant(&standard, &mp4)?,
                    poster: self.variant(&poster, &jpeg(photo.standard_edge))?,
                    thumb: self.variant(&thumb, &jpeg(photo.thumb_edge))?,
                    preview: self.preview(&preview, photo.preview_max_bytes)?,
                })
            }
            (_, made) => Err(misbehaved(format!("an answer of the wrong kind: {made:?}"))),
        }
    }

    fn preview(&self, file: &OutFile, max_bytes: usize) -> Result<Vec<u8>, TranscodeError> {
        let expect = Expect { max_bytes: max_bytes as u64, magic: is_jpeg, max_edge: None };
        match self.variant(file, &expect)?.body {
            Body::Memory(bytes) => Ok(bytes.to_vec()),
            Body::File(_) => unreachable!("a preview is small enough for memory"),
        }
    }

    /// Opens `file` beneath `out` (no `..`, no symlink, no other mount), checks it against
    /// `expect`, and copies its bytes out while hashing them.
    fn variant(&self, file: &OutFile, expect: &Expect) -> Result<Variant, TranscodeError> {
        use rustix::fs::{Mode, OFlags, ResolveFlags};
        let name = &file.name;
        let plain = !name.is_empty()
            && name.len() <= 64
            && name != "."
            && name != ".."
            && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
        if !plain {
            return Err(misbehaved(format!("an output named {name:?}")));
        }
        for (what, n) in [("width", file.width), ("height", file.height)] {
            if let (Some(n), Some(max)) = (n, expect.max_edge)
                && (n == 0 || n > max)
            {
                return Err(misbehaved(format!("{name}: a {what} of {n}, the limit is {max}")));
            }
        }
        let opened = |e: rustix::io::Errno| misbehaved(format!("{name} cannot be opened as a plain file: {e}"));
        let dir = rustix::fs::open(
            self.out,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| TranscodeError::Io(format!("opening the worker's output folder: {e}")))?;
        let fd = rustix::fs::openat2(
            &dir,
            name.as_str(),
            OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NONBLOCK,
            Mode::empty(),
            ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS | ResolveFlags::NO_XDEV,
        )
        .map_err(opened)?;
        let mut source = File::from(fd);
        let meta = source.metadata().map_err(|e| TranscodeError::Io(e.to_string()))?;
        if !meta.file_type().is_file() {
            return Err(misbehaved(format!("{name} is not a regular file")));
        }
        if meta.len() == 0 || meta.len() > expect.max_bytes {
            return Err(misbehaved(format!("{name} has {} bytes, the limit is {}", meta.len(), expect.max_bytes)));
        }
        let io = |e: std::io::Error| TranscodeError::Io(format!("copying {name}: {e}"));
        let mut hasher = blake3::Hasher::new();
        let mut chunk = vec![0u8; 256 * 1024];
        let mut head = Vec::new();
        let mut len = 0u64;
        let mut memory = Vec::new();
        let mut spooled = if meta.len() > IN_MEMORY {
            Some(tempfile::Builder::new().prefix("output-").tempfile_in(self.spool).map_err(io)?)
        } else {
            None
        };
        loop {
            let n = source.read(&mut chunk).map_err(io)?;
            if n == 0 {
                break;
            }
            len += n as u64;
            // The file may still be growing if the worker lied about being done.
            if len > expect.max_bytes {
                return Err(misbehaved(format!("{name} grew past {} bytes", expect.max_bytes)));
            }
            if head.len() < 32 {
                head.extend_from_slice(&chunk[..n.min(32 - head.len())]);
            }
            hasher.update(&chunk[..n]);
            // Decided by the size seen at open and again as bytes come: a file that grows while it
            // is read never piles up in memory.
            if spooled.is_none() && memory.len() + n > IN_MEMORY as usize {
                let mut file = tempfile::Builder::new().prefix("output-").tempfile_in(self.spool).map_err(io)?;
                file.write_all(&std::mem::take(&mut memory)).map_err(io)?;
                spooled = Some(file);
            }
            match &mut spooled {
                Some(file) => file.write_all(&chunk[..n]).map_err(io)?,
                None => memory.extend_from_slice(&chunk[..n]),
            }
        }
        if !(expect.magic)(&head) {
            return Err(misbehaved(format!("{name} is not the format it should be")));
        }
        let body = match spooled {
            Some(file) => Body::File(file),
            None => Body::Memory(Bytes::from(memory)),
        };
        Ok(Variant { blob: BlobId::from_hash(hasher.finalize()), len, width: file.width, height: file.height, body })
    }
}

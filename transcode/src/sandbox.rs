//! The walls a `courier transcode-worker` puts up around itself before it reads a byte of input.
//!
//! In the order [`enter`] applies them:
//! 1. It dies with its parent (`PR_SET_PDEATHSIG`), and exits at once if the parent is already gone.
//! 2. Resource limits: address space (`RLIMIT_AS`: its own footprint at start plus the job budget),
//!    CPU seconds (`RLIMIT_CPU`, moved forward per job by [`allow_cpu`]), the largest file it may
//!    write (`RLIMIT_FSIZE`), open files (`RLIMIT_NOFILE`), no core dumps; a lower priority.
//! 3. Landlock: the only file system access left is reading its own folder and writing inside its
//!    `out/` subfolder; no TCP bind or connect; no signals to processes outside the sandbox. On a
//!    kernel without Landlock this step reports that it was not enforced and the rest still holds.
//! 4. `PR_SET_NO_NEW_PRIVS` and two seccomp filters. The first is an allow-list ([`ALLOWED`]):
//!    every other system call kills the process (`SECCOMP_RET_KILL_PROCESS`, seen by the parent as
//!    SIGSYS). Within it, `clone` must carry `CLONE_THREAD` (threads, never a new process),
//!    `tgkill` may only name this process, and `prlimit64` only this process. The second answers
//!    `clone3` with ENOSYS, so glibc falls back to `clone`, whose flags the first can check.
//!
//! No socket, connect, execve, ptrace, kill or mount is reachable: a decoder bug that gains control
//! of the process can read the upload it was given, write into `out/`, and burn its CPU budget.

use std::collections::BTreeMap;
use std::path::Path;

use landlock::{
    ABI, Access, AccessFs, AccessNet, CompatLevel, Compatible, PathBeneath, PathFd, Ruleset, RulesetAttr,
    RulesetCreatedAttr, RulesetStatus, Scope,
};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule,
};
use serde::{Deserialize, Serialize};

/// What a worker may use, given to it on its command line by the parent.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Limits {
    /// Address space a job may add to the worker's own footprint at start, in bytes.
    pub memory_bytes: u64,
    /// The largest file the worker may write, in bytes.
    pub file_bytes: u64,
    /// File descriptors the worker may hold.
    pub open_files: u64,
    /// Scheduling niceness (0 normal, 19 lowest).
    pub niceness: i32,
}

/// How much of the sandbox the kernel enforced.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Landlock {
    Full,
    Partial,
    /// The kernel has no Landlock (or it is turned off): seccomp and the limits still hold.
    None,
}

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("the parent process is gone")]
    Orphaned,
    #[error("{0}: {1}")]
    Os(&'static str, std::io::Error),
    #[error("landlock: {0}")]
    Landlock(#[from] landlock::RulesetError),
    #[error("landlock: {0}")]
    LandlockPath(#[from] landlock::PathFdError),
    #[error("seccomp: {0}")]
    Seccomp(#[from] seccompiler::Error),
    #[error("seccomp filter: {0}")]
    SeccompFilter(#[from] seccompiler::BackendError),
}

/// The folder a worker writes its outputs into, inside its own folder.
pub const OUT_DIR: &str = "out";

/// Puts the calling process in its sandbox; `dir` is its folder, `parent` the pid that started it
/// (by default, whichever process that is now). Call it first thing, on the only thread: the
/// seccomp filter applies to threads started later.
pub fn enter(dir: &Path, parent: Option<i32>, limits: &Limits) -> Result<Landlock, SandboxError> {
    use rustix::process::{Resource, Rlimit, Signal, getppid, set_parent_process_death_signal, setrlimit};
    let os = |what: &'static str| move |e: rustix::io::Errno| SandboxError::Os(what, e.into());

    set_parent_process_death_signal(Some(Signal::KILL)).map_err(os("PR_SET_PDEATHSIG"))?;
    // The parent may have died before the line above: then no signal will ever come.
    let now = getppid().map(|p| p.as_raw_nonzero().get());
    if now.is_none() || parent.is_some_and(|parent| now != Some(parent)) {
        return Err(SandboxError::Orphaned);
    }

    let footprint = address_space().map_err(|e| SandboxError::Os("reading /proc/self/status", e))?;
    let fixed = |n: u64| Rlimit { current: Some(n), maximum: Some(n) };
    setrlimit(Resource::As, fixed(footprint.saturating_add(limits.memory_bytes))).map_err(os("RLIMIT_AS"))?;
    setrlimit(Resource::Core, fixed(0)).map_err(os("RLIMIT_CORE"))?;
    setrlimit(Resource::Fsize, fixed(limits.file_bytes)).map_err(os("RLIMIT_FSIZE"))?;
    // No CPU until a job is given some (allow_cpu); the hard limit stays open for that.
    setrlimit(Resource::Cpu, Rlimit { current: Some(cpu_used_secs() + 1), maximum: None }).map_err(os("RLIMIT_CPU"))?;
    if limits.niceness != 0 {
        rustix::process::setpriority_process(None, limits.niceness).map_err(os("setpriority"))?;
    }

    let landlock = restrict_paths(dir)?;
    // Descriptors are checked when they are made, so this goes after Landlock's own.
    setrlimit(Resource::Nofile, fixed(limits.open_files)).map_err(os("RLIMIT_NOFILE"))?;

    let (allow, deny) = filters()?;
    // apply_filter sets PR_SET_NO_NEW_PRIVS first, as seccomp requires of an unprivileged process.
    seccompiler::apply_filter(&deny)?;
    seccompiler::apply_filter(&allow)?;
    Ok(landlock)
}

/// Lets the next job use `secs` more seconds of CPU; past them the kernel sends SIGXCPU.
pub fn allow_cpu(secs: u64) -> std::io::Result<()> {
    use rustix::process::{Resource, Rlimit, setrlimit};
    setrlimit(Resource::Cpu, Rlimit { current: Some(cpu_used_secs() + secs.max(1)), maximum: None })?;
    Ok(())
}

fn cpu_used_secs() -> u64 {
    let used = rustix::time::clock_gettime(rustix::time::ClockId::ProcessCPUTime);
    used.tv_sec.max(0) as u64 + 1
}

/// The process's address space now (`VmSize`), in bytes.
fn address_space() -> std::io::Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    status_field(&status, "VmSize:").ok_or_else(|| std::io::Error::other("no VmSize in /proc/self/status"))
}

/// A `kB` field of /proc/PID/status, in bytes.
pub fn status_field(status: &str, name: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with(name))?;
    line.split_whitespace().nth(1)?.parse::<u64>().ok().map(|kib| kib * 1024)
}

fn restrict_paths(dir: &Path) -> Result<Landlock, SandboxError> {
    // The newest ABI this code was written and tested against; older kernels get what they have.
    let abi = ABI::V7;
    let ruleset = Ruleset::default()
        .set_compatibility(CompatLevel::BestEffort)
        .handle_access(AccessFs::from_all(abi))?
        .handle_access(AccessNet::from_all(abi))?
        .scope(Scope::from_all(abi))?
        .create()?
        .add_rule(PathBeneath::new(PathFd::new(dir)?, AccessFs::ReadFile | AccessFs::ReadDir))?
        .add_rule(PathBeneath::new(
            PathFd::new(dir.join(OUT_DIR))?,
            AccessFs::from_write(abi) | AccessFs::ReadFile | AccessFs::ReadDir,
        ))?;
    let status = ruleset.restrict_self()?;
    Ok(match status.ruleset {
        RulesetStatus::FullyEnforced => Landlock::Full,
        RulesetStatus::PartiallyEnforced => Landlock::Partial,
        RulesetStatus::NotEnforced => Landlock::None,
    })
}

/// The system calls a worker makes, and why.
///
/// Memory: `brk`, `mmap`, `munmap`, `mremap`, `mprotect`, `madvise` (allocators, libav's buffers).
/// Files, within what Landlock leaves: `openat`, `read`, `write`, `readv`, `writev`, `pread64`,
/// `pwrite64`, `lseek`, `close`, `fstat`, `newfstatat`, `statx`, `fcntl` (descriptor flags and
/// duplicates only: no `F_SETOWN`/`F_SETSIG`, which would aim signals at another process), `ftruncate`,
/// `fdatasync`, `fsync`, `getdents64`, `unlinkat` (the MP4 muxer's faststart pass rewrites its own
/// output). Threads (libx264, libav's frame threads): `clone` with `CLONE_THREAD` only, `futex`,
/// `set_robust_list`, `rseq`, `set_tid_address`, `sched_yield`, `sched_getaffinity` (how many
/// threads to start), `gettid`, `getpid`, `exit`, `exit_group`, `membarrier`. Signals, only to
/// itself: `rt_sigaction`, `rt_sigprocmask`, `rt_sigreturn`, `sigaltstack`, `tgkill` (abort),
/// `restart_syscall`. Time: `clock_gettime`, `clock_getres`, `gettimeofday`, `nanosleep`,
/// `clock_nanosleep`. Other: `getrandom` (hash map seeds), `prlimit64` on itself (the per-job CPU
/// limit), `prctl` with `PR_SET_NAME`/`PR_GET_NAME` only (thread names), `ioctl` with `TCGETS`
/// only (isatty on stderr), `sysinfo`, `uname`, `poll`, `ppoll`.
const ALLOWED: &[i64] = &[
    libc::SYS_brk,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_openat,
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_lseek,
    libc::SYS_close,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_ftruncate,
    libc::SYS_fdatasync,
    libc::SYS_fsync,
    libc::SYS_getdents64,
    libc::SYS_unlinkat,
    libc::SYS_futex,
    libc::SYS_set_robust_list,
    libc::SYS_rseq,
    libc::SYS_set_tid_address,
    libc::SYS_sched_yield,
    libc::SYS_sched_getaffinity,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_membarrier,
    libc::SYS_rt_sigaction,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_sigaltstack,
    libc::SYS_restart_syscall,
    libc::SYS_clock_gettime,
    libc::SYS_clock_getres,
    libc::SYS_gettimeofday,
    libc::SYS_nanosleep,
    libc::SYS_clock_nanosleep,
    libc::SYS_getrandom,
    libc::SYS_sysinfo,
    libc::SYS_uname,
    libc::SYS_ppoll,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_poll,
    // Answered with ENOSYS by the second filter; listed so the first does not kill for it.
    libc::SYS_clone3,
];

fn arch() -> Result<seccompiler::TargetArch, SandboxError> {
    Ok(std::env::consts::ARCH.try_into()?)
}

fn condition(arg: u8, op: SeccompCmpOp, value: u64) -> Result<SeccompCondition, SandboxError> {
    Ok(SeccompCondition::new(arg, SeccompCmpArgLen::Qword, op, value)?)
}

/// The allow-list, and the filter that answers `clone3` with ENOSYS.
fn filters() -> Result<(BpfProgram, BpfProgram), SandboxError> {
    let pid = u64::from(rustix::process::getpid().as_raw_nonzero().get().unsigned_abs());
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = ALLOWED.iter().map(|&call| (call, Vec::new())).collect();
    let thread = libc::CLONE_THREAD as u64;
    rules.insert(libc::SYS_clone, vec![SeccompRule::new(vec![condition(0, SeccompCmpOp::MaskedEq(thread), thread)?])?]);
    rules.insert(libc::SYS_tgkill, vec![SeccompRule::new(vec![condition(0, SeccompCmpOp::Eq, pid)?])?]);
    // Descriptor flags and duplicates only: F_SETOWN/F_SETSIG would let O_ASYNC signal another process.
    rules.insert(
        libc::SYS_fcntl,
        [libc::F_DUPFD, libc::F_DUPFD_CLOEXEC, libc::F_GETFD, libc::F_SETFD, libc::F_GETFL, libc::F_SETFL]
            .into_iter()
            .map(|cmd| SeccompRule::new(vec![condition(1, SeccompCmpOp::Eq, cmd as u64)?]).map_err(SandboxError::from))
            .collect::<Result<Vec<_>, _>>()?,
    );
    // Thread names (libx264 and libav name their threads); no other prctl.
    rules.insert(
        libc::SYS_prctl,
        vec![
            SeccompRule::new(vec![condition(0, SeccompCmpOp::Eq, libc::PR_SET_NAME as u64)?])?,
            SeccompRule::new(vec![condition(0, SeccompCmpOp::Eq, libc::PR_GET_NAME as u64)?])?,
        ],
    );
    rules.insert(libc::SYS_prlimit64, vec![SeccompRule::new(vec![condition(0, SeccompCmpOp::Eq, 0)?])?]);
    rules.insert(libc::SYS_ioctl, vec![SeccompRule::new(vec![condition(1, SeccompCmpOp::Eq, libc::TCGETS)?])?]);
    let allow = SeccompFilter::new(rules, SeccompAction::KillProcess, SeccompAction::Allow, arch()?)?;
    let clone3 = BTreeMap::from([(libc::SYS_clone3, Vec::new())]);
    let deny = SeccompFilter::new(clone3, SeccompAction::Allow, SeccompAction::Errno(libc::ENOSYS as u32), arch()?)?;
    Ok((allow.try_into()?, deny.try_into()?))
}

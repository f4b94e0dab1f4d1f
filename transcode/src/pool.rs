//! A fixed set of OS threads with a bounded queue in front, for CPU-heavy work.
//!
//! The async side submits a closure and awaits a oneshot; a full queue is refused at once so the
//! caller can apply back-pressure (HTTP 503) instead of piling up work in memory. A panic inside a
//! job is caught and reported as [`TranscodeError::Panicked`]; the thread lives on for the next job.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::thread;

use crossbeam_channel::{Sender, TrySendError};
use tokio::sync::oneshot;

use crate::TranscodeError;

type Task = Box<dyn FnOnce() + Send + 'static>;

/// The worker pool. Dropping it lets the workers finish the queued jobs and exit.
pub struct Pool {
    tx: Sender<Task>,
    workers: usize,
    queue: usize,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("the transcode queue is full")]
pub struct PoolFull;

impl Pool {
    /// `workers` threads (at least one) and room for `queue` jobs waiting beyond those running.
    pub fn new(name: &str, workers: usize, queue: usize) -> Self {
        let workers = workers.max(1);
        let (tx, rx) = crossbeam_channel::bounded::<Task>(queue);
        for i in 0..workers {
            let rx = rx.clone();
            thread::Builder::new()
                .name(format!("{name}-{i}"))
                .spawn(move || {
                    while let Ok(task) = rx.recv() {
                        task();
                    }
                })
                .expect("spawning a worker thread");
        }
        Self { tx, workers, queue }
    }

    pub fn workers(&self) -> usize {
        self.workers
    }

    /// Queues `job`; its result arrives on the returned receiver.
    pub fn try_submit<T, F>(&self, job: F) -> Result<oneshot::Receiver<Result<T, TranscodeError>>, PoolFull>
    where
        T: Send + 'static,
        F: FnOnce() -> Result<T, TranscodeError> + Send + 'static,
    {
        let (done, result) = oneshot::channel();
        let task: Task = Box::new(move || {
            let outcome = catch_unwind(AssertUnwindSafe(job)).unwrap_or_else(|panic| {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown panic".into());
                tracing::error!(panic = %what, "transcode job panicked");
                Err(TranscodeError::Panicked(what))
            });
            // The submitter may have given up waiting; then nobody needs the result.
            let _ = done.send(outcome);
        });
        match self.tx.try_send(task) {
            Ok(()) => Ok(result),
            Err(TrySendError::Full(_)) => Err(PoolFull),
            Err(TrySendError::Disconnected(_)) => unreachable!("the pool owns its receivers' threads"),
        }
    }

    /// Runs `job` in the pool and waits for it, for callers that already hold a slot.
    pub async fn run<T, F>(&self, job: F) -> Result<T, TranscodeError>
    where
        T: Send + 'static,
        F: FnOnce() -> Result<T, TranscodeError> + Send + 'static,
    {
        let rx = self.try_submit(job).map_err(|_| TranscodeError::PoolClosed)?;
        rx.await.unwrap_or(Err(TranscodeError::PoolClosed))
    }
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool").field("workers", &self.workers).field("queue", &self.queue).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_panicking_job_fails_alone_and_the_worker_lives_on() {
        let pool = Pool::new("test", 1, 4);
        let bad = pool.run(|| -> Result<(), _> { panic!("boom") }).await;
        assert_eq!(bad, Err(TranscodeError::Panicked("boom".into())));
        assert_eq!(pool.run(|| Ok(41 + 1)).await, Ok(42));
    }

    #[tokio::test]
    async fn a_full_queue_is_refused_at_once() {
        let pool = Pool::new("test", 1, 1);
        let (release, wait) = std::sync::mpsc::channel::<()>();
        let running = pool
            .try_submit(move || {
                wait.recv().ok();
                Ok(())
            })
            .unwrap();
        // The worker may not have taken the first job yet; keep offering until the queue is full.
        let mut queued = Vec::new();
        loop {
            match pool.try_submit(|| Ok(())) {
                Ok(rx) => queued.push(rx),
                Err(PoolFull) => break,
            }
            assert!(queued.len() <= 2, "a queue of one held more than two jobs");
        }
        release.send(()).unwrap();
        assert_eq!(running.await.unwrap(), Ok(()));
        for rx in queued {
            assert_eq!(rx.await.unwrap(), Ok(()));
        }
    }
}

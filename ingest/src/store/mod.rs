//! ingest's tables (`media`, `jobs`, `media_grants`) on SQLite, the embedded default, or on
//! PostgreSQL, which many nodes share.
//!
//! Each backend is a plain module with one `const` per statement, written for its engine (no SQL is
//! rewritten at run time), and the same methods: [`Store`] picks one by the database URL and passes
//! each call through. Rows come back as the `*Row` structs here, which both engines decode alike,
//! and are checked into domain types in one place. This module knows nothing of HTTP, workers or
//! policy: the caller passes the time, the lease and the back-off.

mod postgres;
mod sqlite;

use serde::de::DeserializeOwned;
use types::{BlobId, ErrorDetail, MediaId, MediaKind, MediaStatus, UserId};

use crate::view::JobResult;

/// One new upload, as recorded with its job.
#[derive(Debug)]
pub(crate) struct NewMedia<'a> {
    pub(crate) id: MediaId,
    pub(crate) owner: &'a UserId,
    pub(crate) kind: MediaKind,
    pub(crate) blob: BlobId,
    pub(crate) mime: &'a str,
    pub(crate) bytes: u64,
}

/// Where a job stands.
#[derive(Debug, Clone)]
pub(crate) struct JobState {
    pub(crate) status: MediaStatus,
    pub(crate) permanent: bool,
    pub(crate) error: Option<ErrorDetail>,
    pub(crate) result: Option<JobResult>,
    pub(crate) progress: Option<f32>,
}

/// A media row joined with its job.
#[derive(Debug)]
pub(crate) struct MediaRow {
    pub(crate) owner: String,
    pub(crate) kind: MediaKind,
    pub(crate) blob: BlobId,
    pub(crate) job: JobState,
}

/// A job a runner has claimed.
#[derive(Debug)]
pub(crate) struct Claimed {
    pub(crate) blob: BlobId,
    pub(crate) kind: MediaKind,
    pub(crate) mime: String,
    pub(crate) attempts: u32,
    /// A token new to this claim, which its heartbeats and outcome must name: a runner whose lease
    /// ran out and whose job was claimed again (or deleted and uploaded again) no longer speaks
    /// for it.
    pub(crate) claim: String,
    /// When it was claimed (unix ms, this node's clock): the runner stores its variants after.
    pub(crate) claimed_at: i64,
}

/// How long a sweep's claim on a logged deletion stands. The sweep deletes the bytes within
/// [`crate::DELETE_TIMEOUT`] of claiming, so a claim older than this is a sweep that died, and the
/// next one decides again. Each node judges claims by its own clock: the margin over the delete's
/// time is more than the clock skew allowed ([`CLOCK_SKEW_MS`]).
pub(crate) const DELETION_CLAIM_MS: i64 = 90_000;

/// How far before a writer stored its bytes it looks for deletions claimed since: nodes' clocks
/// differ a little, and storing again needlessly costs only a write.
pub(crate) const CLOCK_SKEW_MS: i64 = 60_000;

/// A deletion a sweep claimed since a writer stored bytes it now needs (the writer's reference is
/// committed, so no later claim can take them): the bytes may be gone, so once the deletion has
/// settled ([`Store::deletion_settled`]) the writer stores them again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Overlap {
    pub(crate) seq: i64,
    pub(crate) blob: BlobId,
}

#[derive(Debug, sqlx::FromRow)]
struct OverlapRow {
    seq: i64,
    blob: String,
}

impl TryFrom<OverlapRow> for Overlap {
    type Error = sqlx::Error;

    fn try_from(row: OverlapRow) -> Result<Self, sqlx::Error> {
        Ok(Overlap { seq: row.seq, blob: blob(&row.blob)? })
    }
}

/// What recording a job's result did.
#[derive(Debug, Default)]
pub(crate) struct Completed {
    /// False when the job is no longer this claim's (nothing was recorded).
    pub(crate) recorded: bool,
    /// Deletions a sweep claimed of variants the runner stored (nothing was recorded).
    pub(crate) overlaps: Vec<Overlap>,
}

/// What the blob store holds, as the tables say: originals not yet deleted, the distinct variants
/// jobs name, and deletions logged but not done.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoredTotals {
    pub originals: u64,
    pub original_bytes: u64,
    pub variants: u64,
    pub variant_bytes: u64,
    pub pending_deletions: u64,
}

/// What deleting a media record left behind.
#[derive(Debug)]
pub(crate) enum Deleted {
    /// No such media of this owner's.
    NotFound,
    /// Deleted; other uploads of the same bytes keep the job and the blobs.
    Kept,
    /// Deleted with its job: its original and the variants no other job names are logged in
    /// `deleted_blobs`, for [`Store::pending_deletions`] to delete from the blob store.
    Orphaned { source: BlobId },
}

/// Where a blob lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Namespace {
    Originals,
    Variants,
    /// What a resumable upload's PATCH requests stored, until the upload completes or expires.
    Parts,
}

impl Namespace {
    pub fn as_str(self) -> &'static str {
        match self {
            Namespace::Originals => "originals",
            Namespace::Variants => "variants",
            Namespace::Parts => "parts",
        }
    }

    fn parse(name: &str) -> Result<Self, sqlx::Error> {
        match name {
            "originals" => Ok(Namespace::Originals),
            "variants" => Ok(Namespace::Variants),
            "parts" => Ok(Namespace::Parts),
            _ => Err(corrupt_row("blob namespace")),
        }
    }
}

/// A blob deleted (or to be deleted) from the blob store, in the order it was decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeletedBlob {
    pub seq: i64,
    pub namespace: Namespace,
    pub blob: BlobId,
    /// Unix ms.
    pub deleted_at: i64,
}

#[derive(Debug, sqlx::FromRow)]
struct DeletedRow {
    seq: i64,
    namespace: String,
    blob: String,
    deleted_at: i64,
}

impl TryFrom<DeletedRow> for DeletedBlob {
    type Error = sqlx::Error;

    fn try_from(row: DeletedRow) -> Result<Self, sqlx::Error> {
        Ok(DeletedBlob {
            seq: row.seq,
            namespace: Namespace::parse(&row.namespace)?,
            blob: blob(&row.blob)?,
            deleted_at: row.deleted_at,
        })
    }
}

/// A resumable upload, as its row says.
#[derive(Debug, Clone, sqlx::FromRow)]
pub(crate) struct UploadRow {
    pub(crate) owner: String,
    pub(crate) mime: String,
    /// `None` while the client defers it.
    pub(crate) length: Option<i64>,
    pub(crate) upload_offset: i64,
    /// The first bytes, until there are enough to sniff (then empty).
    pub(crate) head: Vec<u8>,
    pub(crate) metadata: String,
    pub(crate) done: bool,
    pub(crate) expires_at: i64,
}

/// A resumable upload being created.
#[derive(Debug)]
pub(crate) struct NewUpload<'a> {
    pub(crate) id: MediaId,
    pub(crate) owner: &'a UserId,
    pub(crate) mime: &'a str,
    pub(crate) length: Option<u64>,
    pub(crate) metadata: &'a str,
    pub(crate) expires_at: i64,
}

/// What one PATCH request stored: `len` bytes at `start_at`, under `key` in the `parts`
/// namespace.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub(crate) struct Part {
    pub(crate) start_at: i64,
    pub(crate) len: i64,
    pub(crate) key: String,
}

/// How a PATCH moves its upload on, recorded with its part.
#[derive(Debug)]
pub(crate) struct Advance<'a> {
    pub(crate) writer: &'a str,
    pub(crate) part: Part,
    /// The first bytes to keep for the sniff (empty once sniffed).
    pub(crate) head: &'a [u8],
    /// A length the client named now (it deferred it at creation).
    pub(crate) length: Option<i64>,
    pub(crate) expires_at: i64,
    /// The part's deletion logged before it was stored ([`Store::log_part`]), taken back now.
    pub(crate) logged: i64,
}

/// How a failed attempt is recorded: the policy is the queue's, the columns are these.
#[derive(Debug)]
pub(crate) struct Failure<'a> {
    pub(crate) last: bool,
    pub(crate) permanent: bool,
    pub(crate) code: &'a str,
    pub(crate) message: &'a str,
    pub(crate) run_after: i64,
}

/// A job's columns as both engines return them.
#[derive(Debug, sqlx::FromRow)]
struct JobRow {
    status: String,
    permanent: bool,
    error_code: Option<String>,
    error_message: Option<String>,
    result: Option<String>,
    progress: Option<f64>,
}

#[derive(Debug, sqlx::FromRow)]
struct MediaJobRow {
    owner: String,
    kind: String,
    source_blob: String,
    #[sqlx(flatten)]
    job: JobRow,
}

#[derive(Debug, sqlx::FromRow)]
struct ClaimRow {
    source_blob: String,
    kind: String,
    source_mime: String,
    attempts: i32,
    claim: String,
}

fn corrupt_row(what: &str) -> sqlx::Error {
    sqlx::Error::Decode(format!("bad {what} in the database").into())
}

fn blob(hex: &str) -> Result<BlobId, sqlx::Error> {
    hex.parse().map_err(|_| corrupt_row("blob id"))
}

fn kind(name: &str) -> Result<MediaKind, sqlx::Error> {
    MediaKind::parse(name).ok_or_else(|| corrupt_row("media kind"))
}

fn json<T: DeserializeOwned>(text: &str) -> Result<T, sqlx::Error> {
    serde_json::from_str(text).map_err(|_| corrupt_row("job result"))
}

impl TryFrom<JobRow> for JobState {
    type Error = sqlx::Error;

    fn try_from(row: JobRow) -> Result<Self, sqlx::Error> {
        Ok(JobState {
            status: MediaStatus::parse(&row.status).ok_or_else(|| corrupt_row("job status"))?,
            permanent: row.permanent,
            error: row.error_code.map(|code| ErrorDetail { code, message: row.error_message.unwrap_or_default() }),
            result: row.result.as_deref().map(json).transpose()?,
            progress: row.progress.map(|p| p as f32),
        })
    }
}

impl TryFrom<MediaJobRow> for MediaRow {
    type Error = sqlx::Error;

    fn try_from(row: MediaJobRow) -> Result<Self, sqlx::Error> {
        Ok(MediaRow {
            owner: row.owner,
            kind: kind(&row.kind)?,
            blob: blob(&row.source_blob)?,
            job: row.job.try_into()?,
        })
    }
}

impl Claimed {
    /// The job a claim at `now` returned.
    fn from_row(row: ClaimRow, now: i64) -> Result<Self, sqlx::Error> {
        Ok(Claimed {
            blob: blob(&row.source_blob)?,
            kind: kind(&row.kind)?,
            mime: row.source_mime,
            attempts: u32::try_from(row.attempts).map_err(|_| corrupt_row("attempt count"))?,
            claim: row.claim,
            claimed_at: now,
        })
    }
}

/// What a deleted job's result named: its variants, for the caller to keep those another job
/// still names.
fn variants_of(result: Option<String>) -> Result<Vec<BlobId>, sqlx::Error> {
    let Some(text) = result else { return Ok(Vec::new()) };
    let result: JobResult = json(&text)?;
    Ok(result.variants.values().map(|v| v.blob).collect())
}

/// ingest's tables on one of the two engines.
#[derive(Debug, Clone)]
pub enum Store {
    Sqlite(sqlite::Sqlite),
    Postgres(postgres::Postgres),
}

/// A day in unix milliseconds: quotas count bytes per UTC day.
pub(crate) const DAY_MS: i64 = 86_400_000;

/// What one user has used of their quotas.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Bytes their media take in the blob store: originals not yet deleted and the variants made of
    /// them (bytes two users uploaded count for each).
    pub stored_bytes: u64,
    /// Bytes uploaded this UTC day, deleted and refused uploads included.
    pub bytes_today: u64,
    /// Their uploads of the last day whose jobs wait or run.
    pub queued_jobs: u64,
}

/// Passes a call to whichever backend this is.
macro_rules! each {
    ($store:expr, $backend:ident => $call:expr) => {
        match $store {
            Store::Sqlite($backend) => $call,
            Store::Postgres($backend) => $call,
        }
    };
}

impl Store {
    /// Opens the database at `url` (`sqlite://PATH` or `postgres://…`), creating a SQLite file if
    /// needed, and applies ingest's migrations for that engine.
    pub async fn connect(url: &str) -> Result<Self, sqlx::Error> {
        if types::is_postgres_url(url) {
            Ok(Store::Postgres(postgres::Postgres::connect(url).await?))
        } else {
            Ok(Store::Sqlite(sqlite::Sqlite::connect(url).await?))
        }
    }

    /// Whether this is the embedded database, which only this process uses.
    pub fn is_embedded(&self) -> bool {
        matches!(self, Store::Sqlite(_))
    }

    pub(crate) async fn queued(&self) -> Result<u64, sqlx::Error> {
        each!(self, db => db.queued().await)
    }

    pub(crate) async fn release_leases(&self) -> Result<u64, sqlx::Error> {
        each!(self, db => db.release_leases().await)
    }

    pub(crate) async fn job(&self, blob: &BlobId) -> Result<Option<JobState>, sqlx::Error> {
        each!(self, db => db.job(blob).await)
    }

    /// Records an upload whose original was stored at `stored_at`, with its job (queued, or queued
    /// again after a failure a retry might fix). When a sweep claimed a deletion of that original
    /// since (other than the `settled` ones), nothing is recorded and those are returned: the
    /// caller waits for them, stores the original again and records again, so that once the
    /// record is committed its bytes are surely stored.
    pub(crate) async fn record_upload(
        &self,
        media: &NewMedia<'_>,
        stored_at: i64,
        settled: &[i64],
        now: i64,
    ) -> Result<Vec<Overlap>, sqlx::Error> {
        let rows = each!(self, db => db.record_upload(media, stored_at - CLOCK_SKEW_MS, settled, now).await)?;
        rows.into_iter().map(Overlap::try_from).collect()
    }

    /// What `owner` has used of their quotas at `now` (unix ms).
    pub(crate) async fn usage(&self, owner: &UserId, now: i64) -> Result<Usage, sqlx::Error> {
        each!(self, db => db.usage(owner, now).await)
    }

    /// Deletes a refused upload's record, and its job when no other record refers to the bytes,
    /// logging the original for deletion: returns that deletion's `seq` when the job went.
    pub(crate) async fn forget_upload(&self, id: MediaId, blob: &BlobId, now: i64) -> Result<Option<i64>, sqlx::Error> {
        each!(self, db => db.forget_upload(id, blob, now).await)
    }

    pub(crate) async fn may_read(&self, id: MediaId, user: &UserId) -> Result<bool, sqlx::Error> {
        each!(self, db => db.may_read(id, user).await)
    }

    pub(crate) async fn grant(&self, id: MediaId, users: &[UserId], source: &str, now: i64) -> Result<(), sqlx::Error> {
        each!(self, db => db.grant(id, users, source, now).await)
    }

    pub(crate) async fn revoke(&self, id: MediaId, source: &str, now: i64) -> Result<u64, sqlx::Error> {
        each!(self, db => db.revoke(id, source, now).await)
    }

    /// Deletes up to `limit` media records due to expire at `now` (no grants left, and uploaded
    /// more than `retention_ms` ago, or `unsent_ms` if never shared) with their jobs when no other
    /// record refers to the bytes, logging the blobs that go; records not due yet are given their
    /// time to be looked at again. Returns the sources whose jobs went.
    pub(crate) async fn expire_media(
        &self,
        now: i64,
        unsent_ms: i64,
        retention_ms: i64,
        limit: i64,
    ) -> Result<Vec<BlobId>, sqlx::Error> {
        each!(self, db => db.expire_media(now, unsent_ms, retention_ms, limit).await)
    }

    pub(crate) async fn media(&self, id: MediaId) -> Result<Option<MediaRow>, sqlx::Error> {
        each!(self, db => db.media(id).await)
    }

    pub(crate) async fn delete(&self, id: MediaId, owner: &UserId, now: i64) -> Result<Deleted, sqlx::Error> {
        each!(self, db => db.delete(id, owner, now).await)
    }

    /// Marks up to `limit` originals of jobs that succeeded before `before` as gone and logs them
    /// for deletion, in one transaction (on PostgreSQL skipping rows another node holds). Returns
    /// how many.
    pub(crate) async fn retire_originals(&self, before: i64, now: i64, limit: i64) -> Result<u64, sqlx::Error> {
        each!(self, db => db.retire_originals(before, now, limit).await)
    }

    /// Up to `limit` logged deletions after `after` (a `seq`) whose bytes are still in the blob
    /// store, that are due by `now` and that no sweep holds, oldest first.
    pub(crate) async fn pending_deletions(
        &self,
        limit: i64,
        after: i64,
        now: i64,
    ) -> Result<Vec<DeletedBlob>, sqlx::Error> {
        let rows = each!(self, db => db.pending_deletions(limit, after, now - DELETION_CLAIM_MS, now).await)?;
        rows.into_iter().map(DeletedBlob::try_from).collect()
    }

    /// Takes logged deletion `seq` for this sweep, in one transaction with the check that nothing
    /// needs its bytes again (an original a new job of the same bytes reads, a variant a job
    /// names): true when the caller is to delete them now. A blob needed again is kept (the
    /// deletion is done); one another sweep holds, or already done, is left.
    pub(crate) async fn claim_deletion(&self, seq: i64, now: i64) -> Result<bool, sqlx::Error> {
        each!(self, db => db.claim_deletion(seq, now, now - DELETION_CLAIM_MS).await)
    }

    /// A resumable upload not yet expired at `now`.
    pub(crate) async fn upload(&self, id: MediaId, now: i64) -> Result<Option<UploadRow>, sqlx::Error> {
        each!(self, db => db.upload(id, now).await)
    }

    /// How many uploads `owner` has open at `now`, and the bytes they will take.
    pub(crate) async fn open_uploads(&self, owner: &UserId, now: i64) -> Result<(u64, u64), sqlx::Error> {
        let (count, bytes): (i64, i64) = each!(self, db => db.open_uploads(owner, now).await)?;
        Ok((count.max(0) as u64, bytes.max(0) as u64))
    }

    pub(crate) async fn create_upload(&self, upload: &NewUpload<'_>, now: i64) -> Result<(), sqlx::Error> {
        each!(self, db => db.create_upload(upload, now).await)
    }

    /// Takes upload `id` for one PATCH (`writer`) until `until`, if it stands at `offset` and no
    /// other PATCH holds it. False otherwise.
    pub(crate) async fn lock_upload(
        &self,
        id: MediaId,
        offset: i64,
        writer: &str,
        until: i64,
        now: i64,
    ) -> Result<bool, sqlx::Error> {
        each!(self, db => db.lock_upload(id, offset, writer, until, now).await)
    }

    pub(crate) async fn renew_upload_lock(&self, id: MediaId, writer: &str, until: i64) -> Result<bool, sqlx::Error> {
        each!(self, db => db.renew_upload_lock(id, writer, until).await)
    }

    pub(crate) async fn release_upload_lock(&self, id: MediaId, writer: &str) -> Result<(), sqlx::Error> {
        each!(self, db => db.release_upload_lock(id, writer).await)
    }

    /// Records a stored part and moves the upload's offset past it, releasing the writer's lock.
    /// False when the writer no longer holds the upload (its lock lapsed, it expired or was
    /// terminated): the part is not the upload's, and the caller deletes it.
    pub(crate) async fn advance_upload(&self, id: MediaId, advance: &Advance<'_>) -> Result<bool, sqlx::Error> {
        each!(self, db => db.advance_upload(id, advance).await)
    }

    /// Logs `blob` of `namespace` for deletion now; its `seq`.
    pub(crate) async fn log_deletion(&self, namespace: Namespace, blob: &BlobId, now: i64) -> Result<i64, sqlx::Error> {
        each!(self, db => db.log_deletion(namespace, &blob.to_hex(), now).await)
    }

    /// Logs a part about to be stored under `key` for deletion at `due_at` (when its upload would
    /// have expired): if the part is never recorded (a crash), the sweep deletes it then.
    pub(crate) async fn log_part(&self, key: &str, due_at: i64) -> Result<i64, sqlx::Error> {
        each!(self, db => db.log_part(key, due_at).await)
    }

    pub(crate) async fn upload_parts(&self, id: MediaId) -> Result<Vec<Part>, sqlx::Error> {
        each!(self, db => db.upload_parts(id).await)
    }

    /// Marks upload `id` done (its media exists) and logs its parts for deletion.
    pub(crate) async fn finish_upload(&self, id: MediaId, now: i64) -> Result<(), sqlx::Error> {
        each!(self, db => db.finish_upload(id, now).await)
    }

    /// Deletes `owner`'s upload `id` and logs its parts for deletion; false if there is none.
    pub(crate) async fn delete_upload(&self, id: MediaId, owner: &UserId, now: i64) -> Result<bool, sqlx::Error> {
        each!(self, db => db.delete_upload(id, Some(owner), now).await)
    }

    /// Names the length of a deferred upload that stands at or below it; false otherwise.
    pub(crate) async fn set_upload_length(&self, id: MediaId, length: u64) -> Result<bool, sqlx::Error> {
        each!(self, db => db.set_upload_length(id, length as i64).await)
    }

    /// Up to `limit` uploads holding all their bytes whose media was never made, free of locks at
    /// `now`: their ids and owners.
    pub(crate) async fn stuck_uploads(&self, now: i64, limit: i64) -> Result<Vec<(MediaId, UserId)>, sqlx::Error> {
        let rows = each!(self, db => db.stuck_uploads(now, limit).await)?;
        rows.into_iter()
            .map(|(id, owner)| {
                let id = id.parse().map_err(|_| corrupt_row("upload id"))?;
                let owner = owner.parse().map_err(|_| corrupt_row("upload owner"))?;
                Ok((id, owner))
            })
            .collect()
    }

    /// Deletes up to `limit` uploads expired at `now` with their parts (logged for deletion).
    pub(crate) async fn expire_uploads(&self, now: i64, limit: i64) -> Result<u64, sqlx::Error> {
        let ids: Vec<String> = each!(self, db => db.expired_uploads(now, limit).await)?;
        let mut gone = 0;
        for id in ids {
            let id: MediaId = id.parse().map_err(|_| corrupt_row("upload id"))?;
            if each!(self, db => db.delete_upload(id, None, now).await)? {
                gone += 1;
            }
        }
        Ok(gone)
    }

    /// Whether a job of these bytes still reads their original (it has not succeeded and retired it).
    pub(crate) async fn original_needed(&self, blob: &BlobId) -> Result<bool, sqlx::Error> {
        each!(self, db => db.original_needed(blob).await)
    }

    /// Gives claimed deletion `seq` back (its delete failed): a later sweep takes it again.
    pub(crate) async fn release_deletion(&self, seq: i64) -> Result<(), sqlx::Error> {
        each!(self, db => db.release_deletion(seq).await)
    }

    /// Whether claimed deletion `seq` is over: done, kept, or its claim lapsed.
    pub(crate) async fn deletion_settled(&self, seq: i64, now: i64) -> Result<bool, sqlx::Error> {
        each!(self, db => db.deletion_settled(seq, now - DELETION_CLAIM_MS).await)
    }

    /// These logged deletions are done (their bytes are gone).
    pub(crate) async fn deletions_done(&self, seqs: &[i64]) -> Result<(), sqlx::Error> {
        each!(self, db => db.deletions_done(seqs).await)
    }

    /// What the blob store holds, as the tables say (one pass over `jobs` and `job_variants`: the
    /// caller spaces these out).
    pub async fn stored_totals(&self) -> Result<StoredTotals, sqlx::Error> {
        let (originals, original_bytes, variants, variant_bytes, pending): (i64, i64, i64, i64, i64) =
            each!(self, db => db.stored_totals().await)?;
        let n = |v: i64| v.max(0) as u64;
        Ok(StoredTotals {
            originals: n(originals),
            original_bytes: n(original_bytes),
            variants: n(variants),
            variant_bytes: n(variant_bytes),
            pending_deletions: n(pending),
        })
    }

    /// Up to `limit` blobs deleted after `after` (a `seq`), in order, logged by `upto` (unix ms):
    /// what edges should purge.
    pub async fn deleted_since(&self, after: i64, limit: i64, upto: i64) -> Result<Vec<DeletedBlob>, sqlx::Error> {
        let rows = each!(self, db => db.deleted_since(after, limit, upto).await)?;
        rows.into_iter().map(DeletedBlob::try_from).collect()
    }

    pub(crate) async fn claim(
        &self,
        kinds: [MediaKind; 2],
        now: i64,
        lease_until: i64,
    ) -> Result<Option<Claimed>, sqlx::Error> {
        each!(self, db => db.claim(kinds, now, lease_until).await)
    }

    /// Renews `job`'s lease; false when the job is no longer this claim's (deleted, or claimed
    /// again after its lease ran out).
    pub(crate) async fn heartbeat(
        &self,
        job: &Claimed,
        progress: Option<f32>,
        now: i64,
        lease_until: i64,
    ) -> Result<bool, sqlx::Error> {
        each!(self, db => db.heartbeat(job, progress, now, lease_until).await)
    }

    /// Records `job`'s result and the variants it names. When a sweep claimed a deletion of one of
    /// them since the job was claimed (other than the `settled` ones), nothing is recorded and
    /// those are returned: the runner waits for them, stores those variants again and completes
    /// again. A job no longer this claim's (its media deleted mid-transcode, or claimed again)
    /// records nothing, and the variants the runner stored that no job names are logged for
    /// deletion.
    pub(crate) async fn complete(
        &self,
        job: &Claimed,
        result: &JobResult,
        settled: &[i64],
        now: i64,
    ) -> Result<Completed, sqlx::Error> {
        let json = serde_json::to_string(result).expect("job results serialise");
        let variants: Vec<(String, i64)> =
            result.variants.values().map(|v| (v.blob.to_hex(), i64::try_from(v.bytes).unwrap_or(i64::MAX))).collect();
        let since = job.claimed_at - CLOCK_SKEW_MS;
        let (recorded, rows) = each!(self, db => db.complete(job, &json, &variants, since, settled, now).await)?;
        let overlaps = rows.into_iter().map(Overlap::try_from).collect::<Result<_, _>>()?;
        Ok(Completed { recorded, overlaps })
    }

    /// Records a failed attempt of `job`; false when the job is no longer this claim's.
    pub(crate) async fn fail(&self, job: &Claimed, failure: &Failure<'_>, now: i64) -> Result<bool, sqlx::Error> {
        each!(self, db => db.fail(job, failure, now).await)
    }
}

//! ingest's tables on PostgreSQL (sqlx), which many nodes share.
//!
//! A claim locks its row with `FOR UPDATE SKIP LOCKED`, so runners on many nodes never take the
//! same job and never wait for each other. Whoever may delete a job (a deleted or refused upload)
//! first locks its row, so the check that no media record refers to its bytes any more sees an
//! upload of the same bytes that committed meanwhile. A sweep deleting bytes first claims the
//! logged deletion, holding its row while it checks that nothing needs them; a writer needing the
//! bytes again updates that row, so it waits for the claim and then sees it (and stores the bytes
//! again once the deletion is done).

use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use types::{BlobId, MediaId, MediaKind, UserId};

use super::{
    Advance, ClaimRow, Claimed, DAY_MS, Deleted, DeletedRow, Failure, JobRow, JobState, MediaJobRow, MediaRow,
    Namespace, NewMedia, NewUpload, OverlapRow, Part, UploadRow, Usage, blob, variants_of,
};

/// Originals of jobs that succeeded before $1, not yet retired: up to $2.
const ORIGINALS_TO_RETIRE: &str = "
    SELECT source_blob FROM jobs
     WHERE status = 'ready' AND original_gone = FALSE AND updated_at <= $1
     ORDER BY updated_at LIMIT $2
       FOR UPDATE SKIP LOCKED";

const RETIRE_ORIGINAL: &str = "UPDATE jobs SET original_gone = TRUE WHERE source_blob = $1";

/// A blob logged for deletion that is needed after all (an original a job queued again reads, a
/// variant a completing job names) is kept: its pending deletion is taken back, unless a sweep
/// holds it (claimed since $3), which the writer then waits for (`CLAIMED_SINCE`). The update waits
/// for a sweep deciding on the row, so the select after it sees that sweep's claim.
const KEEP_LOGGED: &str = "
    UPDATE deleted_blobs SET removed = TRUE
     WHERE namespace = $1 AND blob = $2 AND removed = FALSE AND (claimed_at IS NULL OR claimed_at < $3)";

/// Deletions of a blob a sweep claimed since $3 (when the writer stored it, less clock skew).
const CLAIMED_SINCE: &str =
    "SELECT seq, blob FROM deleted_blobs WHERE namespace = $1 AND blob = $2 AND claimed_at >= $3";

/// A sweep takes a pending deletion no other sweep holds (claims before $3 have lapsed). The row
/// stays locked until the check that nothing needs the bytes has committed with the claim.
const CLAIM_DELETION: &str = "
    UPDATE deleted_blobs SET claimed_at = $2
     WHERE seq = $1 AND removed = FALSE AND (claimed_at IS NULL OR claimed_at < $3) AND deleted_at <= $2
    RETURNING namespace, blob";

/// A claimed deletion whose bytes are needed again: done, and never claimed (no writer waits).
const KEEP_CLAIMED: &str = "UPDATE deleted_blobs SET removed = TRUE, claimed_at = NULL WHERE seq = $1";

/// A claimed deletion whose delete failed (the bytes are most likely still there): pending again,
/// for a later sweep, and no writer waits for it.
const RELEASE_DELETION: &str = "UPDATE deleted_blobs SET claimed_at = NULL WHERE seq = $1 AND removed = FALSE";

const DELETION_SETTLED: &str =
    "SELECT 1 FROM deleted_blobs WHERE seq = $1 AND (removed OR claimed_at IS NULL OR claimed_at < $2)";

/// A blob to delete, logged in the transaction that decides it.
const LOG_DELETION: &str = "INSERT INTO deleted_blobs (namespace, blob, deleted_at) VALUES ($1, $2, $3) RETURNING seq";

const PENDING_DELETIONS: &str = "
    SELECT seq, namespace, blob, deleted_at FROM deleted_blobs
     WHERE removed = FALSE AND seq > $2 AND (claimed_at IS NULL OR claimed_at < $3) AND deleted_at <= $4
     ORDER BY seq LIMIT $1";

const DELETION_DONE: &str = "UPDATE deleted_blobs SET removed = TRUE WHERE seq = $1";

/// Rows logged by $3 only: numbers are taken in insert order but seen in commit order, so the
/// newest rows wait until every transaction that could hold an earlier number has committed.
const DELETED_SINCE: &str = "
    SELECT seq, namespace, blob, deleted_at FROM deleted_blobs
     WHERE seq > $1 AND deleted_at <= $3 AND namespace <> 'parts'
     ORDER BY seq LIMIT $2";

/// An original that a job of the same bytes, uploaded again, still needs.
const ORIGINAL_NEEDED: &str = "SELECT 1 FROM jobs WHERE source_blob = $1 AND original_gone = FALSE";

const QUEUED: &str = "SELECT COUNT(*) FROM jobs WHERE status = 'processing'";

const RELEASE_LEASES: &str =
    "UPDATE jobs SET lease_until = NULL WHERE status = 'processing' AND lease_until IS NOT NULL";

const RELEASE_DELETION_CLAIMS: &str =
    "UPDATE deleted_blobs SET claimed_at = NULL WHERE NOT removed AND claimed_at IS NOT NULL";

const JOB: &str =
    "SELECT status, permanent, error_code, error_message, result, progress FROM jobs WHERE source_blob = $1";

/// A job for the upload's bytes; one that failed for a reason a retry might fix is queued again.
const UPSERT_JOB: &str = "
    INSERT INTO jobs (source_blob, kind, source_mime, source_bytes, status, run_after, created_at, updated_at)
    VALUES ($1, $2, $3, $5, 'processing', $4, $4, $4)
    ON CONFLICT (source_blob) DO UPDATE
       SET status = 'processing', attempts = 0, run_after = $4, lease_until = NULL,
           error_code = NULL, error_message = NULL, updated_at = $4
     WHERE jobs.status = 'failed' AND NOT jobs.permanent";

/// A new record is looked at by the next sweep (which sets when to look again).
const INSERT_MEDIA: &str = "
    INSERT INTO media (id, owner, kind, source_blob, source_mime, source_bytes, created_at, expire_check_at)
    VALUES ($1, $2, $3, $4, $5, $6, $7, $7)";

/// Shared: referenced now, not a candidate to expire until a revocation.
const MARK_SHARED: &str = "UPDATE media SET last_shared_at = $2, expire_check_at = NULL WHERE id = $1";

/// A revocation makes a record a candidate again.
/// (Whether grants are left the sweep checks: two revocations at once on PostgreSQL would each
/// see the other's grant.)
const MARK_UNSHARED: &str = "UPDATE media SET expire_check_at = COALESCE(expire_check_at, $2) WHERE id = $1";

/// Records the sweep should look at by $1, oldest first.
const EXPIRY_CANDIDATES: &str = "
    SELECT id, created_at, last_shared_at, source_blob FROM media WHERE expire_check_at <= $1
     ORDER BY expire_check_at LIMIT $2 FOR UPDATE SKIP LOCKED";

const HAS_GRANTS: &str = "SELECT 1 FROM media_grants WHERE media_id = $1 LIMIT 1";

const SET_EXPIRE_CHECK: &str = "UPDATE media SET expire_check_at = $2 WHERE id = $1";

const DELETE_MEDIA_BY_ID: &str = "DELETE FROM media WHERE id = $1 RETURNING source_blob";

const DELETE_MEDIA: &str = "DELETE FROM media WHERE id = $1";

/// Waits for an upload of the same bytes that holds the job's row (it upserted the job first).
const LOCK_JOB: &str = "SELECT 1 FROM jobs WHERE source_blob = $1 FOR UPDATE";

/// The job of bytes no media record refers to any more.
const DELETE_ORPHANED_JOB: &str = "
    DELETE FROM jobs WHERE source_blob = $1 AND NOT EXISTS (SELECT 1 FROM media WHERE source_blob = $1)
    RETURNING result";

/// Counts an upload's bytes on its UTC day, and drops the owner's days before yesterday.
const COUNT_UPLOAD_DAY: &str = "
    INSERT INTO upload_days (owner, day, bytes) VALUES ($1, $2, $3)
    ON CONFLICT (owner, day) DO UPDATE SET bytes = upload_days.bytes + excluded.bytes";
const DROP_OLD_UPLOAD_DAYS: &str = "DELETE FROM upload_days WHERE owner = $1 AND day < $2 - 1";

/// A user's quota use: bytes their media take (originals not yet deleted, variants), bytes
/// uploaded on day $2, and their uploads since $3 whose jobs are still waiting or running.
const USAGE: &str = "
    SELECT (SELECT COALESCE(SUM(CASE WHEN j.original_gone THEN 0 ELSE m.source_bytes END), 0)::BIGINT
              FROM media m JOIN jobs j ON j.source_blob = m.source_blob WHERE m.owner = $1)
         + (SELECT COALESCE(SUM(v.bytes), 0)::BIGINT
              FROM media m JOIN job_variants v ON v.source_blob = m.source_blob WHERE m.owner = $1),
           (SELECT COALESCE(SUM(bytes), 0)::BIGINT FROM upload_days WHERE owner = $1 AND day = $2),
           (SELECT COUNT(*) FROM media m JOIN jobs j ON j.source_blob = m.source_blob
             WHERE m.owner = $1 AND m.created_at > $3 AND j.status = 'processing')";

const MAY_READ: &str = "
    SELECT 1 FROM media WHERE id = $1 AND owner = $2
    UNION ALL SELECT 1 FROM media_grants WHERE media_id = $1 AND user_id = $2
    LIMIT 1";

const GRANT: &str = "
    INSERT INTO media_grants (media_id, user_id, source, granted_at) VALUES ($1, $2, $3, $4)
    ON CONFLICT (media_id, user_id, source) DO NOTHING";

/// Takes back what one source granted.
const REVOKE: &str = "DELETE FROM media_grants WHERE source = $1 AND media_id = $2";

const MEDIA: &str = "
    SELECT m.owner, m.kind, m.source_blob, j.status, j.permanent, j.error_code, j.error_message, j.result,
           j.progress
      FROM media m JOIN jobs j ON j.source_blob = m.source_blob
     WHERE m.id = $1";

const DELETE_OWNED_MEDIA: &str = "DELETE FROM media WHERE id = $1 AND owner = $2 RETURNING source_blob";

const DELETE_GRANTS: &str = "DELETE FROM media_grants WHERE media_id = $1";

const NEVER_NEEDED: &str = "SELECT 1 WHERE $1::TEXT IS NULL";

/// Whether a job's result names a variant.
const NAMED_BY_A_JOB: &str = "SELECT 1 FROM job_variants WHERE blob = $1 LIMIT 1";

const NAME_VARIANT: &str =
    "INSERT INTO job_variants (blob, source_blob, bytes) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING";

/// Originals not yet deleted, distinct variants named, deletions not done.
const STORED_TOTALS: &str = "
    SELECT (SELECT COUNT(*) FROM jobs WHERE NOT original_gone),
           (SELECT COALESCE(SUM(source_bytes), 0)::BIGINT FROM jobs WHERE NOT original_gone),
           (SELECT COUNT(DISTINCT blob) FROM job_variants),
           (SELECT COALESCE(SUM(bytes), 0)::BIGINT FROM (SELECT MAX(bytes) AS bytes FROM job_variants GROUP BY blob) t),
           (SELECT COUNT(*) FROM deleted_blobs WHERE NOT removed)";

/// The next due job of two kinds whose lease is free, leased in the same statement.
const CLAIM: &str = "
    UPDATE jobs SET lease_until = $1, attempts = attempts + 1, claim = $5, progress = NULL, updated_at = $2
     WHERE source_blob = (
           SELECT source_blob FROM jobs
            WHERE kind IN ($3, $4) AND status = 'processing' AND run_after <= $2
              AND (lease_until IS NULL OR lease_until < $2)
            ORDER BY run_after LIMIT 1
              FOR UPDATE SKIP LOCKED)
       AND status = 'processing' AND (lease_until IS NULL OR lease_until < $2)
    RETURNING source_blob, kind, source_mime, attempts, claim";

const HEARTBEAT: &str = "
    UPDATE jobs SET lease_until = $1, progress = COALESCE($2, progress), updated_at = $3
     WHERE source_blob = $4 AND status = 'processing' AND claim = $5 AND lease_until IS NOT NULL";

const COMPLETE: &str = "
    UPDATE jobs SET status = 'ready', result = $1, lease_until = NULL, error_code = NULL, error_message = NULL,
           updated_at = $2
     WHERE source_blob = $3 AND status = 'processing' AND claim = $4";

const FAIL: &str = "
    UPDATE jobs SET status = $1, permanent = $2, error_code = $3, error_message = $4, lease_until = NULL,
           run_after = $5, updated_at = $6
     WHERE source_blob = $7 AND status = 'processing' AND claim = $8";

const UPLOAD: &str = "
    SELECT owner, mime, length, upload_offset, head, metadata, done, expires_at FROM uploads
     WHERE id = $1 AND expires_at > $2";

/// A user's open uploads and the bytes they will take (the offset while the length is deferred).
const OPEN_UPLOADS: &str = "
    SELECT COUNT(*), COALESCE(SUM(COALESCE(length, upload_offset)), 0)::BIGINT FROM uploads
     WHERE owner = $1 AND NOT done AND expires_at > $2";

const INSERT_UPLOAD: &str = "
    INSERT INTO uploads (id, owner, mime, length, head, metadata, expires_at, created_at)
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8)";

/// One PATCH at a time appends: it holds the upload until $4 (a lock older than $5 has lapsed).
const LOCK_UPLOAD: &str = "
    UPDATE uploads SET writer = $3, writer_until = $4, expires_at = GREATEST(expires_at, $4)
     WHERE id = $1 AND upload_offset = $2 AND NOT done AND expires_at > $5
       AND (writer IS NULL OR writer_until < $5)";

const RENEW_UPLOAD_LOCK: &str =
    "UPDATE uploads SET writer_until = $3, expires_at = GREATEST(expires_at, $3) WHERE id = $1 AND writer = $2";

const RELEASE_UPLOAD_LOCK: &str = "UPDATE uploads SET writer = NULL, writer_until = NULL WHERE id = $1 AND writer = $2";

/// The writer's part moves the offset on (only if the writer still holds the upload at the
/// offset it started from), and the lock goes.
const ADVANCE_UPLOAD: &str = "
    UPDATE uploads SET upload_offset = upload_offset + $4, head = $5, length = COALESCE(length, $6), expires_at = $7,
           writer = NULL, writer_until = NULL
     WHERE id = $1 AND writer = $2 AND upload_offset = $3";

/// A part about to be stored is logged for deletion when the upload would have expired, so a
/// crash before it is recorded leaks nothing; recording it takes the deletion back.
const LOG_PART: &str = "INSERT INTO deleted_blobs (namespace, blob, deleted_at) VALUES ('parts', $1, $2) RETURNING seq";
const KEEP_PART: &str = "UPDATE deleted_blobs SET removed = TRUE WHERE seq = $1";

const ADD_PART: &str = "INSERT INTO upload_parts (upload_id, start_at, len, key) VALUES ($1, $2, $3, $4)";

const UPLOAD_PARTS: &str = "SELECT start_at, len, key FROM upload_parts WHERE upload_id = $1 ORDER BY start_at";

const FINISH_UPLOAD: &str =
    "UPDATE uploads SET done = TRUE, head = $2, writer = NULL, writer_until = NULL WHERE id = $1 AND NOT done";

/// Whoever deletes an upload's parts holds its row first, so no part is added meanwhile.
const LOCK_UPLOAD_ROW: &str = "SELECT 1 FROM uploads WHERE id = $1 FOR UPDATE";

const DELETE_PARTS: &str = "DELETE FROM upload_parts WHERE upload_id = $1 RETURNING key";

const DELETE_UPLOAD: &str = "DELETE FROM uploads WHERE id = $1 AND ($2::TEXT IS NULL OR owner = $2)";

/// A deferred length named by a request with no bytes.
const SET_UPLOAD_LENGTH: &str =
    "UPDATE uploads SET length = $2 WHERE id = $1 AND length IS NULL AND upload_offset <= $2 AND NOT done";

/// Uploads holding all their bytes whose media was never made (their last request failed on our
/// side, or the node died), free of any lock, oldest first.
const STUCK_UPLOADS: &str = "
    SELECT id, owner FROM uploads
     WHERE NOT done AND length = upload_offset AND (writer IS NULL OR writer_until < $1) AND expires_at > $1
     ORDER BY expires_at LIMIT $2";

const EXPIRED_UPLOADS: &str = "SELECT id FROM uploads WHERE expires_at <= $1 ORDER BY expires_at LIMIT $2";

/// ingest's tables in a PostgreSQL database.
#[derive(Debug, Clone)]
pub struct Postgres {
    db: PgPool,
}

impl Postgres {
    pub(super) async fn connect(url: &str) -> Result<Self, sqlx::Error> {
        let db = PgPoolOptions::new().max_connections(16).connect(url).await?;
        let mut migrator = sqlx::migrate!("./migrations-postgres");
        // chat-core keeps its own migrations in the same database.
        migrator.set_ignore_missing(true);
        migrator.run(&db).await?;
        Ok(Self { db })
    }

    pub(super) async fn queued(&self) -> Result<u64, sqlx::Error> {
        let n: i64 = sqlx::query_scalar(QUEUED).fetch_one(&self.db).await?;
        Ok(n as u64)
    }

    pub(super) async fn release_leases(&self) -> Result<u64, sqlx::Error> {
        sqlx::query(RELEASE_DELETION_CLAIMS).execute(&self.db).await?;
        Ok(sqlx::query(RELEASE_LEASES).execute(&self.db).await?.rows_affected())
    }

    pub(super) async fn job(&self, blob: &BlobId) -> Result<Option<JobState>, sqlx::Error> {
        let row: Option<JobRow> = sqlx::query_as(JOB).bind(blob.to_hex()).fetch_optional(&self.db).await?;
        row.map(JobState::try_from).transpose()
    }

    pub(super) async fn record_upload(
        &self,
        media: &NewMedia<'_>,
        since: i64,
        settled: &[i64],
        now: i64,
    ) -> Result<Vec<OverlapRow>, sqlx::Error> {
        let mut tx = self.db.begin().await?;
        let queued = sqlx::query(UPSERT_JOB)
            .bind(media.blob.to_hex())
            .bind(media.kind.as_str())
            .bind(media.mime)
            .bind(now)
            .bind(media.bytes as i64)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        if queued > 0 {
            let mut overlaps = keep_logged(&mut tx, Namespace::Originals, &media.blob.to_hex(), since, now).await?;
            overlaps.retain(|o| !settled.contains(&o.seq));
            if !overlaps.is_empty() {
                // Rolled back: the caller waits for these and stores the original again first.
                return Ok(overlaps);
            }
        }
        sqlx::query(INSERT_MEDIA)
            .bind(media.id.to_string())
            .bind(media.owner.as_str())
            .bind(media.kind.as_str())
            .bind(media.blob.to_hex())
            .bind(media.mime)
            .bind(media.bytes as i64)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        let day = now.div_euclid(DAY_MS);
        let owner = media.owner.as_str();
        sqlx::query(COUNT_UPLOAD_DAY).bind(owner).bind(day).bind(media.bytes as i64).execute(&mut *tx).await?;
        sqlx::query(DROP_OLD_UPLOAD_DAYS).bind(owner).bind(day).execute(&mut *tx).await?;
        tx.commit().await?;
        Ok(Vec::new())
    }

    pub(super) async fn usage(&self, owner: &UserId, now: i64) -> Result<Usage, sqlx::Error> {
        let (stored, today, queued): (i64, i64, i64) = sqlx::query_as(USAGE)
            .bind(owner.as_str())
            .bind(now.div_euclid(DAY_MS))
            .bind(now - DAY_MS)
            .fetch_one(&self.db)
            .await?;
        Ok(Usage { stored_bytes: stored.max(0) as u64, bytes_today: today.max(0) as u64, queued_jobs: queued as u64 })
    }

    pub(super) async fn forget_upload(&self, id: MediaId, blob: &BlobId, now: i64) -> Result<Option<i64>, sqlx::Error> {
        let mut tx = self.db.begin().await?;
        sqlx::query(DELETE_MEDIA).bind(id.to_string()).execute(&mut *tx).await?;
        let orphaned = orphan(&mut tx, &blob.to_hex(), now).await?;
        tx.commit().await?;
        Ok(orphaned)
    }

    pub(super) async fn may_read(&self, id: MediaId, user: &UserId) -> Result<bool, sqlx::Error> {
        let found: Option<i32> =
            sqlx::query_scalar(MAY_READ).bind(id.to_string()).bind(user.as_str()).fetch_optional(&self.db).await?;
        Ok(found.is_some())
    }

    pub(super) async fn grant(&self, id: MediaId, users: &[UserId], source: &str, now: i64) -> Result<(), sqlx::Error> {
        let mut tx = self.db.begin().await?;
        // The record first: on PostgreSQL this locks it against the sweep, and a record the sweep
        // deleted meanwhile is not shared (the caller hears it is gone).
        let marked = sqlx::query(MARK_SHARED).bind(id.to_string()).bind(now).execute(&mut *tx).await?.rows_affected();
        if marked == 0 {
            return Err(sqlx::Error::RowNotFound);
        }
        for user in users {
            sqlx::query(GRANT)
                .bind(id.to_string())
                .bind(user.as_str())
                .bind(source)
                .bind(now)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await
    }

    pub(super) async fn revoke(&self, id: MediaId, source: &str, now: i64) -> Result<u64, sqlx::Error> {
        let mut tx = self.db.begin().await?;
        let revoked = sqlx::query(REVOKE).bind(source).bind(id.to_string()).execute(&mut *tx).await?.rows_affected();
        if revoked > 0 {
            sqlx::query(MARK_UNSHARED).bind(id.to_string()).bind(now).execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(revoked)
    }

    pub(super) async fn media(&self, id: MediaId) -> Result<Option<MediaRow>, sqlx::Error> {
        let row: Option<MediaJobRow> = sqlx::query_as(MEDIA).bind(id.to_string()).fetch_optional(&self.db).await?;
        row.map(MediaRow::try_from).transpose()
    }

    pub(super) async fn delete(&self, id: MediaId, owner: &UserId, now: i64) -> Result<Deleted, sqlx::Error> {
        let mut tx = self.db.begin().await?;
        let source: Option<String> = sqlx::query_scalar(DELETE_OWNED_MEDIA)
            .bind(id.to_string())
            .bind(owner.as_str())
            .fetch_optional(&mut *tx)
            .await?;
        let Some(source) = source else { return Ok(Deleted::NotFound) };
        sqlx::query(DELETE_GRANTS).bind(id.to_string()).execute(&mut *tx).await?;
        let orphaned = orphan(&mut tx, &source, now).await?;
        tx.commit().await?;
        Ok(if orphaned.is_some() { Deleted::Orphaned { source: blob(&source)? } } else { Deleted::Kept })
    }

    pub(super) async fn expire_media(
        &self,
        now: i64,
        unsent_ms: i64,
        retention_ms: i64,
        limit: i64,
    ) -> Result<Vec<BlobId>, sqlx::Error> {
        let mut tx = self.db.begin().await?;
        let mut candidates: Vec<(String, i64, Option<i64>, String)> =
            sqlx::query_as(EXPIRY_CANDIDATES).bind(now).bind(limit).fetch_all(&mut *tx).await?;
        // Jobs are locked in the order of their bytes, as every sweep does: two nodes' sweeps
        // never wait on each other in a cycle.
        candidates.sort_by(|a, b| a.3.cmp(&b.3));
        let mut orphaned = Vec::new();
        for (id, created_at, last_shared_at, _) in candidates {
            let shared: Option<i32> = sqlx::query_scalar(HAS_GRANTS).bind(&id).fetch_optional(&mut *tx).await?;
            let due = created_at.saturating_add(if last_shared_at.is_some() { retention_ms } else { unsent_ms });
            if shared.is_some() || due > now {
                // Referenced (a grant came meanwhile), or not yet old enough: look again then.
                let next = shared.is_none().then_some(due);
                sqlx::query(SET_EXPIRE_CHECK).bind(&id).bind(next).execute(&mut *tx).await?;
                continue;
            }
            let source: Option<String> =
                sqlx::query_scalar(DELETE_MEDIA_BY_ID).bind(&id).fetch_optional(&mut *tx).await?;
            if let Some(source) = source
                && orphan(&mut tx, &source, now).await?.is_some()
            {
                orphaned.push(blob(&source)?);
            }
        }
        tx.commit().await?;
        Ok(orphaned)
    }

    pub(super) async fn retire_originals(&self, before: i64, now: i64, limit: i64) -> Result<u64, sqlx::Error> {
        let mut tx = self.db.begin().await?;
        let sources: Vec<String> =
            sqlx::query_scalar(ORIGINALS_TO_RETIRE).bind(before).bind(limit).fetch_all(&mut *tx).await?;
        for source in &sources {
            sqlx::query(RETIRE_ORIGINAL).bind(source).execute(&mut *tx).await?;
            sqlx::query(LOG_DELETION)
                .bind(Namespace::Originals.as_str())
                .bind(source)
                .bind(now)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(sources.len() as u64)
    }

    pub(super) async fn pending_deletions(
        &self,
        limit: i64,
        after: i64,
        lapsed: i64,
        now: i64,
    ) -> Result<Vec<DeletedRow>, sqlx::Error> {
        sqlx::query_as(PENDING_DELETIONS).bind(limit).bind(after).bind(lapsed).bind(now).fetch_all(&self.db).await
    }

    pub(super) async fn claim_deletion(&self, seq: i64, now: i64, lapsed: i64) -> Result<bool, sqlx::Error> {
        let mut tx = self.db.begin().await?;
        let claimed: Option<(String, String)> =
            sqlx::query_as(CLAIM_DELETION).bind(seq).bind(now).bind(lapsed).fetch_optional(&mut *tx).await?;
        let Some((namespace, blob)) = claimed else { return Ok(false) };
        let query = match Namespace::parse(&namespace)? {
            Namespace::Originals => ORIGINAL_NEEDED,
            Namespace::Variants => NAMED_BY_A_JOB,
            // A part's key is its upload's alone: nothing else ever needs it.
            Namespace::Parts => NEVER_NEEDED,
        };
        let needed: Option<i32> = sqlx::query_scalar(query).bind(&blob).fetch_optional(&mut *tx).await?;
        if needed.is_some() {
            sqlx::query(KEEP_CLAIMED).bind(seq).execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(needed.is_none())
    }

    pub(super) async fn upload(&self, id: MediaId, now: i64) -> Result<Option<UploadRow>, sqlx::Error> {
        sqlx::query_as(UPLOAD).bind(id.to_string()).bind(now).fetch_optional(&self.db).await
    }

    pub(super) async fn open_uploads(&self, owner: &UserId, now: i64) -> Result<(i64, i64), sqlx::Error> {
        sqlx::query_as(OPEN_UPLOADS).bind(owner.as_str()).bind(now).fetch_one(&self.db).await
    }

    pub(super) async fn create_upload(&self, upload: &NewUpload<'_>, now: i64) -> Result<(), sqlx::Error> {
        sqlx::query(INSERT_UPLOAD)
            .bind(upload.id.to_string())
            .bind(upload.owner.as_str())
            .bind(upload.mime)
            .bind(upload.length.map(|l| l as i64))
            .bind(Vec::<u8>::new())
            .bind(upload.metadata)
            .bind(upload.expires_at)
            .bind(now)
            .execute(&self.db)
            .await?;
        Ok(())
    }

    pub(super) async fn lock_upload(
        &self,
        id: MediaId,
        offset: i64,
        writer: &str,
        until: i64,
        now: i64,
    ) -> Result<bool, sqlx::Error> {
        let locked = sqlx::query(LOCK_UPLOAD)
            .bind(id.to_string())
            .bind(offset)
            .bind(writer)
            .bind(until)
            .bind(now)
            .execute(&self.db);
        Ok(locked.await?.rows_affected() == 1)
    }

    pub(super) async fn renew_upload_lock(&self, id: MediaId, writer: &str, until: i64) -> Result<bool, sqlx::Error> {
        let renewed = sqlx::query(RENEW_UPLOAD_LOCK).bind(id.to_string()).bind(writer).bind(until).execute(&self.db);
        Ok(renewed.await?.rows_affected() == 1)
    }

    pub(super) async fn release_upload_lock(&self, id: MediaId, writer: &str) -> Result<(), sqlx::Error> {
        sqlx::query(RELEASE_UPLOAD_LOCK).bind(id.to_string()).bind(writer).execute(&self.db).await?;
        Ok(())
    }

    pub(super) async fn advance_upload(&self, id: MediaId, advance: &Advance<'_>) -> Result<bool, sqlx::Error> {
        let mut tx = self.db.begin().await?;
        let part = &advance.part;
        let moved = sqlx::query(ADVANCE_UPLOAD)
            .bind(id.to_string())
            .bind(advance.writer)
            .bind(part.start_at)
            .bind(part.len)
            .bind(advance.head)
            .bind(advance.length)
            .bind(advance.expires_at)
            .execute(&mut *tx)
            .await?;
        if moved.rows_affected() != 1 {
            return Ok(false);
        }
        sqlx::query(ADD_PART)
            .bind(id.to_string())
            .bind(part.start_at)
            .bind(part.len)
            .bind(&part.key)
            .execute(&mut *tx)
            .await?;
        sqlx::query(KEEP_PART).bind(advance.logged).execute(&mut *tx).await?;
        tx.commit().await?;
        Ok(true)
    }

    pub(super) async fn log_deletion(&self, namespace: Namespace, blob: &str, now: i64) -> Result<i64, sqlx::Error> {
        sqlx::query_scalar(LOG_DELETION).bind(namespace.as_str()).bind(blob).bind(now).fetch_one(&self.db).await
    }

    pub(super) async fn log_part(&self, key: &str, due_at: i64) -> Result<i64, sqlx::Error> {
        sqlx::query_scalar(LOG_PART).bind(key).bind(due_at).fetch_one(&self.db).await
    }

    pub(super) async fn upload_parts(&self, id: MediaId) -> Result<Vec<Part>, sqlx::Error> {
        sqlx::query_as(UPLOAD_PARTS).bind(id.to_string()).fetch_all(&self.db).await
    }

    pub(super) async fn finish_upload(&self, id: MediaId, now: i64) -> Result<(), sqlx::Error> {
        let mut tx = self.db.begin().await?;
        sqlx::query(FINISH_UPLOAD).bind(id.to_string()).bind(Vec::<u8>::new()).execute(&mut *tx).await?;
        log_parts(&mut tx, id, now).await?;
        tx.commit().await
    }

    pub(super) async fn delete_upload(
        &self,
        id: MediaId,
        owner: Option<&UserId>,
        now: i64,
    ) -> Result<bool, sqlx::Error> {
        let mut tx = self.db.begin().await?;
        log_parts(&mut tx, id, now).await?;
        let deleted =
            sqlx::query(DELETE_UPLOAD).bind(id.to_string()).bind(owner.map(UserId::as_str)).execute(&mut *tx).await?;
        if deleted.rows_affected() == 0 {
            // Not this owner's: its parts stay.
            return Ok(false);
        }
        tx.commit().await?;
        Ok(true)
    }

    pub(super) async fn set_upload_length(&self, id: MediaId, length: i64) -> Result<bool, sqlx::Error> {
        let set = sqlx::query(SET_UPLOAD_LENGTH).bind(id.to_string()).bind(length).execute(&self.db).await?;
        Ok(set.rows_affected() == 1)
    }

    pub(super) async fn stuck_uploads(&self, now: i64, limit: i64) -> Result<Vec<(String, String)>, sqlx::Error> {
        sqlx::query_as(STUCK_UPLOADS).bind(now).bind(limit).fetch_all(&self.db).await
    }

    pub(super) async fn expired_uploads(&self, now: i64, limit: i64) -> Result<Vec<String>, sqlx::Error> {
        sqlx::query_scalar(EXPIRED_UPLOADS).bind(now).bind(limit).fetch_all(&self.db).await
    }

    pub(super) async fn original_needed(&self, blob: &BlobId) -> Result<bool, sqlx::Error> {
        let found: Option<i32> =
            sqlx::query_scalar(ORIGINAL_NEEDED).bind(blob.to_hex()).fetch_optional(&self.db).await?;
        Ok(found.is_some())
    }

    pub(super) async fn release_deletion(&self, seq: i64) -> Result<(), sqlx::Error> {
        sqlx::query(RELEASE_DELETION).bind(seq).execute(&self.db).await?;
        Ok(())
    }

    pub(super) async fn deletion_settled(&self, seq: i64, lapsed: i64) -> Result<bool, sqlx::Error> {
        let found: Option<i32> =
            sqlx::query_scalar(DELETION_SETTLED).bind(seq).bind(lapsed).fetch_optional(&self.db).await?;
        Ok(found.is_some())
    }

    pub(super) async fn stored_totals(&self) -> Result<(i64, i64, i64, i64, i64), sqlx::Error> {
        sqlx::query_as(STORED_TOTALS).fetch_one(&self.db).await
    }

    pub(super) async fn deletions_done(&self, seqs: &[i64]) -> Result<(), sqlx::Error> {
        let mut tx = self.db.begin().await?;
        for seq in seqs {
            sqlx::query(DELETION_DONE).bind(seq).execute(&mut *tx).await?;
        }
        tx.commit().await
    }

    pub(super) async fn deleted_since(
        &self,
        after: i64,
        limit: i64,
        upto: i64,
    ) -> Result<Vec<DeletedRow>, sqlx::Error> {
        sqlx::query_as(DELETED_SINCE).bind(after).bind(limit).bind(upto).fetch_all(&self.db).await
    }

    pub(super) async fn claim(
        &self,
        [first, second]: [MediaKind; 2],
        now: i64,
        lease_until: i64,
    ) -> Result<Option<Claimed>, sqlx::Error> {
        let row: Option<ClaimRow> = sqlx::query_as(CLAIM)
            .bind(lease_until)
            .bind(now)
            .bind(first.as_str())
            .bind(second.as_str())
            .bind(uuid::Uuid::now_v7().to_string())
            .fetch_optional(&self.db)
            .await?;
        row.map(|row| Claimed::from_row(row, now)).transpose()
    }

    pub(super) async fn heartbeat(
        &self,
        job: &Claimed,
        progress: Option<f32>,
        now: i64,
        lease_until: i64,
    ) -> Result<bool, sqlx::Error> {
        let done = sqlx::query(HEARTBEAT)
            .bind(lease_until)
            .bind(progress.map(f64::from))
            .bind(now)
            .bind(job.blob.to_hex())
            .bind(&job.claim)
            .execute(&self.db)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    pub(super) async fn complete(
        &self,
        job: &Claimed,
        result: &str,
        variants: &[(String, i64)],
        since: i64,
        settled: &[i64],
        now: i64,
    ) -> Result<(bool, Vec<OverlapRow>), sqlx::Error> {
        let mut tx = self.db.begin().await?;
        let source = job.blob.to_hex();
        let done =
            sqlx::query(COMPLETE).bind(result).bind(now).bind(&source).bind(&job.claim).execute(&mut *tx).await?;
        let recorded = done.rows_affected() == 1;
        let mut overlaps = Vec::new();
        if recorded {
            // Variants in the order of their bytes, as every writer locks deletions.
            let mut variants: Vec<&(String, i64)> = variants.iter().collect();
            variants.sort();
            for (variant, bytes) in variants {
                sqlx::query(NAME_VARIANT).bind(variant).bind(&source).bind(bytes).execute(&mut *tx).await?;
                // A deletion logged meanwhile is taken back, or waited for if a sweep holds it.
                overlaps.extend(keep_logged(&mut tx, Namespace::Variants, variant, since, now).await?);
            }
            overlaps.retain(|o| !settled.contains(&o.seq));
            if !overlaps.is_empty() {
                // Rolled back: the runner waits for these and stores the variants again first.
                return Ok((false, overlaps));
            }
        } else {
            // Not this claim's job any more (deleted mid-transcode, or claimed again): what the
            // runner stored that no job names is logged (a runner storing the same bytes for a
            // job hears of the deletion when it completes).
            let variants = variants.iter().map(|(variant, _)| variant.as_str());
            log_unnamed_variants(&mut tx, variants, now).await?;
        }
        tx.commit().await?;
        Ok((recorded, overlaps))
    }

    pub(super) async fn fail(&self, job: &Claimed, failure: &Failure<'_>, now: i64) -> Result<bool, sqlx::Error> {
        let done = sqlx::query(FAIL)
            .bind(if failure.last { "failed" } else { "processing" })
            .bind(failure.permanent)
            .bind(failure.code)
            .bind(failure.message)
            .bind(failure.run_after)
            .bind(now)
            .bind(job.blob.to_hex())
            .bind(&job.claim)
            .execute(&self.db)
            .await?;
        Ok(done.rows_affected() == 1)
    }
}

/// Deletes the job of bytes no media record refers to any more, inside `tx`, and logs its original
/// and the variants no other job names for deletion. Returns the original's deletion, or `None`
/// when the job stays (another record refers to the bytes).
async fn orphan(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    source: &str,
    now: i64,
) -> Result<Option<i64>, sqlx::Error> {
    sqlx::query(LOCK_JOB).bind(source).execute(&mut **tx).await?;
    let job: Option<Option<String>> =
        sqlx::query_scalar(DELETE_ORPHANED_JOB).bind(source).fetch_optional(&mut **tx).await?;
    let Some(result) = job else { return Ok(None) };
    let originals = Namespace::Originals.as_str();
    let seq: i64 = sqlx::query_scalar(LOG_DELETION).bind(originals).bind(source).bind(now).fetch_one(&mut **tx).await?;
    let variants: Vec<String> = variants_of(result)?.iter().map(BlobId::to_hex).collect();
    log_unnamed_variants(tx, variants.iter().map(String::as_str), now).await?;
    Ok(Some(seq))
}

/// Deletes an upload's part rows inside `tx` and logs their blobs for deletion.
async fn log_parts(tx: &mut sqlx::Transaction<'_, sqlx::Postgres>, id: MediaId, now: i64) -> Result<(), sqlx::Error> {
    sqlx::query(LOCK_UPLOAD_ROW).bind(id.to_string()).execute(&mut **tx).await?;
    let keys: Vec<String> = sqlx::query_scalar(DELETE_PARTS).bind(id.to_string()).fetch_all(&mut **tx).await?;
    for key in keys {
        sqlx::query(LOG_DELETION).bind(Namespace::Parts.as_str()).bind(key).bind(now).execute(&mut **tx).await?;
    }
    Ok(())
}

/// Logs for deletion the variants no job names (different uploads can come out as the same
/// bytes, and variants are named by their hash too).
async fn log_unnamed_variants(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    variants: impl Iterator<Item = &str>,
    now: i64,
) -> Result<(), sqlx::Error> {
    for variant in variants {
        let named: Option<i32> = sqlx::query_scalar(NAMED_BY_A_JOB).bind(variant).fetch_optional(&mut **tx).await?;
        if named.is_none() {
            let namespace = Namespace::Variants.as_str();
            sqlx::query(LOG_DELETION).bind(namespace).bind(variant).bind(now).execute(&mut **tx).await?;
        }
    }
    Ok(())
}

/// Takes back the pending deletions of a blob a writer needs again, inside `tx`, and returns
/// those a sweep claimed since `since` (the writer waits for them, then stores the bytes again).
async fn keep_logged(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    namespace: Namespace,
    blob: &str,
    since: i64,
    now: i64,
) -> Result<Vec<OverlapRow>, sqlx::Error> {
    let lapsed = now - super::DELETION_CLAIM_MS;
    sqlx::query(KEEP_LOGGED).bind(namespace.as_str()).bind(blob).bind(lapsed).execute(&mut **tx).await?;
    sqlx::query_as(CLAIMED_SINCE).bind(namespace.as_str()).bind(blob).bind(since).fetch_all(&mut **tx).await
}

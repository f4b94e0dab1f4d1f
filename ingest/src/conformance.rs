//! One suite for ingest's tables, run on both engines through the queue and records production
//! uses: SQLite in a temp file, and PostgreSQL at `COURIER_TEST_DATABASE_URL` (each test in a schema
//! of its own). With that variable set, an unreachable server fails the PostgreSQL tests; without
//! it they are skipped with a note.

use transcode::TranscodeError;
use types::{BlobId, MediaId, MediaKind, MediaStatus, UserId, VariantName};

use crate::queue::{JobQueue, Lane};
use crate::records::MediaRecords;
use crate::store::{Deleted, Namespace, NewMedia, Store, Usage};
use crate::view::{JobResult, StoredVariant};
use crate::{Clock, JobConfig};

/// The queue and records on one engine, with a clock the test moves.
struct Tables {
    queue: JobQueue,
    records: MediaRecords,
    store: Store,
    clock: Clock,
    _dir: Option<tempfile::TempDir>,
}

async fn sqlite(config: JobConfig) -> Tables {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("test.db").display());
    tables(Store::connect(&url).await.unwrap(), config, Some(dir))
}

async fn postgres(test: &str, config: JobConfig) -> Option<Tables> {
    let Ok(url) = std::env::var("COURIER_TEST_DATABASE_URL") else {
        eprintln!("COURIER_TEST_DATABASE_URL is not set: skipping the PostgreSQL run of {test}");
        return None;
    };
    let schema = format!("ingest_{test}");
    let admin = sqlx::PgPool::connect(&url).await.expect("COURIER_TEST_DATABASE_URL is set but unreachable");
    sqlx::query(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE")).execute(&admin).await.unwrap();
    sqlx::query(&format!("CREATE SCHEMA {schema}")).execute(&admin).await.unwrap();
    admin.close().await;
    Some(tables(Store::connect(&options_url(&url, &schema)).await.unwrap(), config, None))
}

/// `url` with its connections' search path set to `schema`.
fn options_url(url: &str, schema: &str) -> String {
    let separator = if url.contains('?') { '&' } else { '?' };
    format!("{url}{separator}options=-c%20search_path%3D{schema}")
}

fn tables(store: Store, config: JobConfig, dir: Option<tempfile::TempDir>) -> Tables {
    let clock = Clock::manual(1_800_000_000_000);
    Tables {
        queue: JobQueue::new(store.clone(), config, clock.clone()),
        records: MediaRecords::new(store.clone(), clock.clone()),
        store,
        clock,
        _dir: dir,
    }
}

/// Declares each suite function as a test per engine.
macro_rules! on_both {
    (@config) => { crate::JobConfig::default() };
    (@config $config:expr) => { $config };
    ($($name:ident $(($config:expr))?),* $(,)?) => {
        mod sqlite_engine {
            $(
                #[tokio::test]
                async fn $name() {
                    let config = on_both!(@config $($config)?);
                    super::$name(super::sqlite(config).await).await;
                }
            )*
        }
        mod postgres_engine {
            $(
                #[tokio::test]
                async fn $name() {
                    let config = on_both!(@config $($config)?);
                    if let Some(tables) = super::postgres(stringify!($name), config).await {
                        super::$name(tables).await;
                    }
                }
            )*
        }
    };
}

on_both!(
    videos_wait_in_a_lane_of_their_own,
    retryable_failures_back_off_until_attempts_run_out(crate::JobConfig { max_attempts: 3, ..Default::default() }),
    permanent_failures_end_at_once_and_stay_failed,
    a_dead_runners_lease_expires,
    records_are_read_by_their_owner_and_those_shared_with,
    deleting_keeps_what_other_uploads_still_need,
    a_refused_upload_is_forgotten,
    concurrent_claims_take_each_job_once,
    an_old_claim_never_speaks_for_a_new_job,
    usage_counts_a_users_bytes_by_day_and_in_all,
    originals_retire_after_success_and_every_deletion_is_logged,
    media_nothing_references_expire_and_shared_bytes_stay_while_referenced,
    stored_bytes_follow_originals_and_variants,
    a_writer_sees_a_deletion_in_flight_and_no_variant_is_left_unlogged,
    resumable_uploads_keep_their_offset_their_parts_and_one_writer,
);

fn alice() -> UserId {
    "alice".parse().unwrap()
}

async fn upload_as(t: &Tables, owner: &UserId, bytes: &[u8], kind: MediaKind) -> (MediaId, BlobId) {
    let blob = BlobId::of(bytes);
    let mime = match kind {
        MediaKind::Image => "image/jpeg",
        MediaKind::Audio => "audio/ogg",
        MediaKind::Video => "video/mp4",
    };
    let id = MediaId::new();
    let media = NewMedia { id, owner, kind, blob, mime, bytes: bytes.len() as u64 };
    // As the upload route does: deletions of the bytes claimed since they were stored are waited
    // for (here: taken as over) and the record made again.
    let mut settled = Vec::new();
    loop {
        let overlaps = t.records.record_upload(&media, t.clock.now_ms(), &settled).await.unwrap();
        if overlaps.is_empty() {
            break;
        }
        settled.extend(overlaps.iter().map(|o| o.seq));
    }
    (id, blob)
}

async fn upload(t: &Tables, bytes: &[u8]) -> BlobId {
    upload_as(t, &alice(), bytes, MediaKind::Image).await.1
}

/// The deletions logged and not done that no sweep holds.
async fn pending(t: &Tables) -> Vec<crate::DeletedBlob> {
    t.store.pending_deletions(10, 0, t.clock.now_ms()).await.unwrap()
}

async fn status(t: &Tables, blob: &BlobId) -> (MediaStatus, bool) {
    let job = t.queue.job(blob).await.unwrap().unwrap();
    (job.status, job.permanent)
}

/// Long enough for any back-off or lease to come due.
const AN_HOUR: i64 = 3_600_000;

async fn videos_wait_in_a_lane_of_their_own(t: Tables) {
    let (_, video) = upload_as(&t, &alice(), b"a video", MediaKind::Video).await;
    let (_, voice) = upload_as(&t, &alice(), b"a voice note", MediaKind::Audio).await;
    let photo = upload(&t, b"a photo").await;
    let mut quick = Vec::new();
    for _ in 0..2 {
        quick.push(t.queue.claim(Lane::Quick).await.unwrap().unwrap().blob);
    }
    assert!(quick.contains(&voice) && quick.contains(&photo), "the quick lane takes images and audio");
    assert!(t.queue.claim(Lane::Quick).await.unwrap().is_none(), "and never a video");
    let job = t.queue.claim(Lane::Video).await.unwrap().unwrap();
    assert_eq!((job.blob, job.kind, job.mime.as_str()), (video, MediaKind::Video, "video/mp4"));
    assert!(t.queue.heartbeat(&job, Some(0.25)).await.unwrap());
    assert_eq!(t.queue.job(&video).await.unwrap().unwrap().progress, Some(0.25));
    // A heartbeat without news keeps the progress it had.
    assert!(t.queue.heartbeat(&job, None).await.unwrap());
    assert_eq!(t.queue.job(&video).await.unwrap().unwrap().progress, Some(0.25));
}

async fn retryable_failures_back_off_until_attempts_run_out(t: Tables) {
    let blob = upload(&t, b"photo").await;
    for attempt in 1..=3 {
        let job = t.queue.claim(Lane::Quick).await.unwrap().expect("a due job is claimable");
        assert_eq!((job.blob, job.attempts), (blob, attempt));
        assert!(t.queue.claim(Lane::Quick).await.unwrap().is_none(), "a leased job is nobody else's");
        t.queue.fail(&job, &TranscodeError::Io("the blob store is down".into())).await.unwrap();
        assert!(t.queue.claim(Lane::Quick).await.unwrap().is_none(), "a failed attempt backs off");
        t.clock.advance(AN_HOUR);
    }
    assert_eq!(status(&t, &blob).await, (MediaStatus::Failed, false));
    let failed = t.queue.job(&blob).await.unwrap().unwrap();
    assert_eq!(failed.error.unwrap().code, "storage_error");
    assert!(t.queue.claim(Lane::Quick).await.unwrap().is_none());
    assert_eq!(t.queue.queued().await.unwrap(), 0);

    // Uploading the same bytes again gives a job that failed for a passing reason another go.
    upload(&t, b"photo").await;
    assert_eq!(status(&t, &blob).await, (MediaStatus::Processing, false));
    assert!(t.queue.job(&blob).await.unwrap().unwrap().error.is_none());
    assert_eq!(t.queue.claim(Lane::Quick).await.unwrap().unwrap().attempts, 1);
}

async fn permanent_failures_end_at_once_and_stay_failed(t: Tables) {
    let blob = upload(&t, b"not really a jpeg").await;
    let job = t.queue.claim(Lane::Quick).await.unwrap().unwrap();
    t.queue.fail(&job, &TranscodeError::Corrupt("bad huffman table".into())).await.unwrap();
    assert_eq!(status(&t, &blob).await, (MediaStatus::Failed, true));
    upload(&t, b"not really a jpeg").await;
    assert_eq!(status(&t, &blob).await, (MediaStatus::Failed, true));
    t.clock.advance(AN_HOUR);
    assert!(t.queue.claim(Lane::Quick).await.unwrap().is_none());
}

async fn a_dead_runners_lease_expires(t: Tables) {
    let first = upload(&t, b"one").await;
    let second = upload(&t, b"two").await;
    let a = t.queue.claim(Lane::Quick).await.unwrap().unwrap();
    let b = t.queue.claim(Lane::Quick).await.unwrap().unwrap();
    assert_ne!(a.blob, b.blob);
    assert!([first, second].contains(&a.blob) && [first, second].contains(&b.blob));
    assert!(t.queue.claim(Lane::Quick).await.unwrap().is_none());

    // The runner holding `a` died and `b`'s kept its lease: once a's lease runs out, a alone is
    // claimed again.
    t.clock.advance(JobConfig::default().lease_secs as i64 * 1000 / 2);
    assert!(t.queue.heartbeat(&b, None).await.unwrap());
    t.clock.advance(JobConfig::default().lease_secs as i64 * 1000 / 2 + 1);
    let again = t.queue.claim(Lane::Quick).await.unwrap().unwrap();
    assert_eq!((again.blob, again.attempts), (a.blob, 2));
    assert!(t.queue.claim(Lane::Quick).await.unwrap().is_none());

    // The first runner comes back: it no longer speaks for the job, whatever it reports.
    assert!(!t.queue.heartbeat(&a, None).await.unwrap());
    assert!(!t.queue.fail(&a, &TranscodeError::Corrupt("too late".into())).await.unwrap());
    assert_eq!(status(&t, &a.blob).await, (MediaStatus::Processing, false));
    assert_eq!(t.queue.queued().await.unwrap(), 2);
    assert!(t.queue.complete(&again, &JobResult::default(), &[]).await.unwrap().recorded);
    assert!(!t.queue.complete(&a, &JobResult::default(), &[]).await.unwrap().recorded);
    assert_eq!(t.queue.queued().await.unwrap(), 1);
    assert_eq!(status(&t, &a.blob).await, (MediaStatus::Ready, false));
}

async fn records_are_read_by_their_owner_and_those_shared_with(t: Tables) {
    let bob: UserId = "bob".parse().unwrap();
    let carol: UserId = "carol".parse().unwrap();
    let (id, blob) = upload_as(&t, &alice(), b"a photo", MediaKind::Image).await;
    let row = t.records.media(id).await.unwrap().unwrap();
    assert_eq!((row.owner.as_str(), row.kind, row.blob), ("alice", MediaKind::Image, blob));
    assert_eq!(row.job.status, MediaStatus::Processing);
    assert!(t.records.may_read(id, &alice()).await.unwrap());
    assert!(!t.records.may_read(id, &bob).await.unwrap());
    t.records.grant(id, &[bob.clone(), carol.clone()], "c1/1").await.unwrap();
    t.records.grant(id, std::slice::from_ref(&bob), "c1/1").await.unwrap();
    t.records.grant(id, std::slice::from_ref(&bob), "c2/7").await.unwrap();
    assert!(t.records.may_read(id, &bob).await.unwrap() && t.records.may_read(id, &carol).await.unwrap());
    // Taking back one message's grants leaves what another message granted.
    assert_eq!(t.records.revoke(id, "c1/1").await.unwrap(), 2);
    assert!(t.records.may_read(id, &bob).await.unwrap(), "bob still has it through c2/7");
    assert!(!t.records.may_read(id, &carol).await.unwrap());
    assert_eq!(t.records.revoke(id, "c2/7").await.unwrap(), 1);
    assert!(!t.records.may_read(id, &bob).await.unwrap());
    assert!(t.records.may_read(id, &alice()).await.unwrap(), "the owner keeps it");
    assert!(!t.records.may_read(MediaId::new(), &alice()).await.unwrap());
    assert!(t.records.media(MediaId::new()).await.unwrap().is_none());
}

fn result_naming(variants: &[BlobId]) -> JobResult {
    let mut result = JobResult::default();
    for (name, blob) in [VariantName::Standard, VariantName::Thumb].into_iter().zip(variants) {
        let variant = StoredVariant { blob: *blob, mime: "image/jpeg".into(), width: None, height: None, bytes: 1 };
        result.variants.insert(name, variant);
    }
    result
}

async fn deleting_keeps_what_other_uploads_still_need(t: Tables) {
    let bob: UserId = "bob".parse().unwrap();
    // Alice and bob upload the same bytes: one job.
    let (alices, blob) = upload_as(&t, &alice(), b"the same photo", MediaKind::Image).await;
    let (bobs, _) = upload_as(&t, &bob, b"the same photo", MediaKind::Image).await;
    let (standard, shared) = (BlobId::of(b"standard"), BlobId::of(b"a variant another job made too"));
    let job = t.queue.claim(Lane::Quick).await.unwrap().unwrap();
    assert!(t.queue.complete(&job, &result_naming(&[standard, shared]), &[]).await.unwrap().recorded);
    // Another upload whose transcode came out as one of the same variants.
    let other = upload(&t, b"another photo").await;
    let job = t.queue.claim(Lane::Quick).await.unwrap().unwrap();
    assert_eq!(job.blob, other);
    assert!(t.queue.complete(&job, &result_naming(&[shared]), &[]).await.unwrap().recorded);
    t.records.grant(alices, std::slice::from_ref(&bob), "c1/1").await.unwrap();

    assert!(matches!(t.records.delete(alices, &bob).await.unwrap(), Deleted::NotFound), "only the owner deletes");
    assert!(matches!(t.records.delete(alices, &alice()).await.unwrap(), Deleted::Kept));
    assert!(t.records.media(alices).await.unwrap().is_none());
    assert!(!t.records.may_read(alices, &bob).await.unwrap(), "the grants went with it");
    assert_eq!(status(&t, &blob).await.0, MediaStatus::Ready, "bob's upload keeps the job");
    match t.records.delete(bobs, &bob).await.unwrap() {
        Deleted::Orphaned { source } => assert_eq!(source, blob),
        other => panic!("expected the job to go, got {other:?}"),
    }
    // Its blobs are logged for the sweep: the original, and the variant no other job names.
    let logged: Vec<(Namespace, BlobId)> = pending(&t).await.into_iter().map(|d| (d.namespace, d.blob)).collect();
    assert_eq!(logged, vec![(Namespace::Originals, blob), (Namespace::Variants, standard)]);
    assert!(t.queue.job(&blob).await.unwrap().is_none());
    assert!(matches!(t.records.delete(bobs, &bob).await.unwrap(), Deleted::NotFound));
}

async fn a_refused_upload_is_forgotten(t: Tables) {
    let (first, blob) = upload_as(&t, &alice(), b"bytes", MediaKind::Image).await;
    let (second, _) = upload_as(&t, &alice(), b"bytes", MediaKind::Image).await;
    assert!(t.records.forget_upload(second, &blob).await.unwrap().is_none(), "the first upload still needs the job");
    assert!(t.records.media(second).await.unwrap().is_none());
    assert!(t.records.forget_upload(first, &blob).await.unwrap().is_some(), "nothing refers to the bytes now");
    let logged: Vec<(Namespace, BlobId)> = pending(&t).await.into_iter().map(|d| (d.namespace, d.blob)).collect();
    assert_eq!(logged, vec![(Namespace::Originals, blob)], "its original is logged for deletion");
    assert!(t.queue.job(&blob).await.unwrap().is_none());
}

async fn concurrent_claims_take_each_job_once(t: Tables) {
    let mut uploaded = Vec::new();
    for n in 0..12u8 {
        uploaded.push(upload(&t, &[n; 8]).await);
    }
    // Twice as many runners as jobs claim at once, as runners on several nodes would.
    let claims = (0..24).map(|_| {
        let queue = t.queue.clone();
        tokio::spawn(async move { queue.claim(Lane::Quick).await.unwrap().map(|job| job.blob) })
    });
    let mut claimed: Vec<BlobId> = Vec::new();
    for claim in claims.collect::<Vec<_>>() {
        claimed.extend(claim.await.unwrap());
    }
    claimed.sort_by_key(|b| b.to_hex());
    uploaded.sort_by_key(|b| b.to_hex());
    assert_eq!(claimed, uploaded, "each job claimed exactly once");
}

async fn an_old_claim_never_speaks_for_a_new_job(t: Tables) {
    // A runner is working on an upload when its owner deletes it (on another node, say), and the
    // same bytes are uploaded again: the new job's first claim has the old one's attempt number.
    let (id, blob) = upload_as(&t, &alice(), b"bytes", MediaKind::Image).await;
    let old = t.queue.claim(Lane::Quick).await.unwrap().unwrap();
    assert!(matches!(t.records.delete(id, &alice()).await.unwrap(), Deleted::Orphaned { .. }));
    assert!(!t.queue.heartbeat(&old, None).await.unwrap(), "its job is gone");
    upload(&t, b"bytes").await;
    let new = t.queue.claim(Lane::Quick).await.unwrap().unwrap();
    assert_eq!((new.blob, new.attempts), (old.blob, old.attempts));
    assert!(!t.queue.heartbeat(&old, None).await.unwrap(), "the old runner does not hold the new claim");
    assert!(!t.queue.fail(&old, &TranscodeError::Corrupt("its original was deleted".into())).await.unwrap());
    assert_eq!(status(&t, &blob).await, (MediaStatus::Processing, false));
    assert!(t.queue.heartbeat(&new, None).await.unwrap());
    assert!(t.queue.complete(&new, &JobResult::default(), &[]).await.unwrap().recorded);
}

async fn usage_counts_a_users_bytes_by_day_and_in_all(t: Tables) {
    let (alice, bob): (UserId, UserId) = (alice(), "bob".parse().unwrap());
    let usage = |user: UserId| {
        let (records, now) = (&t.records, t.clock.now_ms());
        async move { records.usage(&user, now).await.unwrap() }
    };
    assert_eq!(usage(alice.clone()).await, Usage::default());
    let (first, _) = upload_as(&t, &alice, b"first upload", MediaKind::Image).await; // 12 bytes
    upload_as(&t, &alice, b"second", MediaKind::Image).await; // 6 bytes
    upload_as(&t, &bob, b"bob's", MediaKind::Image).await;
    assert_eq!(usage(alice.clone()).await, Usage { stored_bytes: 18, bytes_today: 18, queued_jobs: 2 });
    assert_eq!(usage(bob.clone()).await, Usage { stored_bytes: 5, bytes_today: 5, queued_jobs: 1 });

    // Deleting frees what is stored, not the day's count.
    t.records.delete(first, &alice).await.unwrap();
    assert_eq!(usage(alice.clone()).await, Usage { stored_bytes: 6, bytes_today: 18, queued_jobs: 1 });
    // An upload its job refused is forgotten, but its bytes were received: they stay counted.
    let (refused, blob) = upload_as(&t, &alice, b"refused!", MediaKind::Image).await;
    t.records.forget_upload(refused, &blob).await.unwrap();
    assert_eq!(usage(alice.clone()).await, Usage { stored_bytes: 6, bytes_today: 26, queued_jobs: 1 });

    // A day later the count starts again; what is stored stays.
    t.clock.advance(crate::store::DAY_MS);
    assert_eq!(usage(alice.clone()).await, Usage { stored_bytes: 6, bytes_today: 0, queued_jobs: 0 });
    upload_as(&t, &alice, b"next day", MediaKind::Image).await;
    assert_eq!(usage(alice).await, Usage { stored_bytes: 14, bytes_today: 8, queued_jobs: 1 });
}

async fn originals_retire_after_success_and_every_deletion_is_logged(t: Tables) {
    let (id, blob) = upload_as(&t, &alice(), b"a photo", MediaKind::Image).await;
    let failing = upload(&t, b"bytes that fail").await;
    let now = t.clock.now_ms();
    assert_eq!(t.store.retire_originals(now, now, 10).await.unwrap(), 0, "nothing has succeeded yet");
    let job = t.queue.claim(Lane::Quick).await.unwrap().unwrap();
    let other = t.queue.claim(Lane::Quick).await.unwrap().unwrap();
    let (done, failed) = if job.blob == blob { (job, other) } else { (other, job) };
    assert_eq!(failed.blob, failing);
    assert!(t.queue.complete(&done, &result_naming(&[BlobId::of(b"its variant")]), &[]).await.unwrap().recorded);
    assert!(t.queue.fail(&failed, &TranscodeError::Corrupt("broken".into())).await.unwrap());

    // Kept while younger than the window, retired once past it (a failed job's original never is).
    let finished = t.clock.now_ms();
    assert_eq!(t.store.retire_originals(finished - 1, finished, 10).await.unwrap(), 0);
    t.clock.advance(1_000);
    assert_eq!(t.store.retire_originals(finished, t.clock.now_ms(), 10).await.unwrap(), 1);
    assert_eq!(t.store.retire_originals(t.clock.now_ms(), t.clock.now_ms(), 10).await.unwrap(), 0, "once");
    let retired = pending(&t).await;
    assert_eq!(retired.iter().map(|d| (d.namespace, d.blob)).collect::<Vec<_>>(), vec![(Namespace::Originals, blob)]);
    assert!(t.store.claim_deletion(retired[0].seq, t.clock.now_ms()).await.unwrap(), "nothing needs it");
    // The same bytes uploaded again still share the variants: the job stays ready.
    let (again, _) = upload_as(&t, &alice(), b"a photo", MediaKind::Image).await;
    assert_eq!(status(&t, &blob).await.0, MediaStatus::Ready);
    t.store.deletions_done(&[retired[0].seq]).await.unwrap();
    assert!(pending(&t).await.is_empty());

    // Deleted with its job and uploaded once more, the bytes need their original again: the new
    // job takes its pending deletion back (and would be seen as needing it anyway).
    t.records.delete(id, &alice()).await.unwrap();
    assert!(matches!(t.records.delete(again, &alice()).await.unwrap(), Deleted::Orphaned { .. }));
    let logged = pending(&t).await;
    let original = logged.iter().find(|d| d.namespace == Namespace::Originals).unwrap().clone();
    upload(&t, b"a photo").await;
    assert!(!t.store.claim_deletion(original.seq, t.clock.now_ms()).await.unwrap(), "a new job reads it");
    let logged = pending(&t).await;
    assert_eq!(logged.iter().map(|d| d.namespace).collect::<Vec<_>>(), vec![Namespace::Variants]);
    // A job that completes naming that variant (its transcode came out the same) keeps it.
    let job = t.queue.claim(Lane::Quick).await.unwrap().unwrap();
    assert!(t.queue.complete(&job, &result_naming(&[logged[0].blob]), &[]).await.unwrap().recorded);
    assert!(pending(&t).await.is_empty());

    // The feed an edge purge follows: every deletion, in order, from a cursor.
    let all = t.store.deleted_since(0, 100, i64::MAX).await.unwrap();
    assert_eq!(all.len(), 3);
    assert!(all.windows(2).all(|w| w[0].seq < w[1].seq));
    let rest = t.store.deleted_since(all[0].seq, 100, i64::MAX).await.unwrap();
    assert_eq!(rest, all[1..].to_vec());
}

async fn media_nothing_references_expire_and_shared_bytes_stay_while_referenced(t: Tables) {
    let (unsent, retention) = (1_000, 5_000);
    let expire = |t: &Tables| {
        let (store, now) = (t.store.clone(), t.clock.now_ms());
        async move { store.expire_media(now, unsent, retention, 100).await.unwrap() }
    };
    let (never_sent, never_sent_blob) = upload_as(&t, &alice(), b"never sent", MediaKind::Image).await;
    let (sent, sent_blob) = upload_as(&t, &alice(), b"sent in a message", MediaKind::Image).await;
    t.records.grant(sent, &[alice()], "c1/1").await.unwrap();
    // Two records of the same bytes: one sent, one not.
    let (kept, twice) = upload_as(&t, &alice(), b"uploaded twice", MediaKind::Image).await;
    let (dropped, _) = upload_as(&t, &"bob".parse().unwrap(), b"uploaded twice", MediaKind::Image).await;
    t.records.grant(kept, &[alice()], "c1/2").await.unwrap();

    assert!(expire(&t).await.is_empty(), "nothing is a day old");
    t.clock.advance(unsent);
    assert_eq!(expire(&t).await, vec![never_sent_blob], "the never-sent record went, with its job");
    assert!(t.records.media(never_sent).await.unwrap().is_none());
    assert!(t.records.media(dropped).await.unwrap().is_none(), "bob's unsent copy went too");
    assert!(t.queue.job(&twice).await.unwrap().is_some(), "but alice's sent copy keeps the job");
    let logged: Vec<BlobId> = pending(&t).await.into_iter().map(|d| d.blob).collect();
    assert_eq!(logged, vec![never_sent_blob]);

    // Referenced, a record stays past any age; its message gone, it goes after the retention.
    t.clock.advance(retention * 2);
    assert!(expire(&t).await.is_empty());
    assert!(t.records.media(sent).await.unwrap().is_some());
    assert_eq!(t.records.revoke(sent, "c1/1").await.unwrap(), 1);
    assert_eq!(t.records.revoke(kept, "c1/2").await.unwrap(), 1);
    let mut gone = expire(&t).await;
    gone.sort_by_key(|b| b.to_hex());
    let mut expected = vec![sent_blob, twice];
    expected.sort_by_key(|b| b.to_hex());
    assert_eq!(gone, expected, "uploaded long ago and no longer referenced");
    assert!(t.records.media(kept).await.unwrap().is_none());
    // A grant that comes before the sweep keeps a record (and a revocation that leaves another
    // grant does not make it a candidate).
    let (fresh, _) = upload_as(&t, &alice(), b"fresh", MediaKind::Image).await;
    t.records.grant(fresh, &[alice()], "c2/1").await.unwrap();
    t.records.grant(fresh, &[alice()], "c2/2").await.unwrap();
    t.records.revoke(fresh, "c2/1").await.unwrap();
    t.clock.advance(retention * 2);
    assert!(expire(&t).await.is_empty());
    assert!(t.records.media(fresh).await.unwrap().is_some());
}

async fn stored_bytes_follow_originals_and_variants(t: Tables) {
    let stored = |user: UserId| {
        let (records, now) = (&t.records, t.clock.now_ms());
        async move { records.usage(&user, now).await.unwrap().stored_bytes }
    };
    let bob: UserId = "bob".parse().unwrap();
    let (alices, blob) = upload_as(&t, &alice(), b"a photo", MediaKind::Image).await; // 7 bytes
    upload_as(&t, &bob, b"a photo", MediaKind::Image).await;
    assert_eq!((stored(alice()).await, stored(bob.clone()).await), (7, 7), "each pays for what they uploaded");
    let totals = t.store.stored_totals().await.unwrap();
    assert_eq!((totals.originals, totals.original_bytes, totals.variants), (1, 7, 0), "stored once");

    // The job makes two variants (a byte each): the original and its variants are stored.
    let job = t.queue.claim(Lane::Quick).await.unwrap().unwrap();
    let variants = [BlobId::of(b"standard"), BlobId::of(b"thumb")];
    assert!(t.queue.complete(&job, &result_naming(&variants), &[]).await.unwrap().recorded);
    assert_eq!(stored(alice()).await, 9);
    // Its original retired, only the variants are.
    let now = t.clock.now_ms();
    assert_eq!(t.store.retire_originals(now, now, 10).await.unwrap(), 1);
    assert_eq!(stored(alice()).await, 2);
    let totals = t.store.stored_totals().await.unwrap();
    assert_eq!(
        totals,
        crate::store::StoredTotals {
            originals: 0,
            original_bytes: 0,
            variants: 2,
            variant_bytes: 2,
            pending_deletions: 1
        }
    );
    // Deleting frees the user's share; the bytes stay while bob's upload names them.
    t.records.delete(alices, &alice()).await.unwrap();
    assert_eq!((stored(alice()).await, stored(bob).await), (0, 2));
    assert_eq!(t.store.stored_totals().await.unwrap().variants, 2);
    assert_eq!(status(&t, &blob).await.0, MediaStatus::Ready);
}

async fn a_writer_sees_a_deletion_in_flight_and_no_variant_is_left_unlogged(t: Tables) {
    // A photo is transcoded, then deleted: its original and variant are logged for deletion.
    let (id, blob) = upload_as(&t, &alice(), b"a photo", MediaKind::Image).await;
    let variant = BlobId::of(b"its variant");
    let job = t.queue.claim(Lane::Quick).await.unwrap().unwrap();
    assert!(t.queue.complete(&job, &result_naming(&[variant]), &[]).await.unwrap().recorded);
    assert!(matches!(t.records.delete(id, &alice()).await.unwrap(), Deleted::Orphaned { .. }));
    let logged = pending(&t).await;
    let seq_of = |namespace| logged.iter().find(|d| d.namespace == namespace).unwrap().seq;
    let (original_seq, variant_seq) = (seq_of(Namespace::Originals), seq_of(Namespace::Variants));

    // A sweep claims both: no other sweep takes them while the claims stand.
    let now = t.clock.now_ms();
    assert!(t.store.claim_deletion(original_seq, now).await.unwrap());
    assert!(t.store.claim_deletion(variant_seq, now).await.unwrap());
    assert!(!t.store.claim_deletion(variant_seq, now).await.unwrap(), "held by the first sweep");
    assert!(pending(&t).await.is_empty());

    // The same bytes are uploaded again meanwhile: the upload hears of the deletion in flight,
    // and records nothing until it has stored the original again after it.
    let media =
        NewMedia { id: MediaId::new(), owner: &alice(), kind: MediaKind::Image, blob, mime: "image/jpeg", bytes: 7 };
    let overlaps = t.records.record_upload(&media, t.clock.now_ms(), &[]).await.unwrap();
    assert_eq!(overlaps.iter().map(|o| (o.seq, o.blob)).collect::<Vec<_>>(), vec![(original_seq, blob)]);
    assert!(t.records.media(media.id).await.unwrap().is_none(), "not recorded");
    assert!(!t.store.deletion_settled(original_seq, t.clock.now_ms()).await.unwrap());
    t.store.deletions_done(&[original_seq]).await.unwrap();
    assert!(t.store.deletion_settled(original_seq, t.clock.now_ms()).await.unwrap(), "done: store it again now");
    let again = t.records.record_upload(&media, t.clock.now_ms(), &[original_seq]).await.unwrap();
    assert!(again.is_empty());
    assert!(t.records.media(media.id).await.unwrap().is_some());

    // Its job completes naming the same variant: the runner hears of that deletion too, which
    // settles when its claim lapses (a sweep that died) if nobody finishes it.
    let job = t.queue.claim(Lane::Quick).await.unwrap().unwrap();
    let completed = t.queue.complete(&job, &result_naming(&[variant]), &[]).await.unwrap();
    assert!(!completed.recorded, "not recorded before the variant is stored again");
    assert_eq!(completed.overlaps.iter().map(|o| (o.seq, o.blob)).collect::<Vec<_>>(), vec![(variant_seq, variant)]);
    assert_eq!(status(&t, &blob).await.0, MediaStatus::Processing);
    assert!(!t.store.deletion_settled(variant_seq, t.clock.now_ms()).await.unwrap());
    t.clock.advance(crate::store::DELETION_CLAIM_MS + 1);
    assert!(t.store.deletion_settled(variant_seq, t.clock.now_ms()).await.unwrap());
    let completed = t.queue.complete(&job, &result_naming(&[variant]), &[variant_seq]).await.unwrap();
    assert!(completed.recorded && completed.overlaps.is_empty());
    // The lapsed claim was taken back by the job that names the variant now.
    assert!(pending(&t).await.is_empty());
    assert!(!t.store.claim_deletion(variant_seq, t.clock.now_ms()).await.unwrap(), "kept");

    // A job whose media is deleted mid-transcode: what its runner stored is logged, unless named.
    let (id, _) = upload_as(&t, &alice(), b"deleted while transcoding", MediaKind::Image).await;
    let job = t.queue.claim(Lane::Quick).await.unwrap().unwrap();
    assert!(matches!(t.records.delete(id, &alice()).await.unwrap(), Deleted::Orphaned { .. }));
    let made = BlobId::of(b"made for nobody");
    let completed = t.queue.complete(&job, &result_naming(&[made, variant]), &[]).await.unwrap();
    assert!(!completed.recorded && completed.overlaps.is_empty());
    let logged: Vec<(Namespace, BlobId)> = pending(&t).await.into_iter().map(|d| (d.namespace, d.blob)).collect();
    assert_eq!(logged, vec![(Namespace::Originals, job.blob), (Namespace::Variants, made)]);
}

async fn resumable_uploads_keep_their_offset_their_parts_and_one_writer(t: Tables) {
    use crate::store::{Advance, NewUpload, Part};
    let now = t.clock.now_ms();
    let key = |name: &str| BlobId::of(name.as_bytes()).to_hex();
    let owner = alice();
    let new =
        |id, length| NewUpload { id, owner: &owner, mime: "image/jpeg", length, metadata: "", expires_at: now + 1000 };
    let id = MediaId::new();
    t.store.create_upload(&new(id, None), now).await.unwrap();
    assert_eq!(t.store.open_uploads(&alice(), now).await.unwrap(), (1, 0));

    // One writer at a time, from the offset the upload stands at.
    assert!(!t.store.lock_upload(id, 5, "w1", now + 100, now).await.unwrap(), "not at that offset");
    assert!(t.store.lock_upload(id, 0, "w1", now + 100, now).await.unwrap());
    assert!(!t.store.lock_upload(id, 0, "w2", now + 100, now).await.unwrap(), "held by w1");
    let advance = |writer, start_at, len, name: &str, head: &'static [u8], length| Advance {
        writer,
        part: Part { start_at, len, key: key(name) },
        head,
        length,
        expires_at: now + 1000,
        // Not logged ahead here (a part logged ahead and never recorded is checked below).
        logged: 0,
    };
    assert!(!t.store.advance_upload(id, &advance("w2", 0, 10, "p1", b"0123456789", None)).await.unwrap(), "not w2's");
    assert!(t.store.advance_upload(id, &advance("w1", 0, 10, "p1", b"0123456789", None)).await.unwrap());
    let row = t.store.upload(id, now).await.unwrap().unwrap();
    assert_eq!((row.upload_offset, row.length, row.head.as_slice(), row.done), (10, None, &b"0123456789"[..], false));
    // A lock that lapsed is anyone's; its holder can no longer move the offset.
    assert!(t.store.lock_upload(id, 10, "w3", now + 100, now).await.unwrap());
    assert!(t.store.lock_upload(id, 10, "w4", now + 300, now + 200).await.unwrap(), "w3's lock lapsed");
    assert!(!t.store.advance_upload(id, &advance("w3", 10, 5, "p2", b"", Some(15))).await.unwrap());
    assert!(t.store.advance_upload(id, &advance("w4", 10, 5, "p2", b"", Some(15))).await.unwrap());
    let parts: Vec<String> = t.store.upload_parts(id).await.unwrap().into_iter().map(|p| p.key).collect();
    assert_eq!(parts, vec![key("p1"), key("p2")]);
    assert_eq!(t.store.open_uploads(&alice(), now).await.unwrap(), (1, 15));
    // All its bytes and no media yet: the sweep's to finish; finished, its parts are logged.
    assert_eq!(t.store.stuck_uploads(now, 10).await.unwrap(), vec![(id, alice())]);
    t.store.finish_upload(id, now).await.unwrap();
    assert!(t.store.stuck_uploads(now, 10).await.unwrap().is_empty());
    assert!(t.store.upload(id, now).await.unwrap().unwrap().done);
    assert!(t.store.upload_parts(id).await.unwrap().is_empty());
    assert_eq!(t.store.open_uploads(&alice(), now).await.unwrap(), (0, 0));

    // Another, ended by its owner only, and one that expires: their parts are logged too.
    let (ended, deferred) = (MediaId::new(), MediaId::new());
    t.store.create_upload(&new(ended, Some(100)), now).await.unwrap();
    assert!(t.store.lock_upload(ended, 0, "w5", now + 100, now).await.unwrap());
    assert!(t.store.advance_upload(ended, &advance("w5", 0, 7, "p3", b"", None)).await.unwrap());
    assert!(!t.store.delete_upload(ended, &"bob".parse().unwrap(), now).await.unwrap(), "not bob's");
    assert!(t.store.delete_upload(ended, &alice(), now).await.unwrap());
    assert!(t.store.upload(ended, now).await.unwrap().is_none());
    t.store.create_upload(&new(deferred, None), now).await.unwrap();
    assert!(t.store.set_upload_length(deferred, 0).await.unwrap(), "a length at its offset");
    assert!(!t.store.set_upload_length(deferred, 5).await.unwrap(), "named once");
    assert_eq!(t.store.expire_uploads(now + 1000, 10).await.unwrap(), 2, "the finished one's row and the deferred one");
    let parts: Vec<String> =
        pending(&t).await.into_iter().filter(|d| d.namespace == Namespace::Parts).map(|d| d.blob.to_hex()).collect();
    assert_eq!(parts, vec![key("p1"), key("p2"), key("p3")]);
    // What an edge purges never names a part.
    assert!(t.store.deleted_since(0, 100, i64::MAX).await.unwrap().iter().all(|d| d.namespace != Namespace::Parts));

    // A part logged ahead of being stored: taken back when recorded; if never recorded (a crash),
    // deleted once it is due, not before.
    let stored = MediaId::new();
    t.store.create_upload(&new(stored, None), now).await.unwrap();
    let kept = t.store.log_part(&key("p4"), now + 5_000).await.unwrap();
    let lost = t.store.log_part(&key("p5"), now + 5_000).await.unwrap();
    assert!(t.store.lock_upload(stored, 0, "w6", now + 100, now).await.unwrap());
    let recorded = Advance { logged: kept, ..advance("w6", 0, 3, "p4", b"", None) };
    assert!(t.store.advance_upload(stored, &recorded).await.unwrap());
    let due = |at: i64| {
        let store = t.store.clone();
        async move {
            let pending = store.pending_deletions(100, 0, at).await.unwrap();
            pending.into_iter().filter(|d| d.namespace == Namespace::Parts).map(|d| d.seq).collect::<Vec<_>>()
        }
    };
    let logged_before: Vec<i64> = due(now + 1_000).await;
    assert!(!logged_before.contains(&lost), "not due yet");
    assert!(!t.store.claim_deletion(lost, now + 1_000).await.unwrap(), "not due yet");
    let after = due(now + 5_000).await;
    assert!(after.contains(&lost) && !after.contains(&kept), "{after:?}");
}

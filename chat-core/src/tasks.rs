//! chat-core's background work: pushes, retention, the cluster's heartbeat, and tidying the rate
//! limiters.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio::sync::watch;

use crate::chat::{Chat, now_ms};
use crate::store::PushIntent;
use types::{ConversationId, UserId};

/// Tries per push before it is dropped.
const PUSH_ATTEMPTS: i64 = 10;
/// Push intents claimed per round.
const PUSH_BATCH: i64 = 100;
/// How long a claim on push intents holds: a node that dies mid-push leaves them to another
/// after this long.
const PUSH_LEASE_MS: i64 = 60_000;
/// The longest the push worker sleeps: intents other nodes wrote wake nobody here.
const PUSH_IDLE_MS: i64 = 5_000;
/// Recipient devices named in one webhook call.
const PUSH_TARGETS_PER_CALL: usize = 500;
/// How often large groups' receipts are aggregated.
const AGGREGATE_EVERY: Duration = Duration::from_secs(2);
/// How often messages whose disappearing timer ran out are deleted.
const DISAPPEAR_EVERY: Duration = Duration::from_secs(5);
/// Messages deleted per round of that sweep.
const DISAPPEAR_BATCH: i64 = 500;
/// How often retention runs.
const RETENTION_EVERY: Duration = Duration::from_secs(3600);
/// How often a node of a cluster beats, on the bus and in the directory.
const BEAT: Duration = Duration::from_secs(1);
/// How long after its last beat a node still counts as alive.
const ALIVE_FOR_MS: i64 = 10_000;
/// How long a node must have been silent before its directory rows are swept away.
const SWEEP_AFTER_MS: i64 = 60_000;
/// Beats between two sweeps (each node sweeps; deleting a silent node twice is harmless).
const SWEEP_EVERY: u64 = 30;

impl Chat {
    /// Runs the background tasks until `stop` turns true.
    pub async fn run_background(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let push = tokio::spawn(self.clone().push_loop(stop.clone()));
        let beat = tokio::spawn(self.clone().beat_loop(stop.clone()));
        let disappear = tokio::spawn(self.clone().disappear_loop(stop.clone()));
        let receipts = tokio::spawn(self.clone().receipts_loop(stop.clone()));
        // Retention runs at start, beside the traffic (a backlog takes a while), then every hour.
        let mut retention = tokio::time::interval(RETENTION_EVERY);
        loop {
            tokio::select! {
                _ = retention.tick() => {
                    self.purge_old().await;
                    self.sweep_limits().await;
                    self.sweep_link_requests().await;
                }
                _ = stopped(&mut stop) => break,
            }
        }
        push.abort();
        disappear.abort();
        receipts.abort();
        // Leaves the directory before the process goes, so no node sends here meanwhile.
        let _ = beat.await;
    }

    /// A node of a cluster says it is alive before it takes connections, so the first device
    /// that connects here is found by the other nodes at once.
    pub async fn join_cluster(&self) -> Result<(), crate::StoreError> {
        let Some(bus) = &self.bus else { return Ok(()) };
        self.store.node_alive(bus.node(), ALIVE_FOR_MS).await.map(drop)
    }

    /// Every [`BEAT`]: renews this node in the directory and tells the others how far it has
    /// numbered its envelopes to each; now and then sweeps nodes that stopped beating. On stop,
    /// beats a last time, flushes the bus and leaves the directory.
    async fn beat_loop(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let Some(bus) = self.bus.clone() else { return };
        let mut tick = tokio::time::interval(BEAT);
        let mut beats = 0u64;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stopped(&mut stop) => break,
            }
            match self.store.node_alive(bus.node(), ALIVE_FOR_MS).await {
                Ok(true) if beats > 0 => self.rejoin().await,
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "could not renew this node in the directory"),
            }
            // The beat never waits long behind a stuck bus: the directory is what keeps this node
            // reachable.
            let _ = tokio::time::timeout(BEAT / 2, bus.beat()).await;
            beats += 1;
            if beats.is_multiple_of(SWEEP_EVERY) {
                match self.store.sweep_nodes(SWEEP_AFTER_MS).await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(nodes = n, "swept nodes that stopped beating from the directory"),
                    Err(e) => tracing::warn!(error = %e, "could not sweep silent nodes"),
                }
            }
        }
        let _ = tokio::time::timeout(BEAT, async {
            bus.beat().await;
            bus.flush().await;
        })
        .await;
        if let Err(e) = self.store.node_gone(bus.node()).await {
            tracing::warn!(error = %e, "could not leave the directory; other nodes will count this one gone soon");
        }
    }

    /// This node's row had lapsed: other nodes stopped sending here and may have swept whom it
    /// holds. It records its users again, then has every connection catch up.
    async fn rejoin(&self) {
        let Some(bus) = &self.bus else { return };
        tracing::warn!("this node had lapsed from the directory; recording its users again and resyncing");
        for user in self.hub.user_ids() {
            if let Err(e) = self.store.present(&user, bus.node()).await {
                tracing::warn!(error = %e, %user, "could not record a user again");
            }
        }
        self.hub.resync_all();
    }

    /// Every [`AGGREGATE_EVERY`], tells the senders of the large groups whose receipts moved how
    /// far every other member has got (see [`Chat::aggregate_receipts`]).
    async fn receipts_loop(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(AGGREGATE_EVERY);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stopped(&mut stop) => return,
            }
            let moved: Vec<ConversationId> =
                std::mem::take(&mut *self.receipts_moved.lock().unwrap_or_else(std::sync::PoisonError::into_inner))
                    .into_iter()
                    .collect();
            for conversation in moved {
                if let Err(e) = self.aggregate_receipts(&conversation).await {
                    tracing::warn!(error = %e, %conversation, "could not aggregate a group's receipts; trying again");
                    self.receipts_moved.lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert(conversation);
                }
            }
        }
    }

    /// Every [`DISAPPEAR_EVERY`], deletes the messages whose conversation's timer ran out (each
    /// keeps a tombstone: the log stays gapless; clients delete their copies at `expires_at`), then
    /// takes back the media grants of deleted and disappeared messages, which their tombstones'
    /// transactions queued. Any node may run it at once with another: every step is idempotent,
    /// and a crash between them only leaves the queue for the next round.
    async fn disappear_loop(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(DISAPPEAR_EVERY);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stopped(&mut stop) => return,
            }
            drain("deleting disappearing messages", || self.disappear_due()).await;
            drain("taking back deleted messages' media", || self.revoke_due()).await;
        }
    }

    /// Takes back the media grants of up to [`DISAPPEAR_BATCH`] deleted messages; returns how many.
    async fn revoke_due(&self) -> Result<usize, crate::StoreError> {
        let due = self.store.due_revocations(DISAPPEAR_BATCH).await?;
        let mut done = Vec::with_capacity(due.len());
        for (conversation, seq, media) in due {
            let source = crate::chat::media_source(&conversation, seq);
            match media.parse::<types::MediaId>() {
                Ok(id) => {
                    if let Err(e) = self.media.unshare(id, &source).await {
                        tracing::warn!(error = %e, %conversation, seq, "could not take back a deleted message's media");
                        continue;
                    }
                }
                Err(_) => tracing::error!(%conversation, seq, "a deleted message named no valid media id"),
            }
            done.push((conversation, seq));
        }
        self.store.revoked(&done).await?;
        Ok(done.len())
    }

    /// One round of [`Chat::disappear_loop`]; returns how many messages it deleted. Their media
    /// grants are queued for [`Chat::revoke_due`] with each tombstone, in one transaction: a share
    /// that lands later sees the tombstone and takes itself back.
    async fn disappear_due(&self) -> Result<usize, crate::StoreError> {
        let due = self.store.due_expiries(now_ms(), DISAPPEAR_BATCH).await?;
        self.store.expire(&due).await?;
        Ok(due.len())
    }

    /// Deletes messages past `chat.retention_days`.
    pub async fn purge_old(&self) {
        let days = self.config.retention_days;
        if days == 0 {
            return;
        }
        let before = now_ms() - i64::from(days) * 86_400_000;
        match self.store.purge_before(before).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(messages = n, days, "retention purged old messages"),
            Err(e) => tracing::error!(error = %e, "retention purge failed"),
        }
    }

    /// Pushes messages that recipient devices have not acked by their intent's due time. Every
    /// node runs this; claims keep two from pushing one message.
    async fn push_loop(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let Some(url) = self.config.push_webhook_url.clone() else { return };
        let client = match reqwest::Client::builder().timeout(Duration::from_secs(10)).build() {
            Ok(c) => c,
            Err(e) => return tracing::error!(error = %e, "could not build the push webhook client"),
        };
        loop {
            let claimed = match self.store.claim_pushes(now_ms(), PUSH_LEASE_MS, PUSH_BATCH).await {
                Ok(claimed) => claimed,
                Err(e) => {
                    tracing::error!(error = %e, "could not claim due pushes");
                    Vec::new()
                }
            };
            let busy = claimed.len() as i64 == PUSH_BATCH;
            // One push per conversation and sender a round: the sender's newest message stands for
            // their others (whom to push depends on who sent it: never the sender).
            let mut by_sender: HashMap<(ConversationId, UserId), Vec<PushIntent>> = HashMap::new();
            for intent in claimed {
                by_sender.entry((intent.conversation, intent.sender.clone())).or_default().push(intent);
            }
            let round = std::time::Instant::now();
            for intents in by_sender.into_values() {
                // Claims run out: what is left is claimed again (here or elsewhere) once they do,
                // never pushed by two nodes at once.
                if round.elapsed() > Duration::from_millis(PUSH_LEASE_MS as u64 / 2) {
                    break;
                }
                self.push(&client, &url, intents).await;
            }
            if busy {
                continue;
            }
            let wait_ms = match self.store.next_push_due().await {
                Ok(Some(due)) => (due - now_ms()).clamp(10, PUSH_IDLE_MS),
                Ok(None) => PUSH_IDLE_MS,
                Err(e) => {
                    tracing::error!(error = %e, "could not read when the next push is due");
                    PUSH_IDLE_MS
                }
            };
            tokio::select! {
                _ = self.push_wake.notified() => {}
                _ = tokio::time::sleep(Duration::from_millis(wait_ms as u64)) => {}
                _ = stopped(&mut stop) => return,
            }
        }
    }

    /// Pushes the devices that have not acked the newest of `intents` (one sender's in one
    /// conversation), then drops the intents, or has them tried again later if the notifier failed
    /// (a call that failed after others went through makes those again: pushes are at least once).
    async fn push(&self, client: &reqwest::Client, url: &str, intents: Vec<PushIntent>) {
        let Some(newest) = intents.iter().max_by_key(|i| i.seq) else { return };
        let attempts = intents.iter().map(|i| i.attempts).max().unwrap_or(1);
        let delivered = match self.store.push_targets(newest).await {
            Ok(targets) => {
                let mut delivered = true;
                for chunk in targets.chunks(PUSH_TARGETS_PER_CALL) {
                    let recipients: Vec<_> =
                        chunk.iter().map(|t| json!({"user": t.user, "device": t.device})).collect();
                    let body = json!({
                        "conversation": newest.conversation,
                        "seq": newest.seq,
                        "sender": newest.sender,
                        "recipients": recipients,
                    });
                    delivered = match client.post(url).json(&body).send().await {
                        Ok(r) if r.status().is_success() => true,
                        Ok(r) => {
                            tracing::warn!(status = %r.status(), conversation = %newest.conversation, "the push webhook refused a push");
                            false
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "the push webhook is unreachable");
                            false
                        }
                    };
                    if !delivered {
                        break;
                    }
                }
                delivered
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not read whom to push");
                false
            }
        };
        let result = if delivered {
            self.store.pushes_done(&intents).await
        } else if attempts >= PUSH_ATTEMPTS {
            tracing::error!(conversation = %newest.conversation, seq = newest.seq, "dropping a push after {PUSH_ATTEMPTS} tries");
            self.store.pushes_done(&intents).await
        } else {
            // 2 s, 4 s, 8 s … capped at an hour.
            let delay_ms = (1_000i64 << attempts.min(12)).min(3_600_000);
            self.store.retry_pushes(&intents, now_ms() + delay_ms).await
        };
        if let Err(e) = result {
            // The claim's lease runs out and the intents are tried again.
            tracing::error!(error = %e, "could not record a push's outcome");
        }
    }
}

/// Runs `round` while it finds a full batch ([`DISAPPEAR_BATCH`]) to do; an error ends it until
/// the next tick.
async fn drain<F, R>(what: &str, mut round: F)
where
    F: FnMut() -> R,
    R: std::future::Future<Output = Result<usize, crate::StoreError>>,
{
    loop {
        match round().await {
            Ok(n) if n == DISAPPEAR_BATCH as usize => continue,
            Ok(_) => return,
            Err(e) => return tracing::error!(error = %e, "{what} failed"),
        }
    }
}

async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

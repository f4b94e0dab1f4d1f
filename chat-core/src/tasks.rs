//! chat-core's background work: the push outbox, retention, and tidying the rate limiters.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio::sync::watch;

use crate::chat::{Chat, now_ms};
use crate::store::PendingPush;

/// Tries per notification before it is dropped.
const PUSH_ATTEMPTS: i64 = 10;
/// Pushes taken from the outbox per round.
const PUSH_BATCH: i64 = 100;
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

    async fn push_loop(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let Some(url) = self.config.push_webhook_url.clone() else { return };
        let client = match reqwest::Client::builder().timeout(Duration::from_secs(10)).build() {
            Ok(c) => c,
            Err(e) => return tracing::error!(error = %e, "could not build the push webhook client"),
        };
        loop {
            let due = match self.store.due_pushes(now_ms(), PUSH_BATCH).await {
                Ok(due) => due,
                Err(e) => {
                    tracing::error!(error = %e, "could not read the push outbox");
                    Vec::new()
                }
            };
            let busy = due.len() as i64 == PUSH_BATCH;
            for push in due {
                self.deliver_push(&client, &url, &push).await;
            }
            if busy {
                continue;
            }
            tokio::select! {
                _ = self.push_wake.notified() => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = stopped(&mut stop) => return,
            }
        }
    }

    async fn deliver_push(&self, client: &reqwest::Client, url: &str, push: &PendingPush) {
        if !self.online(std::slice::from_ref(&push.user)).await.is_empty() {
            // Connected again: the message reaches them live or by replay.
            return self.log_push(self.store.push_done(push).await);
        }
        let body = json!({
            "user": push.user,
            "conversation": push.conversation,
            "seq": push.seq,
            "sender": push.sender,
        });
        let ok = match client.post(url).json(&body).send().await {
            Ok(r) if r.status().is_success() => true,
            Ok(r) => {
                tracing::warn!(status = %r.status(), user = %push.user, "push webhook refused a notification");
                false
            }
            Err(e) => {
                tracing::warn!(error = %e, "push webhook unreachable");
                false
            }
        };
        let result = if ok {
            self.store.push_done(push).await
        } else if push.attempts + 1 >= PUSH_ATTEMPTS {
            tracing::error!(user = %push.user, conversation = %push.conversation, "dropping a push after {PUSH_ATTEMPTS} tries");
            self.store.push_failed(push, None).await
        } else {
            // 2 s, 4 s, 8 s … capped at an hour.
            let delay_ms = (2_000i64 << push.attempts.min(11)).min(3_600_000);
            self.store.push_failed(push, Some(now_ms() + delay_ms)).await
        };
        self.log_push(result);
    }

    fn log_push(&self, result: Result<(), crate::StoreError>) {
        if let Err(e) = result {
            tracing::error!(error = %e, "could not update the push outbox");
        }
    }
}

async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

//! Fan-out between the nodes of a cluster over NATS, addressed to the nodes that hold the users.
//!
//! Each node has a subject of its own (`{subject}.node.{id}`); the sender looks up which nodes
//! hold the receivers (`chat_presence`, see [`crate::chat`]) and publishes each event once per
//! such node, with the users it holds there. Rare events every node must hear (logouts, changed
//! memberships) go to `{subject}.all`, and so does an event whose receivers could not be looked up.
//!
//! Like the hub, the bus carries wake-ups, not truth: the store has every message, and a connection
//! that misses a wake-up reads the gap when it notices. So that it notices, every envelope from
//! node S to node R carries the next number of the pair (S, R), and every second each node tells
//! all others on `{subject}.beat` how far it has numbered to each. A receiver that sees a number
//! jump, or a beat ahead of what it received, or its NATS connection come back, or NATS dropping
//! messages for it, or a node fall silent (it may have died with envelopes unsent), resyncs its
//! connections from the store ([`Inbound::Resync`]): a lost envelope is made good within a beat
//! (a dead node's within three), without waiting for a later message.
//!
//! Envelopes are authenticated: a BLAKE3 keyed hash over the bytes, with a key derived from the
//! cluster's token-signing key, which every node already shares, and sealed for the subject they
//! travel on. A stranger on the bus cannot forge or alter one; a copy of a numbered one replayed
//! later, or on another subject, is refused. The unnumbered ones on `.all` (logouts, membership
//! changes) can be replayed, to no effect beyond repeating them. Envelopes are not encrypted: run
//! NATS with TLS and with publish and subscribe permissions on the prefix for Courier's nodes
//! only. What a resync repairs is messages (the store has them); a lost receipt, typing or presence
//! frame is not repaired, and a lost logout leaves the device's open connection on another node
//! until it reconnects (its token is refused within 30 s).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use axum::extract::ws::Utf8Bytes;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::{Mutex, mpsc};
use types::{ConversationId, DeviceId, Secret, UserId};

use crate::hub::Event;

/// The context of the envelope key, derived from the token-signing key.
const KEY_CONTEXT: &str = "courier 2026-12-01 chat bus envelope authentication";
/// Bytes of the keyed hash in front of each envelope.
const MAC_LEN: usize = 32;
/// [`Envelope::to`] on the subject every node reads.
const TO_ALL: &str = "all";
/// [`Envelope::to`] on the beat subject.
const TO_BEAT: &str = "beat";
/// Fewest milliseconds between two resyncs of this node's connections: causes that come together
/// (a burst of drops, a reconnect) cost one.
const RESYNC_GAP: std::time::Duration = std::time::Duration::from_millis(500);
/// How often the listener looks for nodes that stopped beating.
const SILENCE_CHECK: std::time::Duration = std::time::Duration::from_secs(1);
/// A node not heard beating for this long is taken for dead (it beats every second).
const SILENT_AFTER: std::time::Duration = std::time::Duration::from_secs(3);
/// Longest wait for the NATS client to take an envelope.
const PUBLISH_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// What travels between nodes.
#[derive(Serialize, Deserialize)]
struct Envelope {
    /// The publishing node, which has delivered locally already.
    node: String,
    /// Whom it is for: a node's id, [`TO_ALL`] or [`TO_BEAT`]. Under the MAC, so a captured
    /// envelope replayed on another subject is refused.
    to: String,
    /// This envelope's number in the (sender, receiver) pair; 0 on the shared subjects.
    seq: u64,
    users: Vec<UserId>,
    event: Wire,
}

#[derive(Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
enum Wire {
    Message {
        conversation: ConversationId,
        seq: i64,
        device: DeviceId,
        frame: String,
    },
    Frame {
        frame: String,
    },
    Logout {
        device: DeviceId,
    },
    /// A conversation's membership changed: drop cached member lists.
    Members {
        conversation: ConversationId,
    },
    /// How far the sender has numbered its envelopes to each node.
    Beat {
        sent: HashMap<String, u64>,
    },
}

/// What a node does with what other nodes publish.
pub(crate) enum Inbound {
    Deliver(Vec<UserId>, Event),
    LogOut(UserId, DeviceId),
    ForgetMembers(ConversationId),
    /// Wake-ups may have been lost: every connection here reads what it missed from the store.
    Resync,
}

/// Counts of what the bus did, for `/metrics`.
#[derive(Debug, Default)]
pub struct BusStats {
    pub published: AtomicU64,
    pub received: AtomicU64,
    /// Envelopes refused: a bad MAC (forged or altered), unreadable, or a replayed number.
    pub refused: AtomicU64,
    /// Times this node resynced its connections (a gap, a reconnect, a slow subscription).
    pub resyncs: AtomicU64,
}

/// A node's connection to the bus (`chat.bus_url`, `courier serve --bus nats://…`).
pub struct Bus {
    client: async_nats::Client,
    subject: String,
    node: String,
    key: [u8; 32],
    /// The last number sent to each node. Taken with the publish, so that numbers reach NATS in
    /// order and a beat never runs ahead of the envelopes it counts.
    sent: Mutex<HashMap<String, u64>>,
    /// Envelopes to other nodes still to drop, for tests of the repair (`chat.test_drop_envelopes`).
    drop: AtomicU32,
    /// The NATS connection came back, or dropped messages: resync. Taken by the listener.
    trouble: std::sync::Mutex<Option<mpsc::UnboundedReceiver<()>>>,
    pub stats: Arc<BusStats>,
}

impl Bus {
    /// Connects to the NATS server at `url` (credentials in the URL, or in the NATS `creds` file
    /// given); subjects start with `subject`. Envelopes are authenticated with a key derived from
    /// `cluster_key`.
    pub async fn connect(
        url: &str,
        creds: Option<&Path>,
        subject: &str,
        cluster_key: &Secret,
        test_drop: u32,
    ) -> Result<Self, async_nats::ConnectError> {
        let (tell, trouble) = mpsc::unbounded_channel();
        let mut options = async_nats::ConnectOptions::new().event_callback(move |event| {
            let tell = tell.clone();
            async move {
                match event {
                    async_nats::Event::Connected | async_nats::Event::SlowConsumer(_) => {
                        let _ = tell.send(());
                    }
                    async_nats::Event::Disconnected => tracing::warn!("lost the bus; reconnecting"),
                    _ => {}
                }
            }
        });
        if let Some(path) = creds {
            options = options.credentials_file(path).await?;
        }
        let client = options.connect(url).await?;
        Ok(Self {
            client,
            subject: subject.to_owned(),
            node: DeviceId::new().to_string(),
            key: blake3::derive_key(KEY_CONTEXT, cluster_key.as_bytes()),
            sent: Mutex::new(HashMap::new()),
            drop: AtomicU32::new(test_drop),
            trouble: std::sync::Mutex::new(Some(trouble)),
            stats: Arc::new(BusStats::default()),
        })
    }

    /// This node's id on the bus (and in `chat_presence`).
    pub fn node(&self) -> &str {
        &self.node
    }

    fn node_subject(&self, node: &str) -> String {
        format!("{}.node.{node}", self.subject)
    }

    fn all_subject(&self) -> String {
        format!("{}.all", self.subject)
    }

    fn beat_subject(&self) -> String {
        format!("{}.beat", self.subject)
    }

    /// MAC ‖ JSON.
    fn seal(&self, envelope: &Envelope) -> Option<Vec<u8>> {
        let json = serde_json::to_vec(envelope).ok()?;
        let mut sealed = Vec::with_capacity(MAC_LEN + json.len());
        sealed.extend_from_slice(blake3::keyed_hash(&self.key, &json).as_bytes());
        sealed.extend_from_slice(&json);
        Some(sealed)
    }

    /// The envelope in `payload` if its MAC is right (compared in constant time).
    fn open(&self, payload: &[u8]) -> Option<Envelope> {
        if payload.len() < MAC_LEN {
            return None;
        }
        let (mac, json) = payload.split_at(MAC_LEN);
        let mac: [u8; MAC_LEN] = mac.try_into().ok()?;
        if blake3::keyed_hash(&self.key, json) != blake3::Hash::from_bytes(mac) {
            return None;
        }
        serde_json::from_slice(json).ok()
    }

    /// Publishes, waiting at most [`PUBLISH_WAIT`] for room in the client's queue: with NATS away,
    /// sends go on (the store has them) and the receivers resync when it is back.
    async fn publish(&self, subject: String, envelope: &Envelope) {
        let Some(payload) = self.seal(envelope) else { return };
        self.stats.published.fetch_add(1, Ordering::Relaxed);
        match tokio::time::timeout(PUBLISH_WAIT, self.client.publish(subject, payload.into())).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "could not publish to the bus"),
            Err(_) => tracing::warn!("the bus is not taking envelopes; receivers resync when it does"),
        }
    }

    /// Sends `event` for `users` to the node that holds them.
    pub(crate) async fn send_to(&self, node: &str, users: Vec<UserId>, event: &Event) {
        let Some(event) = wire(event) else { return };
        let mut sent = self.sent.lock().await;
        let seq = sent.entry(node.to_owned()).or_insert(0);
        *seq += 1;
        let message = matches!(event, Wire::Message { .. });
        let envelope = Envelope { node: self.node.clone(), to: node.to_owned(), seq: *seq, users, event };
        if message && self.drop.load(Ordering::Relaxed) > 0 {
            self.drop.fetch_sub(1, Ordering::Relaxed);
            tracing::warn!(to = node, seq = *seq, "dropping an envelope on purpose (chat.test_drop_envelopes)");
            return;
        }
        self.publish(self.node_subject(node), &envelope).await;
    }

    /// Sends `event` for `users` to every node (their holders could not be looked up).
    pub(crate) async fn send_to_all(&self, users: Vec<UserId>, event: &Event) {
        let Some(event) = wire(event) else { return };
        let envelope = Envelope { node: self.node.clone(), to: TO_ALL.into(), seq: 0, users, event };
        self.publish(self.all_subject(), &envelope).await;
    }

    pub(crate) async fn publish_logout(&self, user: &UserId, device: DeviceId) {
        let envelope = Envelope {
            node: self.node.clone(),
            to: TO_ALL.into(),
            seq: 0,
            users: vec![user.clone()],
            event: Wire::Logout { device },
        };
        self.publish(self.all_subject(), &envelope).await;
    }

    pub(crate) async fn publish_members(&self, conversation: ConversationId) {
        let envelope = Envelope {
            node: self.node.clone(),
            to: TO_ALL.into(),
            seq: 0,
            users: Vec::new(),
            event: Wire::Members { conversation },
        };
        self.publish(self.all_subject(), &envelope).await;
    }

    /// Tells the other nodes how far this one has numbered its envelopes to each.
    pub(crate) async fn beat(&self) {
        let sent = self.sent.lock().await;
        let envelope = Envelope {
            node: self.node.clone(),
            to: TO_BEAT.into(),
            seq: 0,
            users: Vec::new(),
            event: Wire::Beat { sent: sent.clone() },
        };
        self.publish(self.beat_subject(), &envelope).await;
    }

    /// Hands what the client buffered to NATS (before this node goes away).
    pub(crate) async fn flush(&self) {
        if let Err(e) = self.client.flush().await {
            tracing::warn!(error = %e, "could not flush the bus");
        }
    }

    /// Feeds what other nodes publish to `handle` until the subscriptions end. `online` says
    /// whether a user has a connection here.
    pub(crate) async fn listen(
        self: Arc<Self>,
        online: impl Fn(&UserId) -> bool + Send + 'static,
        handle: impl Fn(Inbound) + Send + 'static,
    ) {
        let subscribe = |subject: String| {
            let client = self.client.clone();
            async move { client.subscribe(subject).await }
        };
        let (own, all, beats) = match tokio::try_join!(
            subscribe(self.node_subject(&self.node)),
            subscribe(self.all_subject()),
            subscribe(self.beat_subject())
        ) {
            Ok(subscriptions) => subscriptions,
            Err(e) => return tracing::error!(error = %e, "could not subscribe to the bus"),
        };
        let taken = self.trouble.lock().unwrap_or_else(|e| e.into_inner()).take();
        let Some(mut trouble) = taken else {
            return tracing::error!("the bus has a listener already");
        };
        let mut incoming = futures_util::stream::select_all([own, all, beats]);
        let (own_subject, all_subject, beat_subject) =
            (self.node_subject(&self.node), self.all_subject(), self.beat_subject());
        let mut heard = Heard::default();
        let mut check = tokio::time::interval(SILENCE_CHECK);
        let mut last_resync: Option<tokio::time::Instant> = None;
        loop {
            let message = tokio::select! {
                message = incoming.next() => match message {
                    Some(message) => Some(message),
                    None => break,
                },
                Some(()) = trouble.recv() => {
                    tracing::info!("the bus connection came back or dropped messages");
                    heard.resync_due = true;
                    None
                }
                _ = check.tick() => {
                    heard.check_silence();
                    None
                }
            };
            if let Some(message) = message {
                self.receive(message, (&own_subject, &all_subject, &beat_subject), &mut heard, &online, &handle);
            }
            if heard.resync_due && last_resync.is_none_or(|at| at.elapsed() >= RESYNC_GAP) {
                heard.resync_due = false;
                last_resync = Some(tokio::time::Instant::now());
                self.stats.resyncs.fetch_add(1, Ordering::Relaxed);
                handle(Inbound::Resync);
            }
        }
        tracing::warn!("the bus subscriptions ended");
    }

    /// Checks one message from the bus and hands on what it carries.
    fn receive(
        &self,
        message: async_nats::Message,
        (own_subject, all_subject, beat_subject): (&str, &str, &str),
        heard: &mut Heard,
        online: &impl Fn(&UserId) -> bool,
        handle: &impl Fn(Inbound),
    ) {
        let refuse = |why: &str| {
            self.stats.refused.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(subject = %message.subject, why, "refused an envelope");
        };
        let Some(envelope) = self.open(&message.payload) else {
            tracing::warn!(subject = %message.subject, "refused an envelope that is not from this cluster");
            return refuse("bad MAC");
        };
        if envelope.node == self.node {
            return;
        }
        // The subject it came on must be the one it was sealed for, and only a node's own
        // subject carries numbered envelopes.
        let subject = message.subject.as_str();
        let addressed = if subject == own_subject {
            envelope.to == self.node && envelope.seq > 0
        } else if subject == all_subject {
            envelope.to == TO_ALL && envelope.seq == 0
        } else {
            subject == beat_subject && envelope.to == TO_BEAT && matches!(envelope.event, Wire::Beat { .. })
        };
        if !addressed {
            return refuse("sealed for another subject");
        }
        self.stats.received.fetch_add(1, Ordering::Relaxed);
        if let Wire::Beat { sent } = &envelope.event {
            heard.beat(&envelope.node, sent.get(&self.node).copied().unwrap_or(0));
            return;
        }
        if envelope.seq > 0 && !heard.numbered(&envelope.node, envelope.seq) {
            return refuse("a number already seen");
        }
        // Only users connected here matter.
        let users: Vec<UserId> = envelope.users.into_iter().filter(|u| online(u)).collect();
        let inbound = match envelope.event {
            Wire::Members { conversation } => Inbound::ForgetMembers(conversation),
            Wire::Beat { .. } => return,
            _ if users.is_empty() => return,
            Wire::Message { conversation, seq, device, frame } => {
                Inbound::Deliver(users, Event::Message { conversation, seq, device, frame: Utf8Bytes::from(frame) })
            }
            Wire::Frame { frame } => Inbound::Deliver(users, Event::Frame(Utf8Bytes::from(frame))),
            Wire::Logout { device } => {
                let Some(user) = users.into_iter().next() else { return };
                Inbound::LogOut(user, device)
            }
        };
        handle(inbound);
    }
}

/// What a node has heard from the others, to find what it missed.
#[derive(Default)]
struct Heard {
    /// The last number received from each sender node; kept after a node falls silent, so its
    /// old envelopes stay refused.
    received: HashMap<String, u64>,
    /// What each sender's previous beat said it had numbered to this node. Envelopes and beats
    /// come on different subjects and may be read out of order, so a count is only held against
    /// what arrived one beat later.
    promised: HashMap<String, u64>,
    /// When each node last beat. One that falls silent may have died between committing a
    /// message and publishing its envelope (or with envelopes still in its NATS buffer).
    last_beat: HashMap<String, tokio::time::Instant>,
    /// Something may be missing: this node's connections should catch up.
    resync_due: bool,
}

impl Heard {
    /// A beat from `node`, which has numbered `counted` envelopes to this node so far.
    fn beat(&mut self, node: &str, counted: u64) {
        self.last_beat.insert(node.to_owned(), tokio::time::Instant::now());
        let got = self.received.entry(node.to_owned()).or_insert(0);
        if let Some(before) = self.promised.insert(node.to_owned(), counted)
            && before > *got
        {
            tracing::info!(node, missing = before - *got, "envelopes a beat counted never came");
            *got = before;
            self.resync_due = true;
        }
    }

    /// Envelope `seq` from `node`: false for a number already seen (a copy or a replay).
    fn numbered(&mut self, node: &str, seq: u64) -> bool {
        let got = self.received.entry(node.to_owned()).or_insert(0);
        if seq <= *got {
            return false;
        }
        if seq > *got + 1 {
            tracing::info!(node, missing = seq - *got - 1, "envelopes from a node went missing");
            self.resync_due = true;
        }
        *got = seq;
        true
    }

    /// Nodes not heard beating for [`SILENT_AFTER`] are taken for dead.
    fn check_silence(&mut self) {
        let silent: Vec<String> =
            self.last_beat.iter().filter(|(_, at)| at.elapsed() >= SILENT_AFTER).map(|(n, _)| n.clone()).collect();
        for node in &silent {
            self.last_beat.remove(node);
            self.promised.remove(node);
        }
        if !silent.is_empty() {
            tracing::info!(nodes = ?silent, "nodes fell silent; their last envelopes may be lost");
            self.resync_due = true;
        }
    }
}

/// What of a hub event travels; `None` for what stays on its node.
fn wire(event: &Event) -> Option<Wire> {
    match event {
        Event::Message { conversation, seq, device, frame } => Some(Wire::Message {
            conversation: *conversation,
            seq: *seq,
            device: *device,
            frame: frame.as_str().to_owned(),
        }),
        Event::Frame(frame) => Some(Wire::Frame { frame: frame.as_str().to_owned() }),
        Event::LoggedOut | Event::Replaced | Event::Resync => None,
    }
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bus").field("subject", &self.subject).field("node", &self.node).finish_non_exhaustive()
    }
}

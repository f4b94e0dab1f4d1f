//! The messaging service: one send path and one ack path shared by HTTP and WebSocket, fan-out
//! through the [`Hub`], and the caches in front of the store.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use serde_json::Value;
use tokio::sync::{Notify, mpsc, oneshot};
use types::{ConversationId, DeviceId, MediaId, TokenKeys, UserId};

use crate::bus::{Bus, Inbound};
use crate::config::{AuthConfig, ChatConfig};
use crate::error::ApiError;
use crate::frames::{ServerFrame, message_frame};
use crate::hub::{Event, Hub};
use crate::store::{Acked, Appended, Change, Effect, LinkAnswer, Linked, Message, Store, StoreError, Write, Written};

/// What messaging needs from media storage, which another crate owns: whether a user may send a
/// media record (they own it, or it was shared with them: forwarding needs no new upload), sharing
/// it with a conversation's members so they may read it and its variants, and taking back what one
/// message shared when it is deleted. A message names itself to media storage as
/// [`media_source`].
pub trait MediaAccess: Send + Sync {
    fn may_share<'a>(&'a self, media: MediaId, user: &'a UserId) -> BoxFuture<'a, Result<bool, String>>;
    fn share<'a>(&'a self, media: MediaId, users: &'a [UserId], source: &'a str) -> BoxFuture<'a, Result<(), String>>;
    fn unshare<'a>(&'a self, media: MediaId, source: &'a str) -> BoxFuture<'a, Result<(), String>>;
    /// The media as a client draws it (ingest's media JSON: kind, size, preview, variants with
    /// signed URLs, and `owner`), for a caller that has made its own check of who may see it;
    /// `None` if gone.
    fn describe<'a>(&'a self, media: MediaId) -> BoxFuture<'a, Result<Option<Value>, String>>;
    /// Waits (at most `timeout`) for the media's processing to end, then describes it.
    fn settled<'a>(&'a self, media: MediaId, timeout: Duration) -> BoxFuture<'a, Result<Option<Value>, String>>;
}

/// How a message names itself as the source of the media grants it gave.
pub fn media_source(conversation: &ConversationId, seq: i64) -> String {
    format!("{conversation}/{seq}")
}

pub type BoxFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

/// How long a device known to be linked is trusted without asking the store again. Logging out
/// through this node takes effect at once; through another node, within this long.
const DEVICE_CACHE_TTL: Duration = Duration::from_secs(30);
/// How long a conversation's member list is kept for fan-out. Membership changes made through this
/// node drop the entry at once; the store stays the judge of every read and write.
const MEMBERS_CACHE_TTL: Duration = Duration::from_secs(60);

/// chat-core, wired: the store, the hub of live connections, media access and settings.
pub struct Chat {
    pub(crate) store: Store,
    pub(crate) hub: Arc<Hub>,
    pub(crate) media: Arc<dyn MediaAccess>,
    pub(crate) keys: TokenKeys,
    pub(crate) config: ChatConfig,
    pub(crate) auth: AuthConfig,
    members: moka::sync::Cache<ConversationId, Arc<[UserId]>>,
    /// Bumped by every membership change this node hears of: a list read before one is not cached
    /// after it (it could put a removed member back for the cache's lifetime).
    members_epoch: Arc<std::sync::atomic::AtomicU64>,
    devices: moka::sync::Cache<(UserId, DeviceId), ()>,
    pub(crate) push_wake: Notify,
    /// One queue per writer; a conversation always goes to the same one, so its writes keep their order.
    writers: Vec<mpsc::Sender<Queued>>,
    pub(crate) bus: Option<Arc<Bus>>,
    /// Orders the directory updates of one user on this node (striped by user).
    presence_locks: Vec<tokio::sync::Mutex<()>>,
    /// Per node, in memory: floods from one client shed before they cost a database write (see
    /// [`crate::limits`]).
    pub(crate) shed: governor::DefaultKeyedRateLimiter<std::net::IpAddr>,
    /// Large groups whose receipts moved since the last round of aggregation.
    pub(crate) receipts_moved: std::sync::Mutex<HashSet<ConversationId>>,
    /// Per large group and sender: how far "delivered to all" and "read by all" were announced.
    announced: moka::sync::Cache<(ConversationId, UserId), (i64, i64)>,
    /// Per large group: the lowest read receipt at the last round (senders before it were told).
    aggregated_from: moka::sync::Cache<ConversationId, i64>,
    /// Deliveries failed on purpose so far (`chat.test_fail_deliveries`).
    failed_deliveries: std::sync::atomic::AtomicU32,
    /// Wake-ups lost on purpose so far (`chat.test_lose_wakeups`).
    lost_wakeups: std::sync::atomic::AtomicU32,
    /// Media messages sent while processing that this node watches (see [`Chat::watch_media`]).
    media_watchers: Arc<tokio::sync::Semaphore>,
    /// How many of them each sender has.
    watched_by: Arc<std::sync::Mutex<HashMap<UserId, usize>>>,
}

/// One sender's share of the media watched: at most [`WATCHED_PER_SENDER`] at once, so one
/// sender cannot take every watcher. Given back when dropped.
struct Watch {
    counts: Arc<std::sync::Mutex<HashMap<UserId, usize>>>,
    sender: UserId,
}

impl Watch {
    fn start(counts: &Arc<std::sync::Mutex<HashMap<UserId, usize>>>, sender: &UserId) -> Option<Watch> {
        let mut held = counts.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let count = held.entry(sender.clone()).or_insert(0);
        if *count >= WATCHED_PER_SENDER {
            return None;
        }
        *count += 1;
        Some(Watch { counts: counts.clone(), sender: sender.clone() })
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let mut held = self.counts.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(count) = held.get_mut(&self.sender) {
            *count -= 1;
            if *count == 0 {
                held.remove(&self.sender);
            }
        }
    }
}

/// When the parts of a delivery that failed after its message was stored (a media share, queueing
/// its pushes) are tried again: after each wait in turn, about 40 minutes in all.
const DELIVERY_RETRIES: [Duration; 9] = [
    Duration::from_secs(1),
    Duration::from_secs(2),
    Duration::from_secs(5),
    Duration::from_secs(10),
    Duration::from_secs(30),
    Duration::from_secs(60),
    Duration::from_secs(300),
    Duration::from_secs(600),
    Duration::from_secs(1200),
];

/// What is left of a delivery: each part is done once. (Pushes and the revocations of deleted
/// messages need nothing after the commit: they are written with the message.)
#[derive(Debug, Clone, Copy)]
struct Todo {
    share: bool,
    wake: bool,
}

/// Unauthenticated requests one client may make of one node before they are shed without asking
/// the database: 300 at once, then 50 a second (several times what the shared limits let through).
const SHED_QUOTA: governor::Quota = governor::Quota::per_second(nonzero(50)).allow_burst(nonzero(300));

const fn nonzero(n: u32) -> std::num::NonZeroU32 {
    match std::num::NonZeroU32::new(n) {
        Some(n) => n,
        None => panic!("zero"),
    }
}

/// Groups of more than this many members get their receipts aggregated: a sender hears "delivered
/// to all" and "read by all" ([`Chat::aggregate_receipts`]) instead of one receipt per reader, and
/// asks for the detail (`GET …/messages/{seq}/receipts`).
pub(crate) const AGGREGATE_ABOVE: usize = 32;
/// How far back (in seqs) one round of aggregation looks for senders to tell.
const AGGREGATE_SPAN: i64 = 2_000;

/// How long a link request waits for another device's answer.
pub(crate) const LINK_REQUEST_TTL_SECS: u64 = 300;

/// Stripes of [`Chat::presence_locks`].
const PRESENCE_LOCKS: usize = 64;

/// A write waiting for its writer, with where its result goes.
type Queued = (Write, oneshot::Sender<Result<Written, StoreError>>);

/// Most writes one group commit takes.
const MAX_BATCH: usize = 256;
/// Writes waiting for the writer before senders wait too.
const WRITE_QUEUE: usize = 4096;

/// The group-commit writer: whatever appends and acks wait when it gets to them go into one
/// transaction, so under load one commit (one fsync) serves many messages, and when idle a lone
/// write goes straight through.
async fn writer(store: Store, mut writes: mpsc::Receiver<Queued>) {
    let mut batch = Batch::default();
    while let Some(first) = writes.recv().await {
        batch.fill(first, &mut writes);
        let results = store.write_batch(std::mem::take(&mut batch.writes)).await;
        batch.answer(results);
    }
}

/// The writes of one group commit and where their results go.
#[derive(Default)]
struct Batch {
    writes: Vec<Write>,
    replies: Vec<oneshot::Sender<Result<Written, StoreError>>>,
}

impl Batch {
    /// Starts with `first` and takes whatever else is waiting, up to [`MAX_BATCH`].
    fn fill(&mut self, first: Queued, queue: &mut mpsc::Receiver<Queued>) {
        let mut next = Some(first);
        while let Some((write, reply)) = next {
            self.writes.push(write);
            self.replies.push(reply);
            next = if self.writes.len() < MAX_BATCH { queue.try_recv().ok() } else { None };
        }
    }

    fn answer(&mut self, results: Vec<Result<Written, StoreError>>) {
        for (reply, result) in self.replies.drain(..).zip(results) {
            let _ = reply.send(result);
        }
    }
}

/// Whether a device-bound token still names a linked device; for auth layers outside this crate.
pub trait DeviceCheck: Send + Sync {
    fn device_active<'a>(&'a self, user: &'a UserId, device: DeviceId) -> BoxFuture<'a, Result<bool, StoreError>>;
}

impl DeviceCheck for Chat {
    fn device_active<'a>(&'a self, user: &'a UserId, device: DeviceId) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(Chat::device_active(self, user, device))
    }
}

impl std::fmt::Debug for Chat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Chat").field("hub", &self.hub).finish_non_exhaustive()
    }
}

pub(crate) fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

impl Chat {
    pub fn new(
        store: Store,
        media: Arc<dyn MediaAccess>,
        keys: TokenKeys,
        config: ChatConfig,
        auth: AuthConfig,
        bus: Option<Bus>,
    ) -> Arc<Self> {
        let writers = (0..store.writers().max(1))
            .map(|_| {
                let (writes, queue) = mpsc::channel(WRITE_QUEUE);
                tokio::spawn(writer(store.clone(), queue));
                writes
            })
            .collect();
        let hub = Arc::new(Hub::new(config.outbound_queue, config.max_sockets_per_device));
        let members = moka::sync::Cache::builder().max_capacity(100_000).time_to_live(MEMBERS_CACHE_TTL).build();
        let members_epoch = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let devices = moka::sync::Cache::builder().max_capacity(1_000_000).time_to_live(DEVICE_CACHE_TTL).build();
        let bus = bus.map(Arc::new);
        if let Some(bus) = &bus {
            let (local, members, devices, epoch) =
                (hub.clone(), members.clone(), devices.clone(), members_epoch.clone());
            let here = hub.clone();
            tokio::spawn(bus.clone().listen(
                move |user| here.online(user),
                move |inbound| match inbound {
                    Inbound::Deliver(users, event) => local.deliver(&users, event),
                    Inbound::LogOut(user, device) => {
                        devices.invalidate(&(user.clone(), device));
                        local.log_out(&user, device);
                    }
                    Inbound::ForgetMembers(conversation) => {
                        epoch.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        members.invalidate(&conversation);
                    }
                    Inbound::Resync => local.resync_all(),
                },
            ));
        }
        Arc::new(Self {
            writers,
            bus,
            store,
            hub,
            media,
            keys,
            config,
            auth,
            members,
            members_epoch,
            devices,
            push_wake: Notify::new(),
            shed: governor::RateLimiter::keyed(SHED_QUOTA),
            receipts_moved: std::sync::Mutex::new(HashSet::new()),
            announced: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_idle(Duration::from_secs(3600))
                .build(),
            aggregated_from: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_idle(Duration::from_secs(3600))
                .build(),
            failed_deliveries: std::sync::atomic::AtomicU32::new(0),
            lost_wakeups: std::sync::atomic::AtomicU32::new(0),
            media_watchers: Arc::new(tokio::sync::Semaphore::new(MEDIA_WATCHERS)),
            watched_by: Arc::new(std::sync::Mutex::new(HashMap::new())),
            presence_locks: (0..PRESENCE_LOCKS).map(|_| tokio::sync::Mutex::new(())).collect(),
        })
    }

    /// Hands a write to the group-commit writer and waits for its result.
    async fn write(&self, write: Write) -> Result<Written, StoreError> {
        let (reply, answer) = oneshot::channel();
        let stopped = || StoreError::Batch("the writer has stopped".into());
        let conversation = match &write {
            Write::Append { conversation, .. } | Write::Ack { conversation, .. } => conversation,
        };
        let mut hasher = std::hash::DefaultHasher::new();
        std::hash::Hash::hash(conversation, &mut hasher);
        let shard = std::hash::Hasher::finish(&hasher) as usize % self.writers.len();
        let queue = &self.writers[shard];
        queue.send((write, reply)).await.map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }

    /// Whether a device-bound token still belongs to a linked device.
    pub async fn device_active(&self, user: &UserId, device: DeviceId) -> Result<bool, StoreError> {
        let key = (user.clone(), device);
        if self.devices.contains_key(&key) {
            return Ok(true);
        }
        let active = self.store.device_exists(user, &device).await?;
        if active {
            self.devices.insert(key, ());
        }
        Ok(active)
    }

    /// Unlinks a device and closes its connections on this node.
    pub(crate) async fn log_out(&self, user: &UserId, device: DeviceId) -> Result<bool, StoreError> {
        let removed = self.store.remove_device(user, &device).await?;
        self.forget_device(user, device).await;
        Ok(removed)
    }

    /// A device the store no longer has: its cached check goes, and its connections close on
    /// every node.
    pub(crate) async fn forget_device(&self, user: &UserId, device: DeviceId) {
        self.devices.invalidate(&(user.clone(), device));
        self.hub.log_out(user, device);
        if let Some(bus) = &self.bus {
            bus.publish_logout(user, device).await;
        }
    }

    /// A device of `user` was linked: their other devices hear of it, and one it replaced (the
    /// least recently seen, past the device limit) is logged out.
    pub(crate) async fn linked(&self, user: &UserId, linked: Linked, name: &str) {
        if let Some(old) = linked.replaced {
            tracing::info!(%user, device = %old, "a device was replaced by a newly linked one");
            self.forget_device(user, old).await;
        }
        let frame = ServerFrame::DeviceLinked { device_id: linked.device, name, replaced: linked.replaced }.encode();
        self.fan_out(std::slice::from_ref(user), Event::Frame(frame)).await;
    }

    /// Stores a signed-in device's request to link another named `name`, and asks the user's
    /// devices to approve it. Returns the request's id.
    pub(crate) async fn request_link(&self, user: &UserId, asker: DeviceId, name: &str) -> Result<String, ApiError> {
        let mut id = [0u8; 16];
        getrandom::fill(&mut id).expect("the OS random source works");
        let id = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(id);
        let expires_at = now_ms() + LINK_REQUEST_TTL_SECS as i64 * 1000;
        self.store.create_link_request(&id, user, &asker, name, expires_at).await?;
        // The asking device's own name, as the user linked it: `name` is the asker's word.
        let devices = self.store.devices(user).await?;
        let asker_name = devices.iter().find(|d| d.id == asker).map(|d| d.name.as_str()).unwrap_or_default();
        let frame = ServerFrame::LinkRequest { request: &id, name, requested_by: asker, requested_by_name: asker_name }
            .encode();
        self.fan_out(std::slice::from_ref(user), Event::Frame(frame)).await;
        Ok(id)
    }

    /// `approver` (a device of `user`) approves or denies a link request; an approval links the
    /// device, which every device of the user hears of (`device_linked`).
    pub(crate) async fn answer_link(
        &self,
        user: &UserId,
        approver: DeviceId,
        request: &str,
        approve: bool,
    ) -> Result<(), ApiError> {
        match self.store.answer_link_request(request, user, &approver, approve, now_ms()).await? {
            LinkAnswer::Answered { name, requested_by, linked } => {
                if let Some(linked) = linked {
                    tracing::info!(%user, %approver, %requested_by, device = %linked.device, "a device link was approved");
                    self.linked(user, linked, &name).await;
                }
                Ok(())
            }
            LinkAnswer::OwnRequest => Err(ApiError::OwnLinkRequest),
            LinkAnswer::Unknown => Err(ApiError::NotFound("link request")),
        }
    }

    /// The members of a conversation, for typing and receipts (messages go to the members read in
    /// their append's own transaction).
    pub(crate) async fn members(&self, conversation: &ConversationId) -> Result<Arc<[UserId]>, StoreError> {
        if let Some(members) = self.members.get(conversation) {
            return Ok(members);
        }
        let epoch = self.members_epoch.load(std::sync::atomic::Ordering::SeqCst);
        let members: Arc<[UserId]> = self.store.member_ids(conversation).await?.into();
        if self.members_epoch.load(std::sync::atomic::Ordering::SeqCst) == epoch {
            self.members.insert(*conversation, members.clone());
        }
        Ok(members)
    }

    pub(crate) async fn forget_members(&self, conversation: &ConversationId) {
        self.members_epoch.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.members.invalidate(conversation);
        if let Some(bus) = &self.bus {
            bus.publish_members(*conversation).await;
        }
    }

    /// Hands `event` to the devices of `users` connected here, and through the bus to the nodes
    /// the directory says hold the others (to every node when it cannot be read).
    pub(crate) async fn fan_out(&self, users: &[UserId], event: Event) {
        // This node's connections first: they wait for nothing the bus does.
        let Some(bus) = &self.bus else {
            return self.hub.deliver(users, event);
        };
        self.hub.deliver(users, event.clone());
        match self.store.nodes_of(users).await {
            Ok(held) => {
                let mut by_node: HashMap<String, Vec<UserId>> = HashMap::new();
                for (user, node) in held {
                    if node != bus.node() {
                        by_node.entry(node).or_default().push(user);
                    }
                }
                for (node, users) in by_node {
                    bus.send_to(&node, users, &event).await;
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not read the directory; sending to every node");
                bus.send_to_all(users.to_vec(), &event).await;
            }
        }
    }

    /// Who of `users` has a device connected to any node.
    pub(crate) async fn online(&self, users: &[UserId]) -> HashSet<UserId> {
        let mut online: HashSet<UserId> = users.iter().filter(|u| self.hub.online(u)).cloned().collect();
        if self.bus.is_some() {
            match self.store.nodes_of(users).await {
                Ok(held) => online.extend(held.into_iter().map(|(user, _)| user)),
                Err(e) => tracing::warn!(error = %e, "could not read the directory"),
            }
        }
        online
    }

    /// A device of `user` connected here: other nodes address the user's events to this one
    /// from now on. Every connection waits for the directory to say so (not only the user's first
    /// here, whose write may still be under way), so its replay read after this misses nothing.
    pub(crate) async fn arrived(&self, user: &UserId) -> Result<(), StoreError> {
        let Some(bus) = &self.bus else { return Ok(()) };
        let _order = self.presence_lock(user).lock().await;
        self.store.present(user, bus.node()).await
    }

    /// The last device of `user` here went away (unless another came meanwhile).
    pub(crate) async fn left(&self, user: &UserId) {
        let Some(bus) = &self.bus else { return };
        let _order = self.presence_lock(user).lock().await;
        if self.hub.online(user) {
            return;
        }
        if let Err(e) = self.store.absent(user, bus.node()).await {
            tracing::warn!(error = %e, %user, "could not record that a user left this node");
        }
    }

    fn presence_lock(&self, user: &UserId) -> &tokio::sync::Mutex<()> {
        let mut hasher = std::hash::DefaultHasher::new();
        std::hash::Hash::hash(user, &mut hasher);
        &self.presence_locks[std::hash::Hasher::finish(&hasher) as usize % self.presence_locks.len()]
    }

    /// Sends a message: checks the body and media, appends (idempotent on `client_id`, with a push
    /// intent when a notifier is configured), shares media with the members and wakes their
    /// connected devices. Once the append has committed the answer is the message, whatever fails
    /// after: a failed share is retried in the background for about 40 minutes (an `internal`
    /// error would make the app send again what is stored already); the wake-up goes out either
    /// way.
    pub(crate) async fn send(
        self: &Arc<Self>,
        user: &UserId,
        device: DeviceId,
        conversation: &ConversationId,
        client_id: &str,
        body: &Value,
    ) -> Result<Appended, ApiError> {
        let Checked { media, effect } = check_body(body)?;
        let mut stored = body.to_string();
        if stored.len() > crate::store::MAX_BODY_BYTES {
            let max = crate::store::MAX_BODY_BYTES;
            return Err(ApiError::Invalid(format!("a message body holds at most {max} bytes")));
        }
        let mut processing = false;
        if let Some(media) = media {
            if !self.media.may_share(media, user).await.map_err(ApiError::Media)? {
                return Err(ApiError::UnknownMedia);
            }
            // What a receiver needs to draw it, so it needs no request of its own.
            if let Some(view) = self.media.describe(media).await.map_err(ApiError::Media)? {
                processing = view["status"] == "processing";
                let mut with_info = body.clone();
                with_info["media_info"] = media_info(&view);
                stored = with_info.to_string();
            }
        }
        // Only a message to read is pushed; a reaction, an edit or a deletion is not.
        let push = matches!(effect, Effect::Ordinary) && self.config.push_webhook_url.is_some();
        let write = Write::Append {
            conversation: *conversation,
            sender: user.clone(),
            device,
            client_id: client_id.to_owned(),
            body: stored,
            now_ms: now_ms(),
            push_delay_ms: push.then_some(self.config.push_delay_ms as i64),
            effect,
        };
        let Written::Appended(appended, members) = self.write(write).await? else {
            return Err(StoreError::Corrupt("the writer answered an append with something else".into()).into());
        };
        let mut todo = Todo { share: true, wake: true };
        if let Err(e) = self.deliver(&appended, &members, media, &mut todo).await {
            let (conversation, seq) = (*conversation, appended.message().seq);
            tracing::warn!(error = ?e, %conversation, seq, "delivering a stored message failed; retrying in the background");
            let (chat, stored) = (self.clone(), appended.clone());
            tokio::spawn(async move {
                let mut todo = todo;
                for delay in DELIVERY_RETRIES {
                    tokio::time::sleep(delay).await;
                    match chat.deliver(&stored, &members, media, &mut todo).await {
                        Ok(()) => {
                            return tracing::info!(%conversation, seq, "a stored message was delivered on a retry");
                        }
                        Err(e) => {
                            tracing::warn!(error = ?e, %conversation, seq, "delivering a stored message failed again")
                        }
                    }
                }
                tracing::error!(%conversation, seq, ?todo, "gave up delivering a stored message's media share");
            });
        }
        if let (Some(media), true, Appended::New(message)) = (media, processing, &appended) {
            self.watch_media(user, media, message.conversation, message.seq);
        }
        Ok(appended)
    }

    /// Sent while still processing, media `media` (of the message at `seq`) is watched until it is
    /// ready (or failed): then the message's `media_info` is brought up to date and the members
    /// get a `media_ready` frame, so no client polls. At most [`MEDIA_WATCHERS`] at once per node;
    /// past that (or if the node goes down meanwhile) clients ask `GET /v1/media/{id}`.
    fn watch_media(self: &Arc<Self>, sender: &UserId, media: MediaId, conversation: ConversationId, seq: i64) {
        let Ok(permit) = self.media_watchers.clone().try_acquire_owned() else {
            return tracing::warn!(%media, "too many media watched at once; members will ask for it themselves");
        };
        let Some(watch) = Watch::start(&self.watched_by, sender) else {
            return tracing::debug!(%media, %sender, "this sender's media are watched enough already");
        };
        let chat = self.clone();
        tokio::spawn(async move {
            let _held = (permit, watch);
            let view = match chat.media.settled(media, MEDIA_READY_WAIT).await {
                Ok(Some(view)) if view["status"] != "processing" => view,
                Ok(_) => return,
                Err(e) => return tracing::warn!(error = %e, %media, "could not watch a media being processed"),
            };
            let info = media_info(&view);
            match chat.store.set_media_info(&conversation, seq, &info).await {
                Ok(Some(_)) => {}
                // Deleted meanwhile, or expired: nothing to announce.
                Ok(None) => return,
                Err(e) => {
                    return tracing::warn!(error = %e, %conversation, seq, "could not record that a media is ready");
                }
            }
            // Those who can see the message: members who joined before it.
            let members: Vec<UserId> = match chat.store.member_receipts(&conversation).await {
                Ok(members) => members.into_iter().filter(|m| m.joined_seq < seq).map(|m| m.user).collect(),
                Err(e) => return tracing::warn!(error = %e, %conversation, "could not read the members"),
            };
            let frame = ServerFrame::MediaReady { conversation, seq, media, media_info: &info }.encode();
            chat.fan_out(&members, Event::Frame(frame)).await;
        });
    }

    /// Whether `user` may make media `id` an avatar: an image they uploaded themselves (one only
    /// shared with them could be taken back, while an avatar is shown to whoever sees it).
    pub(crate) async fn check_avatar(&self, user: &UserId, media: MediaId) -> Result<(), ApiError> {
        let described = self.media.describe(media).await.map_err(ApiError::Media)?;
        let Some(described) = described.filter(|m| m["owner"] == user.as_str()) else {
            return Err(ApiError::UnknownMedia);
        };
        if described["kind"] != "image" {
            return Err(ApiError::Invalid("an avatar is an image".into()));
        }
        Ok(())
    }

    /// Hands an avatar's hold on its media over (media storage expires what nothing references):
    /// the avatar shown now (`now`) is shared with `owner` under `source` (again: sharing is
    /// idempotent), and what the one `before` it was shared under it is taken back (a failure there
    /// only delays that media's expiry).
    pub(crate) async fn hold_avatar(
        &self,
        owner: &UserId,
        source: &str,
        before: Option<&str>,
        now: Option<&str>,
    ) -> Result<(), ApiError> {
        if let Some(media) = now.and_then(|m| m.parse::<MediaId>().ok()) {
            self.media.share(media, std::slice::from_ref(owner), source).await.map_err(ApiError::Media)?;
        }
        if let Some(media) = before.filter(|before| Some(*before) != now).and_then(|m| m.parse::<MediaId>().ok())
            && let Err(e) = self.media.unshare(media, source).await
        {
            tracing::warn!(error = %e, %media, "could not let go of a former avatar's media");
        }
        Ok(())
    }

    /// An avatar as a client draws it: its media id, the signed URLs of its full-size and thumbnail
    /// variants (absent while it is still being processed) and its inline preview; `None` when the
    /// media is gone.
    pub(crate) async fn avatar(&self, media: &str) -> Result<Option<Value>, ApiError> {
        let Ok(id) = media.parse::<MediaId>() else { return Ok(None) };
        let Some(view) = self.media.describe(id).await.map_err(ApiError::Media)? else { return Ok(None) };
        let url = |variant: &str| view["variants"][variant]["url"].clone();
        Ok(Some(serde_json::json!({
            "media": media,
            "url": url("standard"),
            "thumb": url("thumb"),
            "preview": view["preview"],
        })))
    }

    /// Makes a change to a group with its system message, which every member gets like any
    /// message (one it removes included: the last they get); `None` when it changed nothing.
    pub(crate) async fn change(
        &self,
        actor: &UserId,
        conversation: &ConversationId,
        change: Change,
    ) -> Result<Option<Message>, ApiError> {
        let removal = matches!(change, Change::Remove(_));
        let (appended, members) = match self.write(Write::change(conversation, actor, change, now_ms())).await {
            Ok(Written::Appended(appended, members)) => (appended, members),
            Ok(Written::Acked(_)) => {
                return Err(StoreError::Corrupt("the writer answered a change with an ack".into()).into());
            }
            Err(StoreError::Unchanged) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        self.forget_members(conversation).await;
        if removal {
            // The one who left may have been the last to read: a large group's totals may move.
            self.receipts_moved.lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert(*conversation);
        }
        // Shares nothing, so only the wake-up is left, which cannot fail.
        let mut todo = Todo { share: false, wake: true };
        self.deliver(&appended, &members, None, &mut todo).await?;
        Ok(Some(appended.message().clone()))
    }

    /// What follows a committed append: shares its media with the members and wakes their
    /// connected devices. Each step may run again (on a retried send, or here on a retry): a share
    /// or wake-up twice is harmless.
    async fn deliver(
        &self,
        appended: &Appended,
        members: &[UserId],
        media: Option<MediaId>,
        todo: &mut Todo,
    ) -> Result<(), ApiError> {
        let message = appended.message();
        let mut failed = None;
        if todo.share
            && let Some(media) = media
        {
            // Also on a retried send: a share lost to a crash after the append is made good.
            let on_purpose = self.config.test_fail_deliveries > 0
                && self.failed_deliveries.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                    < self.config.test_fail_deliveries;
            let shared = if on_purpose {
                Err("chat.test_fail_deliveries: this share fails on purpose".to_owned())
            } else {
                self.media.share(media, members, &media_source(&message.conversation, message.seq)).await
            };
            // A deletion (or the timer) may have come first and taken its grants back already: a
            // share that lands after its tombstone takes itself back (a share is done only then).
            let settled = match shared {
                Ok(()) => match self.store.is_gone(&message.conversation, message.seq).await {
                    Ok(false) => Ok(()),
                    Ok(true) => self
                        .media
                        .unshare(media, &media_source(&message.conversation, message.seq))
                        .await
                        .map_err(ApiError::Media),
                    Err(e) => Err(e.into()),
                },
                Err(e) => Err(ApiError::Media(e)),
            };
            match settled {
                Ok(()) => todo.share = false,
                Err(e) => failed = Some(e),
            }
        }
        if todo.wake {
            // A retried send wakes the members' devices again: harmless (each connection drops a
            // seq it has passed), and it makes good a wake-up lost to a crash after the commit.
            let event = Event::Message {
                conversation: message.conversation,
                seq: message.seq,
                device: message.device,
                frame: message_frame(message),
            };
            let lose = self.config.test_lose_wakeups > 0
                && self.lost_wakeups.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < self.config.test_lose_wakeups;
            if !lose {
                self.fan_out(members, event).await;
            }
            if matches!(appended, Appended::New(_)) && self.config.push_webhook_url.is_some() {
                self.push_wake.notify_one();
            }
            todo.wake = false;
        }
        failed.map_or(Ok(()), Err)
    }

    /// Moves a device's delivered (or read) cursor and tells the other members when the user's
    /// receipt moved.
    pub(crate) async fn ack(
        &self,
        user: &UserId,
        device: DeviceId,
        conversation: &ConversationId,
        seq: i64,
        read: bool,
    ) -> Result<Acked, StoreError> {
        let write = Write::Ack { user: user.clone(), device, conversation: *conversation, seq, read };
        let Written::Acked(acked) = self.write(write).await? else {
            return Err(StoreError::Corrupt("the writer answered an ack with something else".into()));
        };
        if read {
            // The user's other devices clear what this one read: as far as any of them read.
            let seq = acked.device.read.max(acked.before.read);
            let frame = ServerFrame::Read { conversation: *conversation, seq }.encode();
            self.fan_out(std::slice::from_ref(user), Event::Frame(frame)).await;
        }
        if let Some(receipt) = acked.receipt {
            if self.members(conversation).await?.len() > AGGREGATE_ABOVE {
                // A large group: the next round of aggregation tells the senders.
                self.receipts_moved.lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert(*conversation);
                return Ok(acked);
            }
            // Only the senders of the messages the receipt moved over hear of it: in a group, one
            // message costs its sender a receipt per reader, not every member one.
            let (status, before, seq) = if read {
                ("read", acked.before.read, receipt.read)
            } else {
                ("delivered", acked.before.delivered, receipt.delivered)
            };
            let senders = self.store.senders_between(conversation, before, seq, Some(user)).await?;
            if !senders.is_empty() {
                let frame = ServerFrame::Receipt { conversation: *conversation, user, status, seq }.encode();
                self.fan_out(&senders, Event::Frame(frame)).await;
            }
        }
        Ok(acked)
    }

    /// Tells the senders of a large group how far every other member has got and read: one
    /// read of the members, one of who sent what since the last round, and at most two frames per
    /// sender, whatever the group's size. Members count from where they joined.
    pub(crate) async fn aggregate_receipts(&self, conversation: &ConversationId) -> Result<(), StoreError> {
        let members = self.store.member_receipts(conversation).await?;
        // A group that shrank to 32 gets one more round: its senders were told nothing per member.
        if members.len() <= AGGREGATE_ABOVE && !self.aggregated_from.contains_key(conversation) {
            return Ok(());
        }
        let floors = Floors::of(&members);
        let Some(highest) = floors.delivered.highest() else { return Ok(()) };
        let from = self.aggregated_from.get(conversation).unwrap_or(0).max(highest - AGGREGATE_SPAN);
        for sender in self.store.senders_between(conversation, from, highest, None).await? {
            let key = (*conversation, sender.clone());
            let (told_delivered, told_read) = self.announced.get(&key).unwrap_or((0, 0));
            let (delivered, read) = floors.without(&sender);
            if delivered <= told_delivered && read <= told_read {
                continue;
            }
            for (status, seq, told) in [("delivered", delivered, told_delivered), ("read", read, told_read)] {
                if seq > told {
                    let frame = ServerFrame::GroupReceipt { conversation: *conversation, status, seq }.encode();
                    self.fan_out(std::slice::from_ref(&sender), Event::Frame(frame)).await;
                }
            }
            self.announced.insert(key, (delivered.max(told_delivered), read.max(told_read)));
        }
        if let Some(lowest) = floors.read.lowest() {
            self.aggregated_from.insert(*conversation, lowest);
        }
        Ok(())
    }

    /// How far every member of a large group but `user` has got and read: what a connecting
    /// device of `user` is told in place of one receipt per member.
    pub(crate) async fn group_receipt(
        &self,
        conversation: &ConversationId,
        user: &UserId,
    ) -> Result<(i64, i64), StoreError> {
        let members = self.store.member_receipts(conversation).await?;
        Ok(Floors::of(&members).without(user))
    }

    /// Tells the user's audience (their contacts, and whoever they have exchanged messages with
    /// both ways) that they came online or went offline; the time only if they share it.
    pub(crate) async fn announce_presence(&self, user: &UserId, online: bool, last_seen: i64) {
        let (audience, privacy) = match tokio::try_join!(self.store.audience(user), self.store.privacy(user)) {
            Ok(both) => both,
            Err(e) => return tracing::warn!(error = %e, "could not load the audience of a presence"),
        };
        if audience.is_empty() {
            return;
        }
        let last_seen = if privacy.share_last_seen { last_seen } else { 0 };
        let frame = ServerFrame::Presence { user, online, last_seen }.encode();
        self.fan_out(&audience, Event::Frame(frame)).await;
    }

    /// Mints an access token for a device.
    pub(crate) fn access_token(&self, user: &UserId, device: DeviceId) -> String {
        let now = (now_ms() / 1000) as u64;
        self.keys.mint_for_device(user, device, now, self.auth.access_token_secs)
    }
}

/// The lowest and second lowest of one receipt column over a group's members, so the lowest over
/// every member but one is known for each.
#[derive(Debug, Clone, Copy)]
struct Lowest<'a> {
    first: i64,
    /// Who alone holds `first` (`None` when several do).
    holder: Option<&'a UserId>,
    second: i64,
}

impl<'a> Lowest<'a> {
    fn of(values: impl Iterator<Item = (&'a UserId, i64)>) -> Self {
        let mut lowest = Lowest { first: i64::MAX, holder: None, second: i64::MAX };
        for (user, value) in values {
            if value < lowest.first {
                lowest = Lowest { first: value, holder: Some(user), second: lowest.first };
            } else if value == lowest.first {
                lowest.holder = None;
                lowest.second = value;
            } else if value < lowest.second {
                lowest.second = value;
            }
        }
        lowest
    }

    /// The lowest over everyone but `user` (0 when there is nobody else).
    fn without(&self, user: &UserId) -> i64 {
        let value = if self.holder == Some(user) { self.second } else { self.first };
        if value == i64::MAX { 0 } else { value }
    }

    /// The lowest over all.
    fn lowest(&self) -> Option<i64> {
        (self.first != i64::MAX).then_some(self.first)
    }

    /// The highest that the lowest over everyone but one member can be.
    fn highest(&self) -> Option<i64> {
        let value = if self.holder.is_some() { self.second } else { self.first };
        (value != i64::MAX && value > 0).then_some(value)
    }
}

/// Where a group's members stand, counted from where each joined (a member does not hold back
/// what was said before they came).
struct Floors<'a> {
    delivered: Lowest<'a>,
    read: Lowest<'a>,
}

impl<'a> Floors<'a> {
    /// Over the members who have written in the conversation: the others share no receipts, not
    /// even within a total.
    fn of(members: &'a [crate::store::MemberReceipt]) -> Self {
        let sharing = || members.iter().filter(|m| m.answered);
        Floors {
            delivered: Lowest::of(sharing().map(|m| (&m.user, m.delivered.max(m.joined_seq)))),
            read: Lowest::of(sharing().map(|m| (&m.user, m.read.max(m.joined_seq)))),
        }
    }

    /// How far every member but `user` has got and read.
    fn without(&self, user: &UserId) -> (i64, i64) {
        (self.delivered.without(user), self.read.without(user))
    }
}

/// Media messages sent while processing that one node watches at once.
const MEDIA_WATCHERS: usize = 1024;
/// Of those, at most this many per sender.
const WATCHED_PER_SENDER: usize = 16;
/// How long a media sent while processing is watched (a long video's transcode included).
const MEDIA_READY_WAIT: Duration = Duration::from_secs(30 * 60);

/// What a media message carries for its receivers to draw it at once (a media record's JSON, as
/// ingest describes it): kind and status, dimensions, duration, waveform, sound, the inline
/// preview, and each variant's signed URL, type, size and bytes.
pub(crate) fn media_info(view: &Value) -> Value {
    let mut info = serde_json::Map::new();
    for key in ["kind", "status", "error", "width", "height", "duration_ms", "waveform", "has_audio", "preview"] {
        if let Some(value) = view.get(key).filter(|v| !v.is_null()) {
            info.insert(key.into(), value.clone());
        }
    }
    if let Some(variants) = view.get("variants").and_then(Value::as_object) {
        let variants: serde_json::Map<String, Value> = variants
            .iter()
            .map(|(name, v)| {
                let mut variant = serde_json::Map::new();
                for key in ["url", "mime", "width", "height", "bytes"] {
                    if let Some(value) = v.get(key).filter(|v| !v.is_null()) {
                        variant.insert(key.into(), value.clone());
                    }
                }
                (name.clone(), Value::Object(variant))
            })
            .collect();
        info.insert("variants".into(), Value::Object(variants));
    }
    Value::Object(info)
}

/// A checked message body: the media it sends, and what it does besides being stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Checked {
    pub media: Option<MediaId>,
    pub effect: Effect,
}

/// Longest reaction, in bytes: one emoji, however many code points it takes.
const MAX_REACTION_BYTES: usize = 64;
/// Longest disappearing timer: a year.
const MAX_TIMER_SECS: i64 = 365 * 86_400;

/// A message body is an object of one kind (see PROTOCOL.md):
/// - to read: `text`, `media` (a media id, with an optional `caption`) or `ciphertext` (base64),
///   each with an optional `reply_to` (the seq it quotes);
/// - `reaction` (an emoji; "" takes it back) with `to`, the seq it reacts to;
/// - `edit` (the seq of the sender's own text message) with its new `text`;
/// - `delete` (the seq of the sender's own message, deleted for everyone);
/// - `disappearing` (the conversation's timer in seconds; 0 turns it off).
pub(crate) fn check_body(body: &Value) -> Result<Checked, ApiError> {
    let invalid = |m: &str| Err(ApiError::Invalid(m.into()));
    let Some(object) = body.as_object() else { return invalid("body is a JSON object") };
    let seq_of = |key: &str| object.get(key).and_then(Value::as_i64).filter(|seq| *seq > 0);
    let text_of = |key: &str| object.get(key).and_then(Value::as_str).filter(|t| !t.is_empty());
    let ordinary = |media| Checked { media, effect: Effect::Ordinary };
    let kinds: Vec<&str> = ["text", "media", "ciphertext", "reaction", "edit", "delete", "disappearing"]
        .into_iter()
        .filter(|k| object.contains_key(*k))
        .collect();
    let (allowed, checked): (&[&str], Checked) = match kinds.as_slice() {
        ["text"] => {
            if text_of("text").is_none() {
                return invalid("text is a non-empty string");
            }
            (&["text", "reply_to"], ordinary(None))
        }
        ["ciphertext"] => {
            let decodes =
                text_of("ciphertext").is_some_and(|c| base64::engine::general_purpose::STANDARD.decode(c).is_ok());
            if !decodes {
                return invalid("ciphertext is non-empty standard base64");
            }
            (&["ciphertext", "reply_to"], ordinary(None))
        }
        ["media"] => {
            let Some(id) = object["media"].as_str().and_then(|m| m.parse::<MediaId>().ok()) else {
                return invalid("media is a media id");
            };
            if object.get("caption").is_some_and(|c| !c.is_string()) {
                return invalid("caption is a string");
            }
            (&["media", "caption", "reply_to"], ordinary(Some(id)))
        }
        ["reaction"] => {
            let Some(reaction) = object["reaction"].as_str() else { return invalid("reaction is a string") };
            if reaction.len() > MAX_REACTION_BYTES || reaction.chars().any(char::is_control) {
                return invalid("reaction is one emoji (at most 64 bytes), or \"\" to take it back");
            }
            let Some(to) = seq_of("to") else { return invalid("to is the seq of the message reacted to") };
            (&["reaction", "to"], Checked { media: None, effect: Effect::React { to } })
        }
        ["text", "edit"] => {
            let (Some(to), Some(text)) = (seq_of("edit"), text_of("text")) else {
                return invalid("edit is the seq of your text message, and text its new non-empty text");
            };
            (&["edit", "text"], Checked { media: None, effect: Effect::Edit { to, text: text.to_owned() } })
        }
        ["delete"] => {
            let Some(to) = seq_of("delete") else { return invalid("delete is the seq of your message") };
            (&["delete"], Checked { media: None, effect: Effect::Delete { to } })
        }
        ["disappearing"] => {
            let Some(secs) = object["disappearing"].as_i64().filter(|s| (0..=MAX_TIMER_SECS).contains(s)) else {
                return invalid("disappearing is the timer in seconds, 0 (off) to 31536000 (a year)");
            };
            (&["disappearing"], Checked { media: None, effect: Effect::Timer { secs } })
        }
        _ => {
            return invalid(
                "body has exactly one of text, media, ciphertext, reaction, edit (with text), delete or disappearing",
            );
        }
    };
    if object.contains_key("reply_to") && seq_of("reply_to").is_none() {
        return invalid("reply_to is the seq of the message replied to");
    }
    if let Some(extra) = object.keys().find(|k| !allowed.contains(&k.as_str())) {
        return Err(ApiError::Invalid(format!("unknown body field {extra:?}")));
    }
    Ok(checked)
}

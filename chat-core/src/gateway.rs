//! `GET /v1/ws`: the real-time gateway. One task per connection; the protocol is in PROTOCOL.md.
//!
//! Exactly once, in order: the connection keeps, per conversation, the highest seq it has passed to
//! the device (`sent`). On connect it registers with the hub first, then replays everything after
//! the device's cursor from the store, then handles live events: an event at `sent + 1` goes out as
//! it is, one at or below `sent` is a duplicate and is dropped, one further ahead means events were
//! missed and the gap is read from the store. So the seam between replay and live has neither a gap
//! nor a duplicate, and a lost or doubled wake-up changes nothing. Acks move the device's cursor,
//! never past `sent`, so a reconnect resumes exactly where the device stopped confirming.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, Message as WsMessage, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures_util::SinkExt;
use futures_util::stream::{SplitSink, StreamExt};
use serde::Deserialize;
use serde_json::Value;
use types::{ConversationId, DeviceId, ErrorBody, TokenError, UserId};

use crate::chat::{Chat, now_ms};
use crate::error::ApiError;
use crate::frames::{ServerFrame, message_frame};
use crate::hub::{Event, Lagged};
use crate::store::{Appended, MAX_BODY_BYTES, MAX_PAGE, Receipt, StoreError};

/// Largest frame a client may send: a full body plus its envelope.
pub const MAX_CLIENT_FRAME: usize = MAX_BODY_BYTES + 4096;
/// Close codes the server uses besides the standard ones.
pub const CLOSE_TOO_SLOW: u16 = 4008;
pub const CLOSE_LOGGED_OUT: u16 = 4001;
pub const CLOSE_IDLE: u16 = 4000;
pub const CLOSE_REPLACED: u16 = 4009;
/// Bad frames tolerated per heartbeat interval before the connection is closed as abusive.
const MAX_STRIKES: u32 = 50;
/// How long a connection keeps its user's audience (for typing) before reading it again.
const AUDIENCE_TTL: Duration = Duration::from_secs(10);
/// One typing frame per conversation per this long is forwarded; the rest are dropped.
const TYPING_INTERVAL: Duration = Duration::from_secs(2);
/// Catch-up passes after the first, when live events overflowed while replaying.
const MAX_RESYNC_PASSES: usize = 3;

#[derive(Deserialize)]
pub(crate) struct TokenQuery {
    token: Option<String>,
}

fn refuse(status: StatusCode, code: &str, message: &str) -> Response {
    let mut response = (status, axum::Json(ErrorBody::new(code, message))).into_response();
    if status == StatusCode::UNAUTHORIZED {
        response.headers_mut().insert(header::WWW_AUTHENTICATE, axum::http::HeaderValue::from_static("Bearer"));
    }
    response
}

/// Authenticates (bearer header or `?token=`, bound to a linked device) and upgrades.
pub(crate) async fn upgrade(
    State(chat): State<Arc<Chat>>,
    headers: HeaderMap,
    Query(query): Query<TokenQuery>,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    let bearer = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(types::bearer_token);
    let Some(token) = bearer.or(query.token.as_deref()) else {
        return refuse(StatusCode::UNAUTHORIZED, "missing_token", "a token is required (Authorization or ?token=)");
    };
    let claims = match chat.keys.verify(token) {
        Ok(c) => c,
        Err(TokenError::Expired) => return refuse(StatusCode::UNAUTHORIZED, "token_expired", "the token has expired"),
        Err(TokenError::Invalid) => return refuse(StatusCode::UNAUTHORIZED, "invalid_token", "the token is not valid"),
    };
    let Some(device) = claims.dev else {
        return refuse(StatusCode::FORBIDDEN, "device_token_required", "the gateway needs a token bound to a device");
    };
    match chat.device_active(&claims.sub, device).await {
        Ok(true) => {}
        Ok(false) => return refuse(StatusCode::UNAUTHORIZED, "device_logged_out", "this device was logged out"),
        Err(e) => {
            tracing::error!(error = %e, "could not check a device");
            return refuse(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "something went wrong on our side; try again",
            );
        }
    }
    let ws = match ws {
        Ok(ws) => ws,
        Err(e) => return refuse(StatusCode::BAD_REQUEST, "websocket_required", &e.body_text()),
    };
    let user = claims.sub;
    ws.read_buffer_size(1024)
        .write_buffer_size(0)
        .max_write_buffer_size(256 * 1024)
        .max_message_size(MAX_CLIENT_FRAME)
        .max_frame_size(MAX_CLIENT_FRAME)
        .on_upgrade(move |socket| run(chat, socket, user, device))
}

fn random_u16() -> u16 {
    let mut bytes = [0u8; 2];
    getrandom::fill(&mut bytes).expect("the OS random source works");
    u16::from_le_bytes(bytes)
}

/// Why a connection ends; the socket is gone or closed either way.
struct Stop;

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
enum ClientFrame {
    Send {
        client_id: String,
        conversation: String,
        body: Value,
    },
    Ack {
        conversation: String,
        seq: i64,
    },
    Read {
        conversation: String,
        seq: i64,
    },
    Typing {
        conversation: String,
    },
    #[serde(rename = "link_answer")]
    LinkAnswer {
        request: String,
        approve: bool,
    },
}

/// Most own sends a connection remembers answering (see `Connection::answered`).
const MAX_ANSWERED: usize = 1024;

/// The `sent` frame of one of the device's own messages, from its `message` frame (which the
/// server wrote: it always reads back).
fn sent_of(frame: &Utf8Bytes) -> Option<Utf8Bytes> {
    #[derive(serde::Deserialize)]
    struct Own<'a> {
        conversation: ConversationId,
        seq: i64,
        ts: i64,
        #[serde(borrow)]
        client_id: std::borrow::Cow<'a, str>,
    }
    let own = serde_json::from_str::<Own<'_>>(frame.as_str()).ok()?;
    Some(
        ServerFrame::Sent { client_id: &own.client_id, conversation: own.conversation, seq: own.seq, ts: own.ts }
            .encode(),
    )
}

struct Connection {
    chat: Arc<Chat>,
    user: UserId,
    device: DeviceId,
    sink: SplitSink<WebSocket, WsMessage>,
    /// Per conversation, the highest seq passed to the device (or its own, confirmed by `sent`).
    sent: HashMap<ConversationId, i64>,
    /// This device's own messages it was answered `sent` for over this socket; any other of its
    /// own (sent over HTTP, or before a reconnect) gets a `sent` frame when it passes, so the
    /// device sees every seq.
    answered: HashSet<(ConversationId, i64)>,
    typing: HashMap<ConversationId, Instant>,
    /// The user's audience as last read, for typing.
    audience: Option<(Instant, Arc<HashSet<UserId>>)>,
    strikes: u32,
    lagged: Arc<Lagged>,
    /// While replaying, an overflowing queue is caught up by another pass instead of a disconnect.
    replaying: bool,
    /// Frames written into the socket's buffer but not yet flushed to the kernel.
    unflushed: bool,
}

async fn run(chat: Arc<Chat>, socket: WebSocket, user: UserId, device: DeviceId) {
    let mut registration = chat.hub.register(&user, device);
    // Before the replay: from here on other nodes send this user's events here. Without that,
    // the connection would miss them: it ends, and the device reconnects.
    if let Err(e) = chat.arrived(&user).await {
        tracing::error!(error = %e, %user, "could not record where a user is connected; closing");
        if chat.hub.unregister(&user, registration.id) {
            chat.left(&user).await;
        }
        return;
    }
    if registration.first {
        chat.announce_presence(&user, true, now_ms()).await;
    }
    if let Err(e) = chat.store.device_seen(&user, &device).await {
        tracing::warn!(error = %e, %user, "could not note that a device was seen");
    }
    let (sink, mut stream) = socket.split();
    let mut conn = Connection {
        chat: chat.clone(),
        user: user.clone(),
        device,
        sink,
        sent: HashMap::new(),
        answered: HashSet::new(),
        typing: HashMap::new(),
        audience: None,
        strikes: 0,
        lagged: registration.lagged.clone(),
        replaying: true,
        unflushed: false,
    };
    if conn.start().await.is_ok() && conn.flush().await.is_ok() {
        let _ = conn.serve(&mut stream, &mut registration).await;
    }
    if chat.hub.unregister(&user, registration.id) {
        chat.left(&user).await;
        // Offline only when no node holds a device of theirs.
        if chat.online(std::slice::from_ref(&user)).await.is_empty() {
            let now = now_ms();
            if let Err(e) = chat.store.set_last_seen(&user, now).await {
                tracing::warn!(error = %e, "could not record last seen");
            }
            chat.announce_presence(&user, false, now).await;
        }
    }
}

impl Connection {
    /// Writes one frame into the socket's buffer; [`Connection::flush`] hands what is buffered to
    /// the kernel, once per wake-up rather than once per frame. A client that takes longer than the
    /// send timeout is stuck; one whose queue overflows meanwhile is too slow: either way the
    /// connection ends and the device catches up by replay.
    async fn send_frame(&mut self, frame: Utf8Bytes) -> Result<(), Stop> {
        self.unflushed = true;
        self.write(Some(WsMessage::Text(frame))).await
    }

    /// Flushes what [`Connection::send_frame`] buffered.
    async fn flush(&mut self) -> Result<(), Stop> {
        if !std::mem::take(&mut self.unflushed) {
            return Ok(());
        }
        self.write(None).await
    }

    /// Buffers `frame`, or flushes when there is none, within the send timeout.
    async fn write(&mut self, frame: Option<WsMessage>) -> Result<(), Stop> {
        let timeout = Duration::from_secs(self.chat.config.send_timeout_secs);
        let lagged = self.lagged.clone();
        let replaying = self.replaying;
        let sink = &mut self.sink;
        let op = async move {
            match frame {
                Some(frame) => sink.feed(frame).await,
                None => sink.flush().await,
            }
        };
        let outcome = tokio::select! {
            written = tokio::time::timeout(timeout, op) => match written {
                Ok(Ok(())) => Ok(()),
                _ => Err(false),
            },
            _ = lagged.wait(), if !replaying => Err(true),
        };
        match outcome {
            Ok(()) => Ok(()),
            Err(true) => Err(self.close(CLOSE_TOO_SLOW, "too slow: reconnect to catch up").await),
            Err(false) => Err(Stop),
        }
    }

    async fn close(&mut self, code: u16, reason: &'static str) -> Stop {
        let frame = WsMessage::Close(Some(CloseFrame { code, reason: Utf8Bytes::from_static(reason) }));
        let _ = tokio::time::timeout(Duration::from_secs(1), self.sink.send(frame)).await;
        Stop
    }

    async fn error(&mut self, code: &str, message: &str, client_id: Option<&str>) -> Result<(), Stop> {
        self.strikes += 1;
        if self.strikes > MAX_STRIKES {
            return Err(self.close(1008, "too many bad frames").await);
        }
        self.send_frame(ServerFrame::Error { code, message, client_id }.encode()).await
    }

    /// Replay, then the receipts and presence the device missed.
    async fn start(&mut self) -> Result<(), Stop> {
        self.catch_up().await?;
        // Live events that overflowed while replaying were wake-ups only: another pass reads
        // whatever they announced.
        for _ in 0..MAX_RESYNC_PASSES {
            if !self.lagged.take() {
                break;
            }
            self.catch_up().await?;
        }
        self.replaying = false;
        let receipts = self.chat.store.receipts(&self.user).await.map_err(|e| self.fail(e))?;
        let mut by_conversation: std::collections::BTreeMap<ConversationId, Vec<Receipt>> = Default::default();
        for r in receipts {
            by_conversation.entry(r.conversation).or_default().push(r);
        }
        for (conversation, receipts) in by_conversation {
            // A large group's receipts come aggregated: two frames, not two per member.
            let members = self.chat.members(&conversation).await.map_err(|e| self.fail(e))?;
            if members.len() > crate::chat::AGGREGATE_ABOVE {
                let floors = self.chat.group_receipt(&conversation, &self.user).await.map_err(|e| self.fail(e))?;
                for (status, seq) in [("delivered", floors.0), ("read", floors.1)] {
                    if seq > 0 {
                        self.send_frame(ServerFrame::GroupReceipt { conversation, status, seq }.encode()).await?;
                    }
                }
                continue;
            }
            for r in receipts {
                for (status, seq) in [("delivered", r.cursor.delivered), ("read", r.cursor.read)] {
                    if seq > 0 {
                        let frame = ServerFrame::Receipt { conversation, user: &r.user, status, seq };
                        self.send_frame(frame.encode()).await?;
                    }
                }
            }
        }
        let contacts = self.chat.store.watched(&self.user).await.map_err(|e| self.fail(e))?;
        let users: Vec<UserId> = contacts.iter().map(|c| c.user.clone()).collect();
        let online_now = self.chat.online(&users).await;
        for c in contacts {
            let online = online_now.contains(&c.user);
            self.send_frame(ServerFrame::Presence { user: &c.user, online, last_seen: c.last_seen }.encode()).await?;
        }
        Ok(())
    }

    fn fail(&self, e: StoreError) -> Stop {
        tracing::error!(error = %e, user = %self.user, "gateway store call failed; closing the connection");
        Stop
    }

    async fn catch_up(&mut self) -> Result<(), Stop> {
        let states = self.chat.store.sync_state(&self.user, &self.device).await.map_err(|e| self.fail(e))?;
        for state in states {
            let base = self.sent.get(&state.conversation).copied().unwrap_or(state.delivered);
            let base = self.note_expired(state.conversation, base, state.purged_upto).await?;
            self.sent.insert(state.conversation, base);
            if state.last_seq > base {
                self.fill(state.conversation, state.last_seq).await?;
            }
        }
        Ok(())
    }

    /// Tells the device when retention took messages it never got; returns where to resume.
    async fn note_expired(&mut self, conversation: ConversationId, base: i64, purged_upto: i64) -> Result<i64, Stop> {
        if base >= purged_upto {
            return Ok(base);
        }
        self.send_frame(ServerFrame::Expired { conversation, oldest_seq: purged_upto + 1 }.encode()).await?;
        Ok(purged_upto)
    }

    /// Where this connection stands in a conversation, loading it on first sight; `None` when the
    /// user is not a member.
    async fn base(&mut self, conversation: ConversationId) -> Result<Option<i64>, Stop> {
        if let Some(seq) = self.sent.get(&conversation) {
            return Ok(Some(*seq));
        }
        match self.chat.store.sync_one(&self.user, &self.device, &conversation).await {
            Ok(state) => {
                let base = self.note_expired(conversation, state.delivered, state.purged_upto).await?;
                self.sent.insert(conversation, base);
                Ok(Some(base))
            }
            Err(StoreError::NotMember) => Ok(None),
            Err(e) => Err(self.fail(e)),
        }
    }

    /// Sends what the store holds after `sent` up to `upto`, in seq order.
    async fn fill(&mut self, conversation: ConversationId, upto: i64) -> Result<(), Stop> {
        loop {
            let after = self.sent.get(&conversation).copied().unwrap_or(0);
            if after >= upto {
                return Ok(());
            }
            let page = match self.chat.store.messages_after(&conversation, &self.user, after, MAX_PAGE).await {
                Ok(page) => page,
                Err(StoreError::NotMember) => {
                    self.sent.remove(&conversation);
                    return Ok(());
                }
                Err(e) => return Err(self.fail(e)),
            };
            let Some(first) = page.first() else { return Ok(()) };
            if first.seq > after + 1 {
                // Retention got there first.
                self.send_frame(ServerFrame::Expired { conversation, oldest_seq: first.seq }.encode()).await?;
            }
            for m in &page {
                if m.device != self.device {
                    self.send_frame(message_frame(m)).await?;
                } else if !self.answered.remove(&(conversation, m.seq)) {
                    let sent =
                        ServerFrame::Sent { client_id: &m.client_id, conversation, seq: m.seq, ts: m.created_at };
                    self.send_frame(sent.encode()).await?;
                }
                self.sent.insert(conversation, m.seq);
            }
        }
    }

    async fn serve(
        &mut self,
        stream: &mut futures_util::stream::SplitStream<WebSocket>,
        registration: &mut crate::hub::Registration,
    ) -> Result<(), Stop> {
        let heartbeat = Duration::from_secs(self.chat.config.heartbeat_secs.max(1));
        let idle = Duration::from_secs(self.chat.config.idle_timeout_secs.max(1));
        let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + heartbeat, heartbeat);
        // Finds what a lost wake-up left out (a crash between commit and fan-out, a dropped bus
        // envelope): connections spread their checks over the interval.
        let every = Duration::from_secs(self.chat.config.gap_check_secs.max(1));
        let first = every.mul_f64(0.5 + f64::from(random_u16()) / f64::from(u16::MAX));
        let mut gap_check = tokio::time::interval_at(tokio::time::Instant::now() + first, every);
        gap_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_heard = Instant::now();
        loop {
            tokio::select! {
                incoming = stream.next() => {
                    last_heard = Instant::now();
                    match incoming {
                        None => return Ok(()),
                        Some(Ok(WsMessage::Close(_))) => {
                            // Answer the close handshake: everything the client sent before it is handled.
                            let _ = tokio::time::timeout(Duration::from_secs(1), self.sink.close()).await;
                            return Ok(());
                        }
                        Some(Ok(WsMessage::Text(text))) => self.on_text(text.as_str()).await?,
                        Some(Ok(WsMessage::Binary(_))) => return Err(self.close(1003, "text frames only").await),
                        Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_))) => {}
                        Some(Err(e)) => {
                            let too_big = e.to_string().contains("Space limit exceeded");
                            tracing::debug!(error = %e, "websocket read failed");
                            let (code, reason) = if too_big { (1009, "frame too large") } else { (1002, "protocol error") };
                            return Err(self.close(code, reason).await);
                        }
                    }
                }
                event = registration.events.recv() => {
                    let Some(event) = event else { return Ok(()) };
                    if self.lagged.is_set() {
                        return Err(self.close(CLOSE_TOO_SLOW, "too slow: reconnect to catch up").await);
                    }
                    self.on_event(&event).await?;
                }
                _ = gap_check.tick() => self.catch_up().await?,
                _ = ping.tick() => {
                    if last_heard.elapsed() > idle {
                        return Err(self.close(CLOSE_IDLE, "idle").await);
                    }
                    self.strikes = 0;
                    self.unflushed = true;
                    self.write(Some(WsMessage::Ping(Default::default()))).await?;
                }
            }
            // More events already queued go into the same write; otherwise out it goes.
            if registration.events.is_empty() {
                self.flush().await?;
            }
        }
    }

    async fn on_event(&mut self, event: &Event) -> Result<(), Stop> {
        match event {
            Event::Message { conversation, seq, device, frame } => {
                let Some(base) = self.base(*conversation).await? else { return Ok(()) };
                if *seq <= base {
                    Ok(())
                } else if *seq == base + 1 {
                    if *device != self.device {
                        self.send_frame(frame.clone()).await?;
                    } else if !self.answered.remove(&(*conversation, *seq))
                        && let Some(sent) = sent_of(frame)
                    {
                        self.send_frame(sent).await?;
                    }
                    self.sent.insert(*conversation, *seq);
                    Ok(())
                } else {
                    self.fill(*conversation, *seq).await
                }
            }
            Event::Frame(frame) => self.send_frame(frame.clone()).await,
            Event::LoggedOut => Err(self.close(CLOSE_LOGGED_OUT, "logged out").await),
            Event::Replaced => Err(self.close(CLOSE_REPLACED, "replaced by a newer connection of this device").await),
            Event::Resync => self.catch_up().await,
        }
    }

    async fn on_text(&mut self, text: &str) -> Result<(), Stop> {
        let frame = match serde_json::from_str::<ClientFrame>(text) {
            Ok(frame) => frame,
            Err(e) => {
                // Say which: not JSON at all, or JSON that is not a frame we know.
                return match serde_json::from_str::<Value>(text) {
                    Err(_) => self.error("bad_json", "the frame is not JSON", None).await,
                    Ok(value) => {
                        let client_id = value.get("client_id").and_then(Value::as_str).map(str::to_owned);
                        let message = format!("not a valid frame: {e}");
                        self.error("invalid_frame", &message, client_id.as_deref()).await
                    }
                };
            }
        };
        match frame {
            ClientFrame::Send { client_id, conversation, body } => self.on_send(&client_id, &conversation, &body).await,
            ClientFrame::Ack { conversation, seq } => self.on_ack(&conversation, seq, false).await,
            ClientFrame::Read { conversation, seq } => self.on_ack(&conversation, seq, true).await,
            ClientFrame::Typing { conversation } => self.on_typing(&conversation).await,
            ClientFrame::LinkAnswer { request, approve } => {
                match self.chat.answer_link(&self.user, self.device, &request, approve).await {
                    Ok(()) => Ok(()),
                    Err(ApiError::Store(e @ (StoreError::Database(_) | StoreError::Corrupt(_)))) => Err(self.fail(e)),
                    Err(e) => {
                        let (_, code, message) = e.parts();
                        self.error(code, &message, None).await
                    }
                }
            }
        }
    }

    async fn on_send(&mut self, client_id: &str, conversation: &str, body: &Value) -> Result<(), Stop> {
        let Ok(conversation) = conversation.parse::<ConversationId>() else {
            return self.error("not_found", "no such conversation", Some(client_id)).await;
        };
        match self.chat.send(&self.user, self.device, &conversation, client_id, body).await {
            Ok(appended) => {
                // A message may have made a direct conversation two-way: read the audience afresh.
                self.audience = None;
                let m = appended.message();
                let frame = ServerFrame::Sent { client_id, conversation, seq: m.seq, ts: m.created_at };
                // Its wake-up is coming: it needs no second `sent`. (Bounded: a wake-up lost on
                // the way leaves its entry behind.)
                if self.answered.len() >= MAX_ANSWERED {
                    self.answered.clear();
                }
                self.answered.insert((conversation, m.seq));
                if let Appended::Duplicate(_) = appended {
                    tracing::debug!(%conversation, seq = m.seq, "a retried send was answered with the first result");
                }
                self.send_frame(frame.encode()).await
            }
            Err(e) => {
                let (_, code, message) = e.parts();
                self.error(code, &message, Some(client_id)).await
            }
        }
    }

    async fn on_ack(&mut self, conversation: &str, seq: i64, read: bool) -> Result<(), Stop> {
        let Ok(conversation) = conversation.parse::<ConversationId>() else {
            return self.error("not_found", "no such conversation", None).await;
        };
        let Some(sent) = self.base(conversation).await? else {
            return self.error("not_found", "no such conversation", None).await;
        };
        // A device confirms only what it was given: a cursor never skips what is still on its way.
        let seq = seq.min(sent);
        if seq <= 0 {
            return Ok(());
        }
        match self.chat.ack(&self.user, self.device, &conversation, seq, read).await {
            Ok(_) => Ok(()),
            Err(StoreError::NotMember) => self.error("not_found", "no such conversation", None).await,
            Err(e) => Err(self.fail(e)),
        }
    }

    /// The user's audience, read at most every [`AUDIENCE_TTL`] for typing.
    async fn audience(&mut self) -> Result<Arc<HashSet<UserId>>, Stop> {
        if let Some((at, audience)) = &self.audience
            && at.elapsed() < AUDIENCE_TTL
        {
            return Ok(audience.clone());
        }
        let audience: Arc<HashSet<UserId>> =
            Arc::new(self.chat.store.audience(&self.user).await.map_err(|e| self.fail(e))?.into_iter().collect());
        self.audience = Some((Instant::now(), audience.clone()));
        Ok(audience)
    }

    async fn on_typing(&mut self, conversation: &str) -> Result<(), Stop> {
        let Ok(conversation) = conversation.parse::<ConversationId>() else {
            return self.error("not_found", "no such conversation", None).await;
        };
        let members = match self.chat.members(&conversation).await {
            Ok(m) => m,
            Err(e) => return Err(self.fail(e)),
        };
        if !members.contains(&self.user) {
            return self.error("not_found", "no such conversation", None).await;
        }
        let now = Instant::now();
        if self.typing.get(&conversation).is_some_and(|at| now.duration_since(*at) < TYPING_INTERVAL) {
            return Ok(());
        }
        if self.typing.len() >= 1024 {
            self.typing.clear();
        }
        self.typing.insert(conversation, now);
        // Only to the members in the typist's audience: not to a stranger's message request.
        let audience = self.audience().await?;
        let others: Vec<UserId> =
            members.iter().filter(|u| **u != self.user && audience.contains(*u)).cloned().collect();
        if others.is_empty() {
            return Ok(());
        }
        let frame = ServerFrame::Typing { conversation, user: &self.user }.encode();
        self.chat.fan_out(&others, Event::Frame(frame)).await;
        Ok(())
    }
}

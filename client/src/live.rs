//! The live connection: one task owns the WebSocket, reconnects it (refreshing an expired token),
//! resends unconfirmed sends in their order and filters replayed messages through per-conversation
//! cursors. The application acks what it has kept ([`Live::ack`]); the SDK never acks on its own.

use std::collections::HashMap;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{self, Message as WsMessage};

use crate::{Api, Error, Message};

/// How a [`Live`] behaves.
#[derive(Debug, Clone)]
pub struct LiveOptions {
    /// Events buffered for the application; when it falls behind, the SDK stops reading the socket
    /// (and the server, in turn, disconnects it as too slow; it then catches up by replay).
    pub event_buffer: usize,
    /// How long [`Live::send`] waits for the server's confirmation, across reconnects.
    pub send_timeout: Duration,
    /// Longest wait between reconnect attempts.
    pub max_backoff: Duration,
    /// How often the application's acks ([`Live::ack`]) go out (batched per conversation).
    pub ack_every: Duration,
    /// Per conversation, the highest seq the application already has (from an earlier run);
    /// anything at or below it is not delivered again, and a message past the one after it has
    /// the messages between filled in from history first.
    pub cursors: HashMap<String, i64>,
    /// Nothing heard from the server for this long (it pings every 25 s; this SDK pings too)
    /// means the connection is dead: it is dropped and made again.
    pub read_timeout: Duration,
    /// How often this SDK pings the server.
    pub ping_every: Duration,
    /// A refresh token: when the access token expires, the SDK refreshes it and reconnects
    /// (and says so with [`Event::Refreshed`], whose session the app keeps). Without one, an
    /// expired token ends the connection.
    pub refresh_token: Option<String>,
}

impl Default for LiveOptions {
    fn default() -> Self {
        Self {
            event_buffer: 1024,
            send_timeout: Duration::from_secs(30),
            max_backoff: Duration::from_secs(5),
            ack_every: Duration::from_millis(50),
            cursors: HashMap::new(),
            read_timeout: Duration::from_secs(60),
            ping_every: Duration::from_secs(20),
            refresh_token: None,
        }
    }
}

/// What the server confirmed for a send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sent {
    pub conversation: String,
    pub client_id: String,
    pub seq: i64,
    pub ts: i64,
}

/// What the application sees.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A message from another device, exactly once, in seq order per conversation.
    Message(Message),
    Receipt {
        conversation: String,
        user: String,
        status: String,
        seq: i64,
    },
    /// In a large group (over 32 members), receipts come aggregated: every other member has
    /// reached `status` ("delivered" or "read") up to `seq`. Per-member detail:
    /// [`crate::Api::receipts`].
    GroupReceipt {
        conversation: String,
        status: String,
        seq: i64,
    },
    Typing {
        conversation: String,
        user: String,
    },
    Presence {
        user: String,
        online: bool,
        last_seen: i64,
    },
    /// Retention removed messages this device never got; the conversation resumes at `oldest_seq`.
    Expired {
        conversation: String,
        oldest_seq: i64,
    },
    /// An `error` frame not tied to one of this client's pending sends.
    Error {
        code: String,
        message: String,
    },
    /// Another device was linked to this account; `replaced` names one it logged out (the least
    /// recently seen, past the device limit). An app shows it: a link the user did not make means
    /// their account is in someone else's hands (unlink it with `Api::unlink_device`).
    DeviceLinked {
        device_id: String,
        name: String,
        replaced: Option<String>,
    },
    /// Device `requested_by` (named `requested_by_name` when it was linked) of this account asks
    /// to link another it calls `name`. The app asks its user and answers with
    /// `Live::answer_link`; a request the user did not make means someone else holds that device's
    /// token (deny it, and unlink that device).
    LinkRequest {
        request: String,
        name: String,
        requested_by: String,
        requested_by_name: String,
    },
    /// The media of message `seq`, sent while it was still being processed, is ready (or failed):
    /// `media_info` is what to draw it with (kind, size, preview, variants' signed URLs).
    MediaReady {
        conversation: String,
        seq: i64,
        media: String,
        media_info: Value,
    },
    /// Another of this user's devices read `conversation` up to `seq`: clear its unread here too.
    Read {
        conversation: String,
        seq: i64,
    },
    /// `user` (in one of this user's conversations, or this user) changed their profile: ask for
    /// it again with `Api::user`.
    Profile {
        user: String,
        updated_at: i64,
    },
    /// This user's flags on `conversation` changed (on any of their devices): muted until when
    /// (Unix ms, "always", or null), archived, pinned.
    Flags {
        conversation: String,
        muted_until: Value,
        archived: bool,
        pinned: bool,
    },
    /// The access token expired and the SDK refreshed it: keep this session (its refresh token
    /// replaces the one before, which is spent).
    Refreshed(crate::Session),
    /// The connection is up (again); replay follows.
    Connected,
    /// The connection dropped; the SDK reconnects unless the server refused the device, or closed
    /// this connection for a newer one of the same device (4009), which ends this `Live`.
    Disconnected {
        code: Option<u16>,
        reason: String,
    },
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
enum ServerFrame {
    Sent {
        client_id: String,
        conversation: String,
        seq: i64,
        ts: i64,
    },
    Message(Message),
    Receipt {
        conversation: String,
        user: String,
        status: String,
        seq: i64,
    },
    #[serde(rename = "group_receipt")]
    GroupReceipt {
        conversation: String,
        status: String,
        seq: i64,
    },
    Typing {
        conversation: String,
        user: String,
    },
    Presence {
        user: String,
        online: bool,
        last_seen: i64,
    },
    Expired {
        conversation: String,
        oldest_seq: i64,
    },
    Error {
        code: String,
        message: String,
        client_id: Option<String>,
    },
    #[serde(rename = "device_linked")]
    DeviceLinked {
        device_id: String,
        name: String,
        replaced: Option<String>,
    },
    #[serde(rename = "link_request")]
    LinkRequest {
        request: String,
        name: String,
        requested_by: String,
        requested_by_name: String,
    },
    Read {
        conversation: String,
        seq: i64,
    },
    #[serde(rename = "media_ready")]
    MediaReady {
        conversation: String,
        seq: i64,
        media: String,
        media_info: Value,
    },
    Profile {
        user: String,
        updated_at: i64,
    },
    Flags {
        conversation: String,
        muted_until: Value,
        archived: bool,
        pinned: bool,
    },
}

enum Command {
    Send { conversation: String, client_id: String, body: Value, reply: oneshot::Sender<Result<Sent, Error>> },
    Ack { conversation: String, seq: i64 },
    Frame(Value),
    Close,
}

struct Pending {
    client_id: String,
    frame: String,
    reply: oneshot::Sender<Result<Sent, Error>>,
}

/// The largest frame the server takes (`chat_core::MAX_CLIENT_FRAME`): a send over it is refused
/// here, as the server would close the connection on it (1009) every time it was resent.
const MAX_FRAME: usize = 64 * 1024 + 4096;

/// A live connection to `/v1/ws` that stays up.
#[derive(Debug)]
pub struct Live {
    commands: mpsc::Sender<Command>,
    events: mpsc::Receiver<Event>,
    task: JoinHandle<()>,
    send_timeout: Duration,
}

type Socket = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn open(api: &Api) -> Result<Socket, Error> {
    let mut request = api.ws_url().into_client_request().map_err(|e| Error::WebSocket(e.to_string()))?;
    if let Some(token) = api.token() {
        let value = HeaderValue::from_str(&format!("Bearer {token}")).map_err(|e| Error::WebSocket(e.to_string()))?;
        request.headers_mut().insert("authorization", value);
    }
    match tokio_tungstenite::connect_async(request).await {
        Ok((socket, _)) => Ok(socket),
        Err(tungstenite::Error::Http(response)) => {
            let status = response.status().as_u16();
            let body: Value =
                response.body().as_deref().and_then(|b| serde_json::from_slice(b).ok()).unwrap_or(Value::Null);
            Err(Error::Api {
                status,
                code: body["error"]["code"].as_str().unwrap_or("unknown").to_owned(),
                message: body["error"]["message"].as_str().unwrap_or("").to_owned(),
            })
        }
        Err(e) => Err(Error::WebSocket(e.to_string())),
    }
}

impl Live {
    /// Connects as `api`'s token holder (a device-bound token). Fails if the first connection
    /// fails; later drops are reconnected.
    pub async fn connect(api: &Api, options: LiveOptions) -> Result<Live, Error> {
        let socket = open(api).await?;
        let (commands, command_rx) = mpsc::channel(256);
        let (event_tx, events) = mpsc::channel(options.event_buffer.max(1));
        let send_timeout = options.send_timeout;
        let cursors = options.cursors.clone();
        let options_cursors = options.cursors.clone();
        let worker = Worker {
            api: api.clone(),
            options,
            events: event_tx,
            cursors,
            pending: Vec::new(),
            unacked: HashMap::new(),
            acked: options_cursors,
            own: HashMap::new(),
        };
        let task = tokio::spawn(worker.run(socket, command_rx));
        Ok(Live { commands, events, task, send_timeout })
    }

    /// Sends `body` with a fresh client id; resolves when the server has stored it.
    pub async fn send(&self, conversation: &str, body: Value) -> Result<Sent, Error> {
        self.send_with_id(conversation, &uuid::Uuid::now_v7().to_string(), body).await
    }

    /// Sends with the caller's client id (a retry with the same id is stored once).
    pub async fn send_with_id(&self, conversation: &str, client_id: &str, body: Value) -> Result<Sent, Error> {
        let (reply, answer) = oneshot::channel();
        let command =
            Command::Send { conversation: conversation.to_owned(), client_id: client_id.to_owned(), body, reply };
        self.commands.send(command).await.map_err(|_| Error::Closed)?;
        match tokio::time::timeout(self.send_timeout, answer).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(Error::Closed),
            Err(_) => Err(Error::Timeout),
        }
    }

    /// Acknowledges that the application has everything up to `seq` in a conversation (stored
    /// it, shown it): the server will not replay it to this device again. The SDK never acks on
    /// its own, so a crash with events not yet handled costs a replay, never a message.
    pub async fn ack(&self, conversation: &str, seq: i64) -> Result<(), Error> {
        let command = Command::Ack { conversation: conversation.to_owned(), seq };
        self.commands.send(command).await.map_err(|_| Error::Closed)
    }

    /// Marks a conversation read up to `seq`.
    pub async fn read(&self, conversation: &str, seq: i64) -> Result<(), Error> {
        let frame = json!({"type": "read", "conversation": conversation, "seq": seq});
        self.commands.send(Command::Frame(frame)).await.map_err(|_| Error::Closed)
    }

    /// Approves (or denies) another device's request to link one more (`Event::LinkRequest`).
    /// An approval links it: every device hears `Event::DeviceLinked`.
    pub async fn answer_link(&self, request: &str, approve: bool) -> Result<(), Error> {
        let frame = json!({"type": "link_answer", "request": request, "approve": approve});
        self.commands.send(Command::Frame(frame)).await.map_err(|_| Error::Closed)
    }

    /// Says the user is typing in a conversation.
    pub async fn typing(&self, conversation: &str) -> Result<(), Error> {
        let frame = json!({"type": "typing", "conversation": conversation});
        self.commands.send(Command::Frame(frame)).await.map_err(|_| Error::Closed)
    }

    /// The next event; `None` once the connection has stopped for good.
    pub async fn next_event(&mut self) -> Option<Event> {
        self.events.recv().await
    }

    /// Closes the connection and waits for the task to end; the server has handled every frame
    /// sent before (acks included) when this returns.
    pub async fn close(self) {
        let _ = self.commands.send(Command::Close).await;
        let _ = self.task.await;
    }
}

struct Worker {
    api: Api,
    options: LiveOptions,
    events: mpsc::Sender<Event>,
    /// Per conversation, the highest seq handed to the application.
    cursors: HashMap<String, i64>,
    /// Sends not yet confirmed, in the order they were made, resent so after every reconnect.
    pending: Vec<Pending>,
    /// Acks not yet sent, per conversation.
    unacked: HashMap<String, i64>,
    /// Per conversation, the highest seq the application acked (its start cursors count).
    acked: HashMap<String, i64>,
    /// Per conversation, seqs of this device's own messages past the cursor.
    own: HashMap<String, std::collections::BTreeSet<i64>>,
}

/// What refreshing the access token came to.
enum Refresh {
    Done,
    /// Not now (the network, the server): try again.
    Later,
    /// No refresh token, or the server refused it: the session is over.
    Refused,
}

/// Why a gap could not be filled.
enum Unfilled {
    /// Not now: drop the connection, whose replay brings the message (and the gap) again.
    Later,
}

/// Why one connection ended.
enum Ended {
    Dropped { code: Option<u16>, reason: String },
    Closed,
}

/// The close code of a connection replaced by a newer one of the same device.
const REPLACED: u16 = 4009;

impl Worker {
    async fn run(mut self, mut socket: Socket, mut commands: mpsc::Receiver<Command>) {
        let mut backoff = Duration::from_millis(100);
        loop {
            let _ = self.events.send(Event::Connected).await;
            match self.serve(&mut socket, &mut commands).await {
                Ended::Closed => return,
                Ended::Dropped { code, reason } => {
                    let replaced = code == Some(REPLACED);
                    let _ = self.events.send(Event::Disconnected { code, reason }).await;
                    if replaced {
                        // A newer connection of this device took over: reconnecting would take it
                        // back, and the two would take turns for ever.
                        for p in self.pending.drain(..) {
                            let _ = p.reply.send(Err(Error::Closed));
                        }
                        return;
                    }
                }
            }
            // Acks not flushed before the drop go out on the next connection.
            socket = loop {
                tokio::time::sleep(backoff).await;
                match open(&self.api).await {
                    Ok(socket) => {
                        backoff = Duration::from_millis(100);
                        break socket;
                    }
                    Err(Error::Api { status: 401, code, message }) if code == "token_expired" => {
                        match self.refresh().await {
                            Refresh::Done => backoff = Duration::from_millis(100),
                            Refresh::Later => backoff = (backoff * 2).min(self.options.max_backoff),
                            Refresh::Refused => {
                                for p in self.pending.drain(..) {
                                    let error =
                                        Error::Api { status: 401, code: code.clone(), message: message.clone() };
                                    let _ = p.reply.send(Err(error));
                                }
                                let _ = self
                                    .events
                                    .send(Event::Disconnected { code: None, reason: format!("{code}: {message}") })
                                    .await;
                                return;
                            }
                        }
                    }
                    Err(Error::Api { status: 401 | 403, code, message }) => {
                        // The device was logged out or its token is no good: reconnecting cannot help.
                        for p in self.pending.drain(..) {
                            let _ = p.reply.send(Err(Error::Api {
                                status: 401,
                                code: code.clone(),
                                message: message.clone(),
                            }));
                        }
                        let _ = self
                            .events
                            .send(Event::Disconnected { code: None, reason: format!("{code}: {message}") })
                            .await;
                        return;
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "reconnect failed");
                        backoff = (backoff * 2).min(self.options.max_backoff);
                    }
                }
            };
        }
    }

    /// Spends the refresh token for a fresh pair.
    async fn refresh(&mut self) -> Refresh {
        let Some(token) = self.options.refresh_token.clone() else { return Refresh::Refused };
        match self.api.refresh(&token).await {
            Ok(session) => {
                self.api = self.api.with_token(&session.access_token);
                self.options.refresh_token = session.refresh_token.clone();
                let _ = self.events.send(Event::Refreshed(session)).await;
                Refresh::Done
            }
            Err(e @ Error::Api { status: 400..=499, .. }) if !matches!(e, Error::Api { status: 429, .. }) => {
                tracing::warn!(error = %e, "the refresh token was refused");
                Refresh::Refused
            }
            Err(e) => {
                tracing::warn!(error = %e, "refreshing the access token failed; trying again");
                Refresh::Later
            }
        }
    }

    async fn serve(&mut self, socket: &mut Socket, commands: &mut mpsc::Receiver<Command>) -> Ended {
        // In the order they were made: a conversation's messages keep their order across drops.
        for pending in &self.pending {
            if socket.send(WsMessage::text(pending.frame.clone())).await.is_err() {
                return Ended::Dropped { code: None, reason: "write failed".into() };
            }
        }
        let mut acks = tokio::time::interval(self.options.ack_every);
        let mut ping = tokio::time::interval(self.options.ping_every.max(Duration::from_millis(10)));
        let mut last_heard = tokio::time::Instant::now();
        loop {
            tokio::select! {
                command = commands.recv() => match command {
                    None | Some(Command::Close) => {
                        self.flush_acks(socket).await;
                        // The server answers the close after everything sent before it, acks
                        // included, so waiting for its answer makes those acks durable.
                        let _ = socket.close(None).await;
                        let _ = tokio::time::timeout(Duration::from_secs(5), async {
                            while let Some(Ok(_)) = socket.next().await {}
                        })
                        .await;
                        return Ended::Closed;
                    }
                    Some(Command::Send { conversation, client_id, body, reply }) => {
                        let frame = json!({"type": "send", "client_id": client_id, "conversation": conversation, "body": body}).to_string();
                        if frame.len() > MAX_FRAME {
                            let message = format!("a send frame holds at most {MAX_FRAME} bytes");
                            let _ = reply.send(Err(Error::Api { status: 413, code: "invalid_request".into(), message }));
                            continue;
                        }
                        let write = socket.send(WsMessage::text(frame.clone())).await;
                        self.pending.retain(|p| p.client_id != client_id);
                        self.pending.push(Pending { client_id, frame, reply });
                        if write.is_err() {
                            return Ended::Dropped { code: None, reason: "write failed".into() };
                        }
                    }
                    Some(Command::Ack { conversation, seq }) => {
                        let acked = self.acked.entry(conversation.clone()).or_insert(0);
                        *acked = (*acked).max(seq);
                        let unacked = self.unacked.entry(conversation).or_insert(0);
                        *unacked = (*unacked).max(seq);
                    }
                    Some(Command::Frame(frame)) => {
                        if socket.send(WsMessage::text(frame.to_string())).await.is_err() {
                            return Ended::Dropped { code: None, reason: "write failed".into() };
                        }
                    }
                },
                frame = tokio::time::timeout_at(last_heard + self.options.read_timeout, socket.next()) => match frame {
                    Err(_) => return Ended::Dropped { code: None, reason: "nothing heard from the server".into() },
                    Ok(frame) => {
                    last_heard = tokio::time::Instant::now();
                    match frame {
                    Some(Ok(WsMessage::Text(text))) => {
                        if !self.on_frame(text.as_str()).await {
                            return Ended::Dropped { code: None, reason: "a gap could not be filled yet".into() };
                        }
                    }
                    Some(Ok(WsMessage::Close(close))) => {
                        let (code, reason) = match close {
                            Some(c) => (Some(u16::from(c.code)), c.reason.to_string()),
                            None => (Some(u16::from(CloseCode::Status)), String::new()),
                        };
                        return Ended::Dropped { code, reason };
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return Ended::Dropped { code: None, reason: e.to_string() },
                    None => return Ended::Dropped { code: None, reason: "connection closed".into() },
                    }
                    }
                },
                _ = ping.tick() => {
                    if socket.send(WsMessage::Ping(Default::default())).await.is_err() {
                        return Ended::Dropped { code: None, reason: "write failed".into() };
                    }
                }
                _ = acks.tick() => {
                    if !self.flush_acks(socket).await {
                        return Ended::Dropped { code: None, reason: "write failed".into() };
                    }
                }
            }
        }
    }

    async fn flush_acks(&mut self, socket: &mut Socket) -> bool {
        for (conversation, seq) in self.unacked.drain() {
            let frame = json!({"type": "ack", "conversation": conversation, "seq": seq}).to_string();
            if socket.send(WsMessage::text(frame)).await.is_err() {
                return false;
            }
        }
        true
    }

    /// Handles one frame; false when the connection must be made again (a gap that could not be
    /// filled now).
    async fn on_frame(&mut self, text: &str) -> bool {
        let frame = match serde_json::from_str::<ServerFrame>(text) {
            Ok(frame) => frame,
            Err(e) => {
                tracing::warn!(error = %e, "an unknown frame from the server");
                return true;
            }
        };
        let event = match frame {
            ServerFrame::Message(m) => {
                self.absorb_own(&m.conversation);
                let cursor = self.cursors.get(&m.conversation).copied();
                if cursor.is_some_and(|cursor| m.seq <= cursor) {
                    // Replayed after a reconnect: the application has it already. If it acked it,
                    // say so again (an ack lost with the last connection would replay it forever).
                    if let Some(&acked) = self.acked.get(&m.conversation)
                        && m.seq <= acked
                    {
                        let unacked = self.unacked.entry(m.conversation.clone()).or_insert(0);
                        *unacked = (*unacked).max(acked);
                    }
                    return true;
                }
                if let Some(cursor) = cursor
                    && m.seq > cursor + 1
                {
                    // The application is behind what this device acked (an ack that went out
                    // before the application kept what it covered): fill the gap from history.
                    if let Err(Unfilled::Later) = self.fill(&m.conversation, cursor, m.seq).await {
                        return false;
                    }
                }
                self.cursors.insert(m.conversation.clone(), m.seq);
                Event::Message(m)
            }
            ServerFrame::Sent { client_id, conversation, seq, ts } => {
                // This device's own message holds a seq the server never sends back to it.
                self.own.entry(conversation.clone()).or_default().insert(seq);
                self.absorb_own(&conversation);
                if let Some(p) = self.take_pending(&client_id) {
                    let _ = p.reply.send(Ok(Sent { conversation, client_id, seq, ts }));
                }
                return true;
            }
            ServerFrame::Error { code, message, client_id } => {
                // A refusal of a send is for good (resending it would be refused again): it
                // leaves the queue with the error.
                if let Some(p) = client_id.and_then(|id| self.take_pending(&id)) {
                    let _ = p.reply.send(Err(Error::Api { status: 0, code, message }));
                    return true;
                }
                Event::Error { code, message }
            }
            ServerFrame::Receipt { conversation, user, status, seq } => {
                Event::Receipt { conversation, user, status, seq }
            }
            ServerFrame::GroupReceipt { conversation, status, seq } => {
                Event::GroupReceipt { conversation, status, seq }
            }
            ServerFrame::Typing { conversation, user } => Event::Typing { conversation, user },
            ServerFrame::Presence { user, online, last_seen } => Event::Presence { user, online, last_seen },
            ServerFrame::DeviceLinked { device_id, name, replaced } => {
                Event::DeviceLinked { device_id, name, replaced }
            }
            ServerFrame::LinkRequest { request, name, requested_by, requested_by_name } => {
                Event::LinkRequest { request, name, requested_by, requested_by_name }
            }
            ServerFrame::Read { conversation, seq } => Event::Read { conversation, seq },
            ServerFrame::MediaReady { conversation, seq, media, media_info } => {
                Event::MediaReady { conversation, seq, media, media_info }
            }
            ServerFrame::Profile { user, updated_at } => Event::Profile { user, updated_at },
            ServerFrame::Flags { conversation, muted_until, archived, pinned } => {
                Event::Flags { conversation, muted_until, archived, pinned }
            }
            ServerFrame::Expired { conversation, oldest_seq } => {
                let cursor = self.cursors.entry(conversation.clone()).or_insert(0);
                *cursor = (*cursor).max(oldest_seq - 1);
                Event::Expired { conversation, oldest_seq }
            }
        };
        // Waits when the application is behind: the socket is not read meanwhile.
        let _ = self.events.send(event).await;
        true
    }

    /// Moves a conversation's cursor over this device's own messages right after it, which the
    /// server does not send back (so they are no gap).
    fn absorb_own(&mut self, conversation: &str) {
        let Some(own) = self.own.get_mut(conversation) else { return };
        if let Some(cursor) = self.cursors.get_mut(conversation) {
            while own.remove(&(*cursor + 1)) {
                *cursor += 1;
            }
            own.retain(|seq| *seq > *cursor);
        }
        // A device that only sends into a conversation never gets a message there to move its
        // cursor: keep the newest seqs only.
        while own.len() > 4096 {
            own.pop_first();
        }
        if own.is_empty() {
            self.own.remove(conversation);
        }
    }

    fn take_pending(&mut self, client_id: &str) -> Option<Pending> {
        let at = self.pending.iter().position(|p| p.client_id == client_id)?;
        Some(self.pending.remove(at))
    }

    /// Hands the application the messages of `conversation` after `cursor` and before `seq`, read
    /// from history (what is gone, retention's or from before the user joined, is said with
    /// `Expired`). This device's own messages count as had.
    async fn fill(&mut self, conversation: &str, mut cursor: i64, seq: i64) -> Result<(), Unfilled> {
        let mut refreshed = false;
        while cursor + 1 < seq {
            let page = match self.api.history(conversation, cursor, (seq - cursor - 1).min(500)).await {
                Ok(page) => page,
                // Not a member any more: there is nothing to fill.
                Err(Error::Api { status: 404, .. }) => return Ok(()),
                Err(Error::Api { status: 401, code, .. }) if code == "token_expired" && !refreshed => {
                    refreshed = true;
                    match self.refresh().await {
                        Refresh::Done => continue,
                        Refresh::Later | Refresh::Refused => return Err(Unfilled::Later),
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, conversation, "could not fill a gap from history; reconnecting");
                    return Err(Unfilled::Later);
                }
            };
            let first = page.first().map_or(seq, |m| m.seq);
            if first > cursor + 1 {
                let expired = Event::Expired { conversation: conversation.to_owned(), oldest_seq: first };
                let _ = self.events.send(expired).await;
            }
            let Some(last) = page.last().map(|m| m.seq) else { return Ok(()) };
            for m in page.into_iter().filter(|m| m.seq < seq) {
                self.cursors.insert(conversation.to_owned(), m.seq);
                let own = self.own.get_mut(conversation).is_some_and(|own| own.remove(&m.seq))
                    || self.pending.iter().any(|p| p.client_id == m.client_id);
                if !own {
                    let _ = self.events.send(Event::Message(m)).await;
                }
            }
            if last <= cursor {
                return Ok(());
            }
            cursor = last;
        }
        Ok(())
    }
}

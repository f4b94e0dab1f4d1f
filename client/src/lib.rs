//! A Rust SDK for Courier.
//!
//! [`Api`] speaks the HTTP API (sign-in, devices, conversations, history). [`Live`] holds a
//! WebSocket to `/v1/ws` and keeps it up: it reconnects with back-off, the server replays what the
//! device has not acknowledged, and the SDK drops anything at or below the per-conversation cursor
//! it has already handed to the application, so each message reaches the application exactly once
//! and in order. Sends carry a client id and are resent after a reconnect until the server confirms
//! them; the server stores a retried send once.

mod live;

use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

pub use live::{Event, Live, LiveOptions, Sent};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The server refused: its status and `{"error":{"code","message"}}`.
    #[error("{status} {code}: {message}")]
    Api { status: u16, code: String, message: String },
    #[error("http: {0}")]
    Http(#[from] reqwest::Error),
    #[error("websocket: {0}")]
    WebSocket(String),
    /// The live connection's task has stopped (the [`Live`] was closed).
    #[error("the connection is closed")]
    Closed,
    #[error("no confirmation from the server in time")]
    Timeout,
}

impl Error {
    /// The error code the server gave, if it gave one.
    pub fn code(&self) -> Option<&str> {
        match self {
            Error::Api { code, .. } => Some(code),
            _ => None,
        }
    }
}

/// Tokens for one device, from sign-in or a refresh.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Session {
    pub user_id: String,
    pub device_id: String,
    pub access_token: String,
    #[serde(default)]
    pub refresh_token: Option<String>,
    pub expires_in: u64,
}

/// A linked device, as `GET /v1/devices` lists it.
#[derive(Debug, Clone, Deserialize)]
pub struct Device {
    pub id: String,
    pub name: String,
    /// Unix ms.
    pub created_at: i64,
    /// Unix ms of its last sign-in, token refresh or connect.
    pub last_seen: i64,
    /// The device whose token asked.
    pub current: bool,
}

/// A conversation as the API describes it.
#[derive(Debug, Clone, Deserialize)]
pub struct ConversationInfo {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub name: Option<String>,
    pub last_seq: i64,
    #[serde(default)]
    pub unread: Option<i64>,
}

/// A stored message.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Message {
    pub conversation: String,
    pub seq: i64,
    pub ts: i64,
    pub sender: String,
    pub client_id: String,
    /// Its kind is in the body (see PROTOCOL.md): text, media or ciphertext to read, a reaction,
    /// an edit, a deletion, a timer; a deleted or disappeared message's is a tombstone.
    pub body: Value,
    /// When the conversation's disappearing timer deletes it (Unix ms): delete the local copy then.
    #[serde(default)]
    pub expires_at: Option<i64>,
}

/// Who of a conversation's other members has got and read a message (members who joined after it
/// are not counted).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct MessageReceipts {
    pub seq: i64,
    /// Read it.
    pub read: Vec<String>,
    /// Got it on a device but have not read it.
    pub delivered: Vec<String>,
    /// Neither, yet.
    pub pending: Vec<String>,
    /// Members who never wrote in the conversation share no receipts: how many of them there are.
    pub withheld: usize,
}

/// The HTTP API, as one caller.
#[derive(Debug, Clone)]
pub struct Api {
    http: reqwest::Client,
    base: String,
    token: Option<String>,
}

impl Api {
    /// An anonymous client of the server at `base` (`http://host:port`), for signing in.
    pub fn new(base: &str) -> Self {
        let http = reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(30))
            .build()
            .expect("a plain reqwest client builds");
        Self { http, base: base.trim_end_matches('/').to_owned(), token: None }
    }

    /// The same server, as the holder of `token`.
    pub fn with_token(&self, token: &str) -> Self {
        Self { http: self.http.clone(), base: self.base.clone(), token: Some(token.to_owned()) }
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    pub fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }

    async fn call<T: DeserializeOwned>(&self, request: reqwest::RequestBuilder) -> Result<T, Error> {
        let request = match &self.token {
            Some(token) => request.bearer_auth(token),
            None => request,
        };
        let response = request.send().await?;
        let status = response.status();
        if status.is_success() {
            let bytes = response.bytes().await?;
            // 204 and friends: deserialise from null.
            let value: Value =
                if bytes.is_empty() { Value::Null } else { serde_json::from_slice(&bytes).unwrap_or(Value::Null) };
            return serde_json::from_value(value).map_err(|e| Error::Api {
                status: status.as_u16(),
                code: "unexpected_response".into(),
                message: e.to_string(),
            });
        }
        let body: Value = response.json().await.unwrap_or(Value::Null);
        Err(Error::Api {
            status: status.as_u16(),
            code: body["error"]["code"].as_str().unwrap_or("unknown").to_owned(),
            message: body["error"]["message"].as_str().unwrap_or("").to_owned(),
        })
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Asks for a sign-in code; in development mode the answer carries it (`dev_code`).
    pub async fn request_code(&self, phone: &str) -> Result<Option<String>, Error> {
        let answer: Value = self.call(self.http.post(self.url("/v1/auth/code")).json(&json!({"phone": phone}))).await?;
        Ok(answer["dev_code"].as_str().map(str::to_owned))
    }

    /// Signs in with a code, linking a new device.
    pub async fn verify(&self, phone: &str, code: &str, device_name: &str) -> Result<Session, Error> {
        let body = json!({"phone": phone, "code": code, "device_name": device_name});
        self.call(self.http.post(self.url("/v1/auth/verify")).json(&body)).await
    }

    /// Spends a refresh token for fresh tokens.
    pub async fn refresh(&self, refresh_token: &str) -> Result<Session, Error> {
        let body = json!({"refresh_token": refresh_token});
        self.call(self.http.post(self.url("/v1/auth/refresh")).json(&body)).await
    }

    /// Links a device with an operator-minted user token (`courier token`).
    pub async fn link_device(&self, name: &str) -> Result<Session, Error> {
        self.call(self.http.post(self.url("/v1/devices")).json(&json!({"name": name}))).await
    }

    /// Links another device from a signed-in one: `code` is a fresh code that `request_code` sent
    /// to the account's phone (a device's token alone cannot link devices).
    pub async fn link_device_with_code(&self, name: &str, code: &str) -> Result<Session, Error> {
        self.call(self.http.post(self.url("/v1/devices")).json(&json!({"name": name, "code": code}))).await
    }

    /// Asks the account's other devices to approve linking one more named `name` (instead of an
    /// SMS code); the request's id, to poll with `link_status`.
    pub async fn request_link(&self, name: &str) -> Result<String, Error> {
        let answer: Value =
            self.call(self.http.post(self.url("/v1/devices/requests")).json(&json!({"name": name}))).await?;
        Ok(answer["request_id"].as_str().unwrap_or_default().to_owned())
    }

    /// Where a link request stands: `None` while pending, the new device's session once approved
    /// (handed over once); a denied one is the error `link_denied`.
    pub async fn link_status(&self, request: &str) -> Result<Option<Session>, Error> {
        let answer: Value = self.call(self.http.get(self.url(&format!("/v1/devices/requests/{request}")))).await?;
        if answer["status"] == "pending" {
            return Ok(None);
        }
        serde_json::from_value(answer).map(Some).map_err(|e| Error::Api {
            status: 200,
            code: "unexpected_response".into(),
            message: e.to_string(),
        })
    }

    /// The account's linked devices.
    pub async fn devices(&self) -> Result<Vec<Device>, Error> {
        #[derive(Deserialize)]
        struct Devices {
            devices: Vec<Device>,
        }
        let answer: Devices = self.call(self.http.get(self.url("/v1/devices"))).await?;
        Ok(answer.devices)
    }

    /// Logs a device out.
    pub async fn unlink_device(&self, device_id: &str) -> Result<(), Error> {
        self.call::<Value>(self.http.delete(self.url(&format!("/v1/devices/{device_id}")))).await.map(drop)
    }

    /// The user id of a phone number.
    pub async fn lookup(&self, phone: &str) -> Result<String, Error> {
        let answer: Value = self.call(self.http.get(self.url("/v1/users/lookup")).query(&[("phone", phone)])).await?;
        Ok(answer["user_id"].as_str().unwrap_or_default().to_owned())
    }

    /// The caller's contacts (user ids). Presence and typing go to them, and to whoever the caller
    /// has exchanged messages with both ways.
    pub async fn contacts(&self) -> Result<Vec<String>, Error> {
        let answer: Value = self.call(self.http.get(self.url("/v1/contacts"))).await?;
        let contacts = answer["contacts"].as_array().map(Vec::as_slice).unwrap_or_default();
        Ok(contacts.iter().filter_map(|c| c["user_id"].as_str().map(str::to_owned)).collect())
    }

    /// Makes `users` the caller's whole contact list (an address book after `lookup`).
    pub async fn set_contacts(&self, users: &[&str]) -> Result<(), Error> {
        self.call::<Value>(self.http.put(self.url("/v1/contacts")).json(&json!({"users": users}))).await.map(drop)
    }

    /// Adds one contact.
    pub async fn add_contact(&self, user: &str) -> Result<(), Error> {
        self.call::<Value>(self.http.put(self.url(&format!("/v1/contacts/{user}")))).await.map(drop)
    }

    /// Removes one contact.
    pub async fn remove_contact(&self, user: &str) -> Result<(), Error> {
        self.call::<Value>(self.http.delete(self.url(&format!("/v1/contacts/{user}")))).await.map(drop)
    }

    /// Whether presence frames about the caller carry the time they were last online.
    pub async fn share_last_seen(&self, share: bool) -> Result<(), Error> {
        let body = json!({"share_last_seen": share});
        self.call::<Value>(self.http.put(self.url("/v1/privacy")).json(&body)).await.map(drop)
    }

    /// Which of `phones` (up to 1,000: an address book) have users, as (phone, user id).
    pub async fn discover(&self, phones: &[&str]) -> Result<Vec<(String, String)>, Error> {
        let answer: Value =
            self.call(self.http.post(self.url("/v1/contacts/discover")).json(&json!({"phones": phones}))).await?;
        let users = answer["users"].as_array().map(Vec::as_slice).unwrap_or_default();
        Ok(users
            .iter()
            .filter_map(|u| Some((u["phone"].as_str()?.to_owned(), u["user_id"].as_str()?.to_owned())))
            .collect())
    }

    /// The one direct conversation with `other`.
    pub async fn direct(&self, other: &str) -> Result<ConversationInfo, Error> {
        let body = json!({"type": "direct", "members": [other]});
        self.call(self.http.post(self.url("/v1/conversations")).json(&body)).await
    }

    /// A new group with the caller as admin.
    pub async fn group(&self, name: &str, members: &[&str]) -> Result<ConversationInfo, Error> {
        let body = json!({"type": "group", "name": name, "members": members});
        self.call(self.http.post(self.url("/v1/conversations")).json(&body)).await
    }

    pub async fn add_members(&self, conversation: &str, members: &[&str]) -> Result<(), Error> {
        let url = self.url(&format!("/v1/conversations/{conversation}/members"));
        self.call::<Value>(self.http.post(url).json(&json!({"members": members}))).await.map(drop)
    }

    /// One page of the chat list as the server sends it (`{"conversations":[…],"next":…}`; see
    /// PROTOCOL.md): pinned first, then by last activity; `after` is the `next` of the page before.
    pub async fn chat_list(&self, after: Option<&str>, limit: i64) -> Result<Value, Error> {
        let mut request = self.http.get(self.url("/v1/conversations")).query(&[("limit", limit)]);
        if let Some(after) = after {
            request = request.query(&[("after", after)]);
        }
        self.call(request).await
    }

    /// A conversation's details: settings, and members with their roles.
    pub async fn conversation(&self, conversation: &str) -> Result<Value, Error> {
        self.call(self.http.get(self.url(&format!("/v1/conversations/{conversation}")))).await
    }

    /// Changes a group's `name`, `description`, `avatar` or `info_by_all` (the fields given).
    pub async fn update_group(&self, conversation: &str, fields: Value) -> Result<Value, Error> {
        self.call(self.http.patch(self.url(&format!("/v1/conversations/{conversation}"))).json(&fields)).await
    }

    /// Sets this user's `muted_until`, `archived` or `pinned` on a conversation (the fields given).
    pub async fn set_flags(&self, conversation: &str, fields: Value) -> Result<Value, Error> {
        self.call(self.http.put(self.url(&format!("/v1/conversations/{conversation}/flags"))).json(&fields)).await
    }

    /// This user's own profile.
    pub async fn profile(&self) -> Result<Value, Error> {
        self.call(self.http.get(self.url("/v1/profile"))).await
    }

    /// Changes this user's `name`, `about`, `avatar` or `visibility` (the fields given).
    pub async fn set_profile(&self, fields: Value) -> Result<Value, Error> {
        self.call(self.http.put(self.url("/v1/profile")).json(&fields)).await
    }

    /// Another user's profile, as far as this user may see it.
    pub async fn user(&self, user: &str) -> Result<Value, Error> {
        self.call(self.http.get(self.url(&format!("/v1/users/{user}")))).await
    }

    pub async fn conversations(&self) -> Result<Vec<ConversationInfo>, Error> {
        #[derive(Deserialize)]
        struct List {
            conversations: Vec<ConversationInfo>,
        }
        let list: List = self.call(self.http.get(self.url("/v1/conversations"))).await?;
        Ok(list.conversations)
    }

    /// Sends over HTTP (same semantics as over the live connection).
    pub async fn send(&self, conversation: &str, client_id: &str, body: Value) -> Result<Message, Error> {
        let url = self.url(&format!("/v1/conversations/{conversation}/messages"));
        self.call(self.http.post(url).json(&json!({"client_id": client_id, "body": body}))).await
    }

    /// Up to `limit` messages after `after`.
    pub async fn history(&self, conversation: &str, after: i64, limit: i64) -> Result<Vec<Message>, Error> {
        #[derive(Deserialize)]
        struct Page {
            messages: Vec<Message>,
        }
        let url = self.url(&format!("/v1/conversations/{conversation}/messages"));
        let page: Page = self.call(self.http.get(url).query(&[("after", after), ("limit", limit)])).await?;
        Ok(page.messages)
    }

    /// Who has got and read one of the caller's own messages (see [`MessageReceipts`]).
    pub async fn receipts(&self, conversation: &str, seq: i64) -> Result<MessageReceipts, Error> {
        let url = self.url(&format!("/v1/conversations/{conversation}/messages/{seq}/receipts"));
        self.call(self.http.get(url)).await
    }

    /// The gateway's URL for this server.
    pub fn ws_url(&self) -> String {
        let base = self.base.replacen("http://", "ws://", 1).replacen("https://", "wss://", 1);
        format!("{base}/v1/ws")
    }
}

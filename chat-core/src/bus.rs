//! Cross-node fan-out over NATS: every node publishes its hub events on one subject and delivers
//! what the other nodes publish to its own connections.
//!
//! Like the hub, the bus carries wake-ups, not truth: a lost or doubled envelope is made good by
//! the connection's gap fill or dropped by its seq check, so core NATS (at-most-once) is enough and
//! JetStream is not needed here.

use std::sync::Arc;

use axum::extract::ws::Utf8Bytes;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use types::{ConversationId, DeviceId, UserId};

use crate::hub::{Event, Hub};

/// What travels between nodes.
#[derive(Serialize, Deserialize)]
struct Envelope {
    /// The publishing node, which has delivered locally already.
    node: String,
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
}

/// A node's connection to the bus (`chat.bus_url`, `courier serve --bus nats://…`).
pub struct Bus {
    client: async_nats::Client,
    subject: String,
    node: String,
}

/// What a node does with what other nodes publish.
pub(crate) enum Inbound {
    Deliver(Vec<UserId>, Event),
    LogOut(UserId, DeviceId),
    ForgetMembers(ConversationId),
}

impl Bus {
    /// Connects to the NATS server at `url`; envelopes go on `subject`.
    pub async fn connect(url: &str, subject: &str) -> Result<Self, async_nats::ConnectError> {
        let client = async_nats::connect(url).await?;
        Ok(Self { client, subject: subject.to_owned(), node: types::DeviceId::new().to_string() })
    }

    async fn publish(&self, users: Vec<UserId>, event: Wire) {
        let envelope = Envelope { node: self.node.clone(), users, event };
        let Ok(payload) = serde_json::to_vec(&envelope) else { return };
        if let Err(e) = self.client.publish(self.subject.clone(), payload.into()).await {
            // Other nodes' devices catch up on their next event or reconnect.
            tracing::warn!(error = %e, "could not publish to the bus");
        }
    }

    pub(crate) async fn publish_event(&self, users: &[UserId], event: &Event) {
        let wire = match event {
            Event::Message { conversation, seq, device, frame } => Wire::Message {
                conversation: *conversation,
                seq: *seq,
                device: *device,
                frame: frame.as_str().to_owned(),
            },
            Event::Frame(frame) => Wire::Frame { frame: frame.as_str().to_owned() },
            Event::LoggedOut => return,
        };
        self.publish(users.to_vec(), wire).await;
    }

    pub(crate) async fn publish_logout(&self, user: &UserId, device: DeviceId) {
        self.publish(vec![user.clone()], Wire::Logout { device }).await;
    }

    pub(crate) async fn publish_members(&self, conversation: ConversationId) {
        self.publish(Vec::new(), Wire::Members { conversation }).await;
    }

    /// Feeds what other nodes publish to `handle` until the subscription ends.
    pub(crate) async fn listen(self: Arc<Self>, hub: Arc<Hub>, handle: impl Fn(Inbound) + Send + 'static) {
        let mut subscription = match self.client.subscribe(self.subject.clone()).await {
            Ok(s) => s,
            Err(e) => return tracing::error!(error = %e, "could not subscribe to the bus"),
        };
        while let Some(message) = subscription.next().await {
            let Ok(envelope) = serde_json::from_slice::<Envelope>(&message.payload) else {
                tracing::warn!("an unreadable envelope on the bus");
                continue;
            };
            if envelope.node == self.node {
                continue;
            }
            // Only users connected here matter; most envelopes concern none of them.
            let users: Vec<UserId> = envelope.users.into_iter().filter(|u| hub.online(u)).collect();
            let inbound = match envelope.event {
                Wire::Members { conversation } => Inbound::ForgetMembers(conversation),
                _ if users.is_empty() => continue,
                Wire::Message { conversation, seq, device, frame } => {
                    Inbound::Deliver(users, Event::Message { conversation, seq, device, frame: Utf8Bytes::from(frame) })
                }
                Wire::Frame { frame } => Inbound::Deliver(users, Event::Frame(Utf8Bytes::from(frame))),
                Wire::Logout { device } => {
                    let Some(user) = users.into_iter().next() else { continue };
                    Inbound::LogOut(user, device)
                }
            };
            handle(inbound);
        }
        tracing::warn!("the bus subscription ended");
    }
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bus").field("subject", &self.subject).field("node", &self.node).finish_non_exhaustive()
    }
}

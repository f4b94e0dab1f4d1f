//! The in-process hub: which devices are connected to this node, and a bounded queue to each.
//!
//! The hub carries wake-ups, not truth. A message event names its conversation and seq; the
//! connection that receives it checks that seq against what it has already sent and reads any gap
//! from the store, so a lost, late or doubled event delays nothing for long and never loses or
//! doubles a message. A connection whose queue is full is marked lagged and closed by its own task;
//! the device catches up by replay on its next connect.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use axum::extract::ws::Utf8Bytes;
use tokio::sync::{Notify, mpsc};
use types::{ConversationId, DeviceId, UserId};

/// What the hub hands a connection.
#[derive(Debug, Clone)]
pub(crate) enum Event {
    /// A message was appended; `frame` is its `message` frame, serialised once for every receiver.
    Message { conversation: ConversationId, seq: i64, device: DeviceId, frame: Utf8Bytes },
    /// A frame sent as it is: receipts, typing, presence.
    Frame(Utf8Bytes),
    /// The device was logged out: close the connection.
    LoggedOut,
    /// The device opened more connections than it may hold here: close this, its oldest.
    Replaced,
    /// Wake-ups may have been lost (between nodes): read what was missed from the store.
    Resync,
}

struct Slot {
    id: u64,
    device: DeviceId,
    tx: mpsc::Sender<Arc<Event>>,
    lagged: Arc<Lagged>,
    /// Told to close to make room for a newer connection of its device.
    replaced: bool,
}

/// Set when an event could not be queued for a connection; its task is woken to close it.
#[derive(Debug, Default)]
pub(crate) struct Lagged {
    flag: AtomicBool,
    wake: Notify,
}

impl Lagged {
    fn set(&self) {
        if !self.flag.swap(true, Ordering::AcqRel) {
            self.wake.notify_one();
        }
    }

    pub(crate) fn is_set(&self) -> bool {
        self.flag.load(Ordering::Acquire)
    }

    /// Clears the flag; true if it was set.
    pub(crate) fn take(&self) -> bool {
        self.flag.swap(false, Ordering::AcqRel)
    }

    /// Resolves once the flag is set.
    pub(crate) async fn wait(&self) {
        while !self.is_set() {
            self.wake.notified().await;
        }
    }
}

/// One connection's end of the hub.
pub(crate) struct Registration {
    pub(crate) id: u64,
    pub(crate) events: mpsc::Receiver<Arc<Event>>,
    /// Set when an event could not be queued: the connection must close and the device replay.
    pub(crate) lagged: Arc<Lagged>,
    /// This is the user's only connection on this node (they just came online).
    pub(crate) first: bool,
}

/// Connected devices by user, each with a bounded event queue.
pub struct Hub {
    users: Mutex<HashMap<UserId, Vec<Slot>>>,
    next_id: AtomicU64,
    queue: usize,
    per_device: usize,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub").field("queue", &self.queue).finish_non_exhaustive()
    }
}

impl Hub {
    /// A hub whose connections each queue at most `queue` events, and where one device holds at
    /// most `per_device` connections (a newer one closes its oldest).
    pub fn new(queue: usize, per_device: usize) -> Self {
        Self {
            users: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            queue: queue.max(1),
            per_device: per_device.max(1),
        }
    }

    fn users(&self) -> std::sync::MutexGuard<'_, HashMap<UserId, Vec<Slot>>> {
        // The map stays consistent whatever panicked while holding it: every change is one push or remove.
        self.users.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn register(&self, user: &UserId, device: DeviceId) -> Registration {
        let (tx, events) = mpsc::channel(self.queue);
        let lagged = Arc::new(Lagged::default());
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut users = self.users();
        let slots = users.entry(user.clone()).or_default();
        let first = slots.is_empty();
        // Slots are in the order they connected: the first live ones of this device are its oldest.
        let mut live = slots.iter_mut().filter(|s| s.device == device && !s.replaced).collect::<Vec<_>>();
        let over = (live.len() + 1).saturating_sub(self.per_device);
        for oldest in live.iter_mut().take(over) {
            oldest.replaced = true;
            push(oldest, &Arc::new(Event::Replaced));
        }
        slots.push(Slot { id, device, tx, lagged: lagged.clone(), replaced: false });
        Registration { id, events, lagged, first }
    }

    /// Removes a connection; true when it was the user's last on this node (they went offline).
    pub(crate) fn unregister(&self, user: &UserId, id: u64) -> bool {
        let mut users = self.users();
        let Some(slots) = users.get_mut(user) else { return false };
        slots.retain(|s| s.id != id);
        if slots.is_empty() {
            users.remove(user);
            true
        } else {
            false
        }
    }

    /// Whether any device of `user` is connected to this node.
    pub fn online(&self, user: &UserId) -> bool {
        self.users().contains_key(user)
    }

    /// The users with a connection on this node.
    pub(crate) fn user_ids(&self) -> Vec<UserId> {
        self.users().keys().cloned().collect()
    }

    /// Connections on this node, all users.
    pub fn connections(&self) -> usize {
        self.users().values().map(Vec::len).sum()
    }

    /// Queues `event` for every connected device of each of `users`.
    pub(crate) fn deliver(&self, users: &[UserId], event: Event) {
        let event = Arc::new(event);
        let users_map = self.users();
        for user in users {
            for slot in users_map.get(user).into_iter().flatten() {
                push(slot, &event);
            }
        }
    }

    /// Tells every connection here to read what it may have missed from the store.
    pub(crate) fn resync_all(&self) {
        let event = Arc::new(Event::Resync);
        for slot in self.users().values().flatten() {
            push(slot, &event);
        }
    }

    /// Closes the connections of one device (it was logged out).
    pub(crate) fn log_out(&self, user: &UserId, device: DeviceId) {
        let event = Arc::new(Event::LoggedOut);
        for slot in self.users().get(user).into_iter().flatten().filter(|s| s.device == device) {
            push(slot, &event);
        }
    }
}

fn push(slot: &Slot, event: &Arc<Event>) {
    if let Err(mpsc::error::TrySendError::Full(_)) = slot.tx.try_send(event.clone()) {
        slot.lagged.set();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(name: &str) -> UserId {
        name.parse().unwrap()
    }

    #[test]
    fn a_full_queue_marks_the_connection_lagged_and_others_still_get_events() {
        let hub = Hub::new(2, 4);
        let (alice, bob) = (user("alice"), user("bob"));
        let slow = hub.register(&alice, DeviceId::new());
        let mut fast = hub.register(&bob, DeviceId::new());
        assert!(slow.first && fast.first);
        for _ in 0..3 {
            hub.deliver(&[alice.clone(), bob.clone()], Event::Frame("x".into()));
            assert!(fast.events.try_recv().is_ok());
        }
        assert!(slow.lagged.is_set(), "the third event did not fit");
        assert!(!fast.lagged.is_set());
    }

    #[test]
    fn presence_follows_the_last_connection() {
        let hub = Hub::new(4, 4);
        let alice = user("alice");
        let phone = hub.register(&alice, DeviceId::new());
        let laptop = hub.register(&alice, DeviceId::new());
        assert!(!laptop.first);
        assert!(!hub.unregister(&alice, phone.id));
        assert!(hub.online(&alice));
        assert!(hub.unregister(&alice, laptop.id));
        assert!(!hub.online(&alice));
        assert_eq!(hub.connections(), 0);
    }

    #[test]
    fn a_device_over_its_socket_cap_closes_its_oldest() {
        let hub = Hub::new(4, 2);
        let alice = user("alice");
        let (phone, laptop) = (DeviceId::new(), DeviceId::new());
        let mut first = hub.register(&alice, phone);
        let mut second = hub.register(&alice, phone);
        let mut other = hub.register(&alice, laptop);
        assert!(first.events.try_recv().is_err() && second.events.try_recv().is_err());
        let mut third = hub.register(&alice, phone);
        assert!(matches!(*first.events.try_recv().unwrap(), Event::Replaced), "the oldest was not told to close");
        assert!(second.events.try_recv().is_err() && third.events.try_recv().is_err());
        assert!(other.events.try_recv().is_err(), "another device's connection was closed");
        // The next one closes the next oldest, not the one already closing.
        let _fourth = hub.register(&alice, phone);
        assert!(matches!(*second.events.try_recv().unwrap(), Event::Replaced));
        assert!(first.events.try_recv().is_err());
    }
}

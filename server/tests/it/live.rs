//! The real-time gateway over real sockets, through the client SDK: phone sign-in, live delivery,
//! replay, retries, ordering, receipts, typing and presence, non-members, restarts, slow consumers
//! and malformed frames.

use std::time::Duration;

use client::{Api, Event, Live, LiveOptions, Message, Session};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message as WsMessage;

use crate::harness::{DataDir, Server, fixture, fresh_schema};

const WAIT: Duration = Duration::from_secs(20);

pub(crate) const DEV: (&str, &str) = ("COURIER_AUTH__DEV_CODES", "true");

/// Signs a phone in with the code the dev-mode server hands back.
pub(crate) async fn sign_in(server: &Server, phone: &str, device: &str) -> (Api, Session) {
    let anonymous = Api::new(&server.base);
    let code = anonymous.request_code(phone).await.unwrap().expect("dev mode returns the code");
    let session = anonymous.verify(phone, &code, device).await.unwrap();
    (anonymous.with_token(&session.access_token), session)
}

async fn live(api: &Api) -> Live {
    Live::connect(api, LiveOptions::default()).await.unwrap()
}

/// The next event that `pick` accepts, skipping the others; fails after [`WAIT`].
pub(crate) async fn next<T>(live: &mut Live, mut pick: impl FnMut(Event) -> Option<T>) -> T {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let event = tokio::time::timeout_at(deadline, live.next_event())
            .await
            .expect("no such event in time")
            .expect("the connection stopped");
        if let Some(t) = pick(event) {
            return t;
        }
    }
}

/// The next message, acked as an application acks what it has kept.
async fn next_message(live: &mut Live) -> Message {
    let m = next(live, |e| match e {
        Event::Message(m) => Some(m),
        _ => None,
    })
    .await;
    live.ack(&m.conversation, m.seq).await.unwrap();
    m
}

/// Messages that arrive within `quiet` of each other, until none does; each acked.
async fn drain_messages(live: &mut Live, quiet: Duration) -> Vec<Message> {
    let mut got = Vec::new();
    while let Ok(Some(event)) = tokio::time::timeout(quiet, live.next_event()).await {
        if let Event::Message(m) = event {
            live.ack(&m.conversation, m.seq).await.unwrap();
            got.push(m);
        }
    }
    got
}

fn text(m: &Message) -> &str {
    m.body["text"].as_str().unwrap_or_default()
}

#[tokio::test]
async fn two_users_three_devices_live_replay_retry_and_receipts() {
    let data = DataDir::new();
    let server = Server::start(&data, &[DEV]);
    let (alice, alice_session) = sign_in(&server, "+4915100000001", "alice's phone").await;
    let (bob_phone, bob_session) = sign_in(&server, "+4915100000002", "bob's phone").await;
    let (bob_laptop, laptop_session) = sign_in(&server, "+4915100000002", "bob's laptop").await;
    assert_eq!(bob_session.user_id, laptop_session.user_id, "one phone, one user, two devices");
    let bob_id = alice.lookup("+4915100000002").await.unwrap();
    assert_eq!(bob_id, bob_session.user_id);

    let chat = alice.direct(&bob_id).await.unwrap().id;
    let mut alice_live = live(&alice).await;
    let mut bob_live = live(&bob_phone).await;

    // Live: alice → bob's phone, confirmed to alice with its seq.
    let sent = alice_live.send(&chat, json!({"text": "hi bob"})).await.unwrap();
    assert_eq!(sent.seq, 1);
    let got = next_message(&mut bob_live).await;
    assert_eq!((got.seq, text(&got), got.sender.as_str()), (1, "hi bob", alice_session.user_id.as_str()));
    assert_eq!(got.client_id, sent.client_id);

    // A retried send (same client id) gets the first answer and is not delivered again.
    let again = alice_live.send_with_id(&chat, &sent.client_id, json!({"text": "hi bob"})).await.unwrap();
    assert_eq!(again.seq, 1);
    let second = alice_live.send(&chat, json!({"text": "second"})).await.unwrap();
    assert_eq!(second.seq, 2);
    assert_eq!(next_message(&mut bob_live).await.seq, 2, "the retry was not delivered twice");

    // Bob answers from his phone: alice gets it, his laptop (offline) gets it on connect, his
    // phone never gets its own message back; alice's phone acks it (the SDK acks) and bob hears so.
    let reply = bob_live.send(&chat, json!({"text": "hello alice"})).await.unwrap();
    assert_eq!(reply.seq, 3);
    assert_eq!(text(&next_message(&mut alice_live).await), "hello alice");
    next(&mut bob_live, |e| matches!(e, Event::Receipt { seq: 3, .. }).then_some(())).await;
    // Now that he has answered, his receipts are shared too (before, this was a message request).
    bob_live.read(&chat, 2).await.unwrap();
    next(&mut alice_live, |e| matches!(e, Event::Receipt { ref status, seq: 2, .. } if status == "read").then_some(()))
        .await;

    let mut laptop_live = live(&bob_laptop).await;
    let replayed = drain_messages(&mut laptop_live, Duration::from_millis(700)).await;
    let seqs: Vec<i64> = replayed.iter().map(|m| m.seq).collect();
    assert_eq!(seqs, vec![1, 2, 3], "the laptop replays everything, its user's own message too");
    // ... and then live, without a gap or a duplicate at the seam.
    alice_live.send(&chat, json!({"text": "four"})).await.unwrap();
    assert_eq!(next_message(&mut laptop_live).await.seq, 4);
    assert_eq!(next_message(&mut bob_live).await.seq, 4);
    let extra = drain_messages(&mut bob_live, Duration::from_millis(500)).await;
    assert!(extra.is_empty(), "bob's phone got its own or an old message: {extra:?}");

    // Offline, then replay from the device's cursor: nothing before it comes again.
    bob_live.close().await;
    alice_live.send(&chat, json!({"text": "five"})).await.unwrap();
    alice_live.send(&chat, json!({"text": "six"})).await.unwrap();
    let mut bob_live = live(&bob_phone).await;
    let caught_up: Vec<i64> =
        drain_messages(&mut bob_live, Duration::from_millis(700)).await.iter().map(|m| m.seq).collect();
    assert_eq!(caught_up, vec![5, 6]);

    // Over HTTP the same conversation reads the same.
    let history = bob_phone.history(&chat, 0, 100).await.unwrap();
    assert_eq!(history.iter().map(|m| m.seq).collect::<Vec<_>>(), vec![1, 2, 3, 4, 5, 6]);
    let listed = bob_phone.conversations().await.unwrap();
    assert_eq!(listed[0].last_seq, 6);
}

#[tokio::test]
async fn concurrent_senders_in_a_group_are_seen_in_one_order() {
    let data = DataDir::new();
    let server = Server::start(&data, &[DEV]);
    let mut users = Vec::new();
    for n in 0..3 {
        users.push(sign_in(&server, &format!("+491510000010{n}"), "phone").await);
    }
    let members: Vec<&str> = users[1..].iter().map(|(_, s)| s.user_id.as_str()).collect();
    let group = users[0].0.group("team", &members).await.unwrap().id;
    let mut lives = Vec::new();
    for (api, _) in &users {
        lives.push(live(api).await);
    }
    const EACH: usize = 40;
    let sends = lives.iter().enumerate().map(|(i, live)| {
        let group = group.clone();
        async move {
            for k in 0..EACH {
                live.send(&group, json!({"text": format!("{i}-{k}")})).await.unwrap();
            }
        }
    });
    futures_util::future::join_all(sends).await;

    for (i, live) in lives.iter_mut().enumerate() {
        let got = drain_messages(live, Duration::from_millis(1000)).await;
        assert_eq!(got.len(), 2 * EACH, "member {i} got {} messages", got.len());
        assert!(got.windows(2).all(|w| w[0].seq < w[1].seq), "member {i} saw seqs out of order");
        assert!(got.iter().all(|m| !text(m).starts_with(&format!("{i}-"))), "member {i} got its own message");
        // Each sender's messages arrive in the order they were sent.
        for sender in (0..3).filter(|s| *s != i) {
            let ks: Vec<usize> = got
                .iter()
                .filter_map(|m| text(m).strip_prefix(&format!("{sender}-")).map(|k| k.parse().unwrap()))
                .collect();
            assert_eq!(ks, (0..EACH).collect::<Vec<_>>());
        }
    }
    let history = users[0].0.history(&group, 0, 500).await.unwrap();
    let seqs: Vec<i64> = history.iter().map(|m| m.seq).collect();
    assert_eq!(seqs, (1..=(3 * EACH) as i64).collect::<Vec<_>>(), "gapless");
}

#[tokio::test]
async fn non_members_get_not_found_and_nothing_else() {
    let data = DataDir::new();
    let server = Server::start(&data, &[DEV]);
    let (alice, _) = sign_in(&server, "+4915100000201", "phone").await;
    let (_, bob) = sign_in(&server, "+4915100000202", "phone").await;
    let (eve, _) = sign_in(&server, "+4915100000203", "phone").await;
    let chat = alice.direct(&bob.user_id).await.unwrap().id;
    let mut alice_live = live(&alice).await;
    alice_live.send(&chat, json!({"text": "secret"})).await.unwrap();

    let mut eve_live = live(&eve).await;
    let err = eve_live.send(&chat, json!({"text": "let me in"})).await.unwrap_err();
    assert_eq!(err.code(), Some("not_found"));
    eve_live.typing(&chat).await.unwrap();
    next(&mut eve_live, |e| matches!(e, Event::Error { ref code, .. } if code == "not_found").then_some(())).await;
    let history = eve.history(&chat, 0, 10).await.unwrap_err();
    assert_eq!((history.code(), matches!(history, client::Error::Api { status: 404, .. })), (Some("not_found"), true));
    assert!(drain_messages(&mut eve_live, Duration::from_millis(500)).await.is_empty());
    // Nor did alice hear eve typing.
    let heard = tokio::time::timeout(Duration::from_millis(500), async {
        loop {
            if let Some(Event::Typing { .. }) = alice_live.next_event().await {
                return;
            }
        }
    })
    .await;
    assert!(heard.is_err(), "a non-member's typing reached a member");
}

/// The events `live` gets before the message `marker`, which was sent after whatever the test
/// wants to see withheld: anything forwarded before it has arrived by then.
async fn events_before(live: &mut Live, marker: &str) -> Vec<Event> {
    let mut seen = Vec::new();
    loop {
        let event = tokio::time::timeout(WAIT, live.next_event()).await.expect("no marker in time").expect("stopped");
        match event {
            Event::Message(m) if text(&m) == marker => return seen,
            other => seen.push(other),
        }
    }
}

fn about_user(events: &[Event], who: &str) -> Vec<String> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Presence { user, .. } | Event::Typing { user, .. } | Event::Receipt { user, .. } if user == who => {
                Some(format!("{e:?}"))
            }
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn presence_typing_and_receipts_reach_only_answered_chats_and_contacts() {
    let data = DataDir::new();
    let server = Server::start(&data, &[DEV]);
    let (alice, alice_session) = sign_in(&server, "+4915100000301", "phone").await;
    let (stranger, stranger_session) = sign_in(&server, "+4915100000302", "phone").await;
    let (carol, carol_session) = sign_in(&server, "+4915100000303", "phone").await;
    let alice_id = alice_session.user_id.as_str();
    // Markers go through a group the three share: talking there is not answering the direct chat.
    let marks = alice.group("marks", &[&stranger_session.user_id, &carol_session.user_id]).await.unwrap().id;

    // A stranger who knows alice's number opens a chat and writes; alice connects, reads, types.
    let chat = stranger.direct(alice_id).await.unwrap().id;
    let mut stranger_live = live(&stranger).await;
    stranger_live.send(&chat, json!({"text": "hi, remember me?"})).await.unwrap();
    let mut alice_live = live(&alice).await;
    let request = next_message(&mut alice_live).await;
    alice_live.read(&chat, request.seq).await.unwrap();
    alice_live.typing(&chat).await.unwrap();
    alice_live.send(&marks, json!({"text": "mark 1"})).await.unwrap();
    let withheld = about_user(&events_before(&mut stranger_live, "mark 1").await, alice_id);
    assert!(withheld.is_empty(), "a message request told the stranger: {withheld:?}");

    // Once alice answers, they have talked both ways: receipts, typing and presence flow.
    alice_live.send(&chat, json!({"text": "who is this?"})).await.unwrap();
    assert_eq!(text(&next_message(&mut stranger_live).await), "who is this?");
    let again = stranger_live.send(&chat, json!({"text": "your old classmate"})).await.unwrap();
    assert_eq!(next_message(&mut alice_live).await.seq, again.seq);
    next(&mut stranger_live, |e| {
        matches!(e, Event::Receipt { ref user, seq, .. } if user == alice_id && seq == again.seq).then_some(())
    })
    .await;
    // (Typing is forwarded at most once per 2 s per conversation: the withheld one counted.)
    tokio::time::sleep(Duration::from_secs(2)).await;
    alice_live.typing(&chat).await.unwrap();
    next(&mut stranger_live, |e| matches!(e, Event::Typing { ref user, .. } if user == alice_id).then_some(())).await;
    alice_live.close().await;
    let last_seen = next(&mut stranger_live, |e| match e {
        Event::Presence { user, online: false, last_seen } if user == alice_id => Some(last_seen),
        _ => None,
    })
    .await;
    assert!(last_seen > 0);

    // Alice keeps her last-seen time to herself from now on.
    alice.share_last_seen(false).await.unwrap();
    let alice_live = live(&alice).await;
    next(&mut stranger_live, |e| {
        matches!(e, Event::Presence { ref user, online: true, .. } if user == alice_id).then_some(())
    })
    .await;
    alice_live.close().await;
    let hidden = next(&mut stranger_live, |e| match e {
        Event::Presence { user, online: false, last_seen } if user == alice_id => Some(last_seen),
        _ => None,
    })
    .await;
    assert_eq!(hidden, 0);

    // Carol shares only the group with alice: she sees nothing of her, until alice adds her as a
    // contact.
    let mut carol_live = live(&carol).await;
    stranger_live.send(&marks, json!({"text": "mark 2"})).await.unwrap();
    let withheld = about_user(&events_before(&mut carol_live, "mark 2").await, alice_id);
    assert!(withheld.is_empty(), "a group member saw alice's presence: {withheld:?}");
    carol_live.close().await;
    alice.add_contact(&carol_session.user_id).await.unwrap();
    assert_eq!(alice.contacts().await.unwrap(), vec![carol_session.user_id.clone()]);
    let mut carol_live = live(&carol).await;
    next(&mut carol_live, |e| {
        matches!(e, Event::Presence { ref user, online: false, last_seen: 0 } if user == alice_id).then_some(())
    })
    .await;
    carol_live.close().await;

    // The contact list is the user's own, and names only users that exist.
    let err = alice.set_contacts(&[&carol_session.user_id, "unobody"]).await.unwrap_err();
    assert_eq!((err.code(), matches!(err, client::Error::Api { status: 404, .. })), (Some("unknown_user"), true));
    assert_eq!(alice.contacts().await.unwrap().len(), 1, "a refused list changes nothing");
    alice.remove_contact(&carol_session.user_id).await.unwrap();
    assert_eq!(alice.remove_contact(&carol_session.user_id).await.unwrap_err().code(), Some("not_found"));
    assert!(carol.contacts().await.unwrap().is_empty());
    stranger_live.close().await;
}

#[tokio::test]
async fn an_acknowledged_send_survives_kill_9_and_is_delivered_after_restart() {
    let data = DataDir::new();
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let server = Server::start_on(&data, &listen, &[DEV]);
    let (alice, _) = sign_in(&server, "+4915100000401", "phone").await;
    let (bob, bob_session) = sign_in(&server, "+4915100000402", "phone").await;
    let chat = alice.direct(&bob_session.user_id).await.unwrap().id;
    let mut bob_live = live(&bob).await;
    let alice_live = live(&alice).await;
    alice_live.send(&chat, json!({"text": "one"})).await.unwrap();
    assert_eq!(next_message(&mut bob_live).await.seq, 1);
    bob_live.close().await;

    let sent = alice_live.send(&chat, json!({"text": "before the crash"})).await.unwrap();
    server.kill();
    let server = Server::start_on(&data, &listen, &[DEV]);
    let mut bob_live = live(&bob).await;
    let got = next_message(&mut bob_live).await;
    assert_eq!((got.seq, text(&got)), (sent.seq, "before the crash"));

    // Alice's SDK reconnected by itself to the restarted server and keeps sending.
    let after = alice_live.send(&chat, json!({"text": "after"})).await.unwrap();
    assert_eq!(after.seq, 3);
    assert_eq!(next_message(&mut bob_live).await.seq, 3);
    drop(server);
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

#[tokio::test]
async fn a_slow_consumer_is_disconnected_and_catches_up_by_replay() {
    let data = DataDir::new();
    let server = Server::start(&data, &[DEV, ("COURIER_CHAT__OUTBOUND_QUEUE", "8")]);
    let (alice, _) = sign_in(&server, "+4915100000501", "phone").await;
    let (bob, bob_session) = sign_in(&server, "+4915100000502", "phone").await;
    let chat = alice.direct(&bob_session.user_id).await.unwrap().id;
    // Bob's application reads nothing for a while; with a one-event buffer his SDK stops reading
    // the socket, the kernel buffers fill, and the server's queue for him overflows.
    let mut bob_live = Live::connect(&bob, LiveOptions { event_buffer: 1, ..LiveOptions::default() }).await.unwrap();
    let alice_live = live(&alice).await;
    const N: i64 = 400;
    let filler = "x".repeat(60 * 1024);
    for n in 1..=N {
        let sent = alice_live.send(&chat, json!({"text": format!("{n} {filler}")})).await.unwrap();
        assert_eq!(sent.seq, n);
    }

    let mut seqs = Vec::new();
    let mut disconnects = Vec::new();
    while seqs.last() != Some(&N) {
        match tokio::time::timeout(WAIT, bob_live.next_event()).await.expect("bob stalled").unwrap() {
            Event::Message(m) => {
                bob_live.ack(&m.conversation, m.seq).await.unwrap();
                seqs.push(m.seq);
            }
            Event::Disconnected { code, .. } => disconnects.push(code),
            _ => {}
        }
    }
    // 4008 says "too slow, reconnect to catch up" when the server can still write it; a client that
    // reads nothing at all for long may see the connection drop without a close frame.
    assert!(!disconnects.is_empty(), "the slow consumer was never disconnected");
    assert!(disconnects.iter().all(|c| matches!(c, None | Some(4008))), "{disconnects:?}");
    assert_eq!(seqs, (1..=N).collect::<Vec<_>>(), "every message exactly once, in order, across the disconnect");
}

#[tokio::test]
async fn malformed_frames_get_error_frames_and_abuse_closes_the_connection() {
    let data = DataDir::new();
    let server = Server::start(&data, &[DEV]);
    let (alice, _) = sign_in(&server, "+4915100000601", "phone").await;
    let (_, bob) = sign_in(&server, "+4915100000602", "phone").await;
    let chat = alice.direct(&bob.user_id).await.unwrap().id;
    let url = format!("{}?token={}", alice.ws_url(), alice.token().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(&url).await.unwrap();

    async fn reply(
        ws: &mut (impl StreamExt<Item = Result<WsMessage, tokio_tungstenite::tungstenite::Error>> + Unpin),
    ) -> Value {
        loop {
            match tokio::time::timeout(WAIT, ws.next()).await.unwrap().unwrap().unwrap() {
                WsMessage::Text(t) => {
                    let v: Value = serde_json::from_str(t.as_str()).unwrap();
                    if v["type"] == "error" || v["type"] == "sent" {
                        return v;
                    }
                }
                _ => continue,
            }
        }
    }
    let cases = [
        ("this is not json".to_string(), "bad_json", None),
        (json!({"type": "shout"}).to_string(), "invalid_frame", None),
        (json!({"type": "ack", "conversation": chat, "seq": "x"}).to_string(), "invalid_frame", None),
        (
            json!({"type": "send", "client_id": "c1", "conversation": "nope", "body": {"text": "x"}}).to_string(),
            "not_found",
            Some("c1"),
        ),
        (
            json!({"type": "send", "client_id": "c2", "conversation": chat, "body": {"text": ""}}).to_string(),
            "invalid_request",
            Some("c2"),
        ),
        (
            json!({"type": "send", "client_id": "c3", "conversation": chat, "body": {"media": "not-an-id"}})
                .to_string(),
            "invalid_request",
            Some("c3"),
        ),
        (
            json!({"type": "send", "client_id": "", "conversation": chat, "body": {"text": "x"}}).to_string(),
            "invalid_request",
            Some(""),
        ),
        (
            json!({"type": "send", "conversation": chat, "body": {"text": "x"}, "client_id": 5}).to_string(),
            "invalid_frame",
            None,
        ),
    ];
    for (frame, code, client_id) in cases {
        ws.send(WsMessage::text(frame.clone())).await.unwrap();
        let answer = reply(&mut ws).await;
        assert_eq!(answer["type"], "error", "{frame}");
        assert_eq!(answer["code"], code, "{frame}: {answer}");
        assert!(answer["message"].as_str().is_some_and(|m| !m.is_empty()));
        if let Some(id) = client_id {
            assert_eq!(answer["client_id"], id, "{frame}");
        }
    }
    // Still alive after all that.
    let good = json!({"type": "send", "client_id": "ok", "conversation": chat, "body": {"text": "fine"}});
    ws.send(WsMessage::text(good.to_string())).await.unwrap();
    let answer = reply(&mut ws).await;
    assert_eq!((answer["type"].as_str(), answer["seq"].as_i64()), (Some("sent"), Some(1)));

    // An oversized frame is abuse: the server closes the connection.
    let huge =
        json!({"type": "send", "client_id": "big", "conversation": chat, "body": {"text": "y".repeat(200 * 1024)}});
    let _ = ws.send(WsMessage::text(huge.to_string())).await;
    assert_closed(&mut ws, Some(1009)).await;

    // So is a binary frame.
    let (mut ws, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
    ws.send(WsMessage::binary(vec![1, 2, 3])).await.unwrap();
    assert_closed(&mut ws, Some(1003)).await;
}

/// Reads until the server closes; checks the close code when it sent one.
async fn assert_closed(
    ws: &mut (impl StreamExt<Item = Result<WsMessage, tokio_tungstenite::tungstenite::Error>> + Unpin),
    code: Option<u16>,
) {
    loop {
        match tokio::time::timeout(WAIT, ws.next()).await.expect("the server kept the connection open") {
            Some(Ok(WsMessage::Close(frame))) => {
                if let (Some(code), Some(frame)) = (code, frame) {
                    assert_eq!(u16::from(frame.code), code);
                }
                return;
            }
            Some(Ok(_)) => continue,
            Some(Err(_)) | None => return,
        }
    }
}

#[tokio::test]
async fn the_gateway_refuses_bad_tokens_and_user_tokens() {
    let data = DataDir::new();
    let server = Server::start(&data, &[DEV]);
    let api = Api::new(&server.base);
    let err = Live::connect(&api.with_token("nonsense"), LiveOptions::default()).await.unwrap_err();
    assert!(matches!(err, client::Error::Api { status: 401, ref code, .. } if code == "invalid_token"), "{err}");
    let err = Live::connect(&api, LiveOptions::default()).await.unwrap_err();
    assert!(matches!(err, client::Error::Api { status: 401, ref code, .. } if code == "missing_token"), "{err}");
    // An operator-minted token names no device: the gateway needs one.
    let err = Live::connect(&api.with_token(&server.token("alice")), LiveOptions::default()).await.unwrap_err();
    assert!(
        matches!(err, client::Error::Api { status: 403, ref code, .. } if code == "device_token_required"),
        "{err}"
    );
    // Not a WebSocket request at all.
    let (_, session) = sign_in(&server, "+4915100000701", "phone").await;
    let plain = server.http.get(server.url("/v1/ws")).bearer_auth(&session.access_token).send().await.unwrap();
    assert_eq!(plain.status(), 400);
    let body: Value = plain.json().await.unwrap();
    assert_eq!(body["error"]["code"], "websocket_required");
}

#[tokio::test]
async fn retention_tells_a_lagging_device_what_it_missed() {
    let data = DataDir::new();
    let server = Server::start(&data, &[DEV]);
    let (alice, _) = sign_in(&server, "+4915100000801", "phone").await;
    let (bob, bob_session) = sign_in(&server, "+4915100000802", "phone").await;
    let chat = alice.direct(&bob_session.user_id).await.unwrap().id;
    for n in 1..=5 {
        alice.send(&chat, &format!("c{n}"), json!({"text": format!("m{n}")})).await.unwrap();
    }
    server.kill();
    // Age the first three messages past the 30-day retention, as if time had passed.
    let db = format!("sqlite://{}", data.path().join("chat.db").display());
    let pool = sqlx::SqlitePool::connect(&db).await.unwrap();
    sqlx::query("UPDATE chat_messages SET created_at = 1000 WHERE seq <= 3").execute(&pool).await.unwrap();
    pool.close().await;

    let server = Server::start(&data, &[DEV]);
    let bob = Api::new(&server.base).with_token(bob.token().unwrap());
    // Retention runs at start, beside the traffic.
    let deadline = std::time::Instant::now() + WAIT;
    while bob.history(&chat, 0, 10).await.unwrap()[0].seq != 4 {
        assert!(std::time::Instant::now() < deadline, "retention never ran");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut bob_live = live(&bob).await;
    let expired = next(&mut bob_live, |e| match e {
        Event::Expired { conversation, oldest_seq } => Some((conversation, oldest_seq)),
        _ => None,
    })
    .await;
    assert_eq!(expired, (chat.clone(), 4));
    let rest: Vec<i64> =
        drain_messages(&mut bob_live, Duration::from_millis(700)).await.iter().map(|m| m.seq).collect();
    assert_eq!(rest, vec![4, 5]);
    let kept = bob.history(&chat, 0, 10).await.unwrap();
    assert_eq!(kept.iter().map(|m| m.seq).collect::<Vec<_>>(), vec![4, 5]);
}

/// The same gateway, and uploads, with everything on PostgreSQL (`--database-url postgres://…`), in
/// a schema of its own on the server at `COURIER_TEST_DATABASE_URL`. Unset: skipped with a note; set
/// but unreachable: fails.
#[tokio::test]
async fn messaging_and_media_run_on_postgresql_across_a_restart() {
    let Ok(url) = std::env::var("COURIER_TEST_DATABASE_URL") else {
        eprintln!("COURIER_TEST_DATABASE_URL is not set: skipping the PostgreSQL run of the gateway");
        return;
    };
    let schema = "it_gateway";
    let (admin, database) = fresh_schema(&url, schema).await;

    let data = DataDir::new();
    let listen = format!("127.0.0.1:{}", free_port());
    let server = Server::start_on(&data, &listen, &[DEV, ("COURIER_DATABASE_URL", &database)]);
    let (alice, _) = sign_in(&server, "+4915100000991", "phone").await;
    let (bob, bob_session) = sign_in(&server, "+4915100000992", "phone").await;
    let chat = alice.direct(&bob_session.user_id).await.unwrap().id;
    let alice_live = live(&alice).await;
    let mut bob_live = live(&bob).await;
    alice_live.send(&chat, json!({"text": "on postgres"})).await.unwrap();
    assert_eq!(text(&next_message(&mut bob_live).await), "on postgres");
    bob_live.close().await;
    let sent = alice_live.send(&chat, json!({"text": "while bob is away"})).await.unwrap();
    let photo = server.upload_ready(&server.token("carol"), "image/jpeg", fixture("rocket.jpg")).await;
    assert_eq!(photo["status"], "ready", "{photo}");

    server.kill();
    let count = |table: &str| format!("SELECT COUNT(*) FROM {schema}.{table}");
    let rows: i64 = sqlx::query_scalar(&count("chat_messages")).fetch_one(&admin).await.unwrap();
    assert_eq!(rows, 2, "the messages are in PostgreSQL");
    let rows: i64 = sqlx::query_scalar(&count("media")).fetch_one(&admin).await.unwrap();
    assert_eq!(rows, 1, "the media record is in PostgreSQL");
    let done: String =
        sqlx::query_scalar(&format!("SELECT status FROM {schema}.jobs")).fetch_one(&admin).await.unwrap();
    assert_eq!(done, "ready");
    for file in ["chat.db", "courier.db"] {
        assert!(!data.path().join(file).exists(), "{file}: nothing went to SQLite");
    }

    let server = Server::start_on(&data, &listen, &[DEV, ("COURIER_DATABASE_URL", &database)]);
    let mut bob_live = live(&bob).await;
    let got = next_message(&mut bob_live).await;
    assert_eq!((got.seq, text(&got)), (sent.seq, "while bob is away"));
    let again: Value = server.media(&server.token("carol"), photo["id"].as_str().unwrap()).await.json().await.unwrap();
    assert_eq!(again["status"], "ready", "{again}");
    assert_eq!(again["variants"]["standard"]["blob"], photo["variants"]["standard"]["blob"]);
    drop(server);
    admin.close().await;
}

/// Two nodes on one PostgreSQL database and one NATS bus: a message sent through one reaches a
/// device connected to the other live, and so do receipts and logouts. Needs both
/// `COURIER_TEST_DATABASE_URL` and `COURIER_TEST_NATS_URL` (skipped with a note when unset; a set
/// but unreachable service fails the test).
#[tokio::test]
async fn two_nodes_fan_out_through_nats() {
    let (Ok(db_url), Ok(nats_url)) =
        (std::env::var("COURIER_TEST_DATABASE_URL"), std::env::var("COURIER_TEST_NATS_URL"))
    else {
        eprintln!("COURIER_TEST_DATABASE_URL or COURIER_TEST_NATS_URL is not set: skipping the two-node run");
        return;
    };
    // Reachable, or fail here rather than in the server's log.
    let (host, port) = nats_url.trim_start_matches("nats://").split_once(':').expect("nats://host:port");
    tokio::net::TcpStream::connect((host, port.parse::<u16>().unwrap()))
        .await
        .expect("COURIER_TEST_NATS_URL is set but unreachable");
    let (admin, database) = fresh_schema(&db_url, "it_two_nodes").await;
    let subject = format!("courier.test.{}", std::process::id());
    let env = [
        DEV,
        ("COURIER_DATABASE_URL", database.as_str()),
        ("COURIER_CHAT__BUS_URL", nats_url.as_str()),
        ("COURIER_CHAT__BUS_SUBJECT", subject.as_str()),
    ];
    let (data_a, data_b) = (DataDir::new(), DataDir::new());
    let node_a = Server::start(&data_a, &env);
    let node_b = Server::start(&data_b, &env);

    let (alice, _) = sign_in(&node_a, "+4915100001001", "phone").await;
    let (bob_on_a, bob_session) = sign_in(&node_a, "+4915100001002", "phone").await;
    // Bob's device talks to node B with the token node A issued: the nodes share keys and database.
    std::fs::copy(data_a.path().join("token-signing.key"), data_b.path().join("token-signing.key")).unwrap();
    drop(node_b);
    let node_b = Server::start(&data_b, &env);
    let bob = Api::new(&node_b.base).with_token(bob_on_a.token().unwrap());
    let chat = alice.direct(&bob_session.user_id).await.unwrap().id;

    let mut alice_live = live(&alice).await;
    let mut bob_live = live(&bob).await;
    let sent = alice_live.send(&chat, json!({"text": "across nodes"})).await.unwrap();
    let got = next_message(&mut bob_live).await;
    assert_eq!((got.seq, text(&got)), (sent.seq, "across nodes"));
    let reply = bob_live.send(&chat, json!({"text": "and back"})).await.unwrap();
    assert_eq!(reply.seq, 2);
    assert_eq!(text(&next_message(&mut alice_live).await), "and back");
    // Alice's ack on node A becomes a receipt for bob on node B.
    next(&mut bob_live, |e| matches!(e, Event::Receipt { seq: 2, .. }).then_some(())).await;

    // Logging bob's device out through node A closes its connection on node B at once.
    bob_on_a.unlink_device(&bob_session.device_id).await.unwrap();
    let code = next(&mut bob_live, |e| match e {
        Event::Disconnected { code, .. } => Some(code),
        _ => None,
    })
    .await;
    assert_eq!(code, Some(4001));
    drop((node_a, node_b));
    admin.close().await;
}

#[tokio::test]
async fn a_device_holds_two_sockets_and_a_third_closes_its_oldest() {
    let data = DataDir::new();
    let server = Server::start(&data, &[DEV]);
    let (alice, _) = sign_in(&server, "+4915100000611", "phone").await;
    let url = format!("{}?token={}", alice.ws_url(), alice.token().unwrap());
    /// Waits for an answer to a bad frame: the connection is registered and serving.
    async fn answers(
        ws: &mut (
                 impl StreamExt<Item = Result<WsMessage, tokio_tungstenite::tungstenite::Error>> + SinkExt<WsMessage> + Unpin
             ),
    ) {
        let _ = ws.send(WsMessage::Text("not json".into())).await;
        loop {
            match tokio::time::timeout(WAIT, ws.next()).await.expect("no answer").unwrap().unwrap() {
                WsMessage::Text(t) if t.as_str().contains("bad_json") => break,
                WsMessage::Close(frame) => panic!("a newer socket was closed: {frame:?}"),
                _ => continue,
            }
        }
    }
    // Each one serving before the next connects: "oldest" is then the first.
    let (mut first, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
    answers(&mut first).await;
    let (mut second, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
    answers(&mut second).await;
    let (mut third, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
    assert_closed(&mut first, Some(4009)).await;
    // The two newest still answer.
    answers(&mut second).await;
    answers(&mut third).await;
}

#[tokio::test]
async fn a_history_page_stops_at_a_byte_budget() {
    let data = DataDir::new();
    let server = Server::start(&data, &[DEV]);
    let (alice, _) = sign_in(&server, "+4915100000621", "phone").await;
    let (_, bob) = sign_in(&server, "+4915100000622", "phone").await;
    let chat = alice.direct(&bob.user_id).await.unwrap().id;
    // 40 bodies of 60 KB: 2.4 MB in all, under the 500-row limit.
    let filler = "x".repeat(60_000);
    for i in 0..40 {
        alice.send(&chat, &format!("big-{i}"), json!({ "text": filler })).await.unwrap();
    }
    let first = alice.history(&chat, 0, 500).await.unwrap();
    assert!(!first.is_empty() && first.len() < 40, "one page held {} messages of 60 KB", first.len());
    assert!(first.len() * 60_000 <= 1024 * 1024, "{} messages is over 1 MiB", first.len());
    // Reading on from the last seq gets the rest, in order, nothing twice.
    let mut seen: Vec<i64> = first.iter().map(|m| m.seq).collect();
    while seen.len() < 40 {
        let page = alice.history(&chat, *seen.last().unwrap(), 500).await.unwrap();
        assert!(!page.is_empty());
        seen.extend(page.iter().map(|m| m.seq));
    }
    assert_eq!(seen, (1..=40).collect::<Vec<i64>>());
}

#[tokio::test]
async fn a_lost_wake_up_is_found_by_the_connection_itself() {
    let data = DataDir::new();
    // The first message's wake-up is lost, as a crash between its commit and the fan-out would.
    let lose = [DEV, ("COURIER_CHAT__TEST_LOSE_WAKEUPS", "1"), ("COURIER_CHAT__GAP_CHECK_SECS", "1")];
    let server = Server::start(&data, &lose);
    let (alice, _) = sign_in(&server, "+4915100000701", "phone").await;
    let (bob, bob_session) = sign_in(&server, "+4915100000702", "phone").await;
    let chat = alice.direct(&bob_session.user_id).await.unwrap().id;
    let mut bob_live = live(&bob).await;
    let sent = alice.send(&chat, "c-1", json!({"text": "nobody woke you"})).await.unwrap();
    // Nobody writes again and bob stays connected: his connection's own check finds the message.
    let got = next_message(&mut bob_live).await;
    assert_eq!((got.seq, text(&got)), (sent.seq, "nobody woke you"));
    bob_live.close().await;
}

#[tokio::test]
async fn the_sdk_acks_only_what_the_app_acked_and_fills_a_gap_from_history() {
    let data = DataDir::new();
    let server = Server::start(&data, &[DEV]);
    let (alice, _) = sign_in(&server, "+4915100000711", "phone").await;
    let (bob, bob_session) = sign_in(&server, "+4915100000712", "phone").await;
    let chat = alice.direct(&bob_session.user_id).await.unwrap().id;
    for n in 1..=3 {
        alice.send(&chat, &format!("c{n}"), json!({"text": format!("m{n}")})).await.unwrap();
    }
    // Bob's app gets all three but keeps (and acks) only the first before it crashes.
    let mut bob_live = live(&bob).await;
    let mut got = Vec::new();
    for _ in 0..3 {
        got.push(
            next(&mut bob_live, |e| match e {
                Event::Message(m) => Some(m.seq),
                _ => None,
            })
            .await,
        );
    }
    assert_eq!(got, [1, 2, 3]);
    bob_live.ack(&chat, 1).await.unwrap();
    bob_live.close().await;
    // On restart the two it never acked come again: nothing was lost with the crash.
    let mut bob_live = live(&bob).await;
    let replayed = [next_message(&mut bob_live).await.seq, next_message(&mut bob_live).await.seq];
    assert_eq!(replayed, [2, 3]);
    bob_live.close().await;

    // An app whose store is behind what the device acked (it kept seq 1 only, acked up to 3):
    // the next live message reveals the gap, and the SDK fills it from history, in order.
    let options = LiveOptions { cursors: [(chat.clone(), 1)].into_iter().collect(), ..LiveOptions::default() };
    let mut bob_live = Live::connect(&bob, options).await.unwrap();
    alice.send(&chat, "c4", json!({"text": "m4"})).await.unwrap();
    let mut filled = Vec::new();
    for _ in 0..3 {
        filled.push(next_message(&mut bob_live).await.seq);
    }
    assert_eq!(filled, [2, 3, 4]);
    bob_live.close().await;
}

#[tokio::test]
async fn the_sdk_refreshes_an_expired_token_and_refuses_an_oversized_send_for_good() {
    let data = DataDir::new();
    let listen = format!("127.0.0.1:{}", free_port());
    let short = [DEV, ("COURIER_AUTH__ACCESS_TOKEN_SECS", "5")];
    let server = Server::start_on(&data, &listen, &short);
    let (alice, alice_session) = sign_in(&server, "+4915100000721", "phone").await;
    let (_, bob_session) = sign_in(&server, "+4915100000722", "phone").await;
    let chat = alice.direct(&bob_session.user_id).await.unwrap().id;
    let options = LiveOptions { refresh_token: alice_session.refresh_token.clone(), ..LiveOptions::default() };
    let mut alice_live = Live::connect(&alice, options).await.unwrap();

    // Too big for the server's frame limit: refused at once, never queued to loop on reconnects.
    let huge = "x".repeat(70 * 1024);
    let err = alice_live.send(&chat, json!({ "text": huge })).await.unwrap_err();
    assert_eq!(err.code(), Some("invalid_request"));

    // The access token runs out while connected; the server restarts, and the SDK, refused with
    // `token_expired`, refreshes it, hands the app the new session, and goes on.
    tokio::time::sleep(Duration::from_secs(6)).await;
    server.kill();
    let server = Server::start_on(&data, &listen, &short);
    let refreshed = next(&mut alice_live, |e| match e {
        Event::Refreshed(session) => Some(session),
        _ => None,
    })
    .await;
    assert_eq!(refreshed.device_id, alice_session.device_id);
    assert_ne!(refreshed.refresh_token, alice_session.refresh_token, "the refresh token rotated");
    let sent = alice_live.send(&chat, json!({"text": "still here"})).await.unwrap();
    assert_eq!(sent.seq, 1, "the oversized send never reached the server");
    alice_live.close().await;
    drop(server);
}

/// The seq of the next message, not acked.
async fn message_seq(live: &mut Live) -> i64 {
    next(live, |e| match e {
        Event::Message(m) => Some(m.seq),
        _ => None,
    })
    .await
}

#[tokio::test]
async fn a_receipt_goes_only_to_the_senders_of_the_messages_it_covers() {
    let data = DataDir::new();
    let server = Server::start(&data, &[DEV]);
    let (alice, _) = sign_in(&server, "+4915100000731", "phone").await;
    let (bob, bob_session) = sign_in(&server, "+4915100000732", "phone").await;
    let (carol, carol_session) = sign_in(&server, "+4915100000733", "phone").await;
    let group = alice.group("g", &[&bob_session.user_id, &carol_session.user_id]).await.unwrap().id;
    let (mut alice_live, mut bob_live, mut carol_live) = (live(&alice).await, live(&bob).await, live(&carol).await);
    let bob_id = bob_session.user_id.as_str();
    let receipt_of = |e: Event| match e {
        Event::Receipt { user, seq, .. } if user == bob_id => Some(seq),
        _ => None,
    };
    bob_live.send(&group, json!({"text": "bob here"})).await.unwrap();
    let from_carol = carol_live.send(&group, json!({"text": "carol here"})).await.unwrap();
    assert_eq!(message_seq(&mut bob_live).await, from_carol.seq);
    // Bob's ack over carol's message is carol's to hear.
    bob_live.ack(&group, from_carol.seq).await.unwrap();
    assert_eq!(next(&mut carol_live, receipt_of).await, from_carol.seq);

    // Over alice's message, it is alice's alone.
    let from_alice = alice_live.send(&group, json!({"text": "question"})).await.unwrap();
    assert_eq!(message_seq(&mut bob_live).await, from_alice.seq);
    bob_live.ack(&group, from_alice.seq).await.unwrap();
    assert_eq!(next(&mut alice_live, receipt_of).await, from_alice.seq);
    alice_live.send(&group, json!({"text": "marker"})).await.unwrap();
    let heard: Vec<i64> = events_before(&mut carol_live, "marker").await.into_iter().filter_map(receipt_of).collect();
    assert!(!heard.contains(&from_alice.seq), "carol heard bob's receipt of alice's message: {heard:?}");
    for live in [alice_live, bob_live, carol_live] {
        live.close().await;
    }
}

#[tokio::test]
async fn a_member_removed_and_added_again_is_told_where_they_resume() {
    let data = DataDir::new();
    let server = Server::start(&data, &[DEV]);
    let (alice, _) = sign_in(&server, "+4915100000971", "phone").await;
    let (bob, bob_session) = sign_in(&server, "+4915100000972", "phone").await;
    let group = alice.group("g", &[bob_session.user_id.as_str()]).await.unwrap().id;
    let mut bob_live = live(&bob).await;
    alice.send(&group, "c1", json!({"text": "before"})).await.unwrap();
    assert_eq!(text(&next_message(&mut bob_live).await), "before");
    let remove = format!("/v1/conversations/{group}/members/{}", bob_session.user_id);
    let status = server.http.delete(server.url(&remove)).bearer_auth(alice.token().unwrap()).send().await.unwrap();
    assert_eq!(status.status(), 204);
    alice.send(&group, "c2", json!({"text": "while out"})).await.unwrap();
    alice.add_members(&group, &[bob_session.user_id.as_str()]).await.unwrap();
    alice.send(&group, "c3", json!({"text": "back"})).await.unwrap();
    // The same connection all along: it gets the message of its removal (seq 2), is told that
    // seq 3 is not for it (never a silent skip), then gets what came after the return (the
    // message that added it back, seq 4), and nothing said while out.
    let events = events_before(&mut bob_live, "back").await;
    let expired: Vec<i64> = events
        .iter()
        .filter_map(|e| match e {
            Event::Expired { oldest_seq, .. } => Some(*oldest_seq),
            _ => None,
        })
        .collect();
    assert!(!expired.is_empty() && expired.iter().all(|s| *s == 4), "{events:?}");
    let system: Vec<(i64, &str)> = events
        .iter()
        .filter_map(|e| match e {
            Event::Message(m) => Some((m.seq, m.body["system"].as_str().unwrap_or("not a system message"))),
            _ => None,
        })
        .collect();
    assert_eq!(system, vec![(2, "member_removed"), (4, "members_added")], "{events:?}");
}

#[tokio::test]
async fn a_users_devices_stay_in_sync_on_reads_sends_and_flags() {
    let data = DataDir::new();
    let server = Server::start(&data, &[DEV]);
    let (phone, _) = sign_in(&server, "+4915100000981", "phone").await;
    let (laptop, _) = sign_in(&server, "+4915100000981", "laptop").await;
    let (bob, bob_session) = sign_in(&server, "+4915100000982", "phone").await;
    let chat = phone.direct(&bob_session.user_id).await.unwrap().id;
    let (mut phone_live, mut laptop_live) = (live(&phone).await, live(&laptop).await);

    // Read on the phone: the laptop hears it, and its list shows nothing unread.
    let hi = bob.send(&chat, "b1", json!({"text": "hi"})).await.unwrap();
    assert_eq!(next_message(&mut phone_live).await.seq, hi.seq);
    assert_eq!(next_message(&mut laptop_live).await.seq, hi.seq);
    phone_live.read(&chat, hi.seq).await.unwrap();
    let read = next(&mut laptop_live, |e| match e {
        Event::Read { conversation, seq } if conversation == chat => Some(seq),
        _ => None,
    })
    .await;
    assert_eq!(read, hi.seq);
    let list = laptop.chat_list(None, 10).await.unwrap();
    assert_eq!(list["conversations"][0]["unread"], 0, "{list}");

    // Sent over HTTP from the phone: the laptop gets it, and the phone's own socket is told its
    // seq (a `sent`), so it sees no gap and fetches nothing when bob's next message comes.
    let over_http = phone.send(&chat, "p1", json!({"text": "over http"})).await.unwrap();
    let got = next_message(&mut laptop_live).await;
    assert_eq!((got.seq, text(&got)), (over_http.seq, "over http"));
    bob.send(&chat, "b2", json!({"text": "after"})).await.unwrap();
    let before = events_before(&mut phone_live, "after").await;
    assert!(
        !before.iter().any(|e| matches!(e, Event::Message(m) if text(m) == "over http")),
        "the phone was handed its own message back: {before:?}"
    );

    // Flags set on the laptop reach the phone.
    laptop.set_flags(&chat, json!({"pinned": true})).await.unwrap();
    let pinned = next(&mut phone_live, |e| match e {
        Event::Flags { conversation, pinned, .. } if conversation == chat => Some(pinned),
        _ => None,
    })
    .await;
    assert!(pinned);
    // A profile change reaches the user's conversations.
    phone.set_profile(json!({"name": "Alice"})).await.unwrap();
    let mut bob_live = live(&bob).await;
    phone.set_profile(json!({"about": "here"})).await.unwrap();
    let changed = next(&mut bob_live, |e| match e {
        Event::Profile { user, .. } => Some(user),
        _ => None,
    })
    .await;
    assert_eq!(changed, phone.profile().await.unwrap()["id"].as_str().unwrap());
    for live in [phone_live, laptop_live, bob_live] {
        live.close().await;
    }
}

#[tokio::test]
async fn a_media_message_carries_what_to_draw_it_with_and_says_when_it_is_ready() {
    let data = DataDir::new();
    // Uploads answer at once (still processing), and variant URLs point at a CDN.
    let server = Server::start(
        &data,
        &[
            DEV,
            ("COURIER_INGEST__WAIT_FOR_READY_MS", "0"),
            ("COURIER_INGEST__PUBLIC_BASE_URL", "https://cdn.example.com/"),
        ],
    );
    let (alice, _) = sign_in(&server, "+4915100000991", "phone").await;
    let (bob, bob_session) = sign_in(&server, "+4915100000992", "phone").await;
    let chat = alice.direct(&bob_session.user_id).await.unwrap().id;
    let mut bob_live = live(&bob).await;
    let token = alice.token().unwrap().to_owned();

    // A photo that is ready: the message alone draws it, URLs absolute under the CDN.
    let photo = server.upload_ready(&token, "image/jpeg", fixture("rocket.jpg")).await;
    alice.send(&chat, "p1", json!({"media": photo["id"].clone(), "caption": "launch"})).await.unwrap();
    let m = next_message(&mut bob_live).await;
    let info = &m.body["media_info"];
    assert_eq!((info["kind"].as_str(), info["status"].as_str()), (Some("image"), Some("ready")), "{}", m.body);
    assert!(info["width"].as_u64().unwrap() > 0 && info["preview"].as_str().unwrap().starts_with("data:image/jpeg"));
    let thumb = info["variants"]["thumb"]["url"].as_str().unwrap();
    assert!(thumb.starts_with("https://cdn.example.com/b/"), "{thumb}");
    // The same signed path is served here, as an edge would fill it from this origin.
    let path = thumb.trim_start_matches("https://cdn.example.com");
    assert_eq!(server.http.get(server.url(path)).send().await.unwrap().status(), 200);
    assert_eq!(m.body["caption"], "launch");
    // A client cannot bring its own.
    let forged = json!({"media": photo["id"].clone(), "media_info": {"kind": "image"}});
    let refused = alice.send(&chat, "p2", forged).await.unwrap_err();
    assert!(matches!(&refused, client::Error::Api { status: 422, .. }), "{refused:?}");
    // A retry of the send is answered as the first message, whatever changed in the URLs.
    let again = alice.send(&chat, "p1", json!({"media": photo["id"].clone(), "caption": "launch"})).await.unwrap();
    assert_eq!(again.seq, m.seq);

    // A video still being transcoded: the message says so, and a `media_ready` frame follows.
    let upload = server.upload(&token, "video/mp4", crate::avmedia::busy_video("ready.mp4", 2)).await;
    assert_eq!(upload.status(), 201);
    let video: Value = upload.json().await.unwrap();
    assert_eq!(video["status"], "processing");
    let sent = alice.send(&chat, "v1", json!({"media": video["id"].clone()})).await.unwrap();
    let m = next_message(&mut bob_live).await;
    assert_eq!((m.seq, m.body["media_info"]["status"].as_str()), (sent.seq, Some("processing")));
    let (seq, info) = next(&mut bob_live, |e| match e {
        Event::MediaReady { seq, media_info, .. } => Some((seq, media_info)),
        _ => None,
    })
    .await;
    assert_eq!((seq, info["status"].as_str(), info["kind"].as_str()), (sent.seq, Some("ready"), Some("video")));
    assert!(info["duration_ms"].as_u64().unwrap() > 1000 && info["variants"]["standard"]["url"].is_string(), "{info}");
    // History says the same from now on.
    let history = bob.history(&chat, sent.seq - 1, 1).await.unwrap();
    assert_eq!(history[0].body["media_info"]["status"], "ready");
    bob_live.close().await;
}

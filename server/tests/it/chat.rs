//! Conversations and messages over HTTP, with device-bound tokens.

use serde_json::{Value, json};

use crate::harness::{DataDir, Server, fixture};

/// A device-bound token for `user`.
async fn device_token(server: &Server, user: &str) -> String {
    let response = server
        .http
        .post(server.url("/v1/devices"))
        .bearer_auth(server.token(user))
        .json(&json!({"name": "phone"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    let body: Value = response.json().await.unwrap();
    assert!(body["device_id"].as_str().is_some());
    body["access_token"].as_str().unwrap().to_owned()
}

async fn post(server: &Server, token: &str, path: &str, body: Value) -> (u16, Value) {
    let response = server.http.post(server.url(path)).bearer_auth(token).json(&body).send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn get(server: &Server, token: &str, path: &str) -> (u16, Value) {
    let response = server.http.get(server.url(path)).bearer_auth(token).send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn two_users_talk_and_a_retry_is_stored_once() {
    let data = DataDir::new();
    let server = Server::start(&data, &[]);
    let (alice, bob, eve) =
        (device_token(&server, "alice").await, device_token(&server, "bob").await, device_token(&server, "eve").await);

    let (status, chat) =
        post(&server, &alice, "/v1/conversations", json!({"type": "direct", "members": ["bob"]})).await;
    assert_eq!(status, 200, "{chat}");
    let id = chat["id"].as_str().unwrap().to_owned();
    let (_, again) = post(&server, &bob, "/v1/conversations", json!({"type": "direct", "members": ["alice"]})).await;
    assert_eq!(again["id"], chat["id"], "one pair, one direct conversation");

    let messages = format!("/v1/conversations/{id}/messages");
    let hello = json!({"client_id": "c-1", "body": {"text": "hello bob"}});
    let (status, sent) = post(&server, &alice, &messages, hello.clone()).await;
    assert_eq!(status, 201, "{sent}");
    assert_eq!(sent["seq"], 1);
    assert!(sent["ts"].as_i64().unwrap() > 0);
    let (status, retried) = post(&server, &alice, &messages, hello).await;
    assert_eq!(status, 200);
    assert_eq!(retried["seq"], 1);
    // The same client_id with another body is a bug in the app, not a retry: 409, nothing stored.
    let (status, reused) =
        post(&server, &alice, &messages, json!({"client_id": "c-1", "body": {"text": "something else"}})).await;
    assert_eq!((status, reused["error"]["code"].as_str()), (409, Some("client_id_reused")), "{reused}");
    // A client_id is the sending device's: alice's second device and bob may use "c-1" too.
    let alice_laptop = device_token(&server, "alice").await;
    let (status, laptop) =
        post(&server, &alice_laptop, &messages, json!({"client_id": "c-1", "body": {"text": "from my laptop"}})).await;
    assert_eq!((status, laptop["seq"].as_i64()), (201, Some(2)), "{laptop}");
    let (status, second) =
        post(&server, &bob, &messages, json!({"client_id": "c-1", "body": {"ciphertext": "AAECAw=="}})).await;
    assert_eq!((status, second["seq"].as_i64()), (201, Some(3)));

    let (status, history) = get(&server, &bob, &format!("{messages}?after=0")).await;
    assert_eq!(status, 200);
    let list = history["messages"].as_array().unwrap();
    assert_eq!(list.len(), 3);
    assert_eq!(list[0]["sender"], "alice");
    assert_eq!(list[0]["body"]["text"], "hello bob");
    assert_eq!(list[1]["body"]["text"], "from my laptop");
    assert_eq!(list[2]["body"]["ciphertext"], "AAECAw==");
    let (_, page) = get(&server, &bob, &format!("{messages}?after=2&limit=10")).await;
    assert_eq!(page["messages"].as_array().unwrap().len(), 1);

    let (_, listed) = get(&server, &bob, "/v1/conversations").await;
    assert_eq!(listed["conversations"][0]["unread"], 2, "{listed}");
    assert_eq!(listed["conversations"][0]["last_seq"], 3);

    // Eve is no member: she learns nothing, not even that the conversation exists.
    for (status, body) in [
        get(&server, &eve, &messages).await,
        post(&server, &eve, &messages, json!({"client_id": "x", "body": {"text": "hi"}})).await,
    ] {
        assert_eq!(status, 404);
        assert_eq!(body["error"]["code"], "not_found");
    }
    let (_, eves) = get(&server, &eve, "/v1/conversations").await;
    assert_eq!(eves["conversations"], json!([]));
}

#[tokio::test]
async fn bad_messages_get_clear_errors() {
    let data = DataDir::new();
    let server = Server::start(&data, &[]);
    let (alice, _bob) = (device_token(&server, "alice").await, device_token(&server, "bob").await);
    let (_, chat) = post(&server, &alice, "/v1/conversations", json!({"type": "direct", "members": ["bob"]})).await;
    let messages = format!("/v1/conversations/{}/messages", chat["id"].as_str().unwrap());

    for (body, status, code) in [
        (json!({"client_id": "a", "body": {}}), 422, "invalid_request"),
        (json!({"client_id": "a", "body": {"text": 5}}), 422, "invalid_request"),
        (json!({"client_id": "a", "body": {"text": "x", "ciphertext": "AA=="}}), 422, "invalid_request"),
        (json!({"client_id": "a", "body": {"text": "x", "extra": 1}}), 422, "invalid_request"),
        (json!({"client_id": "a", "body": {"ciphertext": "not base64!"}}), 422, "invalid_request"),
        (json!({"client_id": "a", "body": {"media": "01a21f21-9207-7501-b477-0d4f5ee0e866"}}), 422, "unknown_media"),
        (json!({"client_id": "a", "body": {"media": "not-an-id"}}), 422, "invalid_request"),
        (json!({"client_id": "", "body": {"text": "x"}}), 422, "invalid_request"),
        (json!({"body": {"text": "x"}}), 422, "invalid_request"),
        (json!({"client_id": "a", "body": {"text": "x".repeat(70 * 1024)}}), 422, "invalid_request"),
    ] {
        let (got, answer) = post(&server, &alice, &messages, body.clone()).await;
        assert_eq!((got, answer["error"]["code"].as_str()), (status, Some(code)), "{body}");
    }
    let raw = server.http.post(server.url(&messages)).bearer_auth(&alice).header("content-type", "application/json");
    let response = raw.body("{not json").send().await.unwrap();
    assert_eq!(response.status(), 400);

    // A token without a device may read media but not send.
    let plain = server.token("alice");
    let (status, answer) = post(&server, &plain, &messages, json!({"client_id": "a", "body": {"text": "x"}})).await;
    assert_eq!((status, answer["error"]["code"].as_str()), (403, Some("device_token_required")));
    let (_, history) = get(&server, &alice, &messages).await;
    assert_eq!(history["messages"], json!([]), "a refused message was stored");
    let (status, _) = get(&server, &alice, "/v1/conversations/not-a-conversation/messages").await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn groups_have_admins() {
    let data = DataDir::new();
    let server = Server::start(&data, &[]);
    let (alice, bob, carol) = (
        device_token(&server, "alice").await,
        device_token(&server, "bob").await,
        device_token(&server, "carol").await,
    );
    let (status, group) =
        post(&server, &alice, "/v1/conversations", json!({"type": "group", "name": "friends", "members": ["bob"]}))
            .await;
    assert_eq!(status, 201);
    assert_eq!(group["name"], "friends");
    let members = format!("/v1/conversations/{}/members", group["id"].as_str().unwrap());

    let (status, answer) = post(&server, &bob, &members, json!({"members": ["carol"]})).await;
    assert_eq!((status, answer["error"]["code"].as_str()), (403, Some("not_admin")));
    let (status, _) = post(&server, &alice, &members, json!({"members": ["carol"]})).await;
    assert_eq!(status, 204);
    let (_, listed) = get(&server, &carol, "/v1/conversations").await;
    assert_eq!(listed["conversations"][0]["id"], group["id"]);

    // Carol leaves; then the group is gone from her list.
    let leave = server.http.delete(server.url(&format!("{members}/carol"))).bearer_auth(&carol).send().await.unwrap();
    assert_eq!(leave.status(), 204);
    let (_, listed) = get(&server, &carol, "/v1/conversations").await;
    assert_eq!(listed["conversations"], json!([]));

    let (status, _) =
        post(&server, &alice, "/v1/conversations", json!({"type": "group", "name": "", "members": []})).await;
    assert_eq!(status, 422);
    let (status, _) = post(&server, &alice, "/v1/conversations", json!({"type": "direct", "members": []})).await;
    assert_eq!(status, 422);
}

#[tokio::test]
async fn a_media_message_shares_the_media_with_the_members() {
    let data = DataDir::new();
    let server = Server::start(&data, &[]);
    let (alice, bob, eve) =
        (device_token(&server, "alice").await, device_token(&server, "bob").await, device_token(&server, "eve").await);
    let photo = server.upload_ready(&alice, "image/jpeg", fixture("rocket.jpg")).await;
    let media_id = photo["id"].as_str().unwrap().to_owned();
    assert_eq!(server.media(&bob, &media_id).await.status(), 404, "bob saw the photo before it was sent");

    let (_, chat) = post(&server, &alice, "/v1/conversations", json!({"type": "direct", "members": ["bob"]})).await;
    let messages = format!("/v1/conversations/{}/messages", chat["id"].as_str().unwrap());
    // Bob cannot send Alice's photo before it was shared with him.
    let (status, answer) =
        post(&server, &bob, &messages, json!({"client_id": "b1", "body": {"media": media_id.clone()}})).await;
    assert_eq!((status, answer["error"]["code"].as_str()), (422, Some("unknown_media")));

    let body = json!({"media": media_id.clone(), "caption": "launch"});
    let (status, sent) = post(&server, &alice, &messages, json!({"client_id": "a1", "body": body})).await;
    assert_eq!(status, 201, "{sent}");
    assert_eq!(sent["body"]["caption"], "launch");

    // Now Bob reads it and its variants, and may pass it on; Eve still may not.
    let response = server.media(&bob, &media_id).await;
    assert_eq!(response.status(), 200);
    let seen: Value = response.json().await.unwrap();
    assert_eq!(seen["status"], "ready");
    crate::harness::variant_bytes(&server, &seen, "thumb").await;
    let (status, _) =
        post(&server, &bob, &messages, json!({"client_id": "b2", "body": {"media": media_id.clone()}})).await;
    assert_eq!(status, 201);
    assert_eq!(server.media(&eve, &media_id).await.status(), 404);
}

#[tokio::test]
async fn a_stored_message_is_answered_as_sent_when_its_delivery_fails() {
    let data = DataDir::new();
    // The first delivery after a commit fails (as a media share would with the database away).
    let server = Server::start(&data, &[("COURIER_CHAT__TEST_FAIL_DELIVERIES", "1")]);
    let (alice, bob) = (device_token(&server, "alice").await, device_token(&server, "bob").await);
    let photo = server.upload_ready(&alice, "image/jpeg", fixture("rocket.jpg")).await;
    let media_id = photo["id"].as_str().unwrap().to_owned();
    let (_, chat) = post(&server, &alice, "/v1/conversations", json!({"type": "direct", "members": ["bob"]})).await;
    let messages = format!("/v1/conversations/{}/messages", chat["id"].as_str().unwrap());

    // The message is stored: the answer says so (an error would make the app send it again)...
    let send = json!({"client_id": "a1", "body": {"media": media_id.clone()}});
    let (status, sent) = post(&server, &alice, &messages, send.clone()).await;
    assert_eq!((status, sent["seq"].as_i64()), (201, Some(1)), "{sent}");
    // ...and the share is made good in the background: bob can read the photo soon after.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while server.media(&bob, &media_id).await.status() != 200 {
        assert!(std::time::Instant::now() < deadline, "the media was never shared with bob");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let (_, history) = get(&server, &bob, &format!("{messages}?after=0")).await;
    assert_eq!(history["messages"].as_array().unwrap().len(), 1, "stored once");
}

/// The texts of `token`'s history of `messages` (a conversation's messages path), or the status.
async fn texts(server: &Server, token: &str, messages: &str) -> Result<Vec<String>, u16> {
    let (status, page) = get(server, token, &format!("{messages}?after=0")).await;
    if status != 200 {
        return Err(status);
    }
    // System messages (who joined, who left) have no text.
    Ok(page["messages"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m["body"]["text"].as_str().map(str::to_owned))
        .collect())
}

#[tokio::test]
async fn a_member_reads_from_when_they_joined_and_nothing_while_out() {
    let data = DataDir::new();
    let server = Server::start(&data, &[]);
    let (alice, carol) = (device_token(&server, "alice").await, device_token(&server, "carol").await);
    device_token(&server, "bob").await;
    let (_, group) =
        post(&server, &alice, "/v1/conversations", json!({"type": "group", "name": "g", "members": ["bob"]})).await;
    let id = group["id"].as_str().unwrap();
    let (messages, members) = (format!("/v1/conversations/{id}/messages"), format!("/v1/conversations/{id}/members"));
    let say = |text: &str, n: usize| json!({"client_id": format!("a{n}"), "body": {"text": text}});
    post(&server, &alice, &messages, say("before carol", 1)).await;

    // Added today, carol reads nothing from before, and nothing counts as unread.
    assert_eq!(post(&server, &alice, &members, json!({"members": ["carol"]})).await.0, 204);
    assert_eq!(texts(&server, &carol, &messages).await, Ok(vec![]));
    let (_, listed) = get(&server, &carol, "/v1/conversations").await;
    assert_eq!(listed["conversations"][0]["unread"], 0, "{listed}");
    post(&server, &alice, &messages, say("welcome carol", 2)).await;
    assert_eq!(texts(&server, &carol, &messages).await, Ok(vec!["welcome carol".to_owned()]));

    // Removed, she reads up to her removal and nothing after; added again, nothing said while
    // she was out.
    let remove = server.http.delete(server.url(&format!("{members}/carol"))).bearer_auth(&alice).send().await.unwrap();
    assert_eq!(remove.status(), 204);
    post(&server, &alice, &messages, say("carol is gone", 3)).await;
    assert_eq!(texts(&server, &carol, &messages).await, Ok(vec!["welcome carol".to_owned()]));
    let (_, page) = get(&server, &carol, &format!("{messages}?after=0")).await;
    let last = page["messages"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(last["body"], json!({"system": "member_removed", "by": "alice", "user": "carol"}), "{page}");
    assert_eq!(post(&server, &carol, &messages, say("still here?", 9)).await.0, 404);
    assert_eq!(post(&server, &alice, &members, json!({"members": ["carol"]})).await.0, 204);
    post(&server, &alice, &messages, say("carol is back", 4)).await;
    assert_eq!(texts(&server, &carol, &messages).await, Ok(vec!["carol is back".to_owned()]));
    assert_eq!(texts(&server, &alice, &messages).await.unwrap().len(), 4, "the others read it all");
}

/// Sends `body` as `token` with a fresh client id; the status and answer.
async fn say(server: &Server, token: &str, messages: &str, client_id: &str, body: Value) -> (u16, Value) {
    post(server, token, messages, json!({"client_id": client_id, "body": body})).await
}

/// The bodies of `token`'s history of `messages`, by seq.
async fn bodies(server: &Server, token: &str, messages: &str) -> Vec<(i64, Value)> {
    let (status, page) = get(server, token, &format!("{messages}?after=0")).await;
    assert_eq!(status, 200, "{page}");
    page["messages"].as_array().unwrap().iter().map(|m| (m["seq"].as_i64().unwrap(), m["body"].clone())).collect()
}

#[tokio::test]
async fn replies_reactions_edits_and_deletions_are_messages_of_the_log() {
    let data = DataDir::new();
    let server = Server::start(&data, &[]);
    let (alice, bob) = (device_token(&server, "alice").await, device_token(&server, "bob").await);
    let (_, group) =
        post(&server, &alice, "/v1/conversations", json!({"type": "group", "name": "g", "members": ["bob"]})).await;
    let messages = format!("/v1/conversations/{}/messages", group["id"].as_str().unwrap());
    let refused = |(status, answer): (u16, Value)| (status, answer["error"]["code"].as_str().unwrap_or("").to_owned());

    assert_eq!(say(&server, &alice, &messages, "a1", json!({"text": "helo"})).await.0, 201);
    assert_eq!(say(&server, &bob, &messages, "b1", json!({"text": "hi", "reply_to": 1})).await.0, 201);
    assert_eq!(refused(say(&server, &bob, &messages, "b2", json!({"text": "x", "reply_to": 0})).await).0, 422);
    assert_eq!(say(&server, &bob, &messages, "b3", json!({"reaction": "👍", "to": 1})).await.0, 201);
    assert_eq!(
        refused(say(&server, &bob, &messages, "b4", json!({"reaction": "👍", "to": 99})).await),
        (404, "unknown_message".into())
    );
    assert_eq!(
        refused(say(&server, &bob, &messages, "b5", json!({"edit": 1, "text": "hijacked"})).await),
        (403, "not_sender".into()),
        "only the sender edits"
    );
    assert_eq!(
        refused(say(&server, &bob, &messages, "b6", json!({"edit": 3, "text": "👎"})).await),
        (409, "not_editable".into()),
        "a reaction is replaced by another, not edited"
    );
    let (status, edit) = say(&server, &alice, &messages, "a2", json!({"edit": 1, "text": "hello"})).await;
    assert_eq!((status, edit["seq"].as_i64()), (201, Some(4)), "refusals took no seq: {edit}");

    // The edited message keeps its seq and says when it was edited; everything else is as sent.
    let history = bodies(&server, &bob, &messages).await;
    assert_eq!(history.iter().map(|(seq, _)| *seq).collect::<Vec<_>>(), vec![1, 2, 3, 4]);
    assert_eq!(history[0].1["text"], "hello");
    assert!(history[0].1["edited_at"].as_i64().is_some(), "{:?}", history[0]);
    assert_eq!(history[1].1, json!({"text": "hi", "reply_to": 1}));
    assert_eq!(history[2].1, json!({"reaction": "👍", "to": 1}));

    // Deleting a media message for everyone takes the media back from the members.
    let photo = server.upload_ready(&alice, "image/jpeg", fixture("rocket.jpg")).await;
    let media_id = photo["id"].as_str().unwrap().to_owned();
    assert_eq!(say(&server, &alice, &messages, "a3", json!({"media": media_id.clone()})).await.0, 201);
    assert_eq!(server.media(&bob, &media_id).await.status(), 200);
    assert_eq!(refused(say(&server, &bob, &messages, "b7", json!({"delete": 5})).await), (403, "not_sender".into()));
    // A client id of another message is no way around that.
    assert_eq!(say(&server, &bob, &messages, "b8", json!({"text": "\"edited_at\""})).await.0, 201);
    assert_eq!(say(&server, &bob, &messages, "b9", json!({"edit": 6, "text": "x"})).await.0, 201);
    assert_eq!(
        refused(say(&server, &bob, &messages, "b8", json!({"delete": 5})).await),
        (409, "client_id_reused".into())
    );
    let (status, deletion) = say(&server, &alice, &messages, "a4", json!({"delete": 5})).await;
    assert_eq!((status, deletion["seq"].as_i64()), (201, Some(8)), "{deletion}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while server.media(&bob, &media_id).await.status() != 404 {
        assert!(std::time::Instant::now() < deadline, "bob can still read the deleted message's media");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(server.media(&alice, &media_id).await.status(), 200, "the owner keeps the upload");
    let history = bodies(&server, &bob, &messages).await;
    assert_eq!(history[4], (5, json!({"deleted": true})), "the body is gone from the store");
    assert_eq!(history[7], (8, json!({"delete": 5})), "devices learn of it as a message");
    assert_eq!(refused(say(&server, &alice, &messages, "a5", json!({"delete": 5})).await).0, 409, "deleted once");
    // A retried deletion is the same message, not an error.
    assert_eq!(say(&server, &alice, &messages, "a4", json!({"delete": 5})).await.1["seq"], 8);
}

#[tokio::test]
async fn a_disappearing_timer_deletes_messages_on_the_server() {
    let data = DataDir::new();
    let server = Server::start(&data, &[]);
    let (alice, bob) = (device_token(&server, "alice").await, device_token(&server, "bob").await);
    let (_, chat) = post(&server, &alice, "/v1/conversations", json!({"type": "direct", "members": ["bob"]})).await;
    let messages = format!("/v1/conversations/{}/messages", chat["id"].as_str().unwrap());
    assert_eq!(say(&server, &alice, &messages, "a1", json!({"text": "kept"})).await.0, 201);
    // Either member of a direct chat sets the timer; it is a message of the log too.
    let (status, timer) = say(&server, &bob, &messages, "b1", json!({"disappearing": 2})).await;
    assert_eq!(status, 201, "{timer}");
    assert!(timer.get("expires_at").is_none(), "the timer message itself stays");
    let (_, sent) = say(&server, &alice, &messages, "a2", json!({"text": "gone soon"})).await;
    let expires_at = sent["expires_at"].as_i64().expect("a message under a timer says when it goes");
    assert!((1_900..=2_500).contains(&(expires_at - sent["ts"].as_i64().unwrap())), "{sent}");
    assert_eq!(say(&server, &bob, &messages, "b2", json!({"disappearing": 0})).await.0, 201);
    assert_eq!(say(&server, &alice, &messages, "a3", json!({"text": "kept too"})).await.1.get("expires_at"), None);

    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let history = bodies(&server, &bob, &messages).await;
        if history[2].1 == json!({"expired": true}) {
            assert_eq!(history.len(), 5, "the log keeps its seqs");
            assert_eq!(history[0].1["text"], "kept");
            assert_eq!(history[4].1["text"], "kept too");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the message never disappeared: {history:?}");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }

    // In a group only admins set it.
    let (_, group) =
        post(&server, &alice, "/v1/conversations", json!({"type": "group", "name": "g", "members": ["bob"]})).await;
    let group_messages = format!("/v1/conversations/{}/messages", group["id"].as_str().unwrap());
    let (status, answer) = say(&server, &bob, &group_messages, "b1", json!({"disappearing": 60})).await;
    assert_eq!((status, answer["error"]["code"].as_str()), (403, Some("not_admin")));
    assert_eq!(say(&server, &alice, &group_messages, "a1", json!({"disappearing": 60})).await.0, 201);
}

#[tokio::test]
async fn a_large_groups_receipts_come_aggregated_with_the_detail_on_request() {
    use client::{Api, Event, Live, LiveOptions};
    let data = DataDir::new();
    let server = Server::start(&data, &[]);
    let api = Api::new(&server.base);
    let alice = api.with_token(&device_token(&server, "alice").await);
    // 39 others: more than the 32 above which receipts are aggregated.
    let names: Vec<String> = (0..39).map(|i| format!("member{i}")).collect();
    let mut others = Vec::new();
    for name in &names {
        others.push(api.with_token(&device_token(&server, name).await));
    }
    let group = alice.group("big", &names.iter().map(String::as_str).collect::<Vec<_>>()).await.unwrap().id;
    // All but the last write once: a member who never wrote shares no receipts, not even in a total.
    for (i, other) in others.iter().enumerate().take(38) {
        other.send(&group, &format!("hi{i}"), json!({"text": "hi"})).await.unwrap();
    }
    let mut alice_live = Live::connect(&alice, LiveOptions::default()).await.unwrap();
    let seq = alice.send(&group, "a1", json!({"text": "hello all"})).await.unwrap().seq;
    // All of them get it; the ones who wrote but the last read it.
    let mut lives = Vec::new();
    for (i, other) in others.iter().enumerate() {
        let mut live = Live::connect(other, LiveOptions::default()).await.unwrap();
        crate::live::next(&mut live, |e| matches!(e, Event::Message(m) if m.seq == seq).then_some(())).await;
        if i < 37 {
            live.read(&group, seq).await.unwrap()
        } else {
            live.ack(&group, seq).await.unwrap()
        }
        lives.push(live);
    }
    let mut per_member = 0;
    let delivered = crate::live::next(&mut alice_live, |e| match e {
        Event::GroupReceipt { conversation, status, seq } if conversation == group && status == "delivered" => {
            Some(seq)
        }
        Event::Receipt { .. } => {
            per_member += 1;
            None
        }
        _ => None,
    })
    .await;
    assert_eq!(delivered, seq, "delivered to all");
    let detail = alice.receipts(&group, seq).await.unwrap();
    let shown = (detail.read.len(), detail.delivered.clone(), detail.pending.len(), detail.withheld);
    assert_eq!(shown, (37, vec!["member37".to_owned()], 0, 1));
    // The last who wrote reads it: read by all (the silent member is not counted).
    lives[37].read(&group, seq).await.unwrap();
    let read = crate::live::next(&mut alice_live, |e| match e {
        Event::GroupReceipt { status, seq, .. } if status == "read" => Some(seq),
        Event::Receipt { .. } => {
            per_member += 1;
            None
        }
        _ => None,
    })
    .await;
    assert_eq!(read, seq, "read by all");
    assert_eq!(per_member, 0, "no receipt per member in a large group");
    // Only the sender sees the detail.
    let refused = others[0].receipts(&group, seq).await.unwrap_err();
    assert!(matches!(refused, client::Error::Api { status: 403, .. }), "{refused:?}");
}

#[tokio::test]
async fn every_error_has_the_json_shape_and_browsers_may_call_the_api() {
    let data = DataDir::new();
    let server = Server::start(&data, &[("COURIER_HTTP__ALLOWED_ORIGINS", r#"["https://web.example"]"#)]);
    let alice = device_token(&server, "alice").await;
    let error_of = |response: reqwest::Response| async move {
        let status = response.status().as_u16();
        let allow = response.headers().get("allow").map(|v| v.to_str().unwrap().to_owned());
        let body: Value = response.json().await.expect("an error body is JSON");
        (status, body["error"]["code"].as_str().unwrap_or("").to_owned(), body["error"]["message"].is_string(), allow)
    };
    // The router's own answers: a method a route does not take, a route that does not exist.
    let wrong_method = server.http.delete(server.url("/v1/conversations")).bearer_auth(&alice).send().await.unwrap();
    let (status, code, has_message, allow) = error_of(wrong_method).await;
    assert_eq!((status, code.as_str(), has_message), (405, "method_not_allowed", true));
    assert!(allow.is_some_and(|a| a.contains("GET") && a.contains("POST")), "405 keeps its Allow header");
    let nowhere = server.http.get(server.url("/v1/nowhere")).bearer_auth(&alice).send().await.unwrap();
    assert_eq!(error_of(nowhere).await.0, 404);

    // A browser page of an allowed origin may call the API; another origin's may not.
    let preflight = |origin: &str| {
        server
            .http
            .request(reqwest::Method::OPTIONS, server.url("/v1/conversations"))
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header("access-control-request-headers", "authorization,content-type")
            .send()
    };
    let allowed = preflight("https://web.example").await.unwrap();
    assert!(allowed.status().is_success(), "{}", allowed.status());
    let header = |r: &reqwest::Response, name: &str| r.headers().get(name).map(|v| v.to_str().unwrap().to_lowercase());
    assert_eq!(header(&allowed, "access-control-allow-origin").as_deref(), Some("https://web.example"));
    assert!(header(&allowed, "access-control-allow-methods").is_some_and(|m| m.contains("post")));
    assert!(header(&allowed, "access-control-allow-headers").is_some_and(|h| h.contains("authorization")));
    assert_eq!(header(&allowed, "access-control-allow-credentials"), None, "never credentials");
    let other = preflight("https://evil.example").await.unwrap();
    assert_eq!(header(&other, "access-control-allow-origin"), None);
    let call = server
        .http
        .get(server.url("/v1/conversations"))
        .bearer_auth(&alice)
        .header("origin", "https://web.example")
        .send()
        .await
        .unwrap();
    assert_eq!(call.status(), 200);
    assert_eq!(header(&call, "access-control-allow-origin").as_deref(), Some("https://web.example"));

    // A phone number with its `+` left unencoded in the query is still the number.
    let lookup =
        |query: &str| server.http.get(server.url(&format!("/v1/users/lookup?{query}"))).bearer_auth(&alice).send();
    let raw = error_of(lookup("phone=+4915100000999").await.unwrap()).await;
    assert_eq!((raw.0, raw.1.as_str()), (404, "not_found"), "not found, not \"not E.164\"");
    let encoded = error_of(lookup("phone=%2B4915100000999").await.unwrap()).await;
    assert_eq!(encoded.0, 404);
    assert_eq!(error_of(lookup("phone=12345").await.unwrap()).await.0, 422);
}

#[tokio::test]
async fn conversations_are_only_with_users_that_exist() {
    let data = DataDir::new();
    let server = Server::start(&data, &[]);
    let (alice, _bob) = (device_token(&server, "alice").await, device_token(&server, "bob").await);
    let (status, answer) =
        post(&server, &alice, "/v1/conversations", json!({"type": "direct", "members": ["bbo"]})).await;
    assert_eq!((status, answer["error"]["code"].as_str()), (404, Some("unknown_user")));
    assert!(answer["error"]["message"].as_str().unwrap().contains("bbo"), "{answer}");
    let group = json!({"type": "group", "name": "g", "members": ["bob", "nobody", "ghost"]});
    let (status, answer) = post(&server, &alice, "/v1/conversations", group).await;
    assert_eq!((status, answer["error"]["code"].as_str()), (404, Some("unknown_user")));
    let message = answer["error"]["message"].as_str().unwrap();
    assert!(message.contains("nobody") && message.contains("ghost") && !message.contains("bob"), "{message}");
    let (_, chats) = get(&server, &alice, "/v1/conversations").await;
    assert_eq!(chats["conversations"].as_array().unwrap().len(), 0, "nothing was created");

    let (status, group) =
        post(&server, &alice, "/v1/conversations", json!({"type": "group", "name": "g", "members": ["bob"]})).await;
    assert_eq!(status, 201);
    let members = format!("/v1/conversations/{}/members", group["id"].as_str().unwrap());
    let (status, answer) = post(&server, &alice, &members, json!({"members": ["nobody"]})).await;
    assert_eq!((status, answer["error"]["code"].as_str()), (404, Some("unknown_user")));

    // A direct conversation's members do not change, with a code of its own (not `not_admin`).
    device_token(&server, "carol").await;
    let (_, direct) = post(&server, &alice, "/v1/conversations", json!({"type": "direct", "members": ["bob"]})).await;
    let members = format!("/v1/conversations/{}/members", direct["id"].as_str().unwrap());
    let (status, answer) = post(&server, &alice, &members, json!({"members": ["carol"]})).await;
    assert_eq!((status, answer["error"]["code"].as_str()), (409, Some("direct_conversation")));
    let leave = server.http.delete(server.url(&format!("{members}/alice"))).bearer_auth(&alice).send().await.unwrap();
    assert_eq!(leave.status(), 409);
}

#[tokio::test]
async fn history_pages_both_ways_and_says_when_there_is_more() {
    let data = DataDir::new();
    let server = Server::start(&data, &[]);
    let (alice, _bob) = (device_token(&server, "alice").await, device_token(&server, "bob").await);
    let (_, chat) = post(&server, &alice, "/v1/conversations", json!({"type": "direct", "members": ["bob"]})).await;
    let messages = format!("/v1/conversations/{}/messages", chat["id"].as_str().unwrap());
    for n in 1..=5 {
        say(&server, &alice, &messages, &format!("m{n}"), json!({"text": format!("{n}")})).await;
    }
    let page = |query: &str| {
        let url = format!("{messages}?{query}");
        let (server, alice) = (&server, &alice);
        async move {
            let (status, page) = get(server, alice, &url).await;
            let seqs: Vec<i64> = page["messages"]
                .as_array()
                .map(|m| m.iter().map(|m| m["seq"].as_i64().unwrap()).collect())
                .unwrap_or_default();
            (status, seqs, page["has_more"].as_bool(), page)
        }
    };
    // Back from the end, as a chat screen scrolls up.
    assert_eq!(page("before=6&limit=2").await.1, vec![4, 5]);
    assert_eq!(page("before=6&limit=2").await.2, Some(true));
    assert_eq!(page("before=4&limit=2").await.1, vec![2, 3]);
    let (_, seqs, more, _) = page("before=2&limit=2").await;
    assert_eq!((seqs, more), (vec![1], Some(false)));
    // Forward, as a device catches up.
    let (_, seqs, more, _) = page("after=3").await;
    assert_eq!((seqs, more), (vec![4, 5], Some(false)));
    let (_, seqs, more, _) = page("after=0&limit=3").await;
    assert_eq!((seqs, more), (vec![1, 2, 3], Some(true)));
    // Limits are checked, and a cap is said.
    let (status, _, _, body) = page("limit=0").await;
    assert_eq!((status, body["error"]["code"].as_str()), (400, Some("invalid_request")));
    let (status, seqs, _, body) = page("limit=100000").await;
    assert_eq!((status, seqs.len(), body["limit"].as_i64()), (200, 5, Some(500)));
    assert_eq!(page("after=1&before=3").await.0, 400);
    assert_eq!(page("after=x").await.0, 400);
}

async fn call(
    server: &Server,
    method: reqwest::Method,
    token: impl Into<String>,
    path: impl Into<String>,
    body: Option<Value>,
) -> (u16, Value) {
    let mut request = server.http.request(method, server.url(&path.into())).bearer_auth(token.into());
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn groups_are_administered_and_every_change_is_a_system_message() {
    use reqwest::Method;
    let data = DataDir::new();
    let server = Server::start(&data, &[]);
    let (alice, bob, carol) = (
        device_token(&server, "alice").await,
        device_token(&server, "bob").await,
        device_token(&server, "carol").await,
    );
    let (_, group) =
        post(&server, &alice, "/v1/conversations", json!({"type": "group", "name": "g", "members": ["bob"]})).await;
    let id = group["id"].as_str().unwrap();
    let (path, messages) = (format!("/v1/conversations/{id}"), format!("/v1/conversations/{id}/messages"));
    let code = |(status, answer): (u16, Value)| (status, answer["error"]["code"].as_str().unwrap_or("").to_owned());
    assert_eq!(post(&server, &alice, &format!("{path}/members"), json!({"members": ["carol"]})).await.0, 204);

    // The details, for members only.
    let (status, details) = get(&server, &carol, &path).await;
    assert_eq!(status, 200, "{details}");
    assert_eq!((details["type"].as_str(), details["name"].as_str()), (Some("group"), Some("g")));
    let roles: Vec<(&str, &str)> = details["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["user"].as_str().unwrap(), m["role"].as_str().unwrap()))
        .collect();
    assert_eq!(roles, vec![("alice", "admin"), ("bob", "member"), ("carol", "member")]);
    let eve = device_token(&server, "eve").await;
    assert_eq!(code(get(&server, &eve, &path).await), (404, "not_found".into()));

    // Settings: admins only until the group lets everyone; bad fields are refused by name.
    let patch = |token: &str, body: Value| call(&server, Method::PATCH, token.to_owned(), path.clone(), Some(body));
    assert_eq!(code(patch(&bob, json!({"name": "x"})).await), (403, "not_admin".into()));
    assert_eq!(code(patch(&alice, json!({"name": ""})).await).0, 422);
    assert_eq!(code(patch(&alice, json!({"colour": "red"})).await).0, 422);
    assert_eq!(code(patch(&alice, json!({})).await).0, 422);
    assert_eq!(code(patch(&alice, json!({"avatar": "not-a-media-id"})).await).0, 422);
    let (status, updated) = patch(&alice, json!({"info_by_all": true, "description": "june trip"})).await;
    assert_eq!(
        (status, updated["description"].as_str(), updated["info_by_all"].as_bool()),
        (200, Some("june trip"), Some(true))
    );
    assert_eq!(patch(&bob, json!({"name": "trip"})).await.0, 200);
    assert_eq!(code(patch(&bob, json!({"info_by_all": false})).await), (403, "not_admin".into()));
    // An avatar is an image its setter may share: one of alice's is not bob's to use.
    let photo = server.upload_ready(&alice, "image/jpeg", fixture("rocket.jpg")).await;
    let photo_id = photo["id"].as_str().unwrap();
    assert_eq!(code(patch(&bob, json!({"avatar": photo_id})).await), (422, "unknown_media".into()));
    let (status, updated) = patch(&alice, json!({"avatar": photo_id})).await;
    assert_eq!(status, 200, "{updated}");
    assert_eq!(updated["avatar"]["media"], photo["id"]);
    assert!(updated["avatar"]["preview"].as_str().unwrap().starts_with("data:image/jpeg;base64,"));
    // Its thumbnail is fetched by signed URL: any member may, without a grant.
    let thumb = server.http.get(server.url(updated["avatar"]["thumb"].as_str().unwrap())).send().await.unwrap();
    assert_eq!(thumb.status(), 200);

    // Admins: promoted and demoted; the last cannot step down, but when the last leaves the
    // longest-standing member takes over.
    let admins = |user: &str| format!("{path}/admins/{user}");
    assert_eq!(code(call(&server, Method::PUT, &carol, &admins("carol"), None).await), (403, "not_admin".into()));
    assert_eq!(call(&server, Method::PUT, &alice, &admins("bob"), None).await.0, 204);
    assert_eq!(call(&server, Method::DELETE, &alice, &admins("alice"), None).await.0, 204);
    assert_eq!(code(call(&server, Method::DELETE, &bob, &admins("bob"), None).await), (409, "last_admin".into()));
    assert_eq!(call(&server, Method::DELETE, &bob, &format!("{path}/members/bob"), None).await.0, 204);
    let (_, details) = get(&server, &carol, &path).await;
    assert_eq!(
        details["members"][0],
        json!({"user": "alice", "role": "admin", "joined_at": details["members"][0]["joined_at"]})
    );
    assert_eq!(details["name"], "trip");

    // Every change is in the log, in order, for every member to replay.
    let (_, page) = get(&server, &carol, &format!("{messages}?after=0")).await;
    let events: Vec<(String, String)> = page["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["body"]["system"].as_str().unwrap().to_owned(), m["sender"].as_str().unwrap().to_owned()))
        .collect();
    let expected = [
        ("members_added", "alice"),
        ("group_updated", "alice"),
        ("group_updated", "bob"),
        ("group_updated", "alice"),
        ("admin_added", "alice"),
        ("admin_removed", "alice"),
        ("member_left", "bob"),
    ];
    assert_eq!(events, expected.map(|(e, s)| (e.to_owned(), s.to_owned())).to_vec(), "{page}");
    let left = page["messages"].as_array().unwrap().last().unwrap();
    assert_eq!(left["body"]["admins"], json!(["alice"]));
    // A client cannot write a system message of its own, nor undo one.
    let forged = json!({"client_id": "f1", "body": {"system": "members_added", "by": "alice", "users": ["eve"]}});
    assert_eq!(code(post(&server, &carol, &messages, forged).await).0, 422);
    let undo = json!({"client_id": "f2", "body": {"delete": 1}});
    assert_eq!(code(post(&server, &alice, &messages, undo).await), (409, "not_editable".into()));

    // Bob, gone, reads up to his leaving; a direct chat has no settings to change.
    let (_, his) = get(&server, &bob, &format!("{messages}?after=0")).await;
    assert_eq!(his["messages"].as_array().unwrap().last().unwrap()["body"]["system"], "member_left");
    assert_eq!(code(get(&server, &bob, &path).await).0, 404);
    let (_, direct) = post(&server, &alice, "/v1/conversations", json!({"type": "direct", "members": ["carol"]})).await;
    let direct_path = format!("/v1/conversations/{}", direct["id"].as_str().unwrap());
    assert_eq!(
        code(call(&server, Method::PATCH, &alice, &direct_path, Some(json!({"name": "x"}))).await),
        (409, "direct_conversation".into())
    );
    let (status, direct_details) = get(&server, &carol, &direct_path).await;
    assert_eq!((status, direct_details["type"].as_str()), (200, Some("direct")));
}

#[tokio::test]
async fn profiles_show_each_viewer_what_their_owner_lets_them_see() {
    use reqwest::Method;
    let data = DataDir::new();
    let server = Server::start(&data, &[]);
    let (alice, bob, carol, eve) = (
        device_token(&server, "alice").await,
        device_token(&server, "bob").await,
        device_token(&server, "carol").await,
        device_token(&server, "eve").await,
    );
    let put_profile =
        |token: &str, body: Value| call(&server, Method::PUT, token.to_owned(), "/v1/profile", Some(body));
    let code = |(status, answer): (u16, Value)| (status, answer["error"]["code"].as_str().unwrap_or("").to_owned());
    let (status, own) = put_profile(&alice, json!({"name": " Alice ", "about": "climbing"})).await;
    assert_eq!(status, 200, "{own}");
    assert_eq!((own["name"].as_str(), own["about"].as_str()), (Some("Alice"), Some("climbing")));
    assert_eq!(own["visibility"], "contacts", "the default");
    for bad in
        [json!({"name": ""}), json!({"visibility": "friends"}), json!({"nick": "x"}), json!({}), json!({"avatar": 7})]
    {
        assert_eq!(code(put_profile(&alice, bad.clone()).await).0, 422, "{bad}");
    }
    assert_eq!(get(&server, &alice, "/v1/profile").await.1["name"], "Alice");

    // A stranger sees nothing, not even that the user exists; opening a direct chat earns
    // nothing until alice writes in it.
    let seen_by = |token: &str| {
        let token = token.to_owned();
        let server = &server;
        async move { get(server, &token, "/v1/users/alice").await }
    };
    assert_eq!(code(seen_by(&eve).await), (404, "not_found".into()));
    let (_, direct) = post(&server, &bob, "/v1/conversations", json!({"type": "direct", "members": ["alice"]})).await;
    let messages = format!("/v1/conversations/{}/messages", direct["id"].as_str().unwrap());
    assert_eq!(post(&server, &bob, &messages, json!({"client_id": "b1", "body": {"text": "hi?"}})).await.0, 201);
    assert_eq!(seen_by(&bob).await.0, 404, "alice has not answered");
    assert_eq!(post(&server, &alice, &messages, json!({"client_id": "a1", "body": {"text": "hi"}})).await.0, 201);
    let (status, profile) = seen_by(&bob).await;
    assert_eq!((status, profile["name"].as_str(), &profile["about"]), (200, Some("Alice"), &Value::Null));
    assert!(profile.get("visibility").is_none(), "only the owner sees their setting");
    // Her contacts see the about line; with "nobody", no one does.
    let add = call(&server, Method::PUT, &alice, "/v1/contacts/bob", None).await;
    assert_eq!(add.0, 204);
    assert_eq!(seen_by(&bob).await.1["about"], "climbing");
    put_profile(&alice, json!({"visibility": "nobody"})).await;
    assert_eq!(seen_by(&bob).await.1["about"], Value::Null);
    assert_eq!(seen_by(&bob).await.1["name"], "Alice");

    // Being put in a group earns nobody a name; alice's writing there does. The batch answers
    // what the caller may see, each once, in order.
    post(&server, &eve, "/v1/conversations", json!({"type": "group", "name": "trap", "members": ["alice"]})).await;
    assert_eq!(code(seen_by(&eve).await), (404, "not_found".into()));
    let (_, group) =
        post(&server, &alice, "/v1/conversations", json!({"type": "group", "name": "g", "members": ["carol"]})).await;
    let group_messages = format!("/v1/conversations/{}/messages", group["id"].as_str().unwrap());
    assert_eq!(post(&server, &carol, "/v1/users/lookup-ids", json!({"ids": ["alice"]})).await.1["users"], json!([]));
    post(&server, &alice, &group_messages, json!({"client_id": "g1", "body": {"text": "hello group"}})).await;
    let (status, found) =
        post(&server, &carol, "/v1/users/lookup-ids", json!({"ids": ["alice", "eve", "nobody", "alice", "carol"]}))
            .await;
    assert_eq!(status, 200, "{found}");
    let ids: Vec<&str> = found["users"].as_array().unwrap().iter().map(|u| u["id"].as_str().unwrap()).collect();
    assert_eq!(ids, vec!["alice", "carol"]);
    let many: Vec<String> = (0..257).map(|i| format!("u{i}")).collect();
    assert_eq!(code(post(&server, &carol, "/v1/users/lookup-ids", json!({"ids": many})).await).0, 422);

    // An avatar is an image of one's own, drawn from signed URLs by whoever may see it.
    let photo = server.upload_ready(&alice, "image/jpeg", fixture("rocket.jpg")).await;
    let (status, own) = put_profile(&alice, json!({"avatar": photo["id"].clone(), "visibility": "everyone"})).await;
    assert_eq!(status, 200, "{own}");
    let (_, profile) = get(&server, &carol, "/v1/users/alice").await;
    assert_eq!(profile["avatar"]["media"], photo["id"]);
    let thumb = server.http.get(server.url(profile["avatar"]["thumb"].as_str().unwrap())).send().await.unwrap();
    assert_eq!(thumb.status(), 200);
    assert_eq!(code(put_profile(&bob, json!({"avatar": photo["id"].clone()})).await), (422, "unknown_media".into()));
}

#[tokio::test]
async fn the_chat_list_shows_who_what_and_when_pinned_then_newest_first_in_pages() {
    use reqwest::Method;
    let data = DataDir::new();
    let server = Server::start(&data, &[]);
    let (alice, bob, carol) = (
        device_token(&server, "alice").await,
        device_token(&server, "bob").await,
        device_token(&server, "carol").await,
    );
    call(&server, Method::PUT, &bob, "/v1/profile", Some(json!({"name": "Bob"}))).await;
    let send = |token: &str, conversation: &Value, client_id: &str, text: &str| {
        let path = format!("/v1/conversations/{}/messages", conversation["id"].as_str().unwrap());
        let body = json!({"client_id": client_id, "body": {"text": text}});
        let (server, token) = (&server, token.to_owned());
        async move { assert_eq!(post(server, &token, &path, body).await.0, 201) }
    };
    let (_, with_bob) = post(&server, &alice, "/v1/conversations", json!({"type": "direct", "members": ["bob"]})).await;
    send(&bob, &with_bob, "b1", "hi alice").await;
    let (_, group) = post(
        &server,
        &alice,
        "/v1/conversations",
        json!({"type": "group", "name": "Climbing", "members": ["bob", "carol"]}),
    )
    .await;
    let long = "x".repeat(150);
    send(&carol, &group, "c1", &long).await;
    let (_, with_carol) =
        post(&server, &alice, "/v1/conversations", json!({"type": "direct", "members": ["carol"]})).await;

    let (status, first) = get(&server, &alice, "/v1/conversations?limit=2").await;
    assert_eq!(status, 200, "{first}");
    let ids = |page: &Value| -> Vec<Value> {
        page["conversations"].as_array().unwrap().iter().map(|c| c["id"].clone()).collect()
    };
    assert_eq!(ids(&first), vec![with_carol["id"].clone(), group["id"].clone()], "newest activity first");
    let next = first["next"].as_str().unwrap();
    let (_, second) = get(&server, &alice, &format!("/v1/conversations?limit=2&after={next}")).await;
    assert_eq!(ids(&second), vec![with_bob["id"].clone()]);
    assert_eq!(second["next"], Value::Null);

    let entry = &first["conversations"][1];
    assert_eq!((entry["type"].as_str(), entry["name"].as_str()), (Some("group"), Some("Climbing")));
    assert_eq!((entry["member_count"].as_i64(), entry["unread"].as_i64()), (Some(3), Some(1)));
    assert_eq!(entry["members"], json!(["alice", "bob", "carol"]));
    let last = &entry["last_message"];
    assert_eq!(
        (last["kind"].as_str(), last["sender"].as_str(), last["seq"].as_i64()),
        (Some("text"), Some("carol"), Some(1))
    );
    assert_eq!(last["text"].as_str().unwrap(), format!("{}…", "x".repeat(100)));
    assert!(last["ts"].as_i64().unwrap() > 0 && entry["last_activity"] == last["ts"]);
    let entry = &second["conversations"][0];
    assert_eq!(
        (entry["peer"]["name"].as_str(), entry["last_message"]["text"].as_str()),
        (Some("Bob"), Some("hi alice"))
    );
    let entry = &first["conversations"][0];
    assert_eq!((entry["peer"]["id"].as_str(), &entry["peer"]["name"]), (Some("carol"), &Value::Null), "no name set");
    assert_eq!((entry["last_message"].clone(), entry["unread"].as_i64()), (Value::Null, Some(0)));

    // Pinned first; muting and archiving are the user's own, on every device.
    let flags = |id: &Value, body: Value| {
        let path = format!("/v1/conversations/{}/flags", id.as_str().unwrap());
        call(&server, Method::PUT, alice.clone(), path, Some(body))
    };
    let (status, set) = flags(&with_bob["id"], json!({"pinned": true, "muted_until": "always"})).await;
    assert_eq!((status, set["pinned"].as_bool(), set["muted_until"].as_str()), (200, Some(true), Some("always")));
    assert_eq!(flags(&group["id"], json!({"archived": true})).await.0, 200);
    let (_, list) = get(&server, &alice, "/v1/conversations").await;
    assert_eq!(ids(&list), vec![with_bob["id"].clone(), with_carol["id"].clone(), group["id"].clone()]);
    assert_eq!(list["conversations"][0]["muted_until"], "always");
    assert_eq!(list["conversations"][2]["archived"], true);
    let (_, bobs) = get(&server, &bob, "/v1/conversations").await;
    assert!(bobs["conversations"].as_array().unwrap().iter().all(|c| c["pinned"] == false), "flags are per user");
    for bad in [json!({"pinned": "yes"}), json!({"muted_until": -5}), json!({}), json!({"starred": true})] {
        assert_eq!(flags(&with_bob["id"], bad.clone()).await.0, 422, "{bad}");
    }
    let (_, bob_and_carol) =
        post(&server, &bob, "/v1/conversations", json!({"type": "direct", "members": ["carol"]})).await;
    assert_eq!(flags(&bob_and_carol["id"], json!({"pinned": true})).await.0, 404);
    // Someone who never wrote to alice, and shares no group with her, keeps their profile.
    let dave = device_token(&server, "dave").await;
    call(&server, Method::PUT, dave, "/v1/profile", Some(json!({"name": "Dave"}))).await;
    let (_, with_dave) =
        post(&server, &alice, "/v1/conversations", json!({"type": "direct", "members": ["dave"]})).await;
    let (_, list) = get(&server, &alice, "/v1/conversations").await;
    let entry = list["conversations"].as_array().unwrap().iter().find(|c| c["id"] == with_dave["id"]).unwrap();
    assert_eq!(entry["peer"], json!({"id": "dave"}));
    assert_eq!(get(&server, &alice, "/v1/conversations?after=garbage").await.0, 400);
    assert_eq!(get(&server, &alice, "/v1/conversations?limit=0").await.0, 400);
}

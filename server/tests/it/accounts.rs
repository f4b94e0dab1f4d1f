//! Phone sign-in, refresh tokens, logging devices out, contact lookup, and offline push.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use client::{Api, Event, Live, LiveOptions};
use serde_json::{Value, json};

use crate::harness::{DataDir, Server};
use crate::live::{DEV, next, sign_in};

async fn post(server: &Server, path: &str, body: Value) -> (u16, Value) {
    let response = server.http.post(server.url(path)).json(&body).send().await.unwrap();
    (response.status().as_u16(), response.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn sign_in_needs_the_right_code_in_time_and_few_guesses() {
    let data = DataDir::new();
    let server = Server::start(&data, &[DEV]);
    let phone = "+4915100000901";
    let (status, body) = post(&server, "/v1/auth/code", json!({"phone": "0151 not e164"})).await;
    assert_eq!((status, body["error"]["code"].as_str()), (422, Some("invalid_request")));
    let (status, body) =
        post(&server, "/v1/auth/verify", json!({"phone": phone, "code": "123456", "device_name": "x"})).await;
    assert_eq!((status, body["error"]["code"].as_str()), (422, Some("no_code")));

    let (status, body) = post(&server, "/v1/auth/code", json!({"phone": phone})).await;
    assert_eq!(status, 202);
    let code = body["dev_code"].as_str().unwrap().to_owned();
    let wrong = if code == "000000" { "000001" } else { "000000" };
    let (status, body) =
        post(&server, "/v1/auth/verify", json!({"phone": phone, "code": wrong, "device_name": "x"})).await;
    assert_eq!((status, body["error"]["code"].as_str()), (422, Some("wrong_code")));
    let (status, session) =
        post(&server, "/v1/auth/verify", json!({"phone": phone, "code": code, "device_name": "phone"})).await;
    assert_eq!(status, 200, "{session}");
    for key in ["user_id", "device_id", "access_token", "refresh_token"] {
        assert!(session[key].as_str().is_some_and(|v| !v.is_empty()), "{key} in {session}");
    }
    assert!(session["expires_in"].as_u64().unwrap() > 0);
    let (status, _) =
        post(&server, "/v1/auth/verify", json!({"phone": phone, "code": code, "device_name": "again"})).await;
    assert_eq!(status, 422, "a code signs in once");

    // Five wrong guesses lock the code, even against the right one.
    let (_, body) = post(&server, "/v1/auth/code", json!({"phone": phone})).await;
    let code = body["dev_code"].as_str().unwrap().to_owned();
    let wrong = if code == "000000" { "000001" } else { "000000" };
    for _ in 0..5 {
        post(&server, "/v1/auth/verify", json!({"phone": phone, "code": wrong, "device_name": "x"})).await;
    }
    let (status, body) =
        post(&server, "/v1/auth/verify", json!({"phone": phone, "code": code, "device_name": "x"})).await;
    assert_eq!((status, body["error"]["code"].as_str()), (422, Some("too_many_attempts")));

    // Codes per phone are rate-limited: three at once (two went above), then one an hour.
    let (status, _) = post(&server, "/v1/auth/code", json!({"phone": phone})).await;
    assert_eq!(status, 202);
    let (status, body) = post(&server, "/v1/auth/code", json!({"phone": phone})).await;
    assert_eq!((status, body["error"]["code"].as_str()), (429, Some("rate_limited")));
}

#[tokio::test]
async fn without_dev_mode_the_code_goes_to_the_sms_webhook_only() {
    let (url, received) = webhook(vec![500]).await;
    let data = DataDir::new();
    let server = Server::start(&data, &[("COURIER_AUTH__SMS_WEBHOOK_URL", &url)]);
    let (status, body) = post(&server, "/v1/auth/code", json!({"phone": "+4915100000911"})).await;
    assert_eq!(status, 202);
    assert!(body.get("dev_code").is_none(), "codes never leave in responses outside dev mode: {body}");
    // The webhook failed once; the code was retried.
    let sms = wait_for(&received, 2).await;
    assert_eq!(sms[1]["phone"], "+4915100000911");
    let code = sms[1]["code"].as_str().unwrap().to_owned();
    assert!(sms[1]["message"].as_str().unwrap().contains(&code));
    let (status, _) =
        post(&server, "/v1/auth/verify", json!({"phone": "+4915100000911", "code": code, "device_name": "p"})).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn refresh_tokens_rotate_and_a_replayed_one_logs_the_device_out() {
    let data = DataDir::new();
    let server = Server::start(&data, &[DEV]);
    let (api, session) = sign_in(&server, "+4915100000921", "phone").await;
    let (other_device, _) = sign_in(&server, "+4915100000921", "laptop").await;
    let anonymous = Api::new(&server.base);
    let first = session.refresh_token.clone().unwrap();
    let rotated = anonymous.refresh(&first).await.unwrap();
    assert_eq!(
        (rotated.user_id.as_str(), rotated.device_id.as_str()),
        (session.user_id.as_str(), session.device_id.as_str())
    );
    let second = rotated.refresh_token.clone().unwrap();
    assert_ne!(second, first);
    let fresh = anonymous.with_token(&rotated.access_token);
    fresh.conversations().await.unwrap();

    let mut connection = Live::connect(&fresh, LiveOptions::default()).await.unwrap();
    // The device refreshes again (so `first`'s successor has been used)...
    let third = anonymous.refresh(&second).await.unwrap().refresh_token.unwrap();
    // ...then someone replays the spent token: refused, and the device is logged out everywhere.
    let err = anonymous.refresh(&first).await.unwrap_err();
    assert_eq!(err.code(), Some("invalid_refresh_token"));
    let err = anonymous.refresh(&third).await.unwrap_err();
    assert_eq!(err.code(), Some("invalid_refresh_token"), "the whole device is out, newest token too");
    for token_holder in [&api, &fresh] {
        let err = token_holder.conversations().await.unwrap_err();
        assert!(matches!(err, client::Error::Api { status: 401, .. }), "{err}");
        assert_eq!(err.code(), Some("device_logged_out"));
    }
    let code = loop {
        match tokio::time::timeout(Duration::from_secs(10), connection.next_event()).await.unwrap() {
            Some(Event::Disconnected { code, .. }) => break code,
            Some(_) => continue,
            None => panic!("no disconnect event"),
        }
    };
    assert_eq!(code, Some(4001), "the live connection was closed as logged out");
    // The SDK does not hammer the server with a logged-out device: the task stops.
    assert!(
        tokio::time::timeout(Duration::from_secs(10), async { while connection.next_event().await.is_some() {} })
            .await
            .is_ok()
    );
    // The user's other device is untouched.
    other_device.conversations().await.unwrap();
}

#[tokio::test]
async fn a_device_can_be_logged_out_and_users_found_by_phone() {
    let data = DataDir::new();
    let server = Server::start(&data, &[DEV]);
    let (phone, _) = sign_in(&server, "+4915100000931", "phone").await;
    let (laptop, laptop_session) = sign_in(&server, "+4915100000931", "laptop").await;
    let (stranger, _) = sign_in(&server, "+4915100000932", "phone").await;
    let err = stranger.unlink_device(&laptop_session.device_id).await.unwrap_err();
    assert!(matches!(err, client::Error::Api { status: 404, .. }), "only the owner unlinks: {err}");
    phone.unlink_device(&laptop_session.device_id).await.unwrap();
    assert_eq!(laptop.conversations().await.unwrap_err().code(), Some("device_logged_out"));
    phone.conversations().await.unwrap();

    assert!(!stranger.lookup("+4915100000931").await.unwrap().is_empty());
    let missing = stranger.lookup("+4915100000999").await.unwrap_err();
    assert!(matches!(missing, client::Error::Api { status: 404, .. }));
    let bad = stranger.lookup("nonsense").await.unwrap_err();
    assert!(matches!(bad, client::Error::Api { status: 422, .. }));
}

#[tokio::test]
async fn devices_that_do_not_ack_in_time_get_a_push_without_the_text() {
    // The notifier answers 503 once, then 200: the push is retried.
    let (url, received) = webhook(vec![503]).await;
    let data = DataDir::new();
    let env = [DEV, ("COURIER_CHAT__PUSH_WEBHOOK_URL", url.as_str()), ("COURIER_CHAT__PUSH_DELAY_MS", "1500")];
    let server = Server::start(&data, &env);
    let (alice, _) = sign_in(&server, "+4915100000941", "phone").await;
    let (bob, bob_session) = sign_in(&server, "+4915100000942", "phone").await;
    let (_, carol_session) = sign_in(&server, "+4915100000943", "phone").await;
    let (dave, dave_session) = sign_in(&server, "+4915100000944", "phone").await;
    let members = [bob_session.user_id.as_str(), carol_session.user_id.as_str(), dave_session.user_id.as_str()];
    let group = alice.group("g", &members).await.unwrap().id;
    // Bob's app is live and acks what it gets. Dave's socket is up but his app never acks (to the
    // server, a half-open socket looks the same). Carol is offline.
    let mut bob_live = Live::connect(&bob, LiveOptions::default()).await.unwrap();
    let mut dave_live = Live::connect(&dave, LiveOptions::default()).await.unwrap();
    alice.send(&group, "c1", json!({"text": "top secret words"})).await.unwrap();
    let seq = next(&mut bob_live, |e| match e {
        Event::Message(m) => Some(m.seq),
        _ => None,
    })
    .await;
    bob_live.ack(&group, seq).await.unwrap();
    next(&mut dave_live, |e| matches!(e, Event::Message(_)).then_some(())).await;

    let pushes = wait_for(&received, 2).await;
    assert_eq!(pushes[0], pushes[1], "the failed push is tried again as it was");
    let push = &pushes[1];
    assert_eq!((push["conversation"].as_str(), push["seq"].as_i64()), (Some(group.as_str()), Some(1)));
    let mut recipients: Vec<(String, String)> = push["recipients"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["user"].as_str().unwrap().to_owned(), r["device"].as_str().unwrap().to_owned()))
        .collect();
    recipients.sort();
    let mut expected = vec![
        (carol_session.user_id.clone(), carol_session.device_id.clone()),
        (dave_session.user_id.clone(), dave_session.device_id.clone()),
    ];
    expected.sort();
    assert_eq!(recipients, expected, "bob acked in time; the sender is never pushed");
    assert!(!push.to_string().contains("top secret"), "a push never carries the text: {push}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(received.lock().unwrap().len(), 2, "one failed try and one delivery");
}

#[tokio::test]
async fn a_push_survives_a_crash_right_after_the_send() {
    let (url, received) = webhook(vec![]).await;
    let data = DataDir::new();
    let env = [DEV, ("COURIER_CHAT__PUSH_WEBHOOK_URL", url.as_str()), ("COURIER_CHAT__PUSH_DELAY_MS", "2000")];
    let server = Server::start(&data, &env);
    let (alice, _) = sign_in(&server, "+4915100000951", "phone").await;
    let (_, bob_session) = sign_in(&server, "+4915100000952", "phone").await;
    let chat = alice.direct(&bob_session.user_id).await.unwrap().id;
    alice.send(&chat, "c1", json!({"text": "hello"})).await.unwrap();
    // Killed (SIGKILL) before the push fell due: the intent was stored with the message.
    drop(server);
    assert!(received.lock().unwrap().is_empty());
    let _server = Server::start(&data, &env);
    let pushes = wait_for(&received, 1).await;
    assert_eq!(pushes[0]["conversation"], chat.as_str());
    assert_eq!(pushes[0]["recipients"], json!([{"user": bob_session.user_id, "device": bob_session.device_id}]));
}

type Received = Arc<Mutex<Vec<Value>>>;

/// A webhook on loopback that records every JSON body and answers with `statuses` in turn, then 200.
async fn webhook(statuses: Vec<u16>) -> (String, Received) {
    use axum::http::StatusCode;
    let received: Received = Arc::default();
    let statuses = Arc::new(Mutex::new(statuses.into_iter()));
    let recorder = received.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |axum::Json(body): axum::Json<Value>| {
            let (recorder, statuses) = (recorder.clone(), statuses.clone());
            async move {
                recorder.lock().unwrap().push(body);
                let status = statuses.lock().unwrap().next().unwrap_or(200);
                StatusCode::from_u16(status).unwrap()
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, received)
}

/// Waits (up to 20 s) until `n` bodies arrived.
async fn wait_for(received: &Received, n: usize) -> Vec<Value> {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let got = received.lock().unwrap().clone();
        if got.len() >= n {
            return got;
        }
        assert!(std::time::Instant::now() < deadline, "only {} webhook calls arrived: {got:?}", got.len());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_device_token_alone_cannot_link_devices_and_links_are_seen() {
    let data = DataDir::new();
    let server = Server::start(&data, &[DEV]);
    let phone_number = "+4915100000941";
    let (phone, session) = sign_in(&server, phone_number, "phone").await;
    let mut live = Live::connect(&phone, LiveOptions::default()).await.unwrap();

    // A stolen access token is not enough to link a device.
    let err = phone.link_device("attacker").await.unwrap_err();
    assert!(matches!(err, client::Error::Api { status: 422, .. }), "{err}");
    let err = phone.link_device_with_code("attacker", "123456").await.unwrap_err();
    assert_eq!(err.code(), Some("no_code"));
    assert_eq!(phone.devices().await.unwrap().len(), 1);

    // With the code sent to the account's phone, it is.
    let code = Api::new(&server.base).request_code(phone_number).await.unwrap().unwrap();
    let wrong = if code == "000000" { "000001" } else { "000000" };
    assert_eq!(phone.link_device_with_code("tablet", wrong).await.unwrap_err().code(), Some("wrong_code"));
    let tablet = phone.link_device_with_code("tablet", &code).await.unwrap();
    assert_eq!(tablet.user_id, session.user_id);
    // The code is spent (and a fourth try in a row is refused as too many anyway).
    assert!(phone.link_device_with_code("another", &code).await.is_err());
    assert_eq!(phone.link_device_with_code("another", "111111").await.unwrap_err().code(), Some("rate_limited"));

    // The other device hears of it at once, and the list shows both.
    let linked = loop {
        match tokio::time::timeout(Duration::from_secs(10), live.next_event()).await.unwrap() {
            Some(Event::DeviceLinked { device_id, name, replaced }) => break (device_id, name, replaced),
            Some(_) => continue,
            None => panic!("the live connection ended"),
        }
    };
    assert_eq!(linked, (tablet.device_id.clone(), "tablet".to_owned(), None));
    let devices = phone.devices().await.unwrap();
    let names: Vec<(&str, bool)> = devices.iter().map(|d| (d.name.as_str(), d.current)).collect();
    assert_eq!(names, [("phone", true), ("tablet", false)]);
    // The phone was seen when it connected; the tablet not since it was linked.
    assert!(devices[0].last_seen > devices[0].created_at, "{devices:?}");
    assert_eq!(devices[1].last_seen, devices[1].created_at);

    // A user without a phone (an operator's account) links only with the operator's user token.
    let operator = Api::new(&server.base).with_token(&server.token("ops"));
    let ops_device = operator.link_device("console").await.unwrap();
    let ops = Api::new(&server.base).with_token(&ops_device.access_token);
    assert_eq!(ops.link_device_with_code("more", "123456").await.unwrap_err().code(), Some("code_unavailable"));
    live.close().await;
}

#[tokio::test]
async fn linking_past_the_limit_replaces_the_least_recently_seen_device() {
    let data = DataDir::new();
    let server = Server::start(&data, &[DEV]);
    let operator = Api::new(&server.base).with_token(&server.token("many"));
    let mut sessions = Vec::new();
    for i in 0..chat_core::MAX_DEVICES {
        sessions.push(operator.link_device(&format!("install {i}")).await.unwrap());
    }
    // The first device connects (it is seen now); the second has not been seen since it was linked.
    let first = Api::new(&server.base).with_token(&sessions[0].access_token);
    let mut live = Live::connect(&first, LiveOptions::default()).await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !first.devices().await.unwrap().iter().any(|d| d.id == sessions[0].device_id && d.last_seen > d.created_at) {
        assert!(std::time::Instant::now() < deadline, "the connected device was never seen");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let newest = operator.link_device("new phone").await.expect("the 17th device is linked, not refused");

    let replaced = loop {
        match tokio::time::timeout(Duration::from_secs(10), live.next_event()).await.unwrap() {
            Some(Event::DeviceLinked { device_id, replaced, .. }) if device_id == newest.device_id => break replaced,
            Some(_) => continue,
            None => panic!("the live connection ended"),
        }
    };
    assert_eq!(replaced.as_deref(), Some(sessions[1].device_id.as_str()));
    let gone = Api::new(&server.base).with_token(&sessions[1].access_token);
    assert_eq!(gone.conversations().await.unwrap_err().code(), Some("device_logged_out"));
    let listed = first.devices().await.unwrap();
    assert_eq!(listed.len() as i64, chat_core::MAX_DEVICES);
    assert!(listed.iter().all(|d| d.id != sessions[1].device_id));
    first.conversations().await.unwrap();
    live.close().await;
}

#[tokio::test]
async fn a_refresh_retried_after_its_answer_was_lost_keeps_the_device() {
    let data = DataDir::new();
    let server = Server::start(&data, &[DEV]);
    let (_, session) = sign_in(&server, "+4915100000951", "phone").await;
    let anonymous = Api::new(&server.base);
    let first = session.refresh_token.clone().unwrap();
    // The answer to this refresh is lost on the way...
    let lost = anonymous.refresh(&first).await.unwrap();
    // ...so the app sends the same token again, at once: a fresh pair, not a log-out.
    let retried = anonymous.refresh(&first).await.unwrap();
    assert_eq!(retried.device_id, session.device_id);
    let api = anonymous.with_token(&retried.access_token);
    api.conversations().await.unwrap();
    let next = anonymous.refresh(retried.refresh_token.as_deref().unwrap()).await.unwrap();
    anonymous.with_token(&next.access_token).conversations().await.unwrap();

    // The lost answer's token, presented later (by whoever caught it): a copy, and the device is
    // logged out.
    let err = anonymous.refresh(lost.refresh_token.as_deref().unwrap()).await.unwrap_err();
    assert_eq!(err.code(), Some("invalid_refresh_token"));
    let err = anonymous.with_token(&next.access_token).conversations().await.unwrap_err();
    assert_eq!(err.code(), Some("device_logged_out"));
}

/// Asks for a code for a new phone number as the client `forwarded_for`; the status.
async fn code_as(server: &Server, forwarded_for: &str, phone: u64) -> u16 {
    let response = server
        .http
        .post(server.url("/v1/auth/code"))
        .header("x-forwarded-for", forwarded_for)
        .json(&json!({ "phone": format!("+49151{phone:08}") }))
        .send()
        .await
        .unwrap();
    response.status().as_u16()
}

#[tokio::test]
async fn rate_limits_count_the_client_a_trusted_proxy_names_and_an_ipv6_64_as_one() {
    let data = DataDir::new();
    let behind_proxy = Server::start(&data, &[DEV, ("COURIER_HTTP__TRUSTED_PROXIES", "[\"127.0.0.0/8\"]")]);
    let mut phone = 0;
    let mut next = || {
        phone += 1;
        phone
    };
    // 20 codes a client, then one every 10 s.
    for _ in 0..20 {
        assert_eq!(code_as(&behind_proxy, "198.51.100.1", next()).await, 202);
    }
    assert_eq!(code_as(&behind_proxy, "198.51.100.1", next()).await, 429);
    // Another client behind the same proxy has a bucket of its own.
    assert_eq!(code_as(&behind_proxy, "198.51.100.2", next()).await, 202);
    // Addresses rotated inside one IPv6 /64 are one client.
    for i in 0..20 {
        assert_eq!(code_as(&behind_proxy, &format!("2001:db8:1:2::{:x}", i + 1), next()).await, 202);
    }
    assert_eq!(code_as(&behind_proxy, "2001:db8:1:2:ffff::9", next()).await, 429);
    assert_eq!(code_as(&behind_proxy, "2001:db8:1:3::1", next()).await, 202, "the next /64 is another client");

    // Without trusted proxies the header is the client's own word, and counts for nothing.
    let data = DataDir::new();
    let direct = Server::start(&data, &[DEV]);
    for i in 0..20 {
        assert_eq!(code_as(&direct, &format!("198.51.100.{}", i + 1), next()).await, 202);
    }
    assert_eq!(code_as(&direct, "198.51.100.99", next()).await, 429);
}

/// A verify attempt for `phone` with `code`; the status, error code and `Retry-After`.
async fn guess(server: &Server, phone: &str, code: &str) -> (u16, Option<String>, Option<u64>) {
    let body = json!({"phone": phone, "code": code, "device_name": "x"});
    let response = server.http.post(server.url("/v1/auth/verify")).json(&body).send().await.unwrap();
    let status = response.status().as_u16();
    let retry = response.headers().get("retry-after").and_then(|v| v.to_str().ok()?.parse().ok());
    let body: Value = response.json().await.unwrap();
    (status, body["error"]["code"].as_str().map(str::to_owned), retry)
}

#[tokio::test]
async fn a_new_code_does_not_reset_the_guesses_against_a_phone() {
    let data = DataDir::new();
    let server = Server::start(&data, &[DEV]);
    let phone = "+4915100000961";
    // Two codes, five wrong guesses at each: ten guesses, the most a phone takes at once.
    for _ in 0..2 {
        let (status, body) = post(&server, "/v1/auth/code", json!({"phone": phone})).await;
        assert_eq!(status, 202, "{body}");
        let code = body["dev_code"].as_str().unwrap();
        let wrong = if code == "000000" { "000001" } else { "000000" };
        for _ in 0..5 {
            assert_eq!(guess(&server, phone, wrong).await.0, 422);
        }
    }
    // The third code is sent, but even the right guess at it waits: about an hour, as the
    // Retry-After says.
    let (status, body) = post(&server, "/v1/auth/code", json!({"phone": phone})).await;
    assert_eq!(status, 202, "{body}");
    let (status, code, retry) = guess(&server, phone, body["dev_code"].as_str().unwrap()).await;
    assert_eq!((status, code.as_deref()), (429, Some("rate_limited")));
    assert!(retry.is_some_and(|s| (3000..=3600).contains(&s)), "Retry-After {retry:?}");
    // A fourth code in a row is not sent either.
    let (status, body) = post(&server, "/v1/auth/code", json!({"phone": phone})).await;
    assert_eq!((status, body["error"]["code"].as_str()), (429, Some("rate_limited")));
    // Another phone is untouched.
    let (status, _) = post(&server, "/v1/auth/code", json!({"phone": "+4915100000962"})).await;
    assert_eq!(status, 202);
}

#[tokio::test]
async fn sms_to_one_country_are_capped_per_hour() {
    let data = DataDir::new();
    let server = Server::start(
        &data,
        &[DEV, ("COURIER_AUTH__SMS_PER_COUNTRY_PER_HOUR", "3"), ("COURIER_AUTH__SMS_COUNTRY_LIMITS__44", "0")],
    );
    for n in 1..=3 {
        let (status, body) = post(&server, "/v1/auth/code", json!({"phone": format!("+4915100009{n:02}")})).await;
        assert_eq!(status, 202, "{body}");
    }
    // A pumping run through one country's numbers stops at its cap...
    let (status, body) = post(&server, "/v1/auth/code", json!({"phone": "+4915100009099"})).await;
    assert_eq!((status, body["error"]["code"].as_str()), (429, Some("rate_limited")), "{body}");
    // ...while another country's users sign in as usual, and one the operator closed gets none.
    let (status, _) = post(&server, "/v1/auth/code", json!({"phone": "+33612345678"})).await;
    assert_eq!(status, 202);
    let (status, body) = post(&server, "/v1/auth/code", json!({"phone": "+447700900123"})).await;
    assert_eq!((status, body["error"]["code"].as_str()), (403, Some("country_unavailable")), "{body}");
}

/// The code of the next `error` frame.
async fn next_error(live: &mut Live) -> String {
    next(live, |e| match e {
        Event::Error { code, .. } => Some(code),
        _ => None,
    })
    .await
}

#[tokio::test]
async fn another_device_approves_a_link_and_the_asking_device_cannot() {
    let data = DataDir::new();
    let server = Server::start(&data, &[DEV]);
    let phone_number = "+4915100000971";
    let (phone, _) = sign_in(&server, phone_number, "phone").await;
    let (laptop, laptop_session) = sign_in(&server, phone_number, "laptop").await;
    let mut phone_live = Live::connect(&phone, LiveOptions::default()).await.unwrap();
    let mut laptop_live = Live::connect(&laptop, LiveOptions::default()).await.unwrap();

    // The laptop (or whoever holds its token) asks for a tablet; it cannot approve that itself.
    let request = laptop.request_link("tablet").await.unwrap();
    assert!(laptop.link_status(&request).await.unwrap().is_none(), "pending");
    laptop_live.answer_link(&request, true).await.unwrap();
    let refused = next_error(&mut laptop_live).await;
    assert_eq!(refused, "own_link_request");

    // The phone is asked, and approves: every device hears of the new one, and the laptop collects
    // its token, once.
    let (asked, name, by, by_name) = next(&mut phone_live, |e| match e {
        Event::LinkRequest { request, name, requested_by, requested_by_name } => {
            Some((request, name, requested_by, requested_by_name))
        }
        _ => None,
    })
    .await;
    assert_eq!(
        (asked.as_str(), name.as_str(), by.as_str(), by_name.as_str()),
        (request.as_str(), "tablet", laptop_session.device_id.as_str(), "laptop")
    );
    phone_live.answer_link(&request, true).await.unwrap();
    let linked = next(&mut laptop_live, |e| match e {
        Event::DeviceLinked { device_id, name, .. } if name == "tablet" => Some(device_id),
        _ => None,
    })
    .await;
    let tablet = laptop.link_status(&request).await.unwrap().expect("approved");
    assert_eq!(
        (tablet.device_id.as_str(), tablet.user_id.as_str()),
        (linked.as_str(), laptop_session.user_id.as_str())
    );
    Api::new(&server.base).with_token(&tablet.access_token).conversations().await.unwrap();
    assert_eq!(laptop.link_status(&request).await.unwrap_err().code(), Some("not_found"), "handed over once");
    assert_eq!(phone.devices().await.unwrap().len(), 3);

    // A denied request stays denied, and cannot be answered again.
    let watch = laptop.request_link("watch").await.unwrap();
    phone_live.answer_link(&watch, false).await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let denied = loop {
        match laptop.link_status(&watch).await {
            Ok(None) if std::time::Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(20)).await,
            other => break other.unwrap_err(),
        }
    };
    assert_eq!(denied.code(), Some("link_denied"));
    phone_live.answer_link(&watch, true).await.unwrap();
    let late = next_error(&mut phone_live).await;
    assert_eq!(late, "not_found");
    assert_eq!(phone.devices().await.unwrap().len(), 3, "the watch was never linked");
    // Prompts are rate-limited per account like links: a third request is let through, a fourth not.
    let car = laptop.request_link("car").await.unwrap();
    assert_eq!(laptop.request_link("fridge").await.unwrap_err().code(), Some("rate_limited"));
    // Unlinking the asking device (the owner's answer to a prompt they did not make) takes its
    // pending requests with it: nobody can approve them any more.
    phone.unlink_device(&laptop_session.device_id).await.unwrap();
    phone_live.answer_link(&car, true).await.unwrap();
    let gone = next_error(&mut phone_live).await;
    assert_eq!(gone, "not_found");
    phone_live.close().await;
    drop(laptop_live);
}

#[tokio::test]
async fn an_address_book_is_discovered_in_one_call_within_a_daily_budget() {
    let data = DataDir::new();
    let server = Server::start(&data, &[DEV]);
    let (alice, _) = sign_in(&server, "+4915100000981", "phone").await;
    let (_, bob) = sign_in(&server, "+4915100000982", "phone").await;
    let book = ["+4915100000982", "+4915100000983", "+4915100000981"];
    let mut found = alice.discover(&book).await.unwrap();
    found.sort();
    assert_eq!(found.len(), 2, "{found:?}");
    assert_eq!(found[1], ("+4915100000982".to_owned(), bob.user_id.clone()));
    let too_many: Vec<String> = (0..1001).map(|n| format!("+49151{n:08}")).collect();
    let too_many: Vec<&str> = too_many.iter().map(String::as_str).collect();
    assert_eq!(alice.discover(&too_many).await.unwrap_err().code(), Some("invalid_request"));
    assert_eq!(alice.discover(&["0151 123"]).await.unwrap_err().code(), Some("invalid_request"));
    // Ten address books a day at once (one went above), then one every 2.4 hours.
    for _ in 0..9 {
        alice.discover(&book).await.unwrap();
    }
    assert_eq!(alice.discover(&book).await.unwrap_err().code(), Some("rate_limited"));
}

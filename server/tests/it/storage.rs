//! Storage that does not grow forever: originals go once their job has succeeded, deleted blobs
//! leave the store, and operators can follow what went to purge their edges.

use std::time::{Duration, Instant};

use serde_json::Value;

use crate::harness::{DataDir, Server, fixture};

const ADMIN: &str = "an-admin-token-of-32-characters!";

/// Waits until `done` holds, checking every 50 ms for 20 s.
async fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !done() {
        assert!(Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The feed after `after` once it holds `count` rows (it serves rows a few seconds old).
async fn feed_of(server: &Server, after: i64, count: usize) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, page) = feed(server, Some(ADMIN), after).await;
        assert_eq!(status, 200, "{page}");
        if page["blobs"].as_array().unwrap().len() >= count {
            return page;
        }
        assert!(Instant::now() < deadline, "the feed never held {count} rows: {page}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn feed(server: &Server, token: Option<&str>, after: i64) -> (u16, Value) {
    let mut request = server.http.get(server.url(&format!("/admin/deleted-blobs?after={after}")));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn an_original_goes_once_its_job_succeeds_and_the_same_bytes_still_deduplicate() {
    let data = DataDir::new();
    let server = Server::start(
        &data,
        &[
            ("COURIER_INGEST__KEEP_ORIGINALS_DAYS", "0"),
            ("COURIER_INGEST__SWEEP_INTERVAL_MS", "100"),
            ("COURIER_ADMIN_TOKEN", ADMIN),
        ],
    );
    let alice = server.token("alice");
    let photo = server.upload_ready(&alice, "image/jpeg", fixture("rocket.jpg")).await;
    assert_eq!(photo["status"], "ready");
    eventually("the original is deleted", || server.files_under("blobs/originals").is_empty()).await;
    let series = "courier_sweep_blobs_deleted_total{namespace=\"originals\"}";
    let deadline = Instant::now() + Duration::from_secs(10);
    while crate::harness::metric(&server.http, &server.base, series).await < 1.0 {
        assert!(Instant::now() < deadline, "/metrics never counted the deleted original");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let variants = server.files_under("blobs/variants").len();
    assert!(variants >= 2);

    // The same bytes again (by someone else, too): ready at once with the same variants, and no
    // original is stored for them.
    let bob = server.token("bob");
    let again = server.upload_ready(&bob, "image/jpeg", fixture("rocket.jpg")).await;
    assert_eq!(again["status"], "ready");
    assert_eq!(again["variants"]["standard"]["blob"], photo["variants"]["standard"]["blob"]);
    assert!(server.files_under("blobs/originals").is_empty());
    assert_eq!(server.files_under("blobs/variants").len(), variants);
    let bytes = crate::harness::variant_bytes(&server, &again, "thumb").await;
    assert!(!bytes.is_empty());

    // The feed names the original, in order, for the operator only.
    assert_eq!(feed(&server, None, 0).await.0, 401);
    assert_eq!(feed(&server, Some("not-the-admin-token-at-all-no"), 0).await.0, 401);
    let deleted = feed_of(&server, 0, 1).await;
    let blobs = deleted["blobs"].as_array().unwrap();
    assert_eq!(blobs.len(), 1, "{deleted}");
    assert_eq!((blobs[0]["namespace"].as_str(), &blobs[0]["blob"]), (Some("originals"), &photo["blob"]));

    // When the last media of the bytes is deleted, its variants go too, and the feed says so.
    for (token, media) in [(&alice, &photo), (&bob, &again)] {
        let id = media["id"].as_str().unwrap();
        let response =
            server.http.delete(server.url(&format!("/v1/media/{id}"))).bearer_auth(token).send().await.unwrap();
        assert_eq!(response.status(), 204);
    }
    eventually("the variants are deleted", || server.files_under("blobs/variants").is_empty()).await;
    let rest = feed_of(&server, deleted["next"].as_i64().unwrap(), 1 + variants).await;
    let namespaces: Vec<&str> =
        rest["blobs"].as_array().unwrap().iter().map(|b| b["namespace"].as_str().unwrap()).collect();
    assert!(namespaces.contains(&"variants") && namespaces.len() == 1 + variants, "{rest}");
    assert_eq!(feed(&server, Some(ADMIN), rest["next"].as_i64().unwrap()).await.1["blobs"], serde_json::json!([]));
}

#[tokio::test]
async fn without_an_admin_token_the_feed_does_not_exist() {
    let data = DataDir::new();
    let server = Server::start(&data, &[]);
    let (status, body) = feed(&server, Some(ADMIN), 0).await;
    assert_eq!((status, body["error"]["code"].as_str()), (404, Some("not_found")));
}

#[tokio::test]
async fn media_live_as_long_as_the_messages_that_carry_them() {
    let data = DataDir::new();
    // A "day" of one second: unsent media go after one, unreferenced media two after upload.
    let server = Server::start(
        &data,
        &[
            ("COURIER_INGEST__TEST_DAY_MS", "1000"),
            ("COURIER_INGEST__UNSENT_MEDIA_DAYS", "1"),
            ("COURIER_INGEST__MEDIA_RETENTION_DAYS", "2"),
            ("COURIER_INGEST__KEEP_ORIGINALS_DAYS", "0"),
            ("COURIER_INGEST__SWEEP_INTERVAL_MS", "100"),
        ],
    );
    let device = |user: &str| {
        let (server, user) = (&server, user.to_owned());
        async move {
            let response = server
                .http
                .post(server.url("/v1/devices"))
                .bearer_auth(server.token(&user))
                .json(&serde_json::json!({"name": "phone"}))
                .send()
                .await
                .unwrap();
            response.json::<Value>().await.unwrap()["access_token"].as_str().unwrap().to_owned()
        }
    };
    let (alice, bob) = (device("alice").await, device("bob").await);
    let sent = server.upload_ready(&alice, "image/jpeg", fixture("rocket.jpg")).await;
    let unsent = server.upload_ready(&alice, "image/png", fixture("alpha.png")).await;
    // Bob uploads the same bytes as alice's sent photo, and never sends them.
    let copy = server.upload_ready(&bob, "image/jpeg", fixture("rocket.jpg")).await;
    let chat: Value = server
        .http
        .post(server.url("/v1/conversations"))
        .bearer_auth(&alice)
        .json(&serde_json::json!({"type": "direct", "members": ["bob"]}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let messages = format!("/v1/conversations/{}/messages", chat["id"].as_str().unwrap());
    let body = serde_json::json!({"client_id": "m1", "body": {"media": sent["id"].clone()}});
    let response = server.http.post(server.url(&messages)).bearer_auth(&alice).json(&body).send().await.unwrap();
    assert_eq!(response.status(), 201);
    let seq = response.json::<Value>().await.unwrap()["seq"].as_i64().unwrap();

    let status = |token: &str, media: &Value| {
        let (server, token, id) = (&server, token.to_owned(), media["id"].as_str().unwrap().to_owned());
        async move { server.media(&token, &id).await.status().as_u16() }
    };
    // The unsent ones go (bob's copy too); the one in a message stays, with its variants.
    let deadline = Instant::now() + Duration::from_secs(20);
    while status(&alice, &unsent).await != 404 || status(&bob, &copy).await != 404 {
        assert!(Instant::now() < deadline, "the unsent media never went");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(status(&bob, &sent).await, 200, "a media in a message outlives the retention");
    let thumb = crate::harness::variant_bytes(&server, &sent, "thumb").await;
    assert!(!thumb.is_empty());

    // Deleted for everyone, the message takes its media with it, variants included.
    let delete = serde_json::json!({"client_id": "m2", "body": {"delete": seq}});
    let response = server.http.post(server.url(&messages)).bearer_auth(&alice).json(&delete).send().await.unwrap();
    assert_eq!(response.status(), 201);
    let deadline = Instant::now() + Duration::from_secs(30);
    while status(&alice, &sent).await != 404 {
        assert!(Instant::now() < deadline, "the media outlived its message");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eventually("every variant is deleted", || server.files_under("blobs/variants").is_empty()).await;
}

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

    // A message that expires (a disappearing timer of two seconds) keeps its media while it lives,
    // then lets it go with its variants.
    let say = |client_id: &str, body: Value| {
        let (server, alice, messages) = (&server, &alice, &messages);
        let body = serde_json::json!({"client_id": client_id, "body": body});
        async move { server.http.post(server.url(messages)).bearer_auth(alice).json(&body).send().await.unwrap() }
    };
    assert_eq!(say("m3", serde_json::json!({"disappearing": 2})).await.status(), 201);
    let fleeting = server.upload_ready(&alice, "image/png", fixture("alpha.png")).await;
    assert_eq!(say("m4", serde_json::json!({"media": fleeting["id"].clone()})).await.status(), 201);
    assert_eq!(status(&bob, &fleeting).await, 200, "bob reads it while the message lives");
    let deadline = Instant::now() + Duration::from_secs(30);
    while status(&alice, &fleeting).await != 404 {
        assert!(Instant::now() < deadline, "the media outlived its expired message");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eventually("its variants are deleted", || server.files_under("blobs/variants").is_empty()).await;
}

/// Everything a user would notice of a ready photo: it is ready, both variants are served, match
/// their blobs and are stored, and its original is still stored (the harness keeps originals).
async fn assert_whole(server: &Server, token: &str, media: &Value) {
    let id = media["id"].as_str().unwrap();
    let now: Value = server.media(token, id).await.json().await.unwrap();
    assert_eq!(now["status"], "ready", "{now}");
    // Served (perhaps from the origin's memory tier) and stored.
    let variants = server.files_under("blobs/variants");
    for variant in ["standard", "thumb"] {
        assert!(!crate::harness::variant_bytes(server, &now, variant).await.is_empty());
        let blob = now["variants"][variant]["blob"].as_str().unwrap();
        assert!(variants.iter().any(|path| path.ends_with(blob)), "the {variant} is gone: {variants:?}");
    }
    let original = media["blob"].as_str().unwrap();
    let originals = server.files_under("blobs/originals");
    assert!(originals.iter().any(|path| path.ends_with(original)), "the original is gone: {originals:?}");
}

#[tokio::test]
async fn a_sweep_racing_an_upload_of_the_same_bytes_loses_nothing() {
    let data = DataDir::new();
    // Each deletion waits 2 s between its claim (the check that nothing needs the bytes) and the
    // delete: wide windows for an upload of the same bytes to land in. Only the purge that follows
    // a DELETE runs during the test (the periodic sweep would take deletions out of turn).
    let server = Server::start(
        &data,
        &[("COURIER_INGEST__TEST_DELETE_DELAY_MS", "2000"), ("COURIER_INGEST__SWEEP_INTERVAL_MS", "3600000")],
    );
    let alice = server.token("alice");
    let photo = server.upload_ready(&alice, "image/jpeg", fixture("rocket.jpg")).await;
    assert_eq!(photo["status"], "ready");

    // Deleted, its original and two variants are logged, and a purge claims them one by one (in
    // that order, 2 s each). The same bytes come again at once, while the original's deletion is
    // in flight: the upload waits for it and stores the original again after it.
    assert_eq!(server.delete_media(&alice, photo["id"].as_str().unwrap()).await.status(), 204);
    let again = server.upload_ready(&alice, "image/jpeg", fixture("rocket.jpg")).await;
    assert_eq!(again["status"], "ready", "{again}");
    assert_eq!(again["variants"]["standard"]["blob"], photo["variants"]["standard"]["blob"]);
    // Once the purge is over, nothing the new upload needs is gone.
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_whole(&server, &alice, &again).await;

    // Again, now landing 2.2 s in, while the first variant's deletion is in flight (the original's
    // is done): the job's runner stores that variant again once its deletion is over.
    assert_eq!(server.delete_media(&alice, again["id"].as_str().unwrap()).await.status(), 204);
    tokio::time::sleep(Duration::from_millis(2200)).await;
    let third = server.upload_ready(&alice, "image/jpeg", fixture("rocket.jpg")).await;
    assert_eq!(third["status"], "ready", "{third}");
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_whole(&server, &alice, &third).await;

    // What alice stores is that photo: its original and its two variants, and /metrics agrees.
    let variant_bytes: u64 =
        ["standard", "thumb"].iter().map(|v| third["variants"][v]["bytes"].as_u64().unwrap()).sum();
    let original_bytes = fixture("rocket.jpg").len() as u64;
    let limits: Value =
        server.http.get(server.url("/v1/limits")).bearer_auth(&alice).send().await.unwrap().json().await.unwrap();
    assert_eq!(limits["quota"]["bytes_stored"]["used"].as_u64(), Some(original_bytes + variant_bytes), "{limits}");
    let metric = |series: &'static str| crate::harness::metric(&server.http, &server.base, series);
    assert_eq!(metric("courier_stored_blobs{namespace=\"originals\"}").await, 1.0);
    assert_eq!(metric("courier_stored_blobs{namespace=\"variants\"}").await, 2.0);
    assert_eq!(metric("courier_stored_bytes{namespace=\"originals\"}").await, original_bytes as f64);
    assert_eq!(metric("courier_stored_bytes{namespace=\"variants\"}").await, variant_bytes as f64);
}

#[tokio::test]
async fn a_restart_mid_sweep_finishes_the_sweep_and_loses_nothing() {
    let data = DataDir::new();
    let env = [("COURIER_INGEST__SWEEP_INTERVAL_MS", "100")];
    let slow = [env[0], ("COURIER_INGEST__TEST_DELETE_DELAY_MS", "5000")];
    let server = Server::start(&data, &slow);
    let alice = server.token("alice");
    let kept = server.upload_ready(&alice, "image/png", fixture("alpha.png")).await;
    let deleted = server.upload_ready(&alice, "image/jpeg", fixture("rocket.jpg")).await;
    assert_eq!((kept["status"].as_str(), deleted["status"].as_str()), (Some("ready"), Some("ready")));
    assert_eq!(server.files_under("blobs/variants").len(), 4);

    // Deleted: the purge claims the original's deletion and is killed before it deletes anything.
    assert_eq!(server.delete_media(&alice, deleted["id"].as_str().unwrap()).await.status(), 204);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let claimed = "SELECT COUNT(*) FROM deleted_blobs WHERE removed = 0 AND claimed_at IS NOT NULL";
    assert!(server.count(claimed).await >= 1, "a deletion is claimed when the node dies");
    server.kill();
    let originals = crate::harness::files_in(&data.path().join("blobs/originals"));
    assert_eq!(originals.len(), 2, "killed before the delete");

    // Restarted, the node frees its old claims and its sweep deletes all three blobs; the other
    // photo is untouched.
    let server = Server::start(&data, &env);
    eventually("the deleted photo's blobs go", || {
        server.files_under("blobs/originals").len() == 1 && server.files_under("blobs/variants").len() == 2
    })
    .await;
    assert_whole(&server, &alice, &kept).await;
    assert_eq!(server.media(&alice, deleted["id"].as_str().unwrap()).await.status(), 404);
}

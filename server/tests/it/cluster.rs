//! Several nodes on one PostgreSQL database, one blob store and shared key files: API nodes that
//! run no jobs (`serve --transcode-workers 0`) and a `courier worker` that runs them. Needs
//! `COURIER_TEST_DATABASE_URL`; the whole cluster (two API nodes, a worker and an edge on
//! PostgreSQL, NATS and S3) also needs `COURIER_TEST_NATS_URL` and `COURIER_TEST_S3_URL`
//! (`http://KEY:SECRET@HOST:PORT/BUCKET`, an existing bucket). Each test is skipped with a note
//! when its variables are unset; a set but unreachable service fails it.

use std::path::PathBuf;
use std::process::Child;
use std::time::{Duration, Instant};

use client::{Api, Event, Live, LiveOptions};
use serde_json::{Value, json};
use types::{BlobId, Secret, TokenKeys, UserId};

use crate::avmedia::{busy_video, ffmpeg};
use crate::harness::{DataDir, Edge, Server, fixture, fresh_schema, now, spawn_courier};
use crate::live::{DEV, sign_in};

/// A random key, written where every node can read it.
fn key_file(dir: &DataDir, name: &str) -> (Secret, String) {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).unwrap();
    let secret = Secret::from_bytes(bytes);
    let path = dir.path().join(name);
    std::fs::write(&path, secret.to_hex()).unwrap();
    (secret, path.display().to_string())
}

/// A running `courier worker` and the base URL of its /healthz and /metrics.
struct Worker(Child, String);

impl Worker {
    fn start(data: &DataDir, blobs: &str, env: &[(&str, &str)]) -> Self {
        let args: Vec<String> = ["worker", "--listen", "127.0.0.1:0", "--transcode-workers", "1", "--blobs", blobs]
            .into_iter()
            .chain(["--data-dir", data.path().to_str().unwrap()])
            .map(String::from)
            .collect();
        let (child, base) = spawn_courier(&args, env, "courier worker serving /healthz and /metrics on ");
        Self(child, base)
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// What a cluster's nodes share: a fresh schema on the test PostgreSQL server, a blob folder and
/// the two key files, as the `COURIER_*` settings every node gets.
struct Shared {
    admin: sqlx::PgPool,
    token_key: Secret,
    url_key_file: PathBuf,
    blobs: String,
    env: Vec<(&'static str, String)>,
    _dir: DataDir,
}

/// Where a test's blobs go on the S3 service `COURIER_TEST_S3_URL` names (a prefix of its own in
/// the bucket), with the `AWS_*` settings that point object_store at it; `None` when unset.
fn s3_blobs(test: &str) -> Option<(String, Vec<(&'static str, String)>)> {
    let Ok(url) = std::env::var("COURIER_TEST_S3_URL") else {
        eprintln!("COURIER_TEST_S3_URL is not set: skipping the S3 run of {test}");
        return None;
    };
    let url = reqwest::Url::parse(&url).expect("COURIER_TEST_S3_URL is http://KEY:SECRET@HOST:PORT/BUCKET");
    let endpoint = format!("{}://{}:{}", url.scheme(), url.host_str().unwrap(), url.port_or_known_default().unwrap());
    let mut random = [0u8; 8];
    getrandom::fill(&mut random).unwrap();
    let blobs = format!("s3://{}/{test}-{:016x}", url.path().trim_matches('/'), u64::from_le_bytes(random));
    let env = vec![
        ("AWS_ENDPOINT_URL", endpoint),
        ("AWS_ACCESS_KEY_ID", url.username().to_owned()),
        ("AWS_SECRET_ACCESS_KEY", url.password().unwrap_or_default().to_owned()),
        ("AWS_REGION", "us-east-1".to_owned()),
        ("AWS_ALLOW_HTTP", "true".to_owned()),
    ];
    Some((blobs, env))
}

impl Shared {
    /// Blobs in a shared folder. `None` (with a note) when `COURIER_TEST_DATABASE_URL` is unset.
    async fn new(schema: &str, settings: &[(&'static str, &str)]) -> Option<Self> {
        Self::with_blobs(schema, settings, None).await
    }

    /// Blobs at `blobs` (a location and the settings it needs), or in a shared folder.
    async fn with_blobs(
        schema: &str,
        settings: &[(&'static str, &str)],
        blobs: Option<(String, Vec<(&'static str, String)>)>,
    ) -> Option<Self> {
        let Ok(url) = std::env::var("COURIER_TEST_DATABASE_URL") else {
            eprintln!("COURIER_TEST_DATABASE_URL is not set: skipping the cluster run");
            return None;
        };
        let (admin, database) = fresh_schema(&url, schema).await;
        let dir = DataDir::new();
        let (token_key, token_file) = key_file(&dir, "token.key");
        let (_, url_file) = key_file(&dir, "url.key");
        let mut env = vec![
            ("COURIER_DATABASE_URL", database),
            ("COURIER_TOKEN_KEY_FILE", token_file),
            ("COURIER_URL_KEY_FILE", url_file.clone()),
        ];
        env.extend(settings.iter().map(|(k, v)| (*k, v.to_string())));
        let blobs = match blobs {
            Some((location, settings)) => {
                env.extend(settings);
                location
            }
            None => dir.path().join("blobs").display().to_string(),
        };
        Some(Self { admin, token_key, url_key_file: url_file.into(), blobs, env, _dir: dir })
    }

    fn env(&self) -> Vec<(&str, &str)> {
        self.env.iter().map(|(k, v)| (*k, v.as_str())).collect()
    }

    /// An API node: runs no jobs.
    fn api_node(&self, data: &DataDir) -> Server {
        self.api_node_with(data, &[])
    }

    /// An API node with settings of its own besides the shared ones.
    fn api_node_with(&self, data: &DataDir, extra: &[(&str, &str)]) -> Server {
        let mut env = self.env();
        env.extend_from_slice(extra);
        Server::start_with(data, "127.0.0.1:0", &["--transcode-workers", "0", "--blobs", &self.blobs], &env)
    }

    fn worker(&self, data: &DataDir) -> Worker {
        Worker::start(data, &self.blobs, &self.env())
    }

    fn token(&self, user: &str) -> String {
        TokenKeys::new(&self.token_key).mint(&user.parse::<UserId>().unwrap(), now(), 3600)
    }
}

#[tokio::test]
async fn api_nodes_and_a_worker_share_the_queue_the_blobs_and_the_keys() {
    let Some(shared) = Shared::new("it_cluster", &[("COURIER_INGEST__WAIT_FOR_READY_MS", "20000")]).await else {
        return;
    };
    let (data_a, data_b, data_w) = (DataDir::new(), DataDir::new(), DataDir::new());
    let node_a = shared.api_node(&data_a);
    let node_b = shared.api_node(&data_b);
    assert!(node_a.workers("quick").is_empty(), "an API node starts no transcode workers");
    let worker = shared.worker(&data_w);
    for file in ["token-signing.key", "url-signing.key"] {
        assert!(!data_a.path().join(file).exists(), "{file}: a node given a key file makes none of its own");
    }

    // A token minted with the shared key works on every node.
    let token = shared.token("alice");
    // Node A runs no job, yet the upload answers `ready`: the worker ran it, and A saw its row.
    let response = node_a.upload(&token, "image/jpeg", fixture("rocket.jpg")).await;
    assert_eq!(response.status(), 201);
    let photo: Value = response.json().await.unwrap();
    assert_eq!(photo["status"], "ready", "{photo}");
    // Node B shows the same media and serves its variant from the shared store, signed with the
    // shared URL key.
    let on_b: Value = node_b.media(&token, photo["id"].as_str().unwrap()).await.json().await.unwrap();
    assert_eq!(on_b["variants"]["standard"]["blob"], photo["variants"]["standard"]["blob"]);
    let variant = node_b.get(on_b["variants"]["standard"]["url"].as_str().unwrap()).await;
    assert_eq!(variant.status(), 200);
    assert!(variant.bytes().await.unwrap().starts_with(&[0xFF, 0xD8]), "a JPEG");

    let http = reqwest::Client::new();
    let metrics = http.get(format!("{}/metrics", worker.1)).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("courier_jobs_queued 0"), "{metrics}");
    let jobs: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM it_cluster.jobs WHERE status = 'ready'")
        .fetch_one(&shared.admin)
        .await
        .unwrap();
    assert_eq!(jobs, 1);
    drop((node_a, node_b));
}

/// Rate limits live in the shared database: codes asked of two nodes count against one bucket.
#[tokio::test]
async fn rate_limits_are_shared_by_the_nodes() {
    let Some(shared) = Shared::new("it_cluster_limits", &[DEV]).await else { return };
    let (data_a, data_b) = (DataDir::new(), DataDir::new());
    let (node_a, node_b) = (shared.api_node(&data_a), shared.api_node(&data_b));
    let code = |node: &Server| {
        let request = node.http.post(node.url("/v1/auth/code")).json(&json!({"phone": "+4915100007001"}));
        async move { request.send().await.unwrap().status().as_u16() }
    };
    // Three codes a phone at once, wherever asked.
    assert_eq!([code(&node_a).await, code(&node_b).await, code(&node_a).await], [202; 3]);
    assert_eq!(code(&node_b).await, 429, "node B counted the codes node A sent");
    drop((node_a, node_b));
}

/// kill -9 of a worker mid-video: no node frees its lease, and once the lease runs out another
/// worker claims the job and finishes it.
#[tokio::test]
async fn a_killed_workers_video_is_finished_by_another_once_its_lease_runs_out() {
    // Leases renewed every 2 s; a dead worker's job is free 4 s after its last renewal.
    let settings = [("COURIER_INGEST__WAIT_FOR_READY_MS", "0"), ("COURIER_INGEST__JOB__LEASE_SECS", "4")];
    let Some(shared) = Shared::new("it_cluster_lease", &settings).await else {
        return;
    };
    let data = DataDir::new();
    let node = shared.api_node(&data);
    let first_data = DataDir::new();
    let first = shared.worker(&first_data);
    let token = shared.token("alice");
    let response = node.upload(&token, "video/mp4", busy_video("v.mp4", 20)).await;
    assert_eq!(response.status(), 201);
    let id = response.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_owned();

    // Once the first worker reports progress, it is killed.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let media: Value = node.media(&token, &id).await.json().await.unwrap();
        if media["progress"].as_f64().is_some_and(|p| p > 0.0) {
            break;
        }
        assert_eq!(media["status"], "processing", "{media}");
        assert!(Instant::now() < deadline, "the first worker never got going");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(first);
    let second_data = DataDir::new();
    let second = shared.worker(&second_data);
    let media = node.wait_done(&token, &id).await;
    assert_eq!(media["status"], "ready", "{media}");
    let attempts: i32 =
        sqlx::query_scalar("SELECT attempts FROM it_cluster_lease.jobs").fetch_one(&shared.admin).await.unwrap();
    assert_eq!(attempts, 2, "claimed once by each worker");
    drop((second, node));
}

/// The whole cluster on real engines: two API nodes (no transcoding) and a worker on one
/// PostgreSQL database, one NATS bus and one S3 bucket, and an edge that fills from S3. A user on
/// node A uploads a photo and a video, the worker makes their variants into S3, and a message with
/// each reaches a user connected to node B live; B's user fetches every variant through the edge,
/// byte for byte what its name says.
#[tokio::test]
async fn two_api_nodes_a_worker_and_an_edge_on_postgresql_nats_and_s3() {
    let Ok(nats) = std::env::var("COURIER_TEST_NATS_URL") else {
        eprintln!("COURIER_TEST_NATS_URL is not set: skipping the whole-cluster run");
        return;
    };
    let Some(s3) = s3_blobs("it-whole-cluster") else { return };
    let subject = format!("courier.cluster.{}", std::process::id());
    let settings = [
        DEV,
        ("COURIER_CHAT__BUS_URL", nats.as_str()),
        ("COURIER_CHAT__BUS_SUBJECT", subject.as_str()),
        ("COURIER_INGEST__WAIT_FOR_READY_MS", "0"),
    ];
    let Some(shared) = Shared::with_blobs("it_whole_cluster", &settings, Some(s3)).await else {
        return;
    };
    let (data_a, data_b, data_w) = (DataDir::new(), DataDir::new(), DataDir::new());
    let node_a = shared.api_node(&data_a);
    let node_b = shared.api_node(&data_b);
    let _worker = shared.worker(&data_w);
    let cache = DataDir::new();
    // The edge reads variants straight from the bucket; it needs only the S3 settings.
    let s3_env: Vec<(&str, &str)> = shared.env().into_iter().filter(|(k, _)| k.starts_with("AWS_")).collect();
    let edge = Edge::start_with_key(&shared.url_key_file, &[&shared.blobs], cache.path(), &s3_env);

    let (alice, _) = sign_in(&node_a, "+4915100002001", "phone").await;
    let (bob_on_a, bob_session) = sign_in(&node_a, "+4915100002002", "phone").await;
    let bob = Api::new(&node_b.base).with_token(bob_on_a.token().unwrap());
    let chat = alice.direct(&bob_session.user_id).await.unwrap().id;
    let alice_live = Live::connect(&alice, LiveOptions::default()).await.unwrap();
    let mut bob_live = Live::connect(&bob, LiveOptions::default()).await.unwrap();

    let alice_token = alice.token().unwrap();
    let clip =
        ffmpeg("clip.mp4", &["-f", "lavfi", "-i", "testsrc2=size=640x360:rate=30:duration=1", "-c:v", "libx264"]);
    let mut sent = Vec::new();
    for (mime, bytes, variants) in [
        ("image/jpeg", fixture("rocket.jpg"), &["standard", "thumb"][..]),
        ("video/mp4", clip, &["standard", "poster", "thumb"][..]),
    ] {
        let response = node_a.upload(alice_token, mime, bytes).await;
        assert_eq!(response.status(), 201, "{mime}");
        let id = response.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_owned();
        let media = node_a.wait_done(alice_token, &id).await;
        assert_eq!(media["status"], "ready", "the worker made {mime}'s variants: {media}");
        let message = alice_live.send(&chat, json!({"media": id})).await.unwrap();
        sent.push((message.seq, id, variants));
    }

    for (seq, id, variants) in sent {
        // Live on node B, through the bus.
        let got =
            next_message(&mut bob_live, Duration::from_secs(20)).await.expect("the message reached node B in time");
        assert_eq!((got.seq, got.body["media"].as_str()), (seq, Some(id.as_str())));
        // Shared with bob by the send; the variants come through the edge, from S3.
        let media: Value = node_b.media(bob.token().unwrap(), &id).await.json().await.unwrap();
        for name in variants {
            let variant = &media["variants"][name];
            let response = edge.get(variant["url"].as_str().expect("a signed URL")).await;
            assert_eq!(response.status(), 200, "{id} {name}");
            let bytes = response.bytes().await.unwrap();
            let blob: BlobId = variant["blob"].as_str().unwrap().parse().unwrap();
            assert!(blob.matches(&bytes), "{id} {name}: the edge served its blob's bytes");
        }
    }
    let stored: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM it_whole_cluster.jobs WHERE status = 'ready'")
        .fetch_one(&shared.admin)
        .await
        .unwrap();
    assert_eq!(stored, 2);
    drop((node_a, node_b, edge));
}

/// Subjects and payloads, in the order they were seen.
type Seen = std::sync::Arc<std::sync::Mutex<Vec<(String, Vec<u8>)>>>;

/// Everything published under `prefix`, as a stranger subscribed to the bus sees it.
struct Tap {
    client: async_nats::Client,
    seen: Seen,
}

impl Tap {
    async fn start(url: &str, prefix: &str) -> Self {
        let client = async_nats::connect(url).await.expect("COURIER_TEST_NATS_URL is set but unreachable");
        let mut subscription = client.subscribe(format!("{prefix}.>")).await.unwrap();
        client.flush().await.unwrap();
        let seen = Seen::default();
        let sink = seen.clone();
        tokio::spawn(async move {
            while let Some(message) = futures_util::StreamExt::next(&mut subscription).await {
                sink.lock().unwrap().push((message.subject.to_string(), message.payload.to_vec()));
            }
        });
        Self { client, seen }
    }

    /// What went to node subjects: (node id, the envelope's JSON, after its 32-byte MAC).
    fn to_nodes(&self, prefix: &str) -> Vec<(String, Value)> {
        let node_prefix = format!("{prefix}.node.");
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter_map(|(subject, payload)| {
                let node = subject.strip_prefix(&node_prefix)?;
                Some((node.to_owned(), serde_json::from_slice(&payload[32..]).unwrap()))
            })
            .collect()
    }
}

/// The next message event on `live` within `wait`, skipping other events; `None` if none came.
async fn next_message(live: &mut Live, wait: Duration) -> Option<client::Message> {
    tokio::time::timeout(wait, async {
        loop {
            match live.next_event().await.expect("the connection stopped") {
                Event::Message(m) => {
                    live.ack(&m.conversation, m.seq).await.unwrap();
                    return m;
                }
                _ => continue,
            }
        }
    })
    .await
    .ok()
}

/// Three nodes on one bus: an event goes only to the node that holds its receivers; an envelope
/// lost on the way (node A drops its first on purpose) is repaired within a beat, with no later
/// message to reveal the gap; and envelopes a stranger forges or alters are refused.
#[tokio::test]
async fn the_bus_addresses_nodes_repairs_a_lost_envelope_and_refuses_forgeries() {
    let Ok(nats) = std::env::var("COURIER_TEST_NATS_URL") else {
        eprintln!("COURIER_TEST_NATS_URL is not set: skipping the bus run");
        return;
    };
    let prefix = format!("courier.test.bus{}", std::process::id());
    let settings = [DEV, ("COURIER_CHAT__BUS_URL", nats.as_str()), ("COURIER_CHAT__BUS_SUBJECT", prefix.as_str())];
    let Some(shared) = Shared::new("it_cluster_bus", &settings).await else { return };
    let tap = Tap::start(&nats, &prefix).await;
    let (data_a, data_b, data_c) = (DataDir::new(), DataDir::new(), DataDir::new());
    let node_a = shared.api_node_with(&data_a, &[("COURIER_CHAT__TEST_DROP_ENVELOPES", "1")]);
    let node_b = shared.api_node(&data_b);
    let node_c = shared.api_node(&data_c);

    let (alice, _) = sign_in(&node_a, "+4915100003001", "phone").await;
    let (bob_on_a, bob_session) = sign_in(&node_a, "+4915100003002", "phone").await;
    let (carol_on_a, _) = sign_in(&node_a, "+4915100003003", "phone").await;
    let bob = Api::new(&node_b.base).with_token(bob_on_a.token().unwrap());
    let carol = Api::new(&node_c.base).with_token(carol_on_a.token().unwrap());
    let chat = alice.direct(&bob_session.user_id).await.unwrap().id;
    let alice_live = Live::connect(&alice, LiveOptions::default()).await.unwrap();
    let mut bob_live = Live::connect(&bob, LiveOptions::default()).await.unwrap();
    let _carol_live = Live::connect(&carol, LiveOptions::default()).await.unwrap();

    // Bob's connection on B is in the directory before alice sends (so A addresses B).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let held: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM it_cluster_bus.chat_presence WHERE user_id = $1")
            .bind(&bob_session.user_id)
            .fetch_one(&shared.admin)
            .await
            .unwrap();
        if held == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "bob's connection never reached the directory");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The envelope for "one" is dropped by node A; nothing else is sent, yet bob gets it, once
    // node B hears from A's beats that an envelope is missing.
    let one = alice_live.send(&chat, json!({"text": "one"})).await.unwrap();
    let got = next_message(&mut bob_live, Duration::from_secs(10)).await.expect("the lost wake-up was repaired");
    assert_eq!((got.seq, got.body["text"].as_str()), (one.seq, Some("one")));
    for text in ["two", "three"] {
        let sent = alice_live.send(&chat, json!({"text": text})).await.unwrap();
        let got = next_message(&mut bob_live, Duration::from_secs(10)).await.expect("delivered live");
        assert_eq!((got.seq, got.body["text"].as_str()), (sent.seq, Some(text)));
    }
    let back = bob_live.send(&chat, json!({"text": "back"})).await.unwrap();

    // Only the nodes holding alice and bob were sent envelopes: carol's node C none.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let envelopes = tap.to_nodes(&prefix);
    let mut nodes: Vec<&str> = envelopes.iter().map(|(node, _)| node.as_str()).collect();
    nodes.sort();
    nodes.dedup();
    assert_eq!(nodes.len(), 2, "envelopes went to A and B only: {nodes:?}");
    let (to_b, real) = envelopes
        .iter()
        .find(|(_, e)| e["event"]["kind"] == "message" && e["users"][0] == bob_session.user_id.as_str())
        .cloned()
        .expect("a message envelope to node B");
    assert!(real["seq"].as_u64().unwrap() >= 2, "numbered per pair of nodes; the first was dropped");

    // A stranger on the bus: an envelope as node A would seal it for B, carrying the next message
    // bob expects, first with a made-up MAC, then with the MAC of a real envelope it was altered from.
    let subject = format!("{prefix}.node.{to_b}");
    let next = |text: &str, seq: u64| {
        let frame = json!({"type": "message", "conversation": chat, "seq": back.seq + 1, "sender": "mallory",
                           "device": real["event"]["device"], "client_id": text, "body": {"text": text}, "ts": 1});
        let mut envelope = real.clone();
        envelope["seq"] = json!(seq);
        envelope["event"] = json!({"kind": "message", "conversation": chat, "seq": back.seq + 1,
                                   "device": real["event"]["device"], "frame": frame.to_string()});
        serde_json::to_vec(&envelope).unwrap()
    };
    let mut forged = vec![0u8; 32];
    forged.extend(next("forged", 1_000_000));
    tap.client.publish(subject.clone(), forged.into()).await.unwrap();
    let real_mac = tap.seen.lock().unwrap().iter().find(|(s, p)| *s == subject && p[32..].starts_with(b"{")).unwrap().1
        [..32]
        .to_vec();
    let mut altered = real_mac;
    altered.extend(next("altered", 2_000_000));
    tap.client.publish(subject, altered.into()).await.unwrap();
    tap.client.flush().await.unwrap();
    assert!(next_message(&mut bob_live, Duration::from_secs(2)).await.is_none(), "a forged envelope was delivered");
    let four = alice_live.send(&chat, json!({"text": "four"})).await.unwrap();
    assert_eq!(four.seq, back.seq + 1);
    let got = next_message(&mut bob_live, Duration::from_secs(10)).await.expect("real envelopes still pass");
    assert_eq!((got.seq, got.body["text"].as_str()), (four.seq, Some("four")));
    drop((node_a, node_b, node_c));
}

/// kill -9 of node A in the middle of a 10,000-message burst from users on A to users on B. Every
/// message A confirmed (`sent`) reaches its receiver on B exactly once and in order; the senders
/// move to B and send again what A never confirmed, with the same client ids, and nothing arrives
/// twice: each conversation's log is its 1,000 messages, each once, and each receiver got all of
/// them in seq order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_mid_burst_loses_and_doubles_nothing() {
    const PAIRS: usize = 10;
    const EACH: usize = 1_000;
    const KILL_AFTER: usize = 3_000;
    let Ok(nats) = std::env::var("COURIER_TEST_NATS_URL") else {
        eprintln!("COURIER_TEST_NATS_URL is not set: skipping the kill -9 burst");
        return;
    };
    let prefix = format!("courier.test.burst{}", std::process::id());
    let settings = [DEV, ("COURIER_CHAT__BUS_URL", nats.as_str()), ("COURIER_CHAT__BUS_SUBJECT", prefix.as_str())];
    let Some(shared) = Shared::new("it_cluster_burst", &settings).await else { return };
    let (data_a, data_b) = (DataDir::new(), DataDir::new());
    let node_a = shared.api_node(&data_a);
    let node_b = shared.api_node(&data_b);

    let confirmed_total = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut senders = Vec::new();
    let mut receivers = Vec::new();
    for pair in 0..PAIRS {
        let (sender, _) = sign_in(&node_a, &format!("+49151000040{pair:02}"), "phone").await;
        let (receiver_on_a, receiver) = sign_in(&node_a, &format!("+49151000041{pair:02}"), "phone").await;
        let chat = sender.direct(&receiver.user_id).await.unwrap().id;
        let on_b = Api::new(&node_b.base).with_token(receiver_on_a.token().unwrap());
        let mut live = Live::connect(&on_b, LiveOptions::default()).await.unwrap();
        // The receiver on B: every message, in arrival order, until it has the whole log.
        receivers.push(tokio::spawn(async move {
            let mut got: Vec<(i64, String)> = Vec::new();
            while got.len() < EACH {
                let message = next_message(&mut live, Duration::from_secs(60)).await.expect("messages kept coming");
                got.push((message.seq, message.body["text"].as_str().unwrap().to_owned()));
            }
            // Nothing more may come: everything was in the log once.
            assert!(next_message(&mut live, Duration::from_secs(2)).await.is_none(), "a message came twice");
            got
        }));
        let on_b = Api::new(&node_b.base).with_token(sender.token().unwrap());
        let total = confirmed_total.clone();
        senders.push(tokio::spawn(async move {
            let options = LiveOptions { send_timeout: Duration::from_secs(3), ..LiveOptions::default() };
            let live = Live::connect(&sender, options).await.unwrap();
            let mut confirmed: Vec<(String, i64)> = Vec::new();
            let mut next = 0;
            // On A until it dies under the sender.
            while next < EACH {
                let id = format!("p{pair}-m{next}");
                match live.send_with_id(&chat, &id, json!({"text": id})).await {
                    Ok(sent) => {
                        confirmed.push((id, sent.seq));
                        total.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        next += 1;
                    }
                    Err(_) => break,
                }
            }
            drop(live);
            // Then on B: the unconfirmed one again (A may have stored it), and the rest.
            while next < EACH {
                let id = format!("p{pair}-m{next}");
                let mut tries = 0;
                let message = loop {
                    match on_b.send(&chat, &id, json!({"text": id})).await {
                        Ok(message) => break message,
                        Err(e) => {
                            tries += 1;
                            assert!(tries < 20, "node B refused {id}: {e:?}");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    }
                };
                confirmed.push((id, message.seq));
                next += 1;
            }
            confirmed
        }));
    }
    let deadline = Instant::now() + Duration::from_secs(300);
    while confirmed_total.load(std::sync::atomic::Ordering::Relaxed) < KILL_AFTER {
        assert!(Instant::now() < deadline, "the burst on node A stalled");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    node_a.kill();
    let confirmed_before_kill = confirmed_total.load(std::sync::atomic::Ordering::Relaxed);
    assert!(confirmed_before_kill < PAIRS * EACH, "node A was killed mid-burst");

    for (sender, receiver) in senders.into_iter().zip(receivers) {
        let confirmed = sender.await.unwrap();
        let got = receiver.await.unwrap();
        let seqs: Vec<i64> = got.iter().map(|(seq, _)| *seq).collect();
        assert_eq!(seqs, (1..=EACH as i64).collect::<Vec<_>>(), "gapless, in order, each once");
        let mut texts: Vec<&str> = got.iter().map(|(_, text)| text.as_str()).collect();
        texts.sort();
        texts.dedup();
        assert_eq!(texts.len(), EACH, "every client id once");
        for (id, seq) in &confirmed {
            assert_eq!(got[(*seq - 1) as usize].1, *id, "a confirmed send is where its seq says");
        }
    }
    drop(node_b);
}

#[tokio::test]
async fn a_resumable_upload_moves_between_nodes_and_its_parts_live_in_s3() {
    let Some(s3) = s3_blobs("it-resumable") else { return };
    let settings = [("COURIER_INGEST__WAIT_FOR_READY_MS", "10000")];
    let Some(shared) = Shared::with_blobs("it_resumable", &settings, Some(s3)).await else {
        return;
    };
    let (data_a, data_b, data_w) = (DataDir::new(), DataDir::new(), DataDir::new());
    let (node_a, node_b) = (shared.api_node(&data_a), shared.api_node(&data_b));
    let _worker = shared.worker(&data_w);
    let alice = shared.token("alice");
    let photo = fixture("rocket.jpg");
    let half = photo.len() / 2;
    let tus = |node: &Server, method: reqwest::Method, path: &str| {
        node.http.request(method, node.url(path)).bearer_auth(&alice).header("Tus-Resumable", "1.0.0")
    };
    let offset_of = |response: &reqwest::Response| {
        response.headers().get("upload-offset").and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned()
    };

    // Created on node A, half sent there.
    let metadata =
        format!("filetype {}", base64::Engine::encode(&base64::engine::general_purpose::STANDARD, "image/jpeg"));
    let created = tus(&node_a, reqwest::Method::POST, "/v1/uploads")
        .header("Upload-Length", photo.len().to_string())
        .header("Upload-Metadata", metadata)
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    let path = created.headers()["location"].to_str().unwrap().to_owned();
    let first = tus(&node_a, reqwest::Method::PATCH, &path)
        .header("Content-Type", "application/offset+octet-stream")
        .header("Upload-Offset", "0")
        .body(photo[..half].to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!((first.status().as_u16(), offset_of(&first)), (204, half.to_string()));

    // Node A is gone; the phone reconnects to node B, which knows where the upload stands.
    node_a.kill();
    let head = tus(&node_b, reqwest::Method::HEAD, &path).send().await.unwrap();
    assert_eq!((head.status().as_u16(), offset_of(&head)), (200, half.to_string()));
    let last = tus(&node_b, reqwest::Method::PATCH, &path)
        .header("Content-Type", "application/offset+octet-stream")
        .header("Upload-Offset", half.to_string())
        .body(photo[half..].to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(last.status(), 204);
    assert_eq!(last.headers()["courier-media-status"], "ready", "the worker made its variants");
    let media = node_b.wait_done(&alice, path.trim_start_matches("/v1/uploads/")).await;
    assert_eq!(media["blob"].as_str().unwrap(), BlobId::of(&photo).to_hex());
    assert!(!crate::harness::variant_bytes(&node_b, &media, "thumb").await.is_empty());
}

//! Several nodes on one PostgreSQL database, one blob store and shared key files: API nodes that
//! run no jobs (`serve --transcode-workers 0`) and a `courier worker` that runs them. Needs
//! `COURIER_TEST_DATABASE_URL` (skipped with a note when unset; set but unreachable fails).

use std::process::Child;
use std::time::{Duration, Instant};

use serde_json::Value;
use types::{Secret, TokenKeys, UserId};

use crate::avmedia::busy_video;
use crate::harness::{DataDir, Server, fixture, fresh_schema, now, spawn_courier};

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
    blobs: String,
    env: Vec<(&'static str, String)>,
    _dir: DataDir,
}

impl Shared {
    /// `None` (with a note) when `COURIER_TEST_DATABASE_URL` is unset.
    async fn new(schema: &str, settings: &[(&'static str, &str)]) -> Option<Self> {
        let Ok(url) = std::env::var("COURIER_TEST_DATABASE_URL") else {
            eprintln!("COURIER_TEST_DATABASE_URL is not set: skipping the cluster run");
            return None;
        };
        let (admin, database) = fresh_schema(&url, schema).await;
        let dir = DataDir::new();
        let (token_key, token_file) = key_file(&dir, "token.key");
        let (_, url_file) = key_file(&dir, "url.key");
        let blobs = dir.path().join("blobs").display().to_string();
        let mut env = vec![
            ("COURIER_DATABASE_URL", database),
            ("COURIER_TOKEN_KEY_FILE", token_file),
            ("COURIER_URL_KEY_FILE", url_file),
        ];
        env.extend(settings.iter().map(|(k, v)| (*k, v.to_string())));
        Some(Self { admin, token_key, blobs, env, _dir: dir })
    }

    fn env(&self) -> Vec<(&str, &str)> {
        self.env.iter().map(|(k, v)| (*k, v.as_str())).collect()
    }

    /// An API node: runs no jobs.
    fn api_node(&self, data: &DataDir) -> Server {
        Server::start_with(data, "127.0.0.1:0", &["--transcode-workers", "0", "--blobs", &self.blobs], &self.env())
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

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

#[tokio::test]
async fn api_nodes_and_a_worker_share_the_queue_the_blobs_and_the_keys() {
    let Ok(url) = std::env::var("COURIER_TEST_DATABASE_URL") else {
        eprintln!("COURIER_TEST_DATABASE_URL is not set: skipping the cluster run");
        return;
    };
    let (admin, database) = fresh_schema(&url, "it_cluster").await;
    let shared = DataDir::new();
    let (token_key, token_file) = key_file(&shared, "token.key");
    let (_, url_file) = key_file(&shared, "url.key");
    let blobs = shared.path().join("blobs").display().to_string();
    let env = [
        ("COURIER_DATABASE_URL", database.as_str()),
        ("COURIER_TOKEN_KEY_FILE", token_file.as_str()),
        ("COURIER_URL_KEY_FILE", url_file.as_str()),
        ("COURIER_INGEST__WAIT_FOR_READY_MS", "20000"),
    ];
    let (data_a, data_b, data_w) = (DataDir::new(), DataDir::new(), DataDir::new());
    let api = ["--transcode-workers", "0", "--blobs", blobs.as_str()];
    let node_a = Server::start_with(&data_a, "127.0.0.1:0", &api, &env);
    let node_b = Server::start_with(&data_b, "127.0.0.1:0", &api, &env);
    assert!(node_a.workers("quick").is_empty(), "an API node starts no transcode workers");
    let worker = Worker::start(&data_w, &blobs, &env);
    for file in ["token-signing.key", "url-signing.key"] {
        assert!(!data_a.path().join(file).exists(), "{file}: a node given a key file makes none of its own");
    }

    // A token minted with the shared key works on every node.
    let token = TokenKeys::new(&token_key).mint(&"alice".parse::<UserId>().unwrap(), now(), 3600);
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
        .fetch_one(&admin)
        .await
        .unwrap();
    assert_eq!(jobs, 1);
    drop((node_a, node_b));
    admin.close().await;
}

/// kill -9 of a worker mid-video: no node frees its lease, and once the lease runs out another
/// worker claims the job and finishes it.
#[tokio::test]
async fn a_killed_workers_video_is_finished_by_another_once_its_lease_runs_out() {
    let Ok(url) = std::env::var("COURIER_TEST_DATABASE_URL") else {
        eprintln!("COURIER_TEST_DATABASE_URL is not set: skipping the cluster run");
        return;
    };
    let (admin, database) = fresh_schema(&url, "it_cluster_lease").await;
    let shared = DataDir::new();
    let (token_key, token_file) = key_file(&shared, "token.key");
    let (_, url_file) = key_file(&shared, "url.key");
    let blobs = shared.path().join("blobs").display().to_string();
    let env = [
        ("COURIER_DATABASE_URL", database.as_str()),
        ("COURIER_TOKEN_KEY_FILE", token_file.as_str()),
        ("COURIER_URL_KEY_FILE", url_file.as_str()),
        ("COURIER_INGEST__WAIT_FOR_READY_MS", "0"),
        // Renewed every 2 s; a dead worker's job is free 4 s after its last renewal.
        ("COURIER_INGEST__JOB__LEASE_SECS", "4"),
    ];
    let data = DataDir::new();
    let node = Server::start_with(&data, "127.0.0.1:0", &["--transcode-workers", "0", "--blobs", &blobs], &env);
    let first_data = DataDir::new();
    let first = Worker::start(&first_data, &blobs, &env);
    let token = TokenKeys::new(&token_key).mint(&"alice".parse::<UserId>().unwrap(), now(), 3600);
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
    let second = Worker::start(&second_data, &blobs, &env);
    let media = node.wait_done(&token, &id).await;
    assert_eq!(media["status"], "ready", "{media}");
    let attempts: i32 =
        sqlx::query_scalar("SELECT attempts FROM it_cluster_lease.jobs").fetch_one(&admin).await.unwrap();
    assert_eq!(attempts, 2, "claimed once by each worker");
    drop((second, node));
    admin.close().await;
}

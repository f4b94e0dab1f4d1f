//! Restarts and shutdown: accepted jobs survive a kill -9, SIGTERM drains and exits cleanly.

use serde_json::Value;

use crate::harness::{DataDir, Server, fixture};

#[tokio::test]
async fn queued_jobs_resume_after_a_kill() {
    let data = DataDir::new();
    // First an API-only node: the upload is accepted and its job queued, then the process dies.
    let server =
        Server::start(&data, &[("COURIER_TRANSCODE__RUN_JOBS", "false"), ("COURIER_INGEST__WAIT_FOR_READY_MS", "0")]);
    let token = server.token("alice");
    let response = server.upload(&token, "image/jpeg", fixture("phone-rotated-gps.jpg")).await;
    assert_eq!(response.status(), 201);
    let created: Value = response.json().await.unwrap();
    assert_eq!(created["status"], "processing");
    let id = created["id"].as_str().unwrap().to_owned();
    server.kill();

    let server = Server::start(&data, &[]);
    let media = server.wait_done(&token, &id).await;
    assert_eq!(media["status"], "ready", "{media}");
    assert_eq!(media["variants"]["standard"]["width"], 451);
    crate::harness::variant_bytes(&server, &media, "thumb").await;
}

#[tokio::test]
async fn temp_files_left_by_a_crash_are_removed_at_start() {
    let data = DataDir::new();
    std::fs::create_dir_all(data.path().join("tmp")).unwrap();
    std::fs::write(data.path().join("tmp/upload-crashed"), b"half an upload").unwrap();
    let server = Server::start(&data, &[]);
    assert!(server.files_under("tmp").is_empty(), "a crashed upload's temp file survived the restart");
}

#[tokio::test]
async fn sigterm_stops_the_server_cleanly() {
    let data = DataDir::new();
    let server = Server::start(&data, &[]);
    assert_eq!(server.get("/healthz").await.status(), 200);
    let unknown = server.get("/nope").await;
    assert_eq!(unknown.status(), 404);
    let body: Value = unknown.json().await.unwrap();
    assert_eq!(body["error"]["code"], "not_found");
    let status = server.terminate();
    assert!(status.success(), "exit status {status}");
}

#[tokio::test]
async fn the_blob_store_is_chosen_by_url() {
    let data = DataDir::new();
    // object_store's in-memory store: nothing reaches the data dir, and everything still works.
    let server = Server::start(&data, &[("COURIER_BLOBS", "memory:///")]);
    let media = server.upload_ready(&server.token("alice"), "image/jpeg", fixture("rocket.jpg")).await;
    assert_eq!(media["status"], "ready", "{media}");
    crate::harness::variant_bytes(&server, &media, "standard").await;
    assert!(server.files_under("blobs").is_empty());
}

#[tokio::test]
async fn a_second_process_on_the_same_data_dir_is_refused() {
    let data = DataDir::new();
    let server = Server::start(&data, &[]);
    // It would empty the running server's worker folders and upload spool at start.
    let second = std::process::Command::new(env!("CARGO_BIN_EXE_courier"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data.path())
        .env("COURIER_LOG", "warn")
        .output()
        .unwrap();
    assert!(!second.status.success());
    let said = String::from_utf8_lossy(&second.stderr);
    assert!(said.contains("in use by another courier process"), "{said}");
    assert_eq!(server.get("/healthz").await.status(), 200, "the first server is untouched");
    assert!(!server.workers("quick").is_empty(), "and keeps its workers");
    // Once it is gone, the data dir is free again.
    server.kill();
    let again = Server::start(&data, &[]);
    assert_eq!(again.get("/healthz").await.status(), 200);
}

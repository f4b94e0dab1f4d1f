//! Every user route wants a valid bearer token.

use serde_json::Value;
use types::{TokenKeys, UserId};

use crate::harness::{DataDir, Server, fixture, now};

async fn check_401(response: reqwest::Response, code: &str) {
    assert_eq!(response.status(), 401);
    assert_eq!(response.headers()["www-authenticate"], "Bearer");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], code, "{body}");
    assert!(body["error"]["message"].as_str().is_some_and(|m| !m.is_empty()));
}

#[tokio::test]
async fn missing_invalid_and_expired_tokens_get_401() {
    let data = DataDir::new();
    let server = Server::start(&data, &[]);
    let photo = fixture("rocket.jpg");

    let no_token = server.http.post(server.url("/v1/media")).header("content-type", "image/jpeg").body(photo.clone());
    check_401(no_token.send().await.unwrap(), "missing_token").await;
    check_401(server.upload("not-a-jwt", "image/jpeg", photo.clone()).await, "invalid_token").await;

    let alice: UserId = "alice".parse().unwrap();
    let expired = TokenKeys::new(&server.key("token-signing.key")).mint(&alice, now() - 7200, 60);
    check_401(server.upload(&expired, "image/jpeg", photo.clone()).await, "token_expired").await;

    let foreign = TokenKeys::new(&types::Secret::from_bytes([9; 32])).mint(&alice, now(), 3600);
    check_401(server.media(&foreign, "0190c0d4-0000-7000-8000-000000000000").await, "invalid_token").await;

    // Nothing was stored by any of them.
    assert!(server.files_under("blobs").is_empty());
    assert_eq!(server.count_rows("media").await, 0);
}

#[tokio::test]
async fn the_token_command_mints_what_serve_accepts() {
    let data = DataDir::new();
    let server = Server::start(&data, &[]);
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_courier"))
        .args(["token", "--user", "carol", "--data-dir"])
        .arg(data.path())
        .output()
        .unwrap();
    assert!(output.status.success());
    let token = String::from_utf8(output.stdout).unwrap();
    let response = server.upload(token.trim(), "image/jpeg", fixture("rocket.jpg")).await;
    assert_eq!(response.status(), 201);

    let health = server.get("/healthz").await;
    assert_eq!(health.status(), 200);
}

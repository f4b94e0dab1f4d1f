//! One user cannot take the upload slots, the job queue or the storage from the others, and every
//! limit is discoverable at `GET /v1/limits`.

use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::harness::{DataDir, Server, fixture};

/// Starts an upload of `len` bytes over a raw socket and sends only its first kilobyte.
async fn stalled_upload(server: &Server, token: &str, len: usize) -> TcpStream {
    let addr = server.base.strip_prefix("http://").unwrap();
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST /v1/media HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nContent-Type: image/jpeg\r\n\
         Content-Length: {len}\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(&fixture("rocket.jpg")[..1024]).await.unwrap();
    stream
}

/// The status line's code, if the server answered within `wait`.
async fn answer_within(stream: &mut TcpStream, wait: Duration) -> Option<u16> {
    let mut head = [0u8; 12];
    match tokio::time::timeout(wait, stream.read_exact(&mut head)).await {
        Ok(Ok(_)) => Some(std::str::from_utf8(&head[9..12]).unwrap().parse().unwrap()),
        _ => None,
    }
}

async fn limits(server: &Server, token: &str) -> Value {
    let response = server.http.get(server.url("/v1/limits")).bearer_auth(token).send().await.unwrap();
    assert_eq!(response.status(), 200);
    response.json().await.unwrap()
}

#[tokio::test]
async fn one_user_holding_64_stalled_uploads_does_not_stop_another() {
    let data = DataDir::new();
    // No minimum body rate: the stalled uploads stay as long as the test wants.
    let server = Server::start(&data, &[("COURIER_HTTP__MIN_BODY_RATE", "0")]);
    let mallory = server.token("mallory");
    let mut held = Vec::new();
    for _ in 0..64 {
        held.push(stalled_upload(&server, &mallory, 5_000_000).await);
    }
    let answers =
        futures_util::future::join_all(held.iter_mut().map(|s| answer_within(s, Duration::from_secs(6)))).await;
    let refused = answers.iter().filter(|a| **a == Some(429)).count();
    let pending = answers.iter().filter(|a| a.is_none()).count();
    assert_eq!((pending, refused), (4, 60), "{answers:?}");
    assert_eq!(limits(&server, &mallory).await["quota"]["uploads_at_once"]["used"], 4);

    // Alice's upload goes through while mallory's four hang.
    let ok = server.upload(&server.token("alice"), "image/jpeg", fixture("rocket.jpg")).await;
    assert_eq!(ok.status(), 201);
    drop(held);
}

#[tokio::test]
async fn bytes_per_day_and_stored_are_capped_and_shown() {
    let data = DataDir::new();
    let photo = fixture("rocket.jpg");
    let len = photo.len() as u64;
    let day = (2 * len + len / 2).to_string();
    let stored = (3 * len).to_string();
    let server = Server::start(
        &data,
        &[("COURIER_INGEST__QUOTA__BYTES_PER_DAY", &day), ("COURIER_INGEST__QUOTA__BYTES_STORED", &stored)],
    );
    let alice = server.token("alice");
    let shown = limits(&server, &alice).await;
    assert_eq!(shown["media"]["image"]["max_bytes"], 64 * 1024 * 1024);
    assert!(shown["media"]["video"]["max_duration_ms"].as_u64().unwrap() > 0);
    assert!(shown["media"]["audio"]["max_duration_ms"].as_u64().unwrap() > 0);
    assert_eq!(shown["quota"]["bytes_today"]["limit"], 2 * len + len / 2);

    let first = server.upload_ready(&alice, "image/jpeg", photo.clone()).await;
    assert_eq!(server.upload(&alice, "image/jpeg", photo.clone()).await.status(), 201);
    // A third would pass the day's bytes: 429 with a wait until midnight UTC.
    let third = server.upload(&alice, "image/jpeg", photo.clone()).await;
    assert_eq!(third.status(), 429);
    let retry: u64 = third.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=86_400).contains(&retry), "{retry}");
    let body: Value = third.json().await.unwrap();
    assert_eq!(body["error"]["code"], "quota_exceeded");
    let shown = limits(&server, &alice).await;
    assert_eq!(shown["quota"]["bytes_today"]["used"], 2 * len);
    // Stored: each upload's original (kept, in this harness) and the variants made of it.
    let made: u64 = ["standard", "thumb"].iter().map(|v| first["variants"][v]["bytes"].as_u64().unwrap()).sum();
    assert_eq!(shown["quota"]["bytes_stored"]["used"], 2 * (len + made));

    // Deleting frees storage but not the day's bytes.
    let id = first["id"].as_str().unwrap();
    assert_eq!(server.delete_media(&alice, id).await.status(), 204);
    let shown = limits(&server, &alice).await;
    assert_eq!(shown["quota"]["bytes_stored"]["used"], len + made);
    assert_eq!(shown["quota"]["bytes_today"]["used"], 2 * len);
    assert_eq!(server.upload(&alice, "image/jpeg", photo.clone()).await.status(), 429);

    // Another user has a day of their own.
    let bob = server.token("bob");
    assert_eq!(server.upload(&bob, "image/jpeg", photo.clone()).await.status(), 201);
    assert_eq!(limits(&server, &bob).await["quota"]["bytes_today"]["used"], len);
}

#[tokio::test]
async fn bytes_stored_over_the_quota_get_413() {
    let data = DataDir::new();
    let photo = fixture("rocket.jpg");
    let stored = (photo.len() as u64 + 10).to_string();
    let server = Server::start(&data, &[("COURIER_INGEST__QUOTA__BYTES_STORED", &stored)]);
    let alice = server.token("alice");
    assert_eq!(server.upload(&alice, "image/jpeg", photo.clone()).await.status(), 201);
    let over = server.upload(&alice, "image/jpeg", photo).await;
    assert_eq!(over.status(), 413);
    assert!(over.headers().get("retry-after").is_none());
    let body: Value = over.json().await.unwrap();
    assert_eq!(body["error"]["code"], "quota_exceeded");
}

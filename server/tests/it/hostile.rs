//! Bad uploads get the right status and leave nothing behind: no blob, no record, no temp file.

use bytes::Bytes;
use serde_json::Value;

use crate::harness::{DataDir, Server, fixture};

#[tokio::test]
async fn bad_uploads_are_refused_and_leave_nothing() {
    let data = DataDir::new();
    let server = Server::start(&data, &[]);

    server.refused("image/jpeg", fixture("truncated.jpg"), 422, "corrupt_media").await;
    server.refused("image/png", fixture("bomb.png"), 422, "too_many_pixels").await;
    server.refused("image/jpeg", fixture("png-named.jpg"), 415, "type_mismatch").await;
    server.refused("image/png", b"<html><script>alert(1)</script></html>".to_vec(), 415, "type_mismatch").await;
    server.refused("text/html", fixture("rocket.jpg"), 415, "unsupported_media_type").await;
    server.refused("image/avif", fixture("rocket.jpg"), 415, "unsupported_media_type").await;
    server.refused("image/jpeg", Vec::new(), 422, "empty_body").await;
    // A valid header followed by garbage: it sniffs as JPEG but does not decode.
    let mut garbage = fixture("rocket.jpg")[..600].to_vec();
    garbage.extend((0..50_000u32).map(|i| (i * 7919 % 253) as u8));
    server.refused("image/jpeg", garbage, 422, "corrupt_media").await;
    server.assert_nothing_left().await;

    // The same corrupt bytes again are refused straight away, and still nothing is kept.
    server.refused("image/jpeg", fixture("truncated.jpg"), 422, "corrupt_media").await;
    server.assert_nothing_left().await;

    let missing_type =
        server.http.post(server.url("/v1/media")).bearer_auth(server.token("x")).body(fixture("rocket.jpg"));
    assert_eq!(missing_type.send().await.unwrap().status(), 415);
}

#[tokio::test]
async fn bodies_over_the_limit_get_413_while_streaming() {
    let data = DataDir::new();
    let server = Server::start(&data, &[("COURIER_INGEST__MAX_UPLOAD_BYTES", "200000")]);
    let photo = fixture("rocket.jpg"); // 112 KB: under the limit
    let mut big = photo.clone();
    big.resize(300_000, 0);

    // With Content-Length the refusal comes before any of the body is read.
    server.refused("image/jpeg", big.clone(), 413, "payload_too_large").await;

    // Without one (chunked), it is noticed as the bytes pass the limit.
    let chunks: Vec<Result<Bytes, std::io::Error>> =
        big.chunks(16 * 1024).map(|c| Ok(Bytes::copy_from_slice(c))).collect();
    let stream = futures_util::stream::iter(chunks);
    server.refused("image/jpeg", reqwest::Body::wrap_stream(stream), 413, "payload_too_large").await;
    server.assert_nothing_left().await;

    let ok = server.upload(&server.token("alice"), "image/jpeg", photo).await;
    assert_eq!(ok.status(), 201);
}

#[tokio::test]
async fn a_full_queue_answers_503_with_retry_after() {
    let data = DataDir::new();
    // An API-only node: jobs queue up and nothing works them off.
    let server = Server::start(
        &data,
        &[
            ("COURIER_TRANSCODE__RUN_JOBS", "false"),
            ("COURIER_INGEST__MAX_QUEUED_JOBS", "1"),
            ("COURIER_INGEST__WAIT_FOR_READY_MS", "0"),
        ],
    );
    let token = server.token("alice");
    let first = server.upload(&token, "image/jpeg", fixture("rocket.jpg")).await;
    assert_eq!(first.status(), 201);
    let first: Value = first.json().await.unwrap();
    assert_eq!(first["status"], "processing");

    let second = server.upload(&token, "image/png", fixture("alpha.png")).await;
    assert_eq!(second.status(), 503);
    assert_eq!(second.headers()["retry-after"], "5");
    let body: Value = second.json().await.unwrap();
    assert_eq!(body["error"]["code"], "queue_full");
    assert_eq!(server.files_under("blobs/originals").len(), 1);
    assert_eq!(server.count_rows("media").await, 1);
}

/// A tmpfs of `bytes`, unmounted when dropped. Mounting needs root, which CI has.
struct SmallDisk(tempfile::TempDir);

impl SmallDisk {
    fn new(bytes: u64) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mounted = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .unwrap();
        assert!(mounted.success(), "mounting a small tmpfs needs root");
        Self(dir)
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(self.0.path()).status();
    }
}

/// `photo` made distinct by a comment segment after its start-of-image marker.
fn distinct_jpeg(photo: &[u8], n: u16) -> Vec<u8> {
    let mut bytes = photo[..2].to_vec();
    bytes.extend([0xFF, 0xFE, 0x00, 0x04]);
    bytes.extend(n.to_be_bytes());
    bytes.extend(&photo[2..]);
    bytes
}

#[tokio::test]
async fn a_full_disk_answers_507_and_messaging_still_reads() {
    let disk = SmallDisk::new(600 * 1024);
    let data = DataDir::new();
    let blobs = disk.0.path().display().to_string();
    let server = Server::start_with(&data, "127.0.0.1:0", &["--blobs", &blobs], &[]);
    let device = server
        .http
        .post(server.url("/v1/devices"))
        .bearer_auth(server.token("alice"))
        .json(&serde_json::json!({"name": "phone"}))
        .send()
        .await
        .unwrap();
    let device: Value = device.json().await.unwrap();
    let device_token = device["access_token"].as_str().unwrap().to_owned();

    let (photo, token) = (fixture("rocket.jpg"), server.token("alice"));
    let mut full = None;
    for n in 0..40 {
        let response = server.upload(&token, "image/jpeg", distinct_jpeg(&photo, n)).await;
        if response.status() == 507 {
            full = Some(response);
            break;
        }
        assert_eq!(response.status(), 201, "{}", response.text().await.unwrap());
    }
    let full = full.expect("the disk never filled");
    let body: Value = full.json().await.unwrap();
    assert_eq!(body["error"]["code"], "storage_full", "{body}");
    assert!(server.files_under("tmp").is_empty(), "a temp file was left behind");

    // Messaging still answers.
    let conversations =
        server.http.get(server.url("/v1/conversations")).bearer_auth(&device_token).send().await.unwrap();
    assert_eq!(conversations.status(), 200);
}

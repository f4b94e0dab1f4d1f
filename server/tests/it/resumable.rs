//! Resumable uploads over tus 1.0.0: every status the protocol names, a restart between two
//! PATCHes, a wrong type refused at the first PATCH, termination and expiry.

use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use reqwest::{Method, RequestBuilder, Response};
use serde_json::Value;
use sha2::Digest;

use crate::harness::{DataDir, Server, fixture};

const OCTETS: &str = "application/offset+octet-stream";

fn tus(server: &Server, method: Method, path: &str, token: &str) -> RequestBuilder {
    server.http.request(method, server.url(path)).bearer_auth(token).header("Tus-Resumable", "1.0.0")
}

fn header<'a>(response: &'a Response, name: &str) -> &'a str {
    response.headers().get(name).and_then(|v| v.to_str().ok()).unwrap_or_default()
}

/// Creates an upload of `length` bytes of `filetype`; its path.
async fn create(server: &Server, token: &str, filetype: &str, length: usize) -> String {
    let metadata = format!("filename {},filetype {}", STANDARD.encode("photo.jpg"), STANDARD.encode(filetype));
    let response = tus(server, Method::POST, "/v1/uploads", token)
        .header("Upload-Length", length.to_string())
        .header("Upload-Metadata", metadata)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    assert_eq!(header(&response, "tus-resumable"), "1.0.0");
    assert_eq!(header(&response, "upload-offset"), "0");
    assert!(!header(&response, "upload-expires").is_empty());
    let location = header(&response, "location").to_owned();
    assert!(location.starts_with("/v1/uploads/"), "{location}");
    location
}

async fn patch(server: &Server, token: &str, path: &str, offset: usize, bytes: &[u8]) -> Response {
    patch_with(server, token, path, offset, bytes, &[]).await
}

/// A PATCH with `extra` headers besides the protocol's.
async fn patch_with(
    server: &Server,
    token: &str,
    path: &str,
    offset: usize,
    bytes: &[u8],
    extra: &[(&str, &str)],
) -> Response {
    let mut request = tus(server, Method::PATCH, path, token)
        .header("Content-Type", OCTETS)
        .header("Upload-Offset", offset.to_string());
    for (name, value) in extra {
        request = request.header(*name, *value);
    }
    request.body(bytes.to_vec()).send().await.unwrap()
}

async fn offset_of(server: &Server, token: &str, path: &str) -> (u16, String) {
    let response = tus(server, Method::HEAD, path, token).send().await.unwrap();
    (response.status().as_u16(), header(&response, "upload-offset").to_owned())
}

async fn error_code(response: Response) -> String {
    let body: Value = response.json().await.unwrap_or(Value::Null);
    body["error"]["code"].as_str().unwrap_or_default().to_owned()
}

#[tokio::test]
async fn a_photo_uploaded_in_parts_becomes_media_and_every_misstep_gets_its_status() {
    let data = DataDir::new();
    let server = Server::start(&data, &[]);
    let (alice, bob) = (server.token("alice"), server.token("bob"));
    let photo = fixture("rocket.jpg");
    let half = photo.len() / 2;

    let options = server.http.request(Method::OPTIONS, server.url("/v1/uploads")).bearer_auth(&alice).send().await;
    let options = options.unwrap();
    assert_eq!(options.status(), 204);
    assert_eq!(header(&options, "tus-version"), "1.0.0");
    assert!(header(&options, "tus-extension").contains("creation-with-upload"));
    assert!(header(&options, "tus-extension").contains("checksum"));
    assert_eq!(header(&options, "tus-checksum-algorithm"), "sha1,sha256");
    assert!(header(&options, "tus-max-size").parse::<u64>().unwrap() >= photo.len() as u64);

    let path = create(&server, &alice, "image/jpeg", photo.len()).await;
    let head = tus(&server, Method::HEAD, &path, &alice).send().await.unwrap();
    assert_eq!((head.status().as_u16(), header(&head, "upload-offset")), (200, "0"));
    assert_eq!(header(&head, "upload-length"), photo.len().to_string());
    assert_eq!(header(&head, "cache-control"), "no-store");
    assert!(header(&head, "upload-metadata").contains("filetype"));
    // Someone else's upload does not exist for them.
    assert_eq!(offset_of(&server, &bob, &path).await.0, 404);
    assert_eq!(patch(&server, &bob, &path, 0, &photo[..half]).await.status(), 404);

    let first = patch(&server, &alice, &path, 0, &photo[..half]).await;
    assert_eq!((first.status().as_u16(), header(&first, "upload-offset")), (204, half.to_string().as_str()));
    // From the wrong offset: 409, and nothing moves.
    let wrong = patch(&server, &alice, &path, 0, &photo[..10]).await;
    assert_eq!(wrong.status(), 409);
    assert_eq!(error_code(wrong).await, "offset_mismatch");
    // Without the protocol version: 412 with the version spoken.
    let unversioned = server
        .http
        .patch(server.url(&path))
        .bearer_auth(&alice)
        .header("Content-Type", OCTETS)
        .header("Upload-Offset", half.to_string())
        .body(photo[half..].to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!((unversioned.status().as_u16(), header(&unversioned, "tus-version")), (412, "1.0.0"));
    // Another body type: 415.
    let typed = tus(&server, Method::PATCH, &path, &alice)
        .header("Content-Type", "image/jpeg")
        .header("Upload-Offset", half.to_string())
        .body(photo[half..].to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(typed.status(), 415);
    // A checksum that does not match: 460, and the bytes are discarded.
    let wrong_sum = STANDARD.encode(sha2::Sha256::digest(b"something else"));
    let checksum = format!("sha256 {wrong_sum}");
    let mismatched = patch_with(&server, &alice, &path, half, &photo[half..], &[("Upload-Checksum", &checksum)]).await;
    assert_eq!(mismatched.status().as_u16(), 460);
    assert_eq!(error_code(mismatched).await, "checksum_mismatch");
    assert_eq!(offset_of(&server, &alice, &path).await, (200, half.to_string()));
    // An algorithm the server does not speak: 400.
    let md5 = patch_with(&server, &alice, &path, half, &photo[half..], &[("Upload-Checksum", "md5 AAAA")]).await;
    assert_eq!(md5.status(), 400);

    // The rest, with its checksum: the upload is the media, ready.
    let sum = STANDARD.encode(sha2::Sha256::digest(&photo[half..]));
    let checksum = format!("sha256 {sum}");
    let last = patch_with(&server, &alice, &path, half, &photo[half..], &[("Upload-Checksum", &checksum)]).await;
    assert_eq!(last.status(), 204);
    assert_eq!(header(&last, "upload-offset"), photo.len().to_string());
    assert_eq!(header(&last, "courier-media-status"), "ready");
    let id = path.trim_start_matches("/v1/uploads/");
    let media: Value = server.media(&alice, id).await.json().await.unwrap();
    assert_eq!(media["status"], "ready", "{media}");
    assert_eq!(media["blob"].as_str().unwrap(), types::BlobId::of(&photo).to_hex());
    assert!(!crate::harness::variant_bytes(&server, &media, "thumb").await.is_empty());
    // The same last request again (its answer was lost): the same answer.
    let again = patch(&server, &alice, &path, photo.len(), b"").await;
    assert_eq!((again.status().as_u16(), header(&again, "courier-media-status")), (204, "ready"));
    // The parts are gone once the media exists.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !server.files_under("blobs/parts").is_empty() {
        assert!(Instant::now() < deadline, "the parts outlived their upload");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn an_upload_survives_a_restart_between_two_patches() {
    let data = DataDir::new();
    let server = Server::start(&data, &[]);
    let alice = server.token("alice");
    let photo = fixture("rocket.jpg");
    let half = photo.len() / 3;
    let path = create(&server, &alice, "image/jpeg", photo.len()).await;
    assert_eq!(patch(&server, &alice, &path, 0, &photo[..half]).await.status(), 204);
    server.kill();

    let server = Server::start(&data, &[]);
    assert_eq!(offset_of(&server, &alice, &path).await, (200, half.to_string()));
    let last = patch(&server, &alice, &path, half, &photo[half..]).await;
    assert_eq!((last.status().as_u16(), header(&last, "courier-media-status")), (204, "ready"));
    let media: Value = server.media(&alice, path.trim_start_matches("/v1/uploads/")).await.json().await.unwrap();
    assert_eq!(media["blob"].as_str().unwrap(), types::BlobId::of(&photo).to_hex());
}

#[tokio::test]
async fn creation_with_upload_a_deferred_length_a_wrong_type_termination_and_expiry() {
    let data = DataDir::new();
    let server = Server::start(
        &data,
        &[("COURIER_INGEST__RESUMABLE_EXPIRY_SECS", "2"), ("COURIER_INGEST__SWEEP_INTERVAL_MS", "100")],
    );
    let alice = server.token("alice");
    let photo = fixture("rocket.jpg");
    let metadata = |filetype: &str| format!("filetype {}", STANDARD.encode(filetype));

    // Creation with the first bytes and no length yet; the length comes with the last PATCH.
    let created = tus(&server, Method::POST, "/v1/uploads", &alice)
        .header("Upload-Defer-Length", "1")
        .header("Upload-Metadata", metadata("image/jpeg"))
        .header("Content-Type", OCTETS)
        .body(photo[..1000].to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!((created.status().as_u16(), header(&created, "upload-offset")), (201, "1000"));
    let path = header(&created, "location").to_owned();
    let head = tus(&server, Method::HEAD, &path, &alice).send().await.unwrap();
    assert_eq!(header(&head, "upload-defer-length"), "1");
    let length = photo.len().to_string();
    let last = patch_with(&server, &alice, &path, 1000, &photo[1000..], &[("Upload-Length", &length)]).await;
    assert_eq!((last.status().as_u16(), header(&last, "courier-media-status")), (204, "ready"));

    // Bytes of another type than the upload named fail at the first PATCH, and the upload ends.
    let png = create(&server, &alice, "image/png", photo.len()).await;
    let refused = patch(&server, &alice, &png, 0, &photo[..4096]).await;
    assert_eq!(refused.status(), 415);
    assert_eq!(error_code(refused).await, "type_mismatch");
    assert_eq!(offset_of(&server, &alice, &png).await.0, 404);
    // No filetype, or an unknown one: 415 at creation; no length: 400; over the limit: 413.
    let post = |metadata: Option<String>, length: Option<&str>| {
        let mut request = tus(&server, Method::POST, "/v1/uploads", &alice);
        if let Some(metadata) = metadata {
            request = request.header("Upload-Metadata", metadata);
        }
        if let Some(length) = length {
            request = request.header("Upload-Length", length);
        }
        async move { request.send().await.unwrap().status().as_u16() }
    };
    assert_eq!(post(None, Some("100")).await, 415);
    assert_eq!(post(Some(metadata("text/html")), Some("100")).await, 415);
    assert_eq!(post(Some(metadata("image/jpeg")), None).await, 400);
    assert_eq!(post(Some(metadata("image/jpeg")), Some("999999999999")).await, 413);

    // Termination: 204, then the upload and its bytes are gone.
    let ended = create(&server, &alice, "image/jpeg", photo.len()).await;
    assert_eq!(patch(&server, &alice, &ended, 0, &photo[..2000]).await.status(), 204);
    assert_eq!(tus(&server, Method::DELETE, &ended, &alice).send().await.unwrap().status(), 204);
    assert_eq!(offset_of(&server, &alice, &ended).await.0, 404);

    // Abandoned: expired after its two seconds, with its bytes.
    let abandoned = create(&server, &alice, "image/jpeg", photo.len()).await;
    assert_eq!(patch(&server, &alice, &abandoned, 0, &photo[..2000]).await.status(), 204);
    assert!(!server.files_under("blobs/parts").is_empty());
    let deadline = Instant::now() + Duration::from_secs(20);
    while offset_of(&server, &alice, &abandoned).await.0 != 404 || !server.files_under("blobs/parts").is_empty() {
        assert!(Instant::now() < deadline, "the abandoned upload never expired");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_patch_cut_off_mid_body_keeps_what_arrived_and_the_upload_resumes_from_there() {
    use tokio::io::AsyncWriteExt;
    let data = DataDir::new();
    let server = Server::start(&data, &[]);
    let alice = server.token("alice");
    let photo = fixture("rocket.jpg");
    let path = create(&server, &alice, "image/jpeg", photo.len()).await;

    // A phone on a train: the request says the whole photo, sends 40 KiB of it, and the network goes.
    let sent = 40 * 1024;
    let address = server.base.trim_start_matches("http://").to_owned();
    let mut socket = tokio::net::TcpStream::connect(&address).await.unwrap();
    let head = format!(
        "PATCH {path} HTTP/1.1\r\nHost: {address}\r\nAuthorization: Bearer {alice}\r\nTus-Resumable: 1.0.0\r\n\
         Content-Type: {OCTETS}\r\nUpload-Offset: 0\r\nContent-Length: {}\r\n\r\n",
        photo.len()
    );
    socket.write_all(head.as_bytes()).await.unwrap();
    socket.write_all(&photo[..sent]).await.unwrap();
    socket.flush().await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(socket);

    // The upload stands where the bytes stopped, at once free for the next request.
    let deadline = Instant::now() + Duration::from_secs(10);
    let offset = loop {
        let (status, offset) = offset_of(&server, &alice, &path).await;
        assert_eq!(status, 200);
        if offset != "0" {
            break offset.parse::<usize>().unwrap();
        }
        assert!(Instant::now() < deadline, "what arrived was not kept");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(offset, sent);
    let last = patch(&server, &alice, &path, offset, &photo[offset..]).await;
    assert_eq!((last.status().as_u16(), header(&last, "courier-media-status")), (204, "ready"));
    let media: Value = server.media(&alice, path.trim_start_matches("/v1/uploads/")).await.json().await.unwrap();
    assert_eq!(media["blob"].as_str().unwrap(), types::BlobId::of(&photo).to_hex());
}

/// A TCP proxy to `upstream` that cuts the first connection to carry more than `cut_after` bytes
/// from its client, as a network drop would; every other connection passes. Says whether it cut.
async fn flaky_proxy(upstream: String, cut_after: usize) -> (String, std::sync::Arc<std::sync::atomic::AtomicBool>) {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let cut = Arc::new(AtomicBool::new(false));
    let cut_flag = cut.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let (upstream, cut) = (upstream.clone(), cut_flag.clone());
            tokio::spawn(async move {
                let Ok(server) = tokio::net::TcpStream::connect(&upstream).await else { return };
                let (mut client_read, mut client_write) = client.into_split();
                let (mut server_read, mut server_write) = server.into_split();
                let up = async {
                    let mut buf = vec![0u8; 16 * 1024];
                    let mut sent = 0;
                    loop {
                        let n = client_read.read(&mut buf).await?;
                        if n == 0 {
                            return Ok::<_, std::io::Error>(());
                        }
                        server_write.write_all(&buf[..n]).await?;
                        sent += n;
                        if sent > cut_after && !cut.swap(true, Ordering::SeqCst) {
                            // Both connections close when this task's halves drop.
                            return Ok(());
                        }
                    }
                };
                let down = tokio::io::copy(&mut server_read, &mut client_write);
                tokio::select! {
                    _ = up => {}
                    _ = down => {}
                }
            });
        }
    });
    (format!("http://{address}"), cut)
}

#[tokio::test]
async fn tus_js_client_resumes_an_upload_its_network_cut_mid_way() {
    let data = DataDir::new();
    let server = Server::start(&data, &[]);
    let alice = server.token("alice");
    let photo = fixture("rocket.jpg");
    let (proxy, cut) = flaky_proxy(server.base.trim_start_matches("http://").to_owned(), photo.len() / 2).await;

    let js = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/js");
    assert!(js.join("node_modules/tus-js-client").is_dir(), "tus-js-client is not installed: run `make test`");
    let file = data.path().join("photo.jpg");
    std::fs::write(&file, &photo).unwrap();
    let run = tokio::process::Command::new("node")
        .arg(js.join("tus_upload.js"))
        .arg(format!("{proxy}/v1/uploads"))
        .arg(&alice)
        .arg(&file)
        .arg("image/jpeg")
        .output();
    let output = tokio::time::timeout(Duration::from_secs(60), run).await.expect("the client hung").unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}{}", String::from_utf8_lossy(&output.stderr));
    assert!(cut.load(std::sync::atomic::Ordering::SeqCst), "the proxy never cut the upload");

    let answer: Value = serde_json::from_str(stdout.trim()).unwrap();
    let id = answer["url"].as_str().unwrap().rsplit('/').next().unwrap().to_owned();
    let media: Value = server.media(&alice, &id).await.json().await.unwrap();
    assert_eq!(media["blob"].as_str().unwrap(), types::BlobId::of(&photo).to_hex(), "{media}");
    assert_eq!(server.wait_done(&alice, &id).await["status"], "ready");
}

#[tokio::test]
async fn tiny_pieces_a_length_named_by_an_empty_last_patch_and_a_method_override() {
    let data = DataDir::new();
    let server = Server::start(&data, &[]);
    let (alice, bob) = (server.token("alice"), server.token("bob"));
    let photo = fixture("rocket.jpg");

    // Pieces smaller than the sniff reads: the first bytes are judged once there are enough.
    let created = tus(&server, Method::POST, "/v1/uploads", &alice)
        .header("Upload-Defer-Length", "1")
        .header("Upload-Metadata", format!("filetype {}", STANDARD.encode("image/jpeg")))
        .send()
        .await
        .unwrap();
    let path = header(&created, "location").to_owned();
    for (from, to) in [(0, 10), (10, 20), (20, 40)] {
        let piece = patch(&server, &alice, &path, from, &photo[from..to]).await;
        assert_eq!((piece.status().as_u16(), header(&piece, "upload-offset")), (204, to.to_string().as_str()));
    }
    // Through a proxy that passes only POST: the method comes in X-HTTP-Method-Override.
    let overridden = tus(&server, Method::POST, &path, &alice)
        .header("X-HTTP-Method-Override", "PATCH")
        .header("Content-Type", OCTETS)
        .header("Upload-Offset", "40")
        .body(photo[40..].to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(overridden.status(), 204);
    assert_eq!(header(&overridden, "upload-offset"), photo.len().to_string());
    assert_eq!(header(&overridden, "courier-media-status"), "", "the length is not named yet");
    // Someone else cannot end it.
    assert_eq!(tus(&server, Method::DELETE, &path, &bob).send().await.unwrap().status(), 404);
    // The length, named by a request with no bytes (a stream that ended on a chunk's edge), ends it.
    let length = photo.len().to_string();
    let last = patch_with(&server, &alice, &path, photo.len(), b"", &[("Upload-Length", &length)]).await;
    assert_eq!((last.status().as_u16(), header(&last, "courier-media-status")), (204, "ready"));
    let media: Value = server.media(&alice, path.trim_start_matches("/v1/uploads/")).await.json().await.unwrap();
    assert_eq!(media["blob"].as_str().unwrap(), types::BlobId::of(&photo).to_hex());

    // Tiny pieces of another type are refused as soon as there are enough of them.
    let png = create(&server, &alice, "image/png", photo.len()).await;
    assert_eq!(patch(&server, &alice, &png, 0, &photo[..8]).await.status(), 204);
    assert_eq!(patch(&server, &alice, &png, 8, &photo[8..64]).await.status(), 415);
    assert_eq!(offset_of(&server, &alice, &png).await.0, 404);
}

/// A draft append of `bytes` at `offset`, completing the upload or not.
async fn draft_append(
    server: &Server,
    token: &str,
    path: &str,
    complete: bool,
    offset: impl ToString,
    bytes: Vec<u8>,
) -> Response {
    draft(server, Method::PATCH, path, token)
        .header("Upload-Complete", if complete { "?1" } else { "?0" })
        .header("Upload-Offset", offset.to_string())
        .header("Content-Type", "application/partial-upload")
        .body(bytes)
        .send()
        .await
        .unwrap()
}

/// The IETF draft's requests (draft-ietf-httpbis-resumable-upload, interop version 9).
fn draft(server: &Server, method: Method, path: &str, token: &str) -> RequestBuilder {
    server.http.request(method, server.url(path)).bearer_auth(token).header("Upload-Draft-Interop-Version", "9")
}

#[tokio::test]
async fn the_ietf_draft_creates_resumes_and_completes_an_upload_on_the_same_resources() {
    let data = DataDir::new();
    let server = Server::start(&data, &[]);
    let alice = server.token("alice");
    let photo = fixture("rocket.jpg");
    let third = photo.len() / 3;

    // Creation with the first third, not complete: 201 with where the rest goes.
    let created = draft(&server, Method::POST, "/v1/uploads", &alice)
        .header("Upload-Complete", "?0")
        .header("Upload-Length", photo.len().to_string())
        .header("Content-Type", "image/jpeg")
        .body(photo[..third].to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    assert_eq!(header(&created, "upload-complete"), "?0");
    assert_eq!(header(&created, "upload-offset"), third.to_string());
    assert!(header(&created, "upload-limit").contains("max-size="));
    let path = header(&created, "location").to_owned();

    // Offset retrieval: 204, incomplete, never cached.
    let head = draft(&server, Method::HEAD, &path, &alice).send().await.unwrap();
    assert_eq!(head.status(), 204);
    assert_eq!((header(&head, "upload-offset"), header(&head, "upload-complete")), (third.to_string().as_str(), "?0"));
    assert_eq!(header(&head, "cache-control"), "no-store");

    // An append from the wrong offset: 409 saying where the upload stands.
    let wrong = draft_append(&server, &alice, &path, false, "0", photo[..10].to_vec()).await;
    assert_eq!(wrong.status(), 409);
    assert_eq!(
        (header(&wrong, "upload-offset"), header(&wrong, "upload-complete")),
        (third.to_string().as_str(), "?0")
    );

    // The second third, then the rest with Upload-Complete: ?1, whose answer is the media.
    let second = draft_append(&server, &alice, &path, false, third.to_string(), photo[third..2 * third].to_vec()).await;
    assert_eq!((second.status().as_u16(), header(&second, "upload-complete")), (204, "?0"));
    let last = draft_append(&server, &alice, &path, true, 2 * third, photo[2 * third..].to_vec()).await;
    assert_eq!((last.status().as_u16(), header(&last, "upload-complete")), (200, "?1"));
    let media: Value = last.json().await.unwrap();
    assert_eq!(media["status"], "ready", "{media}");
    assert_eq!(media["blob"].as_str().unwrap(), types::BlobId::of(&photo).to_hex());
    assert_eq!(media["id"].as_str().unwrap(), path.trim_start_matches("/v1/uploads/"));
    // Appending to the completed upload: 400.
    let after = draft_append(&server, &alice, &path, true, "0", photo[..10].to_vec()).await;
    assert_eq!(after.status(), 400);
    // Another interop version's fields mean other things: not taken for this one's.
    let older = server
        .http
        .post(server.url("/v1/uploads"))
        .bearer_auth(&alice)
        .header("Upload-Draft-Interop-Version", "5")
        .header("Upload-Complete", "?0")
        .header("Content-Type", "image/jpeg")
        .body(photo[..100].to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(older.status(), 412);

    // A whole photo in one creation with Upload-Complete: ?1 and no Upload-Length: the media at once.
    let whole = draft(&server, Method::POST, "/v1/uploads", &alice)
        .header("Upload-Complete", "?1")
        .header("Content-Type", "image/jpeg")
        .body(photo.clone())
        .send()
        .await
        .unwrap();
    assert_eq!((whole.status().as_u16(), header(&whole, "upload-complete")), (201, "?1"));
    assert!(header(&whole, "location").starts_with("/v1/uploads/"));
    let media: Value = whole.json().await.unwrap();
    assert_eq!(media["status"], "ready", "{media}");

    // Cancellation.
    let cancelled = draft(&server, Method::POST, "/v1/uploads", &alice)
        .header("Upload-Complete", "?0")
        .header("Content-Type", "image/jpeg")
        .body(photo[..100].to_vec())
        .send()
        .await
        .unwrap();
    let path = header(&cancelled, "location").to_owned();
    assert_eq!(draft(&server, Method::DELETE, &path, &alice).send().await.unwrap().status(), 204);
    assert_eq!(draft(&server, Method::HEAD, &path, &alice).send().await.unwrap().status(), 404);
}

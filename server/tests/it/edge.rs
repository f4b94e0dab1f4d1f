//! `courier edge`: real processes — origin ← shield edge ← edge — with tiers read from Cache-Status.

use std::path::Path;

use futures_util::StreamExt;
use serde_json::Value;
use types::BlobId;

use crate::harness::{DataDir, Edge, Server, files_in, fixture, metric, now};

/// Blobs over this size skip the memory tier, so the test photos' variants exercise the disk tier.
const NO_MEMORY: (&str, &str) = ("COURIER_EDGE_MEMORY_MAX_OBJECT_BYTES", "1000");

async fn photo(origin: &Server, name: &str, mime: &str) -> Value {
    let media = origin.upload_ready(&origin.token("alice"), mime, fixture(name)).await;
    assert_eq!(media["status"], "ready", "{media}");
    media
}

fn url_of(media: &Value, variant: &str) -> String {
    media["variants"][variant]["url"].as_str().unwrap().to_owned()
}

fn blob_of(media: &Value, variant: &str) -> BlobId {
    media["variants"][variant]["blob"].as_str().unwrap().parse().unwrap()
}

/// GETs `url` at `edge`; checks the bytes against `blob` and returns the Cache-Status.
async fn fetch(edge: &Edge, url: &str, blob: &BlobId) -> String {
    let response = edge.get(url).await;
    assert_eq!(response.status(), 200, "{url}");
    let status = response.headers()["cache-status"].to_str().unwrap().to_owned();
    assert_eq!(response.headers()["etag"], format!("\"{blob}\"").as_str());
    assert_eq!(response.headers()["cache-control"], "public, max-age=31536000, immutable");
    let bytes = response.bytes().await.unwrap();
    assert!(blob.matches(&bytes), "edge served bytes that are not the blob");
    status
}

fn disk_bytes(dir: &Path) -> u64 {
    files_in(&dir.join("blobs")).iter().map(|f| std::fs::metadata(f).unwrap().len()).sum()
}

#[tokio::test]
async fn tiers_fill_from_a_shield_and_keep_serving_without_the_origin() {
    let data = DataDir::new();
    let origin = Server::start(&data, &[]);
    let media = photo(&origin, "rocket.jpg", "image/jpeg").await;
    let (shield_dir, edge_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let shield = Edge::start(&origin, &[&origin.base], shield_dir.path(), &[]);
    let edge = Edge::start(&origin, &[&shield.base], edge_dir.path(), &[NO_MEMORY]);
    let (url, blob) = (url_of(&media, "standard"), blob_of(&media, "standard"));

    assert_eq!(fetch(&edge, &url, &blob).await, "courier-edge; fwd=miss; stored");
    assert_eq!(fetch(&edge, &url, &blob).await, "courier-edge; hit; detail=disk");
    // The edge's miss filled the shield, which keeps small blobs in memory.
    assert_eq!(fetch(&shield, &url, &blob).await, "courier-edge; hit; detail=memory");

    // With the origin and the shield gone, what the edge holds is still served; the rest is 502.
    origin.kill();
    shield.kill();
    assert_eq!(fetch(&edge, &url, &blob).await, "courier-edge; hit; detail=disk");
    let thumb = edge.get(&url_of(&media, "thumb")).await;
    assert_eq!(thumb.status(), 502);
    assert_eq!(thumb.headers()["cache-status"], "courier-edge; fwd=miss");
    let body: Value = thumb.json().await.unwrap();
    assert_eq!(body["error"]["code"], "upstream_error");
}

#[tokio::test]
async fn a_thousand_concurrent_cold_requests_make_one_upstream_fetch() {
    let data = DataDir::new();
    let origin = Server::start(&data, &[]);
    let media = photo(&origin, "phone-rotated-gps.jpg", "image/jpeg").await;
    let cache = tempfile::tempdir().unwrap();
    // A thousand clients, all from 127.0.0.1: no per-address cap.
    let edge =
        Edge::start(&origin, &[&origin.base], cache.path(), &[("COURIER_EDGE_HTTP__MAX_CONNECTIONS_PER_ADDRESS", "0")]);
    let (url, blob) = (url_of(&media, "standard"), blob_of(&media, "standard"));
    let before = metric(&origin.http, &origin.base, "courier_blob_requests_total{status=\"200\"}").await;

    let requests = (0..1000).map(|_| {
        let (http, url) = (edge.http.clone(), edge.url(&url));
        async move {
            let response = http.get(url).send().await.unwrap();
            assert_eq!(response.status(), 200);
            response.bytes().await.unwrap()
        }
    });
    let bodies: Vec<_> = futures_util::stream::iter(requests).buffer_unordered(1000).collect().await;
    assert_eq!(bodies.len(), 1000);
    assert!(bodies.iter().all(|b| blob.matches(b)));

    let after = metric(&origin.http, &origin.base, "courier_blob_requests_total{status=\"200\"}").await;
    assert_eq!(after - before, 1.0, "the origin saw {} fetches", after - before);
    assert_eq!(metric(&edge.http, &edge.base, "courier_blob_upstream_requests_total").await, 1.0);
}

#[tokio::test]
async fn a_corrupted_blob_is_never_cached_nor_served_in_full() {
    let data = DataDir::new();
    let origin = Server::start(&data, &[]);
    let media = photo(&origin, "phone-rotated-gps.jpg", "image/jpeg").await;
    let blob = blob_of(&media, "standard");
    // Damage the stored variant in the origin's blob folder, which this edge reads directly.
    let hex = blob.to_hex();
    let stored = data.path().join("blobs/variants").join(&hex[..2]).join(&hex);
    let mut bytes = std::fs::read(&stored).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x55;
    std::fs::write(&stored, &bytes).unwrap();

    let upstream = format!("file://{}", data.path().join("blobs").display());

    // Small blobs are verified before the answer: a clean 502, twice (nothing was kept).
    let cache = tempfile::tempdir().unwrap();
    let edge = Edge::start(&origin, &[&upstream], cache.path(), &[]);
    for _ in 0..2 {
        let response = edge.get(&url_of(&media, "standard")).await;
        assert_eq!(response.status(), 502);
        assert_eq!(response.headers()["cache-status"], "courier-edge; fwd=miss");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["code"], "verify_failed");
    }
    assert_eq!(disk_bytes(cache.path()), 0, "a corrupt fill was kept");
    assert_eq!(metric(&edge.http, &edge.base, "courier_blob_verify_failures_total").await, 2.0);
    // The intact thumb from the same folder is served and kept.
    assert_eq!(
        fetch(&edge, &url_of(&media, "thumb"), &blob_of(&media, "thumb")).await,
        "courier-edge; fwd=miss; stored"
    );

    // Large blobs stream while they download; the last chunk waits for the hash, so the body stops short.
    let cache = tempfile::tempdir().unwrap();
    let edge = Edge::start(&origin, &[&upstream], cache.path(), &[NO_MEMORY]);
    let mut received = 0;
    let mut complete = false;
    if let Ok(response) = edge.http.get(edge.url(&url_of(&media, "standard"))).send().await {
        let mut stream = response.bytes_stream();
        complete = true;
        while let Some(chunk) = stream.next().await {
            match chunk {
                Ok(c) => received += c.len(),
                Err(_) => {
                    complete = false;
                    break;
                }
            }
        }
    }
    assert!(!complete || received < bytes.len(), "a corrupt blob was served in full");
    assert_eq!(disk_bytes(cache.path()), 0, "a corrupt fill was kept");
    assert_eq!(metric(&edge.http, &edge.base, "courier_blob_verify_failures_total").await, 1.0);
}

#[tokio::test]
async fn the_disk_tier_stays_under_its_bound_and_survives_a_restart() {
    let data = DataDir::new();
    let origin = Server::start(&data, &[]);
    let mut variants = Vec::new();
    for (name, mime) in [
        ("rocket.jpg", "image/jpeg"),
        ("alpha.png", "image/png"),
        ("coffee.webp", "image/webp"),
        ("cmyk.jpg", "image/jpeg"),
    ] {
        let media = photo(&origin, name, mime).await;
        for v in ["standard", "thumb"] {
            variants.push((url_of(&media, v), blob_of(&media, v), media["variants"][v]["bytes"].as_u64().unwrap()));
        }
    }
    let total: u64 = variants.iter().map(|v| v.2).sum();
    let bound = total / 2;
    let cache = tempfile::tempdir().unwrap();
    let upstream = format!("file://{}", data.path().join("blobs").display());
    let bound_env = bound.to_string();
    let env = [NO_MEMORY, ("COURIER_EDGE_DISK_BYTES", bound_env.as_str())];
    let edge = Edge::start(&origin, &[&upstream], cache.path(), &env);
    for (url, blob, _) in &variants {
        fetch(&edge, url, blob).await;
    }
    let on_disk = disk_bytes(cache.path());
    assert!(on_disk <= bound, "{on_disk} bytes on disk, bound {bound}");
    assert!(on_disk > 0);
    assert!(metric(&edge.http, &edge.base, "courier_blob_evictions_total").await >= 1.0);
    assert_eq!(metric(&edge.http, &edge.base, "courier_blob_tier_bytes{tier=\"disk\"}").await, on_disk as f64);
    edge.kill();

    // Restarted with an upstream that has nothing: whatever was on disk is still served from disk.
    let empty = tempfile::tempdir().unwrap();
    let nowhere = format!("file://{}", empty.path().display());
    let edge = Edge::start(&origin, &[&nowhere], cache.path(), &env);
    let mut hits = 0;
    for (url, blob, _) in &variants {
        let response = edge.get(url).await;
        if response.status() == 200 {
            assert_eq!(response.headers()["cache-status"], "courier-edge; hit; detail=disk");
            assert!(blob.matches(&response.bytes().await.unwrap()));
            hits += 1;
        } else {
            assert_eq!(response.status(), 404);
        }
    }
    assert!(hits > 0, "nothing survived the restart");
}

#[tokio::test]
async fn ranges_conditionals_and_purge_at_the_edge() {
    let data = DataDir::new();
    let origin = Server::start(&data, &[]);
    let media = photo(&origin, "rocket.jpg", "image/jpeg").await;
    let cache = tempfile::tempdir().unwrap();
    let edge =
        Edge::start(&origin, &[&origin.base], cache.path(), &[("COURIER_EDGE_ADMIN_TOKEN", "let-me-purge-this-edge")]);
    let (url, blob) = (url_of(&media, "standard"), blob_of(&media, "standard"));
    let len = media["variants"]["standard"]["bytes"].as_u64().unwrap();
    let full = origin.get(&url).await.bytes().await.unwrap();

    // A range on a cold blob is answered from the fill.
    let ranged = edge.http.get(edge.url(&url)).header("range", "bytes=100-199").send().await.unwrap();
    assert_eq!(ranged.status(), 206);
    assert_eq!(ranged.headers()["content-range"], format!("bytes 100-199/{len}").as_str());
    assert_eq!(ranged.headers()["cache-status"], "courier-edge; fwd=miss; stored");
    assert_eq!(ranged.bytes().await.unwrap(), full[100..200]);
    let tail = edge.http.get(edge.url(&url)).header("range", "bytes=-10").send().await.unwrap();
    assert_eq!(tail.status(), 206);
    assert_eq!(tail.bytes().await.unwrap(), full[full.len() - 10..]);
    let unsatisfiable = edge.http.get(edge.url(&url)).header("range", format!("bytes={len}-")).send().await.unwrap();
    assert_eq!(unsatisfiable.status(), 416);

    let etag = format!("\"{blob}\"");
    let cached = edge.http.get(edge.url(&url)).header("if-none-match", &etag).send().await.unwrap();
    assert_eq!(cached.status(), 304);
    assert_eq!(cached.headers()["cache-status"], "courier-edge; hit; detail=memory");
    let head = edge.http.head(edge.url(&url)).send().await.unwrap();
    assert_eq!(head.headers()["content-length"], len.to_string().as_str());
    // Only the two ranges sent blob bytes: 100 + 10.
    assert_eq!(metric(&edge.http, &edge.base, "courier_blob_served_bytes_total").await, 110.0);

    // Signatures are checked at the edge, with no call to the origin.
    let forged = edge.get(&format!("/b/{blob}?exp={}&sig=AAAA", now() + 60)).await;
    assert_eq!(forged.status(), 403);
    assert!(forged.headers()["cache-status"].to_str().unwrap().starts_with("courier-edge"));
    let doubled = edge.get(&format!("{url}&sig=AAAA")).await;
    assert_eq!(doubled.status(), 403, "a URL with two signatures is served");
    let body: Value = doubled.json().await.unwrap();
    assert_eq!(body["error"]["code"], "forbidden");
    // Blob reads skip the router on an edge; everything else still goes through it.
    let hit = edge.get(&url).await;
    assert!(!hit.headers()["x-request-id"].is_empty());
    let (path, query) = url.split_once('?').unwrap();
    let deeper = edge.get(&format!("{path}/more?{query}")).await;
    assert_eq!(deeper.status(), 404);
    assert_eq!(deeper.json::<Value>().await.unwrap()["error"]["code"], "not_found");
    let posted = edge.http.post(edge.url(&url)).send().await.unwrap();
    assert_eq!(posted.status(), 405);

    let purge =
        |token: &'static str| edge.http.delete(edge.url(&format!("/admin/blobs/{blob}"))).bearer_auth(token).send();
    assert_eq!(purge("wrong").await.unwrap().status(), 401);
    let no_scheme =
        edge.http.delete(edge.url(&format!("/admin/blobs/{blob}"))).header("authorization", "let-me-purge-this-edge");
    assert_eq!(no_scheme.send().await.unwrap().status(), 401);
    // The scheme is case-insensitive (RFC 9110); some clients send it in lower case.
    let lower = edge
        .http
        .delete(edge.url(&format!("/admin/blobs/{blob}")))
        .header("authorization", "bearer let-me-purge-this-edge");
    assert_eq!(lower.send().await.unwrap().status(), 204);
    assert_eq!(purge("let-me-purge-this-edge").await.unwrap().status(), 204, "purging what is gone is not an error");
    assert_eq!(disk_bytes(cache.path()), 0);
    assert_eq!(fetch(&edge, &url, &blob).await, "courier-edge; fwd=miss; stored");

    assert_eq!(edge.get("/healthz").await.status(), 200);
    let status = edge.terminate();
    assert!(status.success(), "the edge exited with {status} on SIGTERM");
}

#[tokio::test]
async fn https_with_http2_and_connection_limits() {
    let data = DataDir::new();
    let origin = Server::start(&data, &[]);
    let media = photo(&origin, "rocket.jpg", "image/jpeg").await;
    let (url, blob) = (url_of(&media, "thumb"), blob_of(&media, "thumb"));

    // A self-signed certificate made here for localhost.
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let tls = tempfile::tempdir().unwrap();
    let (cert, key) = (tls.path().join("cert.pem"), tls.path().join("key.pem"));
    std::fs::write(&cert, certified.cert.pem()).unwrap();
    std::fs::write(&key, certified.key_pair.serialize_pem()).unwrap();
    let cache = tempfile::tempdir().unwrap();
    let env = [
        ("COURIER_EDGE_TLS_CERT", cert.to_str().unwrap()),
        ("COURIER_EDGE_TLS_KEY", key.to_str().unwrap()),
        ("COURIER_EDGE_HTTP__HEADER_READ_TIMEOUT_SECS", "1"),
        ("COURIER_EDGE_HTTP__MAX_REQUESTS_PER_CONNECTION", "2"),
    ];
    let edge = Edge::start(&origin, &[&origin.base], cache.path(), &env);
    let port = edge.base.rsplit(':').next().unwrap().to_owned();
    assert!(edge.base.starts_with("https://"));

    let root = reqwest::Certificate::from_pem(certified.cert.pem().as_bytes()).unwrap();
    let h2 = reqwest::Client::builder().use_rustls_tls().add_root_certificate(root.clone()).build().unwrap();
    let response = h2.get(format!("https://localhost:{port}{url}")).send().await.unwrap();
    assert_eq!(response.version(), reqwest::Version::HTTP_2, "ALPN did not pick HTTP/2");
    assert_eq!(response.status(), 200);
    assert!(blob.matches(&response.bytes().await.unwrap()));

    // HTTP/1.1 over TLS: the second request on a connection is told it is the last.
    let h1 = reqwest::Client::builder().use_rustls_tls().add_root_certificate(root).http1_only().build().unwrap();
    let health = format!("https://localhost:{port}/healthz");
    let first = h1.get(&health).send().await.unwrap();
    assert_eq!(first.version(), reqwest::Version::HTTP_11);
    assert!(first.headers().get("connection").is_none());
    first.bytes().await.unwrap();
    let second = h1.get(&health).send().await.unwrap();
    assert_eq!(second.headers()["connection"], "close");

    // An edge below it reaches it over HTTPS, trusting its certificate.
    let child_cache = tempfile::tempdir().unwrap();
    let https_upstream = format!("https://localhost:{port}");
    let child_env = [("COURIER_EDGE_UPSTREAM_CA", cert.to_str().unwrap())];
    let child = Edge::start(&origin, &[&https_upstream], child_cache.path(), &child_env);
    assert_eq!(
        fetch(&child, &url_of(&media, "standard"), &blob_of(&media, "standard")).await,
        "courier-edge; fwd=miss; stored"
    );

    // A client that never finishes its TLS handshake is dropped after the header timeout.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut slow = tokio::net::TcpStream::connect(format!("127.0.0.1:{port}")).await.unwrap();
    slow.write_all(b"\x16\x03\x01").await.unwrap();
    let mut buf = [0u8; 64];
    let closed = tokio::time::timeout(std::time::Duration::from_secs(10), async {
        loop {
            match slow.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "a stalled handshake kept its connection");
}

#[tokio::test]
async fn slow_or_oversized_request_heads_are_cut_off() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let data = DataDir::new();
    let origin = Server::start(&data, &[]);
    let cache = tempfile::tempdir().unwrap();
    let edge =
        Edge::start(&origin, &[&origin.base], cache.path(), &[("COURIER_EDGE_HTTP__HEADER_READ_TIMEOUT_SECS", "1")]);
    let addr = edge.base.trim_start_matches("http://").to_owned();

    // Slowloris: half a request head, then nothing.
    let mut slow = tokio::net::TcpStream::connect(&addr).await.unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n").await.unwrap();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(std::time::Duration::from_secs(10), slow.read_to_end(&mut answer)).await;
    assert!(read.is_ok(), "a slow request head kept its connection");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.is_empty() || answer.starts_with("HTTP/1.1 408"), "{answer}");

    // A request head over the limit.
    let mut big = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let mut head = b"GET /healthz HTTP/1.1\r\nHost: x\r\n".to_vec();
    for i in 0..2000 {
        head.extend_from_slice(format!("X-Filler-{i}: {}\r\n", "a".repeat(60)).as_bytes());
    }
    head.extend_from_slice(b"\r\n");
    let _ = big.write_all(&head).await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(std::time::Duration::from_secs(10), big.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.is_empty() || answer.starts_with("HTTP/1.1 431"), "{answer}");
}

#[tokio::test]
async fn an_upstream_that_never_answers_gives_504() {
    let data = DataDir::new();
    let origin = Server::start(&data, &[]);
    let media = photo(&origin, "rocket.jpg", "image/jpeg").await;
    // Accepts connections and says nothing.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_url = format!("http://{}", silent.local_addr().unwrap());
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = silent.accept().await {
            held.push(socket);
        }
    });
    let cache = tempfile::tempdir().unwrap();
    let edge = Edge::start(&origin, &[&silent_url], cache.path(), &[("COURIER_EDGE_UPSTREAM_TIMEOUT_SECS", "1")]);
    let response = edge.get(&url_of(&media, "thumb")).await;
    assert_eq!(response.status(), 504);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "upstream_timeout");

    // With the origin as a fallback after the silent one, the blob arrives.
    let cache = tempfile::tempdir().unwrap();
    let env = [("COURIER_EDGE_UPSTREAM_TIMEOUT_SECS", "1")];
    let edge = Edge::start(&origin, &[&silent_url, &origin.base], cache.path(), &env);
    assert_eq!(
        fetch(&edge, &url_of(&media, "thumb"), &blob_of(&media, "thumb")).await,
        "courier-edge; fwd=miss; stored"
    );
}

#[tokio::test]
async fn a_large_fill_reaches_the_client_before_the_upstream_has_sent_it_all() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // A blob of our own and an upstream that sends half of it, then waits to be told to go on.
    let body: Vec<u8> = (0..400_000u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    let blob = BlobId::of(&body);
    let upstream = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream_url = format!("http://{}", upstream.local_addr().unwrap());
    let (go_on, wait) = tokio::sync::oneshot::channel::<()>();
    let served = body.clone();
    tokio::spawn(async move {
        let (mut socket, _) = upstream.accept().await.unwrap();
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            socket.read_exact(&mut byte).await.unwrap();
            head.push(byte[0]);
        }
        let half = served.len() / 2;
        let header = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", served.len());
        socket.write_all(header.as_bytes()).await.unwrap();
        for piece in served[..half].chunks(8192) {
            socket.write_all(piece).await.unwrap();
        }
        socket.flush().await.unwrap();
        let _ = wait.await;
        socket.write_all(&served[half..]).await.unwrap();
        socket.flush().await.unwrap();
        // Hold the connection open until the edge is done with it.
        let _ = socket.read(&mut byte).await;
    });

    let keys = tempfile::tempdir().unwrap();
    let key = types::Secret::from_bytes([5; 32]);
    std::fs::write(keys.path().join("url.key"), key.to_hex()).unwrap();
    let cache = tempfile::tempdir().unwrap();
    let edge = Edge::start_with_key(&keys.path().join("url.key"), &[&upstream_url], cache.path(), &[NO_MEMORY]);
    let path = types::UrlSigner::new(&key).path(&blob, now() + 600);

    let response = edge.get(&path).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-length"], body.len().to_string().as_str());
    let mut stream = response.bytes_stream();
    let mut received = Vec::new();
    // Bytes arrive while the upstream still holds back the second half.
    while received.is_empty() {
        let chunk = tokio::time::timeout(std::time::Duration::from_secs(20), stream.next())
            .await
            .expect("no byte reached the client before the fill completed")
            .unwrap()
            .unwrap();
        received.extend_from_slice(&chunk);
    }
    assert!(received.len() <= body.len() / 2, "more bytes arrived than the upstream had sent");
    go_on.send(()).unwrap();
    while let Some(chunk) = stream.next().await {
        received.extend_from_slice(&chunk.unwrap());
    }
    assert!(received == body, "the streamed body differs from the blob");
    // And it was kept: the next request is a disk hit.
    let again = edge.get(&path).await;
    assert_eq!(again.headers()["cache-status"], "courier-edge; hit; detail=disk");
}

/// Services often start with a soft limit of 1,024 open files; kept-open disk files and connections
/// share it. The edge raises its soft limit to the hard one and keeps serving disk hits.
#[tokio::test]
async fn an_edge_started_with_few_file_descriptors_raises_its_limit() {
    let data = DataDir::new();
    let origin = Server::start(&data, &[]);
    let media = photo(&origin, "rocket.jpg", "image/jpeg").await;
    let cache = tempfile::tempdir().unwrap();
    let key = origin.data.join("url-signing.key");
    let edge = Edge::start_via(&["prlimit", "--nofile=64:"], &key, &[&origin.base], cache.path(), &[NO_MEMORY]);
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", edge.pid())).unwrap();
    let line = limits.lines().find(|l| l.starts_with("Max open files")).unwrap();
    let fields: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(fields[3], fields[4], "the soft limit was not raised: {line}");

    let (url, blob) = (url_of(&media, "standard"), blob_of(&media, "standard"));
    assert_eq!(fetch(&edge, &url, &blob).await, "courier-edge; fwd=miss; stored");
    assert_eq!(fetch(&edge, &url, &blob).await, "courier-edge; hit; detail=disk");
}

#[test]
fn an_edge_will_not_start_with_an_empty_or_short_purge_token() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("url.key");
    std::fs::write(&key, "ab".repeat(32)).unwrap();
    for token in ["", "   ", "\t", "short-token"] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_courier"))
            .args(["edge", "--listen", "127.0.0.1:0", "--upstream", "http://127.0.0.1:9"])
            .arg("--cache-dir")
            .arg(dir.path().join("cache"))
            .arg("--url-key")
            .arg(&key)
            .env("COURIER_EDGE_ADMIN_TOKEN", token)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "started with the purge token {token:?}");
        assert!(stderr.contains("admin_token must be at least 16 characters"), "{token:?}: {stderr}");
    }
}

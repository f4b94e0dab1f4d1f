//! What a client that stops talking can hold: nothing for long. Raw sockets, because an HTTP
//! client library would finish the requests these tests leave half-sent.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use crate::harness::{DataDir, Server, fixture, metric, now};

/// The socket address a server listens on.
fn addr(server: &Server) -> std::net::SocketAddr {
    server.base.strip_prefix("http://").unwrap().parse().unwrap()
}

/// Reads and discards until the server closes the connection (EOF or reset), or `limit` passes.
/// Returns how long it took and the bytes read, or `None` if it was still open.
async fn until_closed(stream: &mut TcpStream, limit: Duration) -> Option<(Duration, usize)> {
    let started = Instant::now();
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0;
    loop {
        match tokio::time::timeout_at((started + limit).into(), stream.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some((started.elapsed(), total)),
            Ok(Ok(n)) => total += n,
        }
    }
}

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// One HTTP/2 frame.
fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut frame = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    frame.extend(stream.to_be_bytes());
    frame.extend(payload);
    frame
}

const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const ACK: u8 = 0x1;

/// HEADERS for `GET /healthz` on `stream`, HPACK-coded from the static table and literals.
fn get_healthz(stream: u32) -> Vec<u8> {
    let mut block = vec![0x82, 0x86, 0x04, 8]; // :method GET, :scheme http, :path (literal, 8 bytes)
    block.extend(b"/healthz");
    block.extend([0x01, 9]); // :authority (literal, 9 bytes)
    block.extend(b"127.0.0.1");
    frame(HEADERS, 0x4 | 0x1, stream, &block) // END_HEADERS | END_STREAM
}

/// Reads one frame: its type, flags, stream and payload; `None` at EOF or reset.
async fn read_frame(stream: &mut TcpStream) -> Option<(u8, u8, u32, Vec<u8>)> {
    let mut head = [0u8; 9];
    stream.read_exact(&mut head).await.ok()?;
    let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
    let id = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
    let mut payload = vec![0u8; len];
    stream.read_exact(&mut payload).await.ok()?;
    Some((head[3], head[4], id, payload))
}

#[tokio::test]
async fn connections_that_send_no_request_are_closed_after_the_header_deadline() {
    let data = DataDir::new();
    let server = Server::start(&data, &[("COURIER_HTTP__HEADER_READ_TIMEOUT_SECS", "2")]);
    let mut held = Vec::new();
    for i in 0..30 {
        let mut stream = TcpStream::connect(addr(&server)).await.unwrap();
        match i % 4 {
            0 => {}                                                                        // nothing at all
            1 => stream.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n").await.unwrap(), // half a request
            2 => stream.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap(),                   // half the preface
            _ => {
                // The whole HTTP/2 preface and settings, then no stream ever.
                stream.write_all(PREFACE).await.unwrap();
                stream.write_all(&frame(SETTINGS, 0, 0, &[])).await.unwrap();
            }
        }
        held.push(stream);
    }
    // A client that behaves is served meanwhile.
    assert_eq!(server.get("/healthz").await.status(), 200);
    for (i, stream) in held.iter_mut().enumerate() {
        let closed = until_closed(stream, Duration::from_secs(20)).await;
        assert!(closed.is_some(), "connection {i} (kind {}) still open after 20 s", i % 4);
    }
    // hyper's own header timer may close the half HTTP/1 requests first; the other 22 are ours.
    // (A fresh client: the pooled one's connection went quiet for as long as the deadline.)
    let http = reqwest::Client::new();
    let cut = metric(&http, &server.base, "courier_http_connections_cut_total{reason=\"first_request\"}").await;
    assert!(cut >= 22.0, "{cut}");
}

#[tokio::test]
async fn idle_connections_are_closed_though_they_answer_pings() {
    let data = DataDir::new();
    let server = Server::start(
        &data,
        &[("COURIER_HTTP__IDLE_TIMEOUT_SECS", "3"), ("COURIER_HTTP__KEEP_ALIVE_INTERVAL_SECS", "1")],
    );

    // HTTP/1.1 keep-alive: one request, then silence.
    let mut h1 = TcpStream::connect(addr(&server)).await.unwrap();
    h1.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let mut answer = [0u8; 12];
    h1.read_exact(&mut answer).await.unwrap();
    assert_eq!(&answer, b"HTTP/1.1 200");

    // HTTP/2: one request, then only acknowledgements of what the server sends.
    let mut h2 = TcpStream::connect(addr(&server)).await.unwrap();
    h2.write_all(PREFACE).await.unwrap();
    h2.write_all(&frame(SETTINGS, 0, 0, &[])).await.unwrap();
    h2.write_all(&get_healthz(1)).await.unwrap();
    let started = Instant::now();
    let (mut pings, mut goaway, mut answered) = (0, false, false);
    while started.elapsed() < Duration::from_secs(20) {
        let Ok(Some((kind, flags, stream, payload))) =
            tokio::time::timeout(Duration::from_secs(20), read_frame(&mut h2)).await
        else {
            break;
        };
        match kind {
            SETTINGS if flags & ACK == 0 => h2.write_all(&frame(SETTINGS, ACK, 0, &[])).await.unwrap(),
            PING if flags & ACK == 0 => {
                pings += 1;
                h2.write_all(&frame(PING, ACK, 0, &payload)).await.unwrap();
            }
            GOAWAY => goaway = true,
            HEADERS if stream == 1 => answered = true,
            _ => {}
        }
    }
    assert!(answered, "the request on stream 1 was not answered");
    assert!(pings >= 1, "the server sent no keep-alive PING to a quiet peer");
    assert!(goaway, "an idle HTTP/2 connection was not sent GOAWAY");
    assert!(started.elapsed() < Duration::from_secs(20), "the idle HTTP/2 connection was never closed");
    assert!(until_closed(&mut h1, Duration::from_secs(20)).await.is_some(), "the idle HTTP/1.1 connection was kept");
    assert!(metric(&server.http, &server.base, "courier_http_connections_cut_total{reason=\"idle\"}").await >= 2.0);
}

#[tokio::test]
async fn a_trickled_upload_is_cut_with_408_and_frees_its_slot() {
    let data = DataDir::new();
    let server = Server::start(
        &data,
        &[
            ("COURIER_HTTP__MIN_BODY_RATE", "20000"),
            ("COURIER_HTTP__BODY_RATE_WINDOW_SECS", "1"),
            ("COURIER_INGEST__MAX_CONCURRENT_UPLOADS", "1"),
        ],
    );
    let photo = fixture("rocket.jpg");
    let token = server.token("mallory");
    let mut stream = TcpStream::connect(addr(&server)).await.unwrap();
    let head = format!(
        "POST /v1/media HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nContent-Type: image/jpeg\r\n\
         Content-Length: {}\r\n\r\n",
        photo.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(&photo[..4096]).await.unwrap();
    // Then a byte a second: far below 20,000 bytes a second.
    let mut answer = Vec::new();
    let (mut reader, mut writer) = stream.into_split();
    let trickle = async {
        for byte in &photo[4096..4196] {
            if writer.write_all(&[*byte]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(1000)).await;
        }
    };
    let read = async {
        let _ = tokio::time::timeout(Duration::from_secs(30), reader.read_to_end(&mut answer)).await;
    };
    tokio::select! { _ = trickle => {}, _ = read => {} }
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("\"code\":\"request_timeout\""), "{answer}");
    assert_eq!(
        metric(&server.http, &server.base, "courier_http_connections_cut_total{reason=\"slow_body\"}").await,
        1.0
    );
    server.assert_nothing_left().await;

    // The one upload slot is free again.
    let ok = server.upload(&server.token("alice"), "image/jpeg", photo).await;
    assert_eq!(ok.status(), 201);
}

#[tokio::test]
async fn a_response_the_client_stops_reading_is_cut() {
    let data = DataDir::new();
    let server = Server::start(&data, &[("COURIER_HTTP__STALLED_WRITE_TIMEOUT_SECS", "2")]);
    // A 32 MiB blob, far more than the socket buffers on both sides hold.
    let bytes: Vec<u8> = (0..32u32 << 20).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect();
    let blob = types::BlobId::of(&bytes);
    let hex = blob.to_hex();
    let dir = data.path().join("blobs/variants").join(&hex[..2]);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(&hex), &bytes).unwrap();
    let path = server.signer().path(&blob, now() + 600);

    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stream = socket.connect(addr(&server)).await.unwrap();
    stream.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes()).await.unwrap();
    // Nothing is read for 8 s: the server's writes stall.
    tokio::time::sleep(Duration::from_secs(8)).await;
    let (_, read) = until_closed(&mut stream, Duration::from_secs(20)).await.expect("the stalled response was kept");
    assert!(read < bytes.len(), "the whole blob was sent to a client that was not reading");
    let cut = metric(&server.http, &server.base, "courier_http_connections_cut_total{reason=\"stalled_write\"}").await;
    assert_eq!(cut, 1.0);
}

/// A socket to `server` from a chosen loopback address.
async fn connect_from(server: &Server, source: &str) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(format!("{source}:0").parse().unwrap()).unwrap();
    socket.connect(addr(server)).await.unwrap()
}

#[tokio::test]
async fn connections_over_the_caps_are_closed_at_accept() {
    let data = DataDir::new();
    let server = Server::start(
        &data,
        &[
            ("COURIER_HTTP__MAX_CONNECTIONS", "6"),
            ("COURIER_HTTP__MAX_CONNECTIONS_PER_ADDRESS", "4"),
            ("COURIER_HTTP__HEADER_READ_TIMEOUT_SECS", "60"),
        ],
    );
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(connect_from(&server, "127.0.0.2").await);
    }
    // A fifth from the same address is closed at once.
    let mut fifth = connect_from(&server, "127.0.0.2").await;
    assert!(until_closed(&mut fifth, Duration::from_secs(2)).await.is_some(), "a fifth connection was kept");
    // Another address still gets in, up to the total.
    for _ in 0..2 {
        held.push(connect_from(&server, "127.0.0.3").await);
    }
    let mut seventh = connect_from(&server, "127.0.0.4").await;
    assert!(until_closed(&mut seventh, Duration::from_secs(2)).await.is_some(), "a seventh connection was kept");
    // Held connections are open; one let go makes room.
    let mut first = held.remove(0);
    first.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.unwrap();
    let mut answer = String::new();
    first.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    drop(first);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let http = reqwest::Client::new();
    let page = http.get(server.url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(page.contains("courier_http_connections_refused_total{reason=\"per_address\"} 1"), "{page}");
    assert!(page.contains("courier_http_connections_refused_total{reason=\"total\"} 1"), "{page}");
}

#[tokio::test]
async fn a_rapid_reset_burst_gets_goaway_and_others_are_served() {
    let data = DataDir::new();
    let server = Server::start(&data, &[]);
    let mut h2 = TcpStream::connect(addr(&server)).await.unwrap();
    let mut burst = PREFACE.to_vec();
    burst.extend(frame(SETTINGS, 0, 0, &[]));
    for i in 0..5_000u32 {
        let stream = 2 * i + 1;
        burst.extend(get_healthz(stream));
        burst.extend(frame(RST_STREAM, 0, stream, &8u32.to_be_bytes())); // CANCEL
    }
    let writer = async {
        let _ = h2.write_all(&burst).await;
    };
    let _ = tokio::time::timeout(Duration::from_secs(10), writer).await;
    let mut goaway = None;
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_secs(20), read_frame(&mut h2)).await {
            Ok(Some((GOAWAY, _, _, payload))) => {
                goaway = Some(u32::from_be_bytes(payload[4..8].try_into().unwrap()));
                break;
            }
            Ok(Some(_)) => {}
            _ => break,
        }
    }
    assert_eq!(goaway, Some(0xb), "no GOAWAY ENHANCE_YOUR_CALM after 5,000 streams reset at once");
    assert_eq!(server.get("/healthz").await.status(), 200);
}

#[tokio::test]
async fn metrics_can_have_a_listener_of_their_own() {
    let data = DataDir::new();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let metrics_listen = format!("127.0.0.1:{port}");
    let server = Server::start(&data, &[("COURIER_HTTP__METRICS_LISTEN", &metrics_listen)]);
    assert_eq!(server.get("/metrics").await.status(), 404, "/metrics still answered beside the API");
    let page = reqwest::get(format!("http://{metrics_listen}/metrics")).await.unwrap().text().await.unwrap();
    assert!(page.contains("courier_http_connections_open"), "{page}");
    assert!(page.contains("courier_blob_requests"), "{page}");
    assert!(page.ends_with("# EOF\n") && page.matches("# EOF").count() == 1, "{page}");
}

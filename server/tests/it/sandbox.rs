//! No byte of an upload is parsed in the server: hostile files end a sandboxed worker, never
//! `courier serve`, and the parent trusts nothing a worker reports.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::avmedia::ffmpeg;
use crate::harness::{DataDir, Server, fixture};

/// `bytes` with the u32 at `offset` bytes after the first `tag` set to 0xFFFFFFFF.
fn bomb(bytes: &[u8], tag: &[u8], nth: usize, offset: usize) -> Vec<u8> {
    let at = bytes.windows(tag.len()).enumerate().filter(|(_, w)| *w == tag).nth(nth).expect("tag present").0;
    let mut out = bytes.to_vec();
    out[at + offset..at + offset + 4].copy_from_slice(&[0xFF; 4]);
    out
}

/// The server still serves, and another user's photo goes through.
async fn still_serving(server: &Server) {
    assert_eq!(server.get("/healthz").await.status(), 200);
    let photo = server.upload_ready(&server.token("bob"), "image/jpeg", fixture("rocket.jpg")).await;
    assert_eq!(photo["status"], "ready", "{photo}");
}

/// Uploads `body`; it must be refused (4xx) or end `failed` with a code, never kill the server.
async fn refused_or_failed(server: &Server, mime: &str, body: Vec<u8>) -> String {
    let token = server.token("mallory");
    let response = server.upload(&token, mime, body).await;
    let status = response.status().as_u16();
    let body: Value = response.json().await.unwrap();
    let code = if status == 201 {
        let media = server.wait_done(&token, body["id"].as_str().unwrap()).await;
        assert_eq!(media["status"], "failed", "{media}");
        media["error"]["code"].as_str().unwrap().to_string()
    } else {
        assert!((400..500).contains(&status), "{status} {body}");
        body["error"]["code"].as_str().unwrap().to_string()
    };
    assert_eq!(server.get("/healthz").await.status(), 200, "the server died on {mime} ({code})");
    code
}

#[tokio::test]
async fn sample_table_and_cookie_bombs_end_a_worker_not_the_server() {
    let data = DataDir::new();
    let server = Server::start(&data, &[]);
    let m4a = ffmpeg("a.m4a", &["-f", "lavfi", "-i", "sine=duration=2", "-c:a", "aac"]);
    // Entry counts of the sample tables: after size, type and version/flags (stsz: and sample size).
    // The worker checks the tables against their boxes before symphonia sizes anything from them,
    // so each is a plain 422 `corrupt_media`, not a worker killed at its memory limit.
    for (tag, offset) in [(&b"stsc"[..], 8), (b"stsz", 12), (b"stts", 8), (b"stco", 8)] {
        let code = refused_or_failed(&server, "audio/mp4", bomb(&m4a, tag, 0, offset)).await;
        assert_eq!(code, "corrupt_media", "{}", String::from_utf8_lossy(tag));
    }
    // ALAC's magic cookie (the second `alac` box) with a frame length of 0xFFFFFFFF.
    let alac = ffmpeg("a.m4a", &["-f", "lavfi", "-i", "sine=duration=2", "-c:a", "alac"]);
    let code = refused_or_failed(&server, "audio/mp4", bomb(&alac, b"alac", 1, 8)).await;
    assert_eq!(code, "corrupt_media");
    still_serving(&server).await;
    assert_eq!(server.count_rows("media").await, 1, "only bob's photo is kept");
    assert_eq!(server.files_under("tmp").len(), 0, "a temp file was left behind");
}

#[tokio::test]
async fn scan_bombs_pixel_hogs_and_lying_videos_are_refused() {
    // Made before the server starts: they take longer than an idle connection is kept.
    let png = {
        let image = image::ImageBuffer::<image::Rgba<u16>, Vec<u16>>::new(8000, 8000);
        let mut out = std::io::Cursor::new(Vec::new());
        let encoder = image::codecs::png::PngEncoder::new_with_quality(
            &mut out,
            image::codecs::png::CompressionType::Fast,
            image::codecs::png::FilterType::NoFilter,
        );
        image::DynamicImage::ImageRgba16(image).write_with_encoder(encoder).unwrap();
        out.into_inner()
    };
    // A WebM whose header says 10 s and which holds 10 minutes.
    let long = ffmpeg(
        "long.webm",
        &["-f", "lavfi", "-i", "color=c=gray:size=64x64:rate=1:duration=600", "-c:v", "libvpx", "-b:v", "20k"],
    );
    // Matroska's Duration: element 0x4489, an 8-byte float, in milliseconds.
    let at = long.windows(3).position(|w| w == [0x44, 0x89, 0x88]).expect("a Duration element") + 3;
    let mut lying = long.clone();
    lying[at..at + 8].copy_from_slice(&10_000f64.to_be_bytes());
    let data = DataDir::new();
    let server = Server::start(&data, &[("COURIER_INGEST__VIDEO__LIMITS__MAX_DURATION_MS", "60000")]);

    // A JPEG with 10,000 scans: each would be a pass over every coefficient.
    let photo = fixture("rocket.jpg");
    let mut scans = photo[..photo.len() - 2].to_vec();
    for _ in 0..10_000 {
        scans.extend_from_slice(&[0xFF, 0xDA, 0x00, 0x08, 0x01, 0x01, 0x00, 0x00, 0x3F, 0x00, 0x00]);
    }
    scans.extend_from_slice(&[0xFF, 0xD9]);
    assert_eq!(refused_or_failed(&server, "image/jpeg", scans).await, "over_limit");

    // 8000×8000 16-bit RGBA: under the pixel limit, 512 MB decoded before any conversion.
    assert_eq!(refused_or_failed(&server, "image/png", png).await, "over_memory_budget");
    // The WebM that claims 10 s and holds 10 minutes stops at the limit of one.
    assert_eq!(refused_or_failed(&server, "video/webm", lying).await, "duration_over_limit");

    still_serving(&server).await;
    assert_eq!(server.count_rows("media").await, 1, "only bob's photo is kept");
}

#[tokio::test]
async fn workers_run_sandboxed_and_die_with_the_server() {
    let data = DataDir::new();
    let server = Server::start(&data, &[("COURIER_INGEST__WAIT_FOR_READY_MS", "0")]);
    let workers = server.children();
    assert!(!server.workers("quick").is_empty() && !server.workers("probe").is_empty(), "workers start warm");
    for pid in &workers {
        // A worker just started takes a moment to put up its sandbox, before it reads anything.
        let deadline = Instant::now() + Duration::from_secs(5);
        let status = loop {
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
            if status.contains("Seccomp:\t2") || Instant::now() > deadline {
                break status;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert!(status.contains("Seccomp:\t2"), "worker {pid} has no seccomp filter:\n{status}");
        assert!(status.contains("NoNewPrivs:\t1"), "worker {pid} may gain privileges");
    }

    // The same sandbox, entered by hand with a folder two levels under the data dir: the token key
    // is out of reach, and a socket kills the process.
    let dir = data.path().join("tmp/check");
    std::fs::create_dir_all(dir.join("out")).unwrap();
    let key = dir.join("../../token-signing.key");
    assert!(key.exists());
    let out = Command::new(env!("CARGO_BIN_EXE_courier"))
        .args(["sandbox-check", "--dir"])
        .arg(&dir)
        .arg("--open")
        .arg(&key)
        .arg("--socket")
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains(&format!("open {}: denied", key.display())), "{said}");
    assert!(said.contains("socket: trying") && !said.contains("let it through"), "{said}");
    // 31 is SIGSYS, what SECCOMP_RET_KILL_PROCESS delivers.
    assert_eq!(out.status.signal(), Some(31), "{said}");

    // A kill -9 of the server mid-video takes its worker down too.
    let token = server.token("alice");
    let video = ffmpeg(
        "v.mp4",
        &[
            "-f",
            "lavfi",
            "-i",
            "testsrc2=size=1920x1080:rate=30:duration=30",
            "-c:v",
            "libx264",
            "-preset",
            "ultrafast",
        ],
    );
    let created: Value = server.upload(&token, "video/mp4", video).await.json().await.unwrap();
    let id = created["id"].as_str().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let media: Value = server.media(&token, id).await.json().await.unwrap();
        if media["progress"].as_f64().is_some_and(|p| p > 0.0) {
            break;
        }
        assert!(Instant::now() < deadline, "no progress reported");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let running = server.workers("video");
    assert_eq!(running.len(), 1);
    let everyone: Vec<u32> = server.children();
    server.kill();
    let deadline = Instant::now() + Duration::from_secs(10);
    while everyone.iter().any(|pid| alive(*pid)) {
        assert!(Instant::now() < deadline, "workers outlived a killed server");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Whether `pid` is a live process (not gone, not a zombie).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|stat| stat.rsplit_once(')').is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z')))
}

#[tokio::test]
async fn what_a_lying_worker_reports_is_never_stored() {
    let data = DataDir::new();
    // A worker that names /etc/passwd, a path out of its folder, and a symlink to /etc/passwd.
    let fake = data.path().join("fake-worker.sh");
    std::fs::write(
        &fake,
        r#"#!/bin/sh
dir=""
while [ $# -gt 0 ]; do [ "$1" = "--dir" ] && dir="$2"; shift; done
while read -r line; do
  case "$line" in
    *probe_image*) echo '{"done":{"made":{"kind":"probed"},"peak_rss_bytes":0,"landlock":"full"}}' ;;
    *) ln -sf /etc/passwd "$dir/out/standard.jpg"
       echo '{"done":{"made":{"kind":"photo","width":1,"height":1,"standard":{"name":"standard.jpg"},"thumb":{"name":"../../../../etc/passwd"},"preview":{"name":"/etc/passwd"}},"peak_rss_bytes":0,"landlock":"full"}}' ;;
  esac
done
"#,
    )
    .unwrap();
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    let server = Server::start(&data, &[("COURIER_TRANSCODE__WORKER_PROGRAM", fake.to_str().unwrap())]);
    let code = refused_or_failed(&server, "image/jpeg", fixture("rocket.jpg")).await;
    assert_eq!(code, "transcoder_crashed");
    assert!(server.files_under("blobs/variants").is_empty(), "a lying worker's output was stored");
    let passwd = std::fs::read("/etc/passwd").unwrap();
    for file in server.files_under("blobs") {
        assert_ne!(std::fs::read(file).unwrap(), passwd);
    }
}

#[tokio::test]
async fn workers_can_run_as_an_unprivileged_user() {
    let data = DataDir::new();
    if !std::fs::read_to_string("/proc/self/status").unwrap().lines().any(|l| l.starts_with("Uid:\t0\t")) {
        eprintln!("not run: starting workers as `nobody` needs root (CI runs as root)");
        return;
    }
    // `nobody` is uid 65534 on Debian; the server resolves the name itself.
    let server = Server::start(&data, &[("COURIER_TRANSCODE__WORKER_USER", "nobody")]);
    let workers = server.children();
    assert!(!workers.is_empty());
    for pid in workers {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let uid = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
        assert_eq!(uid.split_whitespace().nth(1), Some("65534"), "worker {pid}: {uid}");
    }
    // Such workers can still read their input and write their outputs: a photo goes through.
    still_serving(&server).await;
}

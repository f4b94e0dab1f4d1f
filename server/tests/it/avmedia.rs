//! Voice notes and videos: every input family in, outputs checked with ffprobe; hostile files
//! refused; budgets, cancellation and the separate video lane.
//!
//! Inputs are made here with the ffmpeg CLI from its synthetic sources (tones and test patterns),
//! so no media file is committed but the one hostile MP4 no encoder would write.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::harness::{DataDir, Server, decode, fixture, variant_bytes};

/// Runs the ffmpeg CLI with `args` writing `name` in a temp folder; returns the file's bytes.
pub(crate) fn ffmpeg(name: &str, args: &[&str]) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join(name);
    let status = Command::new("ffmpeg")
        .args(["-v", "error", "-y", "-nostdin"])
        .args(args)
        .arg(&out)
        .status()
        .expect("ffmpeg (Debian package ffmpeg; `make deps` installs it)");
    assert!(status.success(), "ffmpeg {args:?} {name} failed");
    std::fs::read(out).unwrap()
}

/// A silent 1080p30 H.264 MP4 of `seconds`, quick to make and slow to transcode on two cores.
pub(crate) fn busy_video(name: &str, seconds: u32) -> Vec<u8> {
    let source = format!("testsrc2=size=1920x1080:rate=30:duration={seconds}");
    ffmpeg(name, &["-f", "lavfi", "-i", &source, "-c:v", "libx264", "-preset", "ultrafast"])
}

/// ffprobe's view of `bytes`: `format` and `streams`.
fn ffprobe(bytes: &[u8]) -> Value {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("probe");
    std::fs::write(&file, bytes).unwrap();
    ffprobe_file(&file)
}

fn ffprobe_file(file: &Path) -> Value {
    let out = Command::new("ffprobe")
        .args(["-v", "error", "-show_format", "-show_streams", "-of", "json"])
        .arg(file)
        .output()
        .expect("ffprobe");
    assert!(out.status.success(), "ffprobe: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn stream<'a>(probe: &'a Value, kind: &str) -> Option<&'a Value> {
    probe["streams"].as_array().unwrap().iter().find(|s| s["codec_type"] == kind)
}

fn seconds(v: &Value) -> f64 {
    v.as_str().and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("not a duration: {v}"))
}

fn rate(v: &Value) -> f64 {
    let (n, d) = v.as_str().unwrap().split_once('/').unwrap();
    n.parse::<f64>().unwrap() / d.parse::<f64>().unwrap()
}

/// A tone of `secs` seconds, stereo at 44.1 kHz, as ffmpeg lavfi arguments.
fn tone(secs: &str) -> Vec<String> {
    ["-f", "lavfi", "-i", &format!("sine=frequency=440:sample_rate=44100:duration={secs}"), "-ac", "2"]
        .map(String::from)
        .to_vec()
}

#[tokio::test]
async fn every_audio_family_becomes_an_opus_voice_note() {
    let data = DataDir::new();
    let server = Server::start(&data, &[]);
    let token = server.token("alice");
    let families: &[(&str, &str, &[&str])] = &[
        ("a.mp3", "audio/mpeg", &["-c:a", "libmp3lame", "-b:a", "128k"]),
        ("a.aac", "audio/aac", &["-c:a", "aac"]),
        ("a.m4a", "audio/mp4", &["-c:a", "aac"]),
        ("alac.m4a", "audio/x-m4a", &["-c:a", "alac"]),
        ("a.flac", "audio/flac", &[]),
        ("a.wav", "audio/wav", &[]),
        ("vorbis.ogg", "audio/ogg", &["-c:a", "libvorbis"]),
        ("opus.ogg", "audio/ogg", &["-c:a", "libopus"]),
        ("a.webm", "audio/webm", &["-c:a", "libopus"]),
    ];
    for (name, mime, codec) in families {
        let mut args = tone("2.5");
        args.extend(codec.iter().map(|s| s.to_string()));
        let input = ffmpeg(name, &args.iter().map(String::as_str).collect::<Vec<_>>());
        let media = server.upload_ready(&token, mime, input).await;
        assert_eq!(media["status"], "ready", "{name}: {media}");
        assert_eq!(media["kind"], "audio");
        let ms = media["duration_ms"].as_i64().unwrap();
        assert!((ms - 2500).abs() <= 50, "{name}: duration {ms} ms");
        let waveform: Vec<u64> = media["waveform"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
        assert_eq!(waveform.len(), 64);
        // A steady tone at ffmpeg's 1/8 amplitude: every bar alike and well above silence (but
        // the ends, where raw AAC has its encoder's priming and padding).
        assert!(waveform[1..63].iter().all(|&b| (120..=230).contains(&b)), "{name}: {waveform:?}");
        assert!(media.get("width").is_none() && media.get("preview").is_none(), "{media}");

        let variant = &media["variants"]["standard"];
        assert_eq!(variant["mime"], "audio/ogg; codecs=opus");
        let probe = ffprobe(&variant_bytes(&server, &media, "standard").await);
        assert_eq!(probe["format"]["format_name"], "ogg", "{name}");
        let audio = stream(&probe, "audio").unwrap();
        assert_eq!((audio["codec_name"].as_str(), audio["channels"].as_u64()), (Some("opus"), Some(1)), "{name}");
        assert_eq!(audio["sample_rate"], "48000");
        let secs = seconds(&probe["format"]["duration"]);
        assert!((secs - 2.5).abs() <= 0.05, "{name}: the Opus file lasts {secs} s");
        let kbps = variant["bytes"].as_f64().unwrap() * 8.0 / secs / 1000.0;
        assert!(kbps < 48.0, "{name}: {kbps} kb/s is no voice note");
    }
}

#[tokio::test]
async fn every_video_family_becomes_a_streamable_h264_mp4_with_a_poster() {
    let data = DataDir::new();
    let server = Server::start(&data, &[]);
    let token = server.token("alice");
    let pattern = |size: &str, fps: &str, secs: &str| {
        ["-f", "lavfi", "-i", &format!("testsrc2=size={size}:rate={fps}:duration={secs}")].map(String::from).to_vec()
    };
    let with_tone = |mut args: Vec<String>, secs: &str| {
        args.extend(
            ["-f", "lavfi", "-i", &format!("sine=frequency=300:sample_rate=48000:duration={secs}")].map(String::from),
        );
        args
    };
    struct Case {
        name: &'static str,
        mime: &'static str,
        args: Vec<String>,
        /// Upright size of the input, and of the output.
        size: (u64, u64),
        out: (u64, u64),
        audio: bool,
    }
    let case = |name, mime, args: Vec<String>, codec: &[&str], size, out, audio| {
        let mut args = args;
        args.extend(codec.iter().map(|s| s.to_string()));
        Case { name, mime, args, size, out, audio }
    };
    let cases = vec![
        case(
            "big.mp4",
            "video/mp4",
            with_tone(pattern("1920x1080", "60", "3"), "3"),
            &["-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p", "-c:a", "aac"],
            (1920, 1080),
            (1280, 720),
            true,
        ),
        case(
            "silent.mov",
            "video/quicktime",
            pattern("640x480", "25", "2"),
            &["-c:v", "libx264", "-preset", "ultrafast"],
            (640, 480),
            (640, 480),
            false,
        ),
        case(
            "vp9.webm",
            "video/webm",
            with_tone(pattern("854x480", "30", "2"), "2"),
            &["-c:v", "libvpx-vp9", "-deadline", "realtime", "-cpu-used", "8", "-c:a", "libopus"],
            (854, 480),
            (854, 480),
            true,
        ),
        case(
            "vp8.webm",
            "video/webm",
            pattern("320x240", "30", "2"),
            &["-c:v", "libvpx", "-deadline", "realtime"],
            (320, 240),
            (320, 240),
            false,
        ),
        // Odd sides become even, and 4:4:4 becomes 4:2:0.
        case(
            "odd.mp4",
            "video/mp4",
            pattern("320x240", "30", "2"),
            &["-vf", "scale=321:241", "-c:v", "libx264", "-pix_fmt", "yuv444p"],
            (321, 241),
            (320, 240),
            false,
        ),
        case(
            "mpeg4.mkv",
            "video/x-matroska",
            with_tone(pattern("320x240", "25", "2"), "2"),
            &["-c:v", "mpeg4", "-c:a", "libmp3lame"],
            (320, 240),
            (320, 240),
            true,
        ),
        case(
            "phone.3gp",
            "video/3gpp",
            with_tone(pattern("176x144", "15", "2"), "2"),
            &["-c:v", "h263", "-c:a", "aac", "-ar", "16000", "-ac", "1"],
            (176, 144),
            (176, 144),
            true,
        ),
        case(
            "hevc.mp4",
            "video/mp4",
            pattern("640x360", "30", "2"),
            &["-c:v", "libx265", "-preset", "ultrafast", "-x265-params", "log-level=error"],
            (640, 360),
            (640, 360),
            false,
        ),
        case(
            "av1.mkv",
            "video/x-matroska",
            pattern("160x90", "24", "1"),
            &["-c:v", "libaom-av1", "-cpu-used", "8", "-b:v", "100k"],
            (160, 90),
            (160, 90),
            false,
        ),
    ];
    for case in cases {
        let input = ffmpeg(case.name, &case.args.iter().map(String::as_str).collect::<Vec<_>>());
        let input_secs = seconds(&ffprobe(&input)["format"]["duration"]);
        check_video(&server, &token, case.name, case.mime, input, input_secs, case.size, case.out, case.audio).await;
    }

    // A phone video held upright: stored landscape, with a display matrix turning it a quarter.
    let stored = ffmpeg(
        "landscape.mp4",
        &["-f", "lavfi", "-i", "testsrc2=size=1280x720:rate=30:duration=2", "-c:v", "libx264", "-preset", "ultrafast"],
    );
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("in.mp4"), &stored).unwrap();
    let rotated = dir.path().join("rotated.mp4");
    let status = Command::new("ffmpeg")
        .args(["-v", "error", "-y", "-i"])
        .arg(dir.path().join("in.mp4"))
        .args(["-c", "copy", "-metadata:s:v:0", "rotate=90"])
        .arg(&rotated)
        .status()
        .unwrap();
    assert!(status.success());
    let media = check_video(
        &server,
        &token,
        "rotated.mp4",
        "video/mp4",
        std::fs::read(&rotated).unwrap(),
        2.0,
        (720, 1280),
        (720, 1280),
        false,
    )
    .await;
    // Turned the way a player turns it: the ffmpeg CLI's first frame and our poster agree.
    let reference = ffmpeg("frame.jpg", &["-i", rotated.to_str().unwrap(), "-frames:v", "1", "-q:v", "2"]);
    let reference = image::imageops::resize(&decode(&reference), 90, 160, image::imageops::FilterType::Triangle);
    let first = ffmpeg(
        "ours.jpg",
        &["-i", &server.url(media["variants"]["standard"]["url"].as_str().unwrap()), "-frames:v", "1", "-q:v", "2"],
    );
    let first = image::imageops::resize(&decode(&first), 90, 160, image::imageops::FilterType::Triangle);
    let diff: u64 = reference.as_raw().iter().zip(first.as_raw()).map(|(a, b)| u64::from(a.abs_diff(*b))).sum();
    assert!((diff as f64 / reference.as_raw().len() as f64) < 12.0, "the rotated output does not match the CLI's");
}

/// Uploads a video and checks the media JSON and the outputs; returns the media.
#[allow(clippy::too_many_arguments)]
async fn check_video(
    server: &Server,
    token: &str,
    name: &str,
    mime: &str,
    input: Vec<u8>,
    input_secs: f64,
    size: (u64, u64),
    out: (u64, u64),
    audio: bool,
) -> Value {
    let media = server.upload_ready(token, mime, input).await;
    assert_eq!(media["status"], "ready", "{name}: {media}");
    assert_eq!(media["kind"], "video");
    assert_eq!((media["width"].as_u64().unwrap(), media["height"].as_u64().unwrap()), size, "{name}");
    assert_eq!(media["has_audio"], audio, "{name}");
    let ms = media["duration_ms"].as_f64().unwrap();
    assert!((ms / 1000.0 - input_secs).abs() <= 0.05, "{name}: {ms} ms, the input lasts {input_secs} s");
    assert!(media["preview"].as_str().unwrap().starts_with("data:image/jpeg;base64,"));

    let mp4 = variant_bytes(server, &media, "standard").await;
    assert_eq!(media["variants"]["standard"]["mime"], "video/mp4");
    let moov = mp4.windows(4).position(|w| w == b"moov").unwrap();
    let mdat = mp4.windows(4).position(|w| w == b"mdat").unwrap();
    assert!(moov < mdat, "{name}: the moov atom must come first so it plays while downloading");
    let probe = ffprobe(&mp4);
    let video = stream(&probe, "video").unwrap();
    assert_eq!(video["codec_name"], "h264", "{name}");
    assert_eq!(video["profile"], "High", "{name}");
    assert_eq!(video["pix_fmt"], "yuv420p", "{name}");
    let dims = (video["width"].as_u64().unwrap(), video["height"].as_u64().unwrap());
    assert_eq!(dims, out, "{name}");
    assert!(dims.0.is_multiple_of(2) && dims.1.is_multiple_of(2) && dims.0.max(dims.1) <= 1280);
    assert!(rate(&video["r_frame_rate"]) <= 30.0, "{name}: {}", video["r_frame_rate"]);
    let secs = seconds(&probe["format"]["duration"]);
    assert!((secs - input_secs).abs() <= 0.05, "{name}: the MP4 lasts {secs} s, the input {input_secs} s");
    match stream(&probe, "audio") {
        Some(a) => {
            assert!(audio, "{name}: sound appeared from nowhere");
            assert_eq!(a["codec_name"], "aac");
        }
        None => assert!(!audio, "{name}: the sound was lost"),
    }
    for (variant, edge) in [("poster", 1280), ("thumb", 320)] {
        let jpeg = decode(&variant_bytes(server, &media, variant).await);
        let (w, h) = jpeg.dimensions();
        assert!(u64::from(w.max(h)) <= edge && (w > h) == (out.0 > out.1), "{name} {variant}: {w}×{h}");
    }
    media
}

#[tokio::test]
async fn hostile_audio_and_video_are_refused_and_leave_nothing() {
    let data = DataDir::new();
    let server = Server::start(&data, &[("COURIER_INGEST__VIDEO__LIMITS__MAX_DURATION_MS", "2500")]);

    // A playlist calling itself MP4 never reaches a demuxer.
    let playlist = b"#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:10,\nhttp://127.0.0.1:9/x.ts\n".to_vec();
    server.refused("video/mp4", playlist.clone(), 415, "type_mismatch").await;
    server.refused("audio/mpeg", playlist, 415, "type_mismatch").await;
    // Headers claiming 100000×100000: libav refuses the size, so does the probe.
    server.refused("video/mp4", fixture("huge-dimensions.mp4"), 422, "corrupt_media").await;
    // An MP4 cut before its index (ffmpeg writes the moov last unless told otherwise).
    let whole =
        ffmpeg("whole.mp4", &["-f", "lavfi", "-i", "testsrc2=size=320x240:rate=25:duration=2", "-c:v", "libx264"]);
    server.refused("video/mp4", whole[..whole.len() * 2 / 3].to_vec(), 422, "corrupt_media").await;
    // Longer than the limit, from the header.
    let long =
        ffmpeg("long.webm", &["-f", "lavfi", "-i", "testsrc2=size=160x120:rate=10:duration=4", "-c:v", "libvpx"]);
    server.refused("video/webm", long, 422, "duration_over_limit").await;
    // A valid MP3 frame, then garbage.
    let mp3 = ffmpeg("a.mp3", &["-f", "lavfi", "-i", "sine=duration=1", "-c:a", "libmp3lame"]);
    let mut garbage = mp3[..mp3.len().min(1200)].to_vec();
    garbage.extend((0..200_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8));
    server.refused("audio/mpeg", garbage, 422, "corrupt_media").await;
    // A WAV whose header promises ten seconds and holds a tenth of one.
    let wav = ffmpeg("a.wav", &tone("10").iter().map(String::as_str).collect::<Vec<_>>());
    server.refused("audio/wav", wav[..wav.len() / 100].to_vec(), 422, "corrupt_media").await;
    server.refused("audio/ogg", b"OggS\0\x02\0\0\0\0\0\0\0\0".to_vec(), 422, "corrupt_media").await;

    server.assert_nothing_left().await;
    assert!(server.workers("video").len() <= 1, "a video worker outlived its job");
}

#[tokio::test]
async fn audio_over_its_limits_is_refused_from_the_header() {
    let data = DataDir::new();
    let server = Server::start(
        &data,
        &[
            ("COURIER_INGEST__AUDIO__LIMITS__MAX_DURATION_MS", "2000"),
            ("COURIER_INGEST__AUDIO__LIMITS__MAX_CHANNELS", "2"),
        ],
    );
    let long = ffmpeg("long.flac", &tone("3").iter().map(String::as_str).collect::<Vec<_>>());
    server.refused("audio/flac", long, 422, "duration_over_limit").await;
    let surround = ffmpeg("six.wav", &["-f", "lavfi", "-i", "sine=duration=1", "-ac", "6"]);
    server.refused("audio/wav", surround, 422, "over_limit").await;
    assert_eq!(server.count_rows("media").await, 0);
}

#[tokio::test]
async fn a_worker_over_its_memory_budget_fails_alone() {
    let data = DataDir::new();
    // Less address space than the worker already has: its first allocation for the video fails.
    let server = Server::start(&data, &[("COURIER_INGEST__VIDEO__MEMORY_BYTES", "67108864")]);
    let token = server.token("alice");
    let video = ffmpeg("v.mp4", &["-f", "lavfi", "-i", "testsrc2=size=320x240:rate=25:duration=1", "-c:v", "libx264"]);
    server.refused("video/mp4", video, 422, "over_memory_budget").await;
    // The server and the other lane are untouched.
    let photo = server.upload_ready(&token, "image/jpeg", fixture("rocket.jpg")).await;
    assert_eq!(photo["status"], "ready");
    assert!(server.workers("video").len() <= 1, "a video worker outlived its job");
}

#[tokio::test]
async fn photos_do_not_wait_behind_a_video_and_deleting_the_video_stops_its_worker() {
    let data = DataDir::new();
    let server = Server::start(&data, &[("COURIER_INGEST__WAIT_FOR_READY_MS", "0")]);
    let token = server.token("alice");
    // Long enough to take a while on two cores.
    let video = busy_video("long.mp4", 40);
    let response = server.upload(&token, "video/mp4", video).await;
    assert_eq!(response.status(), 201);
    let created: Value = response.json().await.unwrap();
    let id = created["id"].as_str().unwrap().to_string();
    assert_eq!(created["status"], "processing");

    // The worker reports progress while it runs.
    let deadline = Instant::now() + Duration::from_secs(60);
    let progress = loop {
        let media: Value = server.media(&token, &id).await.json().await.unwrap();
        assert_eq!(media["status"], "processing", "{media}");
        if let Some(p) = media["progress"].as_f64().filter(|p| *p > 0.0) {
            break p;
        }
        assert!(Instant::now() < deadline, "no progress reported");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(progress < 1.0);
    let workers = server.workers("video");
    assert_eq!(workers.len(), 1, "one worker process runs the video");
    // It runs below the server in the scheduler (field 19 of /proc/PID/stat is the niceness).
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", workers[0])).unwrap();
    let nice: i32 = stat.rsplit_once(')').unwrap().1.split_whitespace().nth(16).unwrap().parse().unwrap();
    assert_eq!(nice, 10, "the video worker is not niced");

    // A photo and a voice note go through while the video is still being transcoded.
    let photo = server.upload_ready(&token, "image/jpeg", fixture("rocket.jpg")).await;
    assert_eq!(photo["status"], "ready");
    let voice = ffmpeg("v.ogg", &["-f", "lavfi", "-i", "sine=duration=1", "-c:a", "libopus"]);
    assert_eq!(server.upload_ready(&token, "audio/ogg", voice).await["status"], "ready");
    let media: Value = server.media(&token, &id).await.json().await.unwrap();
    assert_eq!(media["status"], "processing", "the video finished before the photo: the test proves nothing");

    // Someone else cannot delete it; its owner can, and that stops the worker.
    assert_eq!(server.delete_media(&server.token("mallory"), &id).await.status(), 404);
    assert_eq!(server.delete_media(&token, &id).await.status(), 204);
    assert_eq!(server.media(&token, &id).await.status(), 404);
    let deadline = Instant::now() + Duration::from_secs(10);
    while server.children().contains(&workers[0]) {
        assert!(Instant::now() < deadline, "the worker still runs after its media was deleted");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let leftovers = || server.files_under("tmp");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !leftovers().is_empty() {
        assert!(Instant::now() < deadline, "the job's folder was left behind: {:?}", leftovers());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(server.count_rows("jobs").await, 2, "only the photo's and the voice note's jobs remain");
}

#[tokio::test]
async fn a_video_past_its_time_budget_is_killed_and_marked_failed() {
    let data = DataDir::new();
    let server = Server::start(&data, &[("COURIER_INGEST__VIDEO__TIMEOUT_SECS", "1")]);
    let token = server.token("alice");
    let video = busy_video("slow.mp4", 30);
    // Killed at its budget and failed at once (no retry): within the upload's wait, so refused.
    let started = Instant::now();
    server.refused("video/mp4", video.clone(), 422, "timed_out").await;
    assert!(started.elapsed() < Duration::from_secs(5), "a timed-out job was retried");
    // The same bytes again are refused without another try.
    server.refused("video/mp4", video, 422, "timed_out").await;
    assert!(server.workers("video").len() <= 1, "the worker outlived its budget");
    let photo = server.upload_ready(&token, "image/jpeg", fixture("rocket.jpg")).await;
    assert_eq!(photo["status"], "ready");
}

#[tokio::test]
async fn deleting_media_keeps_the_bytes_another_upload_holds() {
    let data = DataDir::new();
    let server = Server::start(&data, &[]);
    let (alice, bob) = (server.token("alice"), server.token("bob"));
    let voice = ffmpeg("v.ogg", &["-f", "lavfi", "-i", "sine=duration=1", "-c:a", "libopus"]);
    let first = server.upload_ready(&alice, "audio/ogg", voice.clone()).await;
    let second = server.upload_ready(&bob, "audio/ogg", voice).await;
    assert_eq!(first["variants"]["standard"]["blob"], second["variants"]["standard"]["blob"], "stored once");

    assert_eq!(server.delete_media(&alice, first["id"].as_str().unwrap()).await.status(), 204);
    assert_eq!(server.media(&alice, first["id"].as_str().unwrap()).await.status(), 404);
    // Bob's copy is untouched: his record, and the bytes behind its URL.
    let still = server.media(&bob, second["id"].as_str().unwrap()).await.json::<Value>().await.unwrap();
    assert_eq!(still["status"], "ready");
    variant_bytes(&server, &still, "standard").await;

    assert_eq!(server.delete_media(&bob, second["id"].as_str().unwrap()).await.status(), 204);
    // The last delete frees the blobs, beside its answer.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !server.files_under("blobs").is_empty() {
        assert!(Instant::now() < deadline, "the last delete left {:?}", server.files_under("blobs"));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(server.count_rows("jobs").await, 0);
    assert_eq!(server.delete_media(&bob, second["id"].as_str().unwrap()).await.status(), 404);
}

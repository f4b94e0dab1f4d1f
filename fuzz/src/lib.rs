//! The bodies of Courier's fuzz targets: every parser that reads bytes a client chose.
//!
//! Each function takes arbitrary bytes, runs the parser the server (or a transcode worker) runs on
//! them, and asserts what must hold whatever they are. A panic or an allocation over libFuzzer's
//! limit is a finding. `fuzz_targets/` wraps each one for `make fuzz`; `tests/replay.rs` runs every
//! seed, fixture and past finding through the same functions in `make test`, so a fixed finding
//! stays fixed.

use std::borrow::Cow;
use std::io::Cursor;

use axum::http::{HeaderMap, HeaderValue, header};
use edge_cache::serve;
use transcode::{MediaType, audio, photo};
use types::{BlobId, Secret, UrlSigner};

/// Every image format the photo pipeline decodes.
const FORMATS: [photo::Format; 4] = [photo::Format::Jpeg, photo::Format::Png, photo::Format::WebP, photo::Format::Gif];

/// Every container the audio pipeline opens.
const CONTAINERS: [audio::Container; 7] = [
    audio::Container::Mp3,
    audio::Container::Aac,
    audio::Container::Mp4,
    audio::Container::Flac,
    audio::Container::Wav,
    audio::Container::Ogg,
    audio::Container::WebM,
];

/// Declared types the upload route checks against the sniff.
const DECLARED: [&str; 12] = [
    "image/jpeg",
    "image/png",
    "image/webp",
    "image/gif",
    "audio/mpeg",
    "audio/aac",
    "audio/mp4",
    "audio/flac",
    "audio/wav",
    "audio/ogg",
    "video/mp4",
    "video/webm",
];

/// How many leading bytes of an upload the server sniffs.
const SNIFF_BYTES: usize = 32;

/// The magic-number sniff, the one parse of upload bytes the server process does itself.
pub fn sniff(data: &[u8]) {
    let head = &data[..data.len().min(SNIFF_BYTES)];
    // The server sees only the head; a longer buffer must not change the answer.
    assert_eq!(MediaType::describe(data), MediaType::describe(head), "the sniff looked past {SNIFF_BYTES} bytes");
    for declared in DECLARED {
        let media = MediaType::from_mime(declared).expect("a declared type the server takes");
        assert_eq!(media.matches(data), media.matches(head));
    }
    if let Some(format) = photo::Format::sniff(head) {
        assert!(MediaType::Image(format).matches(head), "{format:?} sniffed but not matched");
        assert_eq!(MediaType::describe(head), format.mime());
    }
}

/// The image header probe a worker runs at upload time (dimensions, before any pixel is decoded).
pub fn image_probe(data: &[u8]) {
    for format in FORMATS {
        if let Ok(probe) = photo::probe(Cursor::new(data), format) {
            let _ = photo::Limits::default().check_pixels(probe.width, probe.height);
        }
    }
}

/// The EXIF reader behind orientation, over every container it looks into.
pub fn exif_orientation(data: &[u8]) {
    let _ = photo::orientation(data);
}

/// The audio header probe a worker runs at upload time, for every container.
pub fn audio_probe(data: &[u8]) {
    let limits = audio::Limits::default();
    for container in CONTAINERS {
        if let Ok(probe) = audio::probe(Cursor::new(data.to_vec()), container, &limits) {
            // What the probe lets through is within the limits it was given.
            assert!(probe.sample_rate > 0 && probe.sample_rate <= limits.max_sample_rate);
            assert!(probe.channels > 0 && probe.channels <= limits.max_channels);
            assert!(probe.duration_ms.is_none_or(|ms| ms <= limits.max_duration_ms));
        }
    }
}

/// `Range` and `If-Range` on a blob: the first 8 bytes are the blob's length, the ninth says
/// whether an `If-Range` with another validator comes along, the rest is the `Range` value.
pub fn byte_range(data: &[u8]) {
    let Some((len, rest)) = data.split_first_chunk::<8>() else {
        return;
    };
    let Some((&flags, value)) = rest.split_first() else {
        return;
    };
    let len = u64::from_le_bytes(*len);
    let Ok(value) = HeaderValue::from_bytes(value) else {
        return;
    };
    let etag = HeaderValue::from_static("\"blob\"");
    let mut headers = HeaderMap::new();
    headers.insert(header::RANGE, value);
    let stale = flags & 1 == 1;
    if stale {
        headers.insert(header::IF_RANGE, HeaderValue::from_static("\"other\""));
    }
    match serve::requested_range(&headers, &etag, len) {
        Ok(Some((start, end))) => {
            assert!(!stale, "a range served against another validator");
            assert!(start <= end && end < len, "range {start}-{end} of a {len}-byte blob");
        }
        Ok(None) => {}
        Err(_) => assert!(!stale, "416 against another validator, where the whole blob is due"),
    }
}

/// The `exp` and `sig` of a blob URL's query, and the check of them.
pub fn signed_query(data: &[u8]) {
    let Ok(query) = std::str::from_utf8(data) else {
        return;
    };
    let got = serve::signed_query(Some(query));
    // The fast path for our own URLs must agree with a full form decoding of any query.
    let (mut exp, mut sig, mut twice) = (None, None, false);
    for (key, value) in form_urlencoded::parse(query.as_bytes()) {
        let slot = match &*key {
            "exp" => &mut exp,
            "sig" => &mut sig,
            _ => continue,
        };
        twice |= slot.replace(value).is_some();
    }
    let expected = if twice { None } else { exp.zip(sig) };
    assert_eq!(got.clone().map(own), expected.map(own), "query {query:?}");
    if let Some((exp, sig)) = got {
        let signer = UrlSigner::new(&Secret::from_bytes([7; 32]));
        let blob = BlobId::of(b"a blob");
        let genuine =
            exp.parse::<u64>().is_ok_and(|at| signer.path(&blob, at) == format!("/b/{blob}?exp={exp}&sig={sig}"));
        assert_eq!(signer.verify(&blob, &exp, &sig, 0).is_ok(), genuine, "exp={exp:?} sig={sig:?}");
    }
}

fn own((a, b): (Cow<'_, str>, Cow<'_, str>)) -> (String, String) {
    (a.into_owned(), b.into_owned())
}

/// A target's body: any bytes in, a panic when something that must hold does not.
pub type Body = fn(&[u8]);

/// The targets by name, as `fuzz_targets/` and the seed folders call them.
pub const TARGETS: [(&str, Body); 6] = [
    ("sniff", sniff),
    ("image_probe", image_probe),
    ("exif_orientation", exif_orientation),
    ("audio_probe", audio_probe),
    ("byte_range", byte_range),
    ("signed_query", signed_query),
];

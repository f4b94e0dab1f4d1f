//! Photos in, ≤1600 px JPEG, ≤320 px thumb and a tiny preview out: oriented, stripped, deduplicated.

use base64::Engine;
use serde_json::Value;

use crate::harness::{DataDir, Server, decode, fixture, variant_bytes};

fn dims(v: &Value) -> (u64, u64) {
    (v["width"].as_u64().unwrap(), v["height"].as_u64().unwrap())
}

/// Mean absolute difference per channel of two images, both scaled to 48×32.
fn difference(a: &image::RgbImage, b: &image::RgbImage) -> f64 {
    let small = |i: &image::RgbImage| image::imageops::resize(i, 48, 32, image::imageops::FilterType::Triangle);
    let (a, b) = (small(a), small(b));
    let sum: u64 = a.as_raw().iter().zip(b.as_raw()).map(|(x, y)| u64::from(x.abs_diff(*y))).sum();
    sum as f64 / a.as_raw().len() as f64
}

fn preview_bytes(media: &Value) -> Vec<u8> {
    let url = media["preview"].as_str().unwrap();
    let b64 = url.strip_prefix("data:image/jpeg;base64,").expect("a JPEG data URL");
    base64::engine::general_purpose::STANDARD.decode(b64).unwrap()
}

#[tokio::test]
async fn a_phone_photo_comes_back_upright_and_without_metadata() {
    let data = DataDir::new();
    let server = Server::start(&data, &[]);
    let token = server.token("alice");
    let media = server.upload_ready(&token, "image/jpeg", fixture("phone-rotated-gps.jpg")).await;
    assert_eq!(media["status"], "ready", "{media}");
    assert_eq!(media["kind"], "image");
    // Stored 300×451 with Orientation=6: upright it is 451×300.
    assert_eq!(dims(&media), (451, 300));
    assert_eq!(dims(&media["variants"]["standard"]), (451, 300));
    assert_eq!(dims(&media["variants"]["thumb"]), (320, 213));
    assert_eq!(media["variants"]["standard"]["mime"], "image/jpeg");

    let upright = image::load_from_memory(&fixture("chelsea-upright.png")).unwrap().to_rgb8();
    for name in ["standard", "thumb"] {
        let bytes = variant_bytes(&server, &media, name).await;
        // A real EXIF parser finds nothing, and no metadata marker is left in the bytes.
        assert!(exif::Reader::new().read_from_container(&mut std::io::Cursor::new(&bytes)).is_err());
        for marker in [&b"Exif"[..], b"GPS", b"xmp", b"FixturePhone", b"secret place"] {
            assert!(!bytes.windows(marker.len()).any(|w| w == marker), "{name} still holds {marker:?}");
        }
        let out = decode(&bytes);
        let right = difference(&out, &upright);
        let wrong = difference(&out, &image::imageops::rotate180(&upright));
        assert!(right < 12.0 && right * 3.0 < wrong, "{name} is not upright: {right} vs {wrong}");
    }

    let preview = preview_bytes(&media);
    assert!(preview.len() <= 3 * 1024, "preview is {} bytes", preview.len());
    let preview = decode(&preview);
    assert_eq!(preview.dimensions(), (64, 43));
}

#[tokio::test]
async fn big_photos_are_shrunk_and_small_ones_never_upscaled() {
    let data = DataDir::new();
    let server = Server::start(&data, &[]);
    let token = server.token("alice");

    // A 4000×3000 photo-like JPEG made here, so big files are never committed.
    let big = image::RgbImage::from_fn(4000, 3000, |x, y| {
        let n = (x.wrapping_mul(2654435761) ^ y.wrapping_mul(40503)) % 23;
        image::Rgb([(x / 16) as u8 ^ n as u8, (y / 12) as u8, ((x + y) / 28) as u8])
    });
    let mut jpeg = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 85).encode_image(&big).unwrap();
    let media = server.upload_ready(&token, "image/jpeg", jpeg).await;
    assert_eq!(dims(&media["variants"]["standard"]), (1600, 1200));
    assert_eq!(dims(&media["variants"]["thumb"]), (320, 240));
    let standard = decode(&variant_bytes(&server, &media, "standard").await);
    assert_eq!(standard.dimensions(), (1600, 1200));

    let small = server.upload_ready(&token, "image/jpeg", fixture("rocket.jpg")).await;
    assert_eq!(dims(&small["variants"]["standard"]), (640, 427));
    assert_eq!(decode(&variant_bytes(&server, &small, "standard").await).dimensions(), (640, 427));
}

#[tokio::test]
async fn png_webp_gif_cmyk_and_16_bit_inputs_all_work() {
    let data = DataDir::new();
    let server = Server::start(&data, &[]);
    let token = server.token("alice");

    // Transparent areas become white, not black.
    let logo = image::load_from_memory(&fixture("alpha.png")).unwrap().to_rgba8();
    let (tx, ty) = logo.enumerate_pixels().find(|(_, _, p)| p[3] == 0).map(|(x, y, _)| (x, y)).unwrap();
    let media = server.upload_ready(&token, "image/png", fixture("alpha.png")).await;
    assert_eq!(dims(&media["variants"]["standard"]), (451, 300));
    let out = decode(&variant_bytes(&server, &media, "standard").await);
    assert!(out.get_pixel(tx, ty).0.iter().all(|&c| c > 235), "transparent pixel came out {:?}", out.get_pixel(tx, ty));

    // CMYK comes out in the same colours as the RGB original (the WebP of the same photo).
    let reference = image::load_from_memory(&fixture("coffee.webp")).unwrap().to_rgb8();
    let media = server.upload_ready(&token, "image/jpeg", fixture("cmyk.jpg")).await;
    assert_eq!(media["status"], "ready", "{media}");
    let out = decode(&variant_bytes(&server, &media, "standard").await);
    assert!(difference(&out, &reference) < 20.0, "CMYK colours are off by {}", difference(&out, &reference));

    let media = server.upload_ready(&token, "image/webp", fixture("coffee.webp")).await;
    assert_eq!(dims(&media["variants"]["standard"]), (600, 400));
    let out = decode(&variant_bytes(&server, &media, "standard").await);
    assert!(difference(&out, &reference) < 8.0);

    // A GIF gives its first frame (the second one is mirrored).
    let media = server.upload_ready(&token, "image/gif", fixture("animated.gif")).await;
    assert_eq!(dims(&media["variants"]["standard"]), (451, 300));
    let out = decode(&variant_bytes(&server, &media, "standard").await);
    let upright = image::load_from_memory(&fixture("chelsea-upright.png")).unwrap().to_rgb8();
    let mirrored = image::imageops::flip_horizontal(&upright);
    assert!(difference(&out, &upright) * 2.0 < difference(&out, &mirrored));

    let deep = image::ImageBuffer::<image::Rgb<u16>, _>::from_fn(300, 200, |x, y| {
        image::Rgb([(x * 218) as u16, (y * 327) as u16, 40000])
    });
    let mut png = Vec::new();
    image::DynamicImage::ImageRgb16(deep)
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .unwrap();
    let media = server.upload_ready(&token, "image/png", png).await;
    assert_eq!(media["status"], "ready", "{media}");
    let out = decode(&variant_bytes(&server, &media, "standard").await);
    let px = out.get_pixel(150, 100).0;
    assert!(px[2].abs_diff(156) < 10 && px[0].abs_diff(127) < 12, "16-bit colours scaled wrong: {px:?}");
}

#[tokio::test]
async fn the_same_bytes_are_stored_and_transcoded_once() {
    let data = DataDir::new();
    let server = Server::start(&data, &[]);
    let photo = fixture("rocket.jpg");
    let first = server.upload_ready(&server.token("alice"), "image/jpeg", photo.clone()).await;

    let response = server.upload(&server.token("bob"), "image/jpeg", photo.clone()).await;
    assert_eq!(response.status(), 201);
    let second: Value = response.json().await.unwrap();
    assert_eq!(second["status"], "ready", "a known upload is ready at once");
    assert_ne!(second["id"], first["id"]);
    assert_eq!(second["blob"], blake3::hash(&photo).to_hex().as_str());
    assert_eq!(second["variants"]["standard"]["blob"], first["variants"]["standard"]["blob"]);

    assert_eq!(server.files_under("blobs/originals").len(), 1);
    assert_eq!(server.files_under("blobs/variants").len(), 2);
    assert_eq!(server.count_rows("media").await, 2);
    assert_eq!(server.count_rows("jobs").await, 1);

    // Each owner sees their own record; nobody sees another's.
    let alice = server.token("alice");
    assert_eq!(server.media(&alice, first["id"].as_str().unwrap()).await.status(), 200);
    let other = server.media(&alice, second["id"].as_str().unwrap()).await;
    assert_eq!(other.status(), 404);
    let body: Value = other.json().await.unwrap();
    assert_eq!(body["error"]["code"], "not_found");
    assert_eq!(server.media(&alice, "not-an-id").await.status(), 404);
}

#[tokio::test]
async fn wide_gamut_photos_are_converted_to_srgb() {
    use image::ImageEncoder;
    let data = DataDir::new();
    let server = Server::start(&data, &[]);
    let token = server.token("alice");
    // A flat Display P3 colour, as an iPhone tags its photos, in a JPEG and a PNG.
    let p3 = moxcms::ColorProfile::new_display_p3();
    let icc = p3.encode().unwrap();
    let colour = [200u8, 100, 50];
    let flat = image::RgbImage::from_pixel(64, 48, image::Rgb(colour));
    let mut expected = [0u8; 3];
    let to_srgb = p3
        .create_transform_8bit(
            moxcms::Layout::Rgb,
            &moxcms::ColorProfile::new_srgb(),
            moxcms::Layout::Rgb,
            Default::default(),
        )
        .unwrap();
    to_srgb.transform(&colour, &mut expected).unwrap();
    assert!(expected[0] > colour[0] + 8, "the P3 colour should be redder in sRGB: {expected:?}");

    let mut jpeg = Vec::new();
    let mut encoder = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 95);
    encoder.set_icc_profile(icc.clone()).unwrap();
    encoder.write_image(flat.as_raw(), 64, 48, image::ExtendedColorType::Rgb8).unwrap();
    let mut png = Vec::new();
    let mut encoder = image::codecs::png::PngEncoder::new(&mut png);
    encoder.set_icc_profile(icc).unwrap();
    encoder.write_image(flat.as_raw(), 64, 48, image::ExtendedColorType::Rgb8).unwrap();

    for (mime, bytes) in [("image/jpeg", jpeg), ("image/png", png)] {
        let media = server.upload_ready(&token, mime, bytes).await;
        let out = decode(&variant_bytes(&server, &media, "standard").await);
        let got = out.get_pixel(32, 24).0;
        for c in 0..3 {
            assert!(got[c].abs_diff(expected[c]) <= 4, "{mime}: got {got:?}, sRGB of the P3 colour is {expected:?}");
        }
    }
}

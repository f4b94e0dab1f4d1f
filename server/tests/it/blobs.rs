//! `/b/{blob}`: signed, immutable, with ranges, conditionals and HEAD; originals never served.

use serde_json::Value;
use types::BlobId;

use crate::harness::{DataDir, Server, fixture, now};

async fn ready_photo(server: &Server) -> (Value, Vec<u8>) {
    let media = server.upload_ready(&server.token("alice"), "image/jpeg", fixture("rocket.jpg")).await;
    let bytes = crate::harness::variant_bytes(server, &media, "standard").await;
    (media, bytes)
}

#[tokio::test]
async fn variants_are_served_with_immutable_caching_headers() {
    let data = DataDir::new();
    let server = Server::start(&data, &[]);
    let (media, bytes) = ready_photo(&server).await;
    let variant = &media["variants"]["standard"];
    let url = variant["url"].as_str().unwrap();
    let blob = variant["blob"].as_str().unwrap();

    let response = server.get(url).await;
    assert_eq!(response.status(), 200);
    let h = response.headers();
    assert_eq!(h["content-type"], "image/jpeg");
    assert_eq!(h["content-length"], bytes.len().to_string().as_str());
    assert_eq!(h["etag"], format!("\"{blob}\"").as_str());
    assert_eq!(h["cache-control"], "public, max-age=31536000, immutable");
    assert_eq!(h["accept-ranges"], "bytes");
    assert_eq!(h["x-content-type-options"], "nosniff");

    let head = server.http.head(server.url(url)).send().await.unwrap();
    assert_eq!(head.status(), 200);
    assert_eq!(head.headers()["content-length"], bytes.len().to_string().as_str());
    assert_eq!(head.headers()["etag"], format!("\"{blob}\"").as_str());
    assert!(head.bytes().await.unwrap().is_empty());

    let not_modified =
        server.http.get(server.url(url)).header("if-none-match", format!("\"{blob}\"")).send().await.unwrap();
    assert_eq!(not_modified.status(), 304);
    assert_eq!(not_modified.headers()["etag"], format!("\"{blob}\"").as_str());
    assert!(not_modified.bytes().await.unwrap().is_empty());
    let other_tag =
        server.http.get(server.url(url)).header("if-none-match", "\"something-else\"").send().await.unwrap();
    assert_eq!(other_tag.status(), 200);
}

#[tokio::test]
async fn single_ranges_get_206_and_unsatisfiable_ones_416() {
    let data = DataDir::new();
    let server = Server::start(&data, &[]);
    let (media, bytes) = ready_photo(&server).await;
    let url = server.url(media["variants"]["standard"]["url"].as_str().unwrap());
    let len = bytes.len();

    let check = |range: String, from: usize, to: usize| {
        let (http, url, bytes) = (server.http.clone(), url.clone(), bytes.clone());
        async move {
            let response = http.get(&url).header("range", &range).send().await.unwrap();
            assert_eq!(response.status(), 206, "{range}");
            assert_eq!(response.headers()["content-range"], format!("bytes {from}-{to}/{len}").as_str());
            assert_eq!(response.headers()["content-length"], (to - from + 1).to_string().as_str());
            assert_eq!(response.bytes().await.unwrap(), bytes[from..=to], "{range}");
        }
    };
    check("bytes=0-99".into(), 0, 99).await;
    check(format!("bytes={}-", len - 10), len - 10, len - 1).await;
    check("bytes=-20".into(), len - 20, len - 1).await;
    check(format!("bytes=100-{}", len + 1000), 100, len - 1).await;

    let unsatisfiable = server.http.get(&url).header("range", format!("bytes={len}-")).send().await.unwrap();
    assert_eq!(unsatisfiable.status(), 416);
    assert_eq!(unsatisfiable.headers()["content-range"], format!("bytes */{len}").as_str());

    // If-Range with another validator: the whole blob instead of a stale piece.
    let stale = server.http.get(&url).header("range", "bytes=0-9").header("if-range", "\"old\"").send().await.unwrap();
    assert_eq!(stale.status(), 200);
    assert_eq!(stale.bytes().await.unwrap().len(), len);
}

#[tokio::test]
async fn altered_expired_or_missing_signatures_get_403() {
    let data = DataDir::new();
    let server = Server::start(&data, &[]);
    let (media, _) = ready_photo(&server).await;
    let url = media["variants"]["thumb"]["url"].as_str().unwrap().to_owned();
    assert_eq!(server.get(&url).await.status(), 200);

    // Change every character of the blob, the expiry and the signature in turn.
    let query_start = url.find('?').unwrap();
    let exp_start = query_start + "?exp=".len();
    let sig_start = url.find("&sig=").unwrap() + "&sig=".len();
    let positions = ("/b/".len()..query_start).chain(exp_start..sig_start - "&sig=".len()).chain(sig_start..url.len());
    for i in positions {
        let mut altered = url.clone().into_bytes();
        altered[i] = if altered[i] == b'1' { b'2' } else { b'1' };
        let altered = String::from_utf8(altered).unwrap();
        assert_eq!(server.get(&altered).await.status(), 403, "{altered}");
    }
    let response = server.get(&url[..query_start]).await;
    assert_eq!(response.status(), 403);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "forbidden");

    let blob: BlobId = media["variants"]["thumb"]["blob"].as_str().unwrap().parse().unwrap();
    let expired = server.signer().path(&blob, now() - 1);
    let response = server.get(&expired).await;
    assert_eq!(response.status(), 403);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "url_expired");
}

#[tokio::test]
async fn unknown_blobs_get_404_and_originals_are_never_served() {
    let data = DataDir::new();
    let server = Server::start(&data, &[]);
    let (media, _) = ready_photo(&server).await;
    let signer = server.signer();
    let exp = now() + 3600;

    let unknown = signer.path(&BlobId::of(b"nothing like this was stored"), exp);
    assert_eq!(server.get(&unknown).await.status(), 404);

    // The uploaded original is stored, but even a valid signature for it finds nothing to serve.
    let original: BlobId = media["blob"].as_str().unwrap().parse().unwrap();
    assert_eq!(server.files_under("blobs/originals").len(), 1);
    assert_eq!(server.get(&signer.path(&original, exp)).await.status(), 404);
}

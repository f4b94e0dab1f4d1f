//! Signed blob URLs: `/b/{blob}?exp={unix seconds}&sig={mac}`.
//!
//! The MAC is BLAKE3 in keyed mode over the blob id and the expiry, so an edge node holding a copy of
//! `url-signing.key` checks a URL without asking the origin. Changing any character of the blob, the
//! expiry or the signature makes the check fail.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use crate::{BlobId, Secret};

/// Mints and checks signed blob URLs.
#[derive(Clone)]
pub struct UrlSigner {
    key: [u8; 32],
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SignedUrlError {
    #[error("the URL has no valid signature")]
    Invalid,
    #[error("the URL has expired")]
    Expired,
}

impl UrlSigner {
    pub fn new(key: &Secret) -> Self {
        Self { key: *key.as_bytes() }
    }

    fn mac(&self, blob: &BlobId, exp: u64) -> blake3::Hash {
        let mut h = blake3::Hasher::new_keyed(&self.key);
        h.update(b"courier/blob-url/v1\n");
        h.update(blob.hex().as_bytes());
        h.update(b"\n");
        // The decimal digits of exp, written without allocating.
        let mut digits = [0u8; 20];
        let mut at = digits.len();
        let mut rest = exp;
        loop {
            at -= 1;
            digits[at] = b'0' + (rest % 10) as u8;
            rest /= 10;
            if rest == 0 {
                break;
            }
        }
        h.update(&digits[at..]);
        h.finalize()
    }

    pub fn signature(&self, blob: &BlobId, exp: u64) -> String {
        URL_SAFE_NO_PAD.encode(self.mac(blob, exp).as_bytes())
    }

    /// The path and query of a URL for `blob` that is good until `exp` (unix seconds).
    pub fn path(&self, blob: &BlobId, exp: u64) -> String {
        format!("/b/{blob}?exp={exp}&sig={}", self.signature(blob, exp))
    }

    /// Checks a URL's `exp` and `sig` as they came in the query string.
    pub fn verify(&self, blob: &BlobId, exp: &str, sig: &str, now: u64) -> Result<(), SignedUrlError> {
        // Only the canonical decimal spelling was ever signed; "+5" or "05" are other strings.
        let canonical =
            !exp.is_empty() && exp.bytes().all(|b| b.is_ascii_digit()) && (exp == "0" || !exp.starts_with('0'));
        let exp_value: u64 = exp.parse().ok().filter(|_| canonical).ok_or(SignedUrlError::Invalid)?;
        let mut given = [0u8; 32];
        match URL_SAFE_NO_PAD.decode_slice(sig, &mut given) {
            Ok(32) => {}
            _ => return Err(SignedUrlError::Invalid),
        }
        // `blake3::Hash` compares in constant time.
        if self.mac(blob, exp_value) != blake3::Hash::from_bytes(given) {
            return Err(SignedUrlError::Invalid);
        }
        if exp_value < now {
            return Err(SignedUrlError::Expired);
        }
        Ok(())
    }
}

impl std::fmt::Debug for UrlSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("UrlSigner(..)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(signer: &UrlSigner, blob: &BlobId, exp: &str, sig: &str, now: u64) -> Result<(), SignedUrlError> {
        signer.verify(blob, exp, sig, now)
    }

    #[test]
    fn any_changed_character_breaks_the_signature() {
        let signer = UrlSigner::new(&Secret::from_bytes([7; 32]));
        let blob = BlobId::of(b"photo");
        let sig = signer.signature(&blob, 1000);
        assert_eq!(check(&signer, &blob, "1000", &sig, 999), Ok(()));
        assert_eq!(check(&signer, &blob, "1000", &sig, 1001), Err(SignedUrlError::Expired));
        assert_eq!(check(&signer, &blob, "1001", &sig, 0), Err(SignedUrlError::Invalid));
        assert_eq!(check(&signer, &blob, "01000", &sig, 0), Err(SignedUrlError::Invalid));
        assert_eq!(check(&signer, &BlobId::of(b"other"), "1000", &sig, 0), Err(SignedUrlError::Invalid));
        for i in 0..sig.len() {
            let mut bad = sig.clone().into_bytes();
            bad[i] = if bad[i] == b'A' { b'B' } else { b'A' };
            let bad = String::from_utf8(bad).unwrap();
            assert_eq!(check(&signer, &blob, "1000", &bad, 0), Err(SignedUrlError::Invalid), "{bad}");
        }
        let other = UrlSigner::new(&Secret::from_bytes([8; 32]));
        assert_eq!(check(&other, &blob, "1000", &sig, 0), Err(SignedUrlError::Invalid));
    }
}

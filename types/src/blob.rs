//! `BlobId`: the BLAKE3 hash that names every stored blob.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The name of a blob: the BLAKE3 hash of its bytes, written as 64 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlobId([u8; 32]);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("a blob id is 64 lowercase hex digits")]
pub struct BlobIdError;

impl BlobId {
    /// Hashes `bytes` in one go. Callers on an async runtime hash large bodies off its threads.
    pub fn of(bytes: &[u8]) -> Self {
        Self(*blake3::hash(bytes).as_bytes())
    }

    pub fn from_hash(hash: blake3::Hash) -> Self {
        Self(*hash.as_bytes())
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Whether `bytes` are what this id names; the comparison runs in constant time.
    pub fn matches(&self, bytes: &[u8]) -> bool {
        blake3::hash(bytes) == blake3::Hash::from_bytes(self.0)
    }

    pub fn to_hex(&self) -> String {
        self.hex().to_string()
    }

    /// The 64 hex digits on the stack, for hot paths that would rather not allocate.
    pub fn hex(&self) -> impl std::ops::Deref<Target = str> + fmt::Display {
        blake3::Hash::from_bytes(self.0).to_hex()
    }
}

impl fmt::Display for BlobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.hex())
    }
}

impl fmt::Debug for BlobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BlobId({self})")
    }
}

impl FromStr for BlobId {
    type Err = BlobIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        // Uppercase hex would name the same bytes twice; only one spelling is accepted.
        if s.len() != 64 || !s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
            return Err(BlobIdError);
        }
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).map_err(|_| BlobIdError)?;
        Ok(Self(out))
    }
}

impl Serialize for BlobId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}

impl<'de> Deserialize<'de> for BlobId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip_and_strict_parsing() {
        let id = BlobId::of(b"hello");
        assert_eq!(id.to_hex(), blake3::hash(b"hello").to_hex().as_str());
        assert_eq!(id.to_hex().parse::<BlobId>(), Ok(id));
        assert!(id.to_hex().to_uppercase().parse::<BlobId>().is_err());
        assert!(id.to_hex()[..63].parse::<BlobId>().is_err());
        assert!("../etc/passwd".parse::<BlobId>().is_err());
        assert!(id.matches(b"hello"));
        assert!(!id.matches(b"hellO"));
    }
}

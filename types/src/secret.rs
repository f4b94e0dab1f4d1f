//! A 256-bit key, as kept in `token-signing.key` and `url-signing.key`.

use std::fmt;
use std::str::FromStr;

/// 32 secret bytes. Written to disk as 64 hex digits; never printed by `Debug`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret([u8; 32]);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("a key file holds 64 hex digits (32 bytes)")]
pub struct SecretError;

impl Secret {
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl FromStr for Secret {
    type Err = SecretError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(s.trim(), &mut out).map_err(|_| SecretError)?;
        Ok(Self(out))
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(..)")
    }
}

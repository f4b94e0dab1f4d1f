//! Courier's leaf crate: the plain types every other crate speaks.
//!
//! Ids, content-addressed blob names, media kinds and variant names, bearer-token claims with their
//! signing and checking, and signed blob URLs. It must stay pure: no tokio, no IO, no HTTP framework,
//! no database. Anything that needs one of those belongs in the crate that owns that concern.

mod blob;
#[cfg(any(feature = "sqlx", feature = "rusqlite"))]
mod columns;
mod error_body;
mod ids;
mod media;
mod secret;
mod signed_url;
mod token;

pub use blob::{BlobId, BlobIdError};
pub use error_body::{ErrorBody, ErrorDetail};
pub use ids::{
    ConversationId, ConversationIdError, DeviceId, DeviceIdError, MediaId, MediaIdError, UserId, UserIdError,
};
pub use media::{MediaKind, MediaStatus, VariantName};
pub use secret::{Secret, SecretError};
pub use signed_url::{SignedUrlError, UrlSigner};
pub use token::{Claims, TokenError, TokenKeys, bearer_token};

/// Whether a database URL names a PostgreSQL server; anything else is an embedded SQLite file.
/// Every crate with tables picks its engine by this one rule.
pub fn is_postgres_url(url: &str) -> bool {
    url.starts_with("postgres://") || url.starts_with("postgresql://")
}

/// The address limits count a client by: IPv4 as it is, IPv6 by its /64 (one subscriber's
/// allocation: rotating addresses inside it must not buy more connections, codes or guesses).
pub fn client_key(ip: std::net::IpAddr) -> std::net::IpAddr {
    match ip.to_canonical() {
        std::net::IpAddr::V6(v6) => std::net::IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into()),
        v4 => v4,
    }
}

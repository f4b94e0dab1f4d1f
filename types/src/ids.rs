//! Ids of users and media.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A user, as named in a token's `sub`. Accounts come with chat-core; until then an operator names
/// users when minting tokens, so the id is a short printable name.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct UserId(String);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("a user id is 1 to 64 characters of a-z, A-Z, 0-9, '-', '_' and '.'")]
pub struct UserIdError;

impl UserId {
    pub const MAX_LEN: usize = 64;

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for UserId {
    type Error = UserIdError;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        let ok = !s.is_empty()
            && s.len() <= Self::MAX_LEN
            && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
        if ok { Ok(Self(s)) } else { Err(UserIdError) }
    }
}

impl FromStr for UserId {
    type Err = UserIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::try_from(s.to_owned())
    }
}

impl From<UserId> for String {
    fn from(id: UserId) -> String {
        id.0
    }
}

impl fmt::Display for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "UserId({})", self.0)
    }
}

/// A UUIDv7 id newtype: time-ordered, printed hyphenated.
macro_rules! uuid_id {
    ($(#[$doc:meta])* $name:ident, $err:ident, $what:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        pub struct $name(uuid::Uuid);

        #[derive(Debug, thiserror::Error, PartialEq, Eq)]
        #[error("not a {} id", $what)]
        pub struct $err;

        impl $name {
            pub fn new() -> Self {
                Self(uuid::Uuid::now_v7())
            }
        }

        impl Default for $name {
            fn default() -> Self {
                Self::new()
            }
        }

        impl FromStr for $name {
            type Err = $err;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                uuid::Uuid::try_parse(s).map(Self).map_err(|_| $err)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.hyphenated().fmt(f)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!(stringify!($name), "({})"), self)
            }
        }
    };
}

uuid_id!(
    /// A media record. UUIDv7, so ids sort by creation time and index well.
    MediaId,
    MediaIdError,
    "media"
);
uuid_id!(
    /// A conversation: a direct chat of two users or a group.
    ConversationId,
    ConversationIdError,
    "conversation"
);
uuid_id!(
    /// One device (phone, desktop) of a user; delivery state is kept per device.
    DeviceId,
    DeviceIdError,
    "device"
);

impl DeviceId {
    /// The sender device of system messages (a group's membership or settings changed): no
    /// user's device, so every device of the user who made the change gets the message too.
    pub const SYSTEM: DeviceId = DeviceId(uuid::Uuid::nil());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_ids_are_short_and_printable() {
        assert!("alice".parse::<UserId>().is_ok());
        assert!("bob.smith-2_x".parse::<UserId>().is_ok());
        assert!("".parse::<UserId>().is_err());
        assert!("a b".parse::<UserId>().is_err());
        assert!("x".repeat(65).parse::<UserId>().is_err());
    }

    #[test]
    fn media_ids_round_trip() {
        let id = MediaId::new();
        assert_eq!(id.to_string().parse::<MediaId>(), Ok(id));
        assert!("nope".parse::<MediaId>().is_err());
    }
}

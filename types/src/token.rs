//! Bearer tokens: HS256 JWTs whose `sub` is the user and `exp` the expiry.

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::{DeviceId, Secret, UserId};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Claims {
    pub sub: UserId,
    /// The device the token was issued to; messaging needs one, media routes do not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dev: Option<DeviceId>,
    pub iat: u64,
    pub exp: u64,
}

/// The token in an `Authorization` header value: `Bearer <token>` (or `bearer`), trimmed.
pub fn bearer_token(authorization: &str) -> Option<&str> {
    authorization.strip_prefix("Bearer ").or_else(|| authorization.strip_prefix("bearer ")).map(str::trim)
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("the token has expired")]
    Expired,
    #[error("the token is not valid")]
    Invalid,
}

/// Signs and checks bearer tokens with the key in `token-signing.key`.
#[derive(Clone)]
pub struct TokenKeys {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
}

impl TokenKeys {
    pub fn new(secret: &Secret) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = 0;
        validation.set_required_spec_claims(&["exp", "sub"]);
        Self {
            encoding: EncodingKey::from_secret(secret.as_bytes()),
            decoding: DecodingKey::from_secret(secret.as_bytes()),
            validation,
        }
    }

    pub fn mint(&self, user: &UserId, now: u64, ttl_secs: u64) -> String {
        self.sign(&Claims { sub: user.clone(), dev: None, iat: now, exp: now.saturating_add(ttl_secs) })
    }

    /// A token bound to one of the user's devices.
    pub fn mint_for_device(&self, user: &UserId, device: DeviceId, now: u64, ttl_secs: u64) -> String {
        self.sign(&Claims { sub: user.clone(), dev: Some(device), iat: now, exp: now.saturating_add(ttl_secs) })
    }

    fn sign(&self, claims: &Claims) -> String {
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), claims, &self.encoding)
            .expect("HS256 signing of plain claims cannot fail")
    }

    /// Checks signature, algorithm and expiry (against the system clock, as jsonwebtoken does).
    pub fn verify(&self, token: &str) -> Result<Claims, TokenError> {
        match jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation) {
            Ok(data) => Ok(data.claims),
            Err(e) if matches!(e.kind(), jsonwebtoken::errors::ErrorKind::ExpiredSignature) => Err(TokenError::Expired),
            Err(_) => Err(TokenError::Invalid),
        }
    }
}

impl std::fmt::Debug for TokenKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenKeys(..)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> u64 {
        jsonwebtoken::get_current_timestamp()
    }

    #[test]
    fn minted_tokens_verify_and_others_do_not() {
        let keys = TokenKeys::new(&Secret::from_bytes([1; 32]));
        let alice: UserId = "alice".parse().unwrap();
        let token = keys.mint(&alice, now(), 60);
        assert_eq!(keys.verify(&token).unwrap().sub, alice);
        assert_eq!(keys.verify(&keys.mint(&alice, now() - 120, 60)), Err(TokenError::Expired));
        let other = TokenKeys::new(&Secret::from_bytes([2; 32]));
        assert_eq!(other.verify(&token), Err(TokenError::Invalid));
        assert_eq!(keys.verify("not.a.token"), Err(TokenError::Invalid));
    }
}

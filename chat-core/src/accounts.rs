//! Phone accounts: verification codes over an SMS webhook, devices, rotating refresh tokens, and
//! contact lookup.
//!
//! Codes and refresh tokens are stored as BLAKE3 hashes only. A refresh token is spent by use and
//! replaced; presenting a spent one again means it was copied, so the device is logged out (its
//! tokens and cursors go, its connections close). A signed-in device links another only with a
//! fresh SMS code (here) or another device's approval (`Chat::request_link`); past the device
//! limit the least recently seen device is replaced. Rate limits
//! are shared by all nodes (see [`crate::limits`]).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::JsonRejection;
use axum::extract::{ConnectInfo, Query, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use base64::Engine;
use serde::Deserialize;
use serde_json::{Value, json};
use types::{Claims, DeviceId, UserId};

use crate::chat::{Chat, now_ms};
use crate::error::{ApiError, json_body};
use crate::limits::{self, Country};
use crate::store::{CodeCheck, Rotation, Spend};

/// How long a verification code is good for.
const CODE_TTL_MS: i64 = 10 * 60 * 1000;
/// Longest device name.
const MAX_DEVICE_NAME: usize = 128;
/// Tries to deliver one code to the SMS webhook.
const SMS_ATTEMPTS: u32 = 5;

/// An E.164 number: `+` and 8 to 15 digits, the first not 0.
fn check_phone(phone: &str) -> Result<&str, ApiError> {
    let digits = phone.strip_prefix('+').unwrap_or("");
    let ok = (8..=15).contains(&digits.len()) && digits.bytes().all(|b| b.is_ascii_digit()) && !digits.starts_with('0');
    if ok { Ok(phone) } else { Err(ApiError::Invalid("phone is an E.164 number such as +4915112345678".into())) }
}

/// The country of an E.164 number, from libphonenumber's metadata: the key of the per-country SMS
/// cap. Parsed off the async runtime (the metadata loads on first use).
async fn country(phone: &str) -> Result<Country, ApiError> {
    let owned = phone.to_owned();
    let parsed = tokio::task::spawn_blocking(move || {
        phonenumber::parse(None, &owned).map(|n| Country {
            calling_code: n.code().value(),
            region: n.country().id().map(|id| id.as_ref().to_owned()),
        })
    })
    .await
    .map_err(|e| ApiError::Invalid(format!("could not read the phone number: {e}")))?;
    parsed.map_err(|_| ApiError::Invalid(format!("{phone} has no country calling code")))
}

fn hash(parts: &[&str]) -> String {
    let mut hasher = blake3::Hasher::new();
    for part in parts {
        hasher.update(part.as_bytes());
        hasher.update(&[0]);
    }
    hasher.finalize().to_hex().to_string()
}

fn random_bytes<const N: usize>() -> [u8; N] {
    let mut bytes = [0u8; N];
    getrandom::fill(&mut bytes).expect("the OS random source works");
    bytes
}

/// Six decimal digits, uniform.
fn new_code() -> String {
    loop {
        let n = u32::from_le_bytes(random_bytes::<4>());
        // Reject the top sliver so every code is equally likely.
        if n < u32::MAX - u32::MAX % 1_000_000 {
            return format!("{:06}", n % 1_000_000);
        }
    }
}

fn new_refresh_token() -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(random_bytes::<32>())
}

/// The client's address as limits count it (an IPv6 /64 as one); the server puts the address a
/// trusted proxy forwards in place of the proxy's.
fn client(addr: Option<Extension<ConnectInfo<SocketAddr>>>) -> IpAddr {
    types::client_key(addr.map(|Extension(ConnectInfo(a))| a.ip()).unwrap_or(IpAddr::from([0, 0, 0, 0])))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct CodeRequest {
    phone: String,
}

/// `POST /v1/auth/code`: sends a code to the phone (202).
pub(crate) async fn request_code(
    State(chat): State<Arc<Chat>>,
    addr: Option<Extension<ConnectInfo<SocketAddr>>>,
    body: Result<Json<CodeRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let CodeRequest { phone } = json_body(body)?;
    let phone = check_phone(&phone)?;
    let client = client(addr);
    chat.shed(client)?;
    chat.limit(limits::CODES_PER_CLIENT, &client.to_string()).await?;
    let country = country(phone).await?;
    let per_country =
        limits::sms_per_country(&chat.auth, &country).ok_or_else(|| ApiError::CountryUnavailable(country.key()))?;
    // The country first: a pumping run that empties it must not spend real users' per-phone codes
    // on requests it refuses.
    chat.limit(per_country, &country.key()).await?;
    let per_code = limits::sms_per_calling_code(&chat.auth, &country);
    if let Some((limit, code)) = &per_code {
        if chat.auth.sms_country_limits.get(code) == Some(&0) {
            chat.give_back(per_country, &country.key()).await;
            return Err(ApiError::CountryUnavailable(code.clone()));
        }
        if let Err(e) = chat.limit(*limit, code).await {
            chat.give_back(per_country, &country.key()).await;
            return Err(e);
        }
    }
    if let Err(e) = chat.limit(limits::CODES_PER_PHONE, phone).await {
        chat.give_back(per_country, &country.key()).await;
        if let Some((limit, code)) = &per_code {
            chat.give_back(*limit, code).await;
        }
        return Err(e);
    }
    let code = new_code();
    let now = now_ms();
    chat.store.put_code(phone, &hash(&[phone, &code]), now + CODE_TTL_MS, now).await?;
    if let Some(url) = chat.auth.sms_webhook_url.clone() {
        tokio::spawn(send_sms(url, phone.to_owned(), code.clone()));
    } else if !chat.auth.dev_codes {
        tracing::warn!("a verification code was requested but no auth.sms_webhook_url is configured");
    }
    let mut answer = json!({ "expires_in": CODE_TTL_MS / 1000 });
    if chat.auth.dev_codes {
        answer["dev_code"] = json!(code);
    }
    Ok((StatusCode::ACCEPTED, Json(answer)))
}

/// Delivers a code to the SMS webhook, retrying with back-off; gives up after [`SMS_ATTEMPTS`].
async fn send_sms(url: String, phone: String, code: String) {
    let client = match reqwest::Client::builder().timeout(Duration::from_secs(10)).build() {
        Ok(c) => c,
        Err(e) => return tracing::error!(error = %e, "could not build the SMS webhook client"),
    };
    let body = json!({ "phone": phone, "code": code, "message": format!("Your Courier code is {code}") });
    for attempt in 0..SMS_ATTEMPTS {
        match client.post(&url).json(&body).send().await {
            Ok(r) if r.status().is_success() => return,
            Ok(r) => tracing::warn!(status = %r.status(), attempt, "SMS webhook refused a code"),
            Err(e) => tracing::warn!(error = %e, attempt, "SMS webhook unreachable"),
        }
        tokio::time::sleep(Duration::from_secs(1 << attempt)).await;
    }
    tracing::error!("gave up delivering a verification code to the SMS webhook");
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Verify {
    phone: String,
    code: String,
    device_name: String,
}

/// `POST /v1/auth/verify`: a right code links a new device and returns its tokens.
pub(crate) async fn verify(
    State(chat): State<Arc<Chat>>,
    addr: Option<Extension<ConnectInfo<SocketAddr>>>,
    body: Result<Json<Verify>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    let Verify { phone, code, device_name } = json_body(body)?;
    let phone = check_phone(&phone)?;
    let name = device_name.trim();
    if name.is_empty() || name.len() > MAX_DEVICE_NAME {
        return Err(ApiError::Invalid(format!("device_name is 1 to {MAX_DEVICE_NAME} bytes")));
    }
    let client = client(addr);
    chat.shed(client)?;
    chat.limit(limits::VERIFY_PER_CLIENT, &client.to_string()).await?;
    let now = now_ms();
    guess(&chat, phone, code.trim(), now).await?;
    let user = chat.store.user_for_phone(phone, now).await?;
    let linked = chat.store.add_device(&user, name).await?;
    chat.linked(&user, linked, name).await;
    let device = linked.device;
    let refresh = new_refresh_token();
    chat.store.issue_refresh(&hash(&[&refresh]), &user, &device, now + refresh_ttl_ms(&chat), now).await?;
    Ok(Json(session(&chat, &user, device, &refresh)))
}

/// What sign-in and refresh answer: the device's ids and a fresh pair of tokens.
fn session(chat: &Chat, user: &UserId, device: DeviceId, refresh: &str) -> Value {
    json!({
        "user_id": user,
        "device_id": device.to_string(),
        "access_token": chat.access_token(user, device),
        "refresh_token": refresh,
        "expires_in": chat.auth.access_token_secs,
    })
}

fn refresh_ttl_ms(chat: &Chat) -> i64 {
    chat.auth.refresh_token_days as i64 * 86_400_000
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Refresh {
    refresh_token: String,
}

/// `POST /v1/auth/refresh`: spends a refresh token for a new access token and refresh token.
pub(crate) async fn refresh(
    State(chat): State<Arc<Chat>>,
    addr: Option<Extension<ConnectInfo<SocketAddr>>>,
    body: Result<Json<Refresh>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    let Refresh { refresh_token } = json_body(body)?;
    chat.shed(client(addr))?;
    chat.limit(limits::REFRESH_PER_CLIENT, &client(addr).to_string()).await?;
    let now = now_ms();
    let next = new_refresh_token();
    let (old_hash, new_hash, client) = (hash(&[&refresh_token]), hash(&[&next]), client(addr).to_string());
    let spend = Spend {
        old_hash: &old_hash,
        new_hash: &new_hash,
        client: &client,
        grace_ms: chat.auth.refresh_grace_secs as i64 * 1000,
        expires_at_ms: now + refresh_ttl_ms(&chat),
        now_ms: now,
    };
    let rotation = chat.store.rotate_refresh(&spend).await?;
    match rotation {
        Rotation::Rotated { user, device } => {
            if let Err(e) = chat.store.device_seen(&user, &device).await {
                tracing::warn!(error = %e, %user, "could not note that a device was seen");
            }
            Ok(Json(session(&chat, &user, device, &next)))
        }
        Rotation::Reused { user, device } => {
            tracing::warn!(%user, %device, "a spent refresh token was presented again; the device is logged out");
            // The store has unlinked it already; its connections close now.
            chat.forget_device(&user, device).await;
            Err(ApiError::BadRefreshToken)
        }
        Rotation::Invalid => Err(ApiError::BadRefreshToken),
    }
}

/// Checks the SMS code that lets a signed-in device link another: a token alone is not enough,
/// so a stolen one cannot chain new devices. The code is spent by the check, like a sign-in's.
pub(crate) async fn check_link_code(chat: &Chat, user: &UserId, code: Option<&str>) -> Result<(), ApiError> {
    let phone = chat.store.phone_of(user).await?.ok_or(ApiError::NoPhone)?;
    let code = code.ok_or_else(|| {
        ApiError::Invalid(
            "linking a device from a signed-in one needs `code`: a fresh code sent by POST /v1/auth/code to the \
             account's phone"
                .into(),
        )
    })?;
    chat.limit(limits::LINKS_PER_USER, user.as_str()).await?;
    guess(chat, &phone, code.trim(), now_ms()).await
}

/// One guess at `phone`'s pending code, within the phone's wrong guesses (counted across codes:
/// a new code does not reset them). Only a wrong guess at a pending code counts.
async fn guess(chat: &Chat, phone: &str, code: &str, now: i64) -> Result<(), ApiError> {
    chat.peek_limit(limits::GUESSES_PER_PHONE, phone).await?;
    match chat.store.check_code(phone, &hash(&[phone, code]), now).await? {
        CodeCheck::Valid => Ok(()),
        CodeCheck::Wrong => {
            // Spent after the fact: a burst of guesses at once may pass the bucket by the few in
            // flight, no more (each client is limited too).
            let _ = chat.limit(limits::GUESSES_PER_PHONE, phone).await;
            Err(ApiError::Code(CodeCheck::Wrong))
        }
        other => Err(ApiError::Code(other)),
    }
}

#[derive(Deserialize)]
pub(crate) struct Lookup {
    phone: String,
}

/// `GET /v1/users/lookup?phone=…`: the user id of a phone number (contact discovery), rate-limited
/// per caller.
pub(crate) async fn lookup(
    State(chat): State<Arc<Chat>>,
    Extension(claims): Extension<Claims>,
    query: Result<Query<Lookup>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(Lookup { phone }) = query.map_err(|e| ApiError::Invalid(e.body_text()))?;
    // A `+` left unencoded in a query string reads as a space: `?phone=+49…` means `+49…`.
    let phone = match phone.strip_prefix(' ') {
        Some(rest) => format!("+{rest}"),
        None => phone,
    };
    let phone = check_phone(&phone)?;
    chat.limit(limits::LOOKUPS_PER_USER, claims.sub.as_str()).await?;
    match chat.store.lookup_phone(phone).await? {
        Some(user) => Ok(Json(json!({ "user_id": user }))),
        None => Err(ApiError::NotFound("user with that phone")),
    }
}

/// Most numbers one discovery takes.
const MAX_DISCOVER: usize = 1000;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Discover {
    phones: Vec<String>,
}

/// `POST /v1/contacts/discover {"phones": [...]}`: which of up to 1,000 numbers (an address book)
/// have users, rate-limited per account per day. Numbers, not hashes: a hash of a phone number hides
/// nothing (the numbering plan is small enough to hash whole).
pub(crate) async fn discover(
    State(chat): State<Arc<Chat>>,
    Extension(claims): Extension<Claims>,
    body: Result<Json<Discover>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    let Discover { phones } = json_body(body)?;
    if phones.is_empty() || phones.len() > MAX_DISCOVER {
        return Err(ApiError::Invalid(format!("phones holds 1 to {MAX_DISCOVER} numbers")));
    }
    for phone in &phones {
        check_phone(phone)?;
    }
    chat.limit(limits::DISCOVERIES_PER_USER, claims.sub.as_str()).await?;
    let found = chat.store.lookup_phones(&phones).await?;
    let users: Vec<Value> = found.iter().map(|(phone, user)| json!({ "phone": phone, "user_id": user })).collect();
    Ok(Json(json!({ "users": users })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phones_are_e164() {
        assert!(check_phone("+4915112345678").is_ok());
        for bad in ["4915112345678", "+0151", "+49 151", "+1234567", "+1234567890123456", "+", ""] {
            assert!(check_phone(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn codes_are_six_digits() {
        for _ in 0..100 {
            let code = new_code();
            assert_eq!(code.len(), 6);
            assert!(code.bytes().all(|b| b.is_ascii_digit()));
        }
    }
}

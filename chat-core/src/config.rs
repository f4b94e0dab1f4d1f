//! chat-core's settings, embedded in `courier serve`'s config as `[chat]` and `[auth]`.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ChatConfig {
    /// Messages older than this many days are purged. Default 30; 0 keeps them forever.
    pub retention_days: u32,
    /// Where offline-push notifications are POSTed (JSON, no message text). Unset: no push.
    pub push_webhook_url: Option<String>,
    /// Milliseconds a recipient device has to ack a message before it is pushed: a device that
    /// acks in time (the app got it live) is not. Default 5000.
    pub push_delay_ms: u64,
    /// Seconds between the server's WebSocket pings. Default 25.
    pub heartbeat_secs: u64,
    /// Seconds without any frame from the client (pongs count) before it is disconnected. Default 75.
    pub idle_timeout_secs: u64,
    /// Seconds one write to a client may take before the client is deemed stuck. Default 10.
    pub send_timeout_secs: u64,
    /// Events queued for one connection before it is disconnected as too slow. Default 256.
    pub outbound_queue: usize,
    /// WebSocket connections one device may hold on a node; a newer one closes its oldest (4009).
    /// Default 2 (an app reconnecting before its old socket has timed out).
    pub max_sockets_per_device: usize,
    /// NATS server for cross-node fan-out (`nats://host:4222`); unset: one node, in-process only.
    pub bus_url: Option<String>,
    /// A NATS credentials file (`.creds`) for the bus; or put a user and password in `bus_url`.
    pub bus_creds_file: Option<std::path::PathBuf>,
    /// The prefix of the NATS subjects the nodes of one cluster share. Default "courier.chat.fanout".
    pub bus_subject: String,
    /// Envelopes to other nodes this node drops on purpose, to test that the cluster repairs the
    /// loss. Testing only. Default 0.
    pub test_drop_envelopes: u32,
    /// Media shares after a committed send that this node fails on
    /// purpose, to test that a stored message is answered as sent and delivered by a retry.
    /// Testing only. Default 0.
    pub test_fail_deliveries: u32,
    /// Wake-ups of stored messages this node loses on purpose (as a crash between commit and
    /// fan-out would), to test that connections find the gap on their own. Testing only. Default 0.
    pub test_lose_wakeups: u32,
    /// Seconds between a connection's checks of its conversations for messages it was never woken
    /// for (a lost wake-up); the first comes at a random point of the first interval. Each check
    /// is one read of the user's conversations. Default 60.
    pub gap_check_secs: u64,
}

impl Default for ChatConfig {
    fn default() -> Self {
        Self {
            retention_days: 30,
            push_webhook_url: None,
            push_delay_ms: 5_000,
            heartbeat_secs: 25,
            idle_timeout_secs: 75,
            send_timeout_secs: 10,
            outbound_queue: 256,
            max_sockets_per_device: 2,
            bus_url: None,
            bus_creds_file: None,
            bus_subject: "courier.chat.fanout".into(),
            test_drop_envelopes: 0,
            test_fail_deliveries: 0,
            test_lose_wakeups: 0,
            gap_check_secs: 60,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// Where verification codes are POSTed as `{"phone","code","message"}` for an SMS gateway.
    pub sms_webhook_url: Option<String>,
    /// Answer `POST /v1/auth/code` with the code itself (`dev_code`). Development only; `courier
    /// serve --dev` turns it on. Default false.
    pub dev_codes: bool,
    /// Lifetime of an access token, in seconds. Default 3600.
    pub access_token_secs: u64,
    /// Lifetime of a refresh token, in days. Default 60.
    pub refresh_token_days: u64,
    /// Seconds a spent refresh token is taken again from the same client address, for a refresh
    /// whose answer was lost; later, or from elsewhere, it is a copy and logs the device out.
    /// Default 30.
    pub refresh_grace_secs: u64,
    /// Verification SMS sent to one country calling code per hour, across all nodes: toll fraud
    /// pumps codes to one country's premium numbers. Default 500.
    pub sms_per_country_per_hour: u32,
    /// The hourly cap for particular calling codes, in place of the default: `{"44" = 2000}`; 0
    /// sends no codes there. Default none.
    pub sms_country_limits: std::collections::BTreeMap<String, u32>,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            sms_webhook_url: None,
            dev_codes: false,
            access_token_secs: 3600,
            refresh_token_days: 60,
            refresh_grace_secs: 30,
            sms_per_country_per_hour: 500,
            sms_country_limits: Default::default(),
        }
    }
}

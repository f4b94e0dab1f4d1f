//! `courier serve`'s settings: one serde tree, read from defaults, then `--config FILE`, then
//! `COURIER_*` environment variables, then command-line flags, each overriding the one before.
//!
//! Nested keys take a double underscore in the environment: `COURIER_INGEST__MAX_UPLOAD_BYTES`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct Config {
    /// Address to listen on. Default 127.0.0.1:8080.
    pub(crate) listen: SocketAddr,
    /// Where the database, blobs, keys and temp files live. Default ./data.
    pub(crate) data_dir: PathBuf,
    /// Database URL: `sqlite://FILE` or `postgres://…`. Default: SQLite files in the data dir
    /// (`courier.db` for media, `chat.db` for messaging). Given, it holds everything: media records,
    /// jobs and grants, and messaging.
    pub(crate) database_url: Option<String>,
    /// Where blobs are stored: a folder, or an object store URL (`s3://bucket/prefix`, `gs://…`,
    /// `az://…`, credentials from the usual AWS_*/GOOGLE_*/AZURE_* variables). Default `{data_dir}/blobs`.
    pub(crate) blobs: Option<String>,
    /// The key that signs bearer tokens, a file every node of a cluster shares. Default
    /// `{data_dir}/token-signing.key`, made on first start. A file named here must exist.
    pub(crate) token_key_file: Option<PathBuf>,
    /// The key that signs blob URLs (edges hold a copy). Default `{data_dir}/url-signing.key`,
    /// made on first start. A file named here must exist.
    pub(crate) url_key_file: Option<PathBuf>,
    /// A bearer token (at least 16 characters) for the operator's routes (`GET
    /// /admin/deleted-blobs`); unset, they answer 404.
    pub(crate) admin_token: Option<String>,
    /// Seconds in-flight requests and jobs get to finish after SIGINT/SIGTERM. Default 10.
    pub(crate) shutdown_grace_secs: u64,
    /// Log filter in tracing's syntax. Default "info".
    pub(crate) log: String,
    /// "text" or "json". Default "text".
    pub(crate) log_format: LogFormat,
    pub(crate) http: HttpConfig,
    pub(crate) ingest: ingest::IngestConfig,
    pub(crate) transcode: TranscodeConfig,
    pub(crate) cache: CacheConfig,
    pub(crate) chat: chat_core::ChatConfig,
    pub(crate) auth: chat_core::AuthConfig,
}

/// Connection limits, shared by `serve`, `edge` and `worker`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct HttpConfig {
    /// Seconds from accepting a connection (TLS handshake included) to its first request's
    /// headers, and for each later request's headers once they begin. Default 10.
    pub(crate) header_read_timeout_secs: u64,
    /// Seconds a connection may sit with no request in flight before it is closed. Default 60.
    pub(crate) idle_timeout_secs: u64,
    /// Seconds a response may wait on a client that is not reading it. Default 60.
    pub(crate) stalled_write_timeout_secs: u64,
    /// Bytes a second a request body must keep up while the server waits for it, measured over
    /// `body_rate_window_secs`; below it the request gets 408 and its upload slot is freed.
    /// 0 turns the check off. Default 1024.
    pub(crate) min_body_rate: u64,
    /// Seconds the body rate is measured over. Default 10.
    pub(crate) body_rate_window_secs: u64,
    /// Seconds between HTTP/2 PINGs to a quiet peer; one not answered within as long again
    /// closes the connection. Default 20.
    pub(crate) keep_alive_interval_secs: u64,
    /// Open connections in all; past it a new one is closed at accept. 0: the open-file limit less
    /// a tenth (at least 256) kept for the database, blob files and workers. Default 0.
    pub(crate) max_connections: usize,
    /// Open connections from one client address (an IPv6 /64 counts as one); 0: no cap.
    /// Default 256 (carrier-grade NAT puts many phones behind one IPv4 address).
    pub(crate) max_connections_per_address: usize,
    /// Networks of the load balancers and proxies in front (e.g. `["10.0.0.0/8"]`): their
    /// connections are not held to the per-address cap. Default: none.
    pub(crate) trusted_proxies: Vec<ipnet::IpNet>,
    /// Largest request head, in bytes. Default 65536.
    pub(crate) max_header_bytes: usize,
    /// HTTP/1 requests per connection before it is closed. Default 10000.
    pub(crate) max_requests_per_connection: u64,
    /// Concurrent HTTP/2 streams per connection. Default 256.
    pub(crate) max_concurrent_streams: u32,
    /// Serve `/metrics` on this address only, rather than beside the API. Default: unset.
    pub(crate) metrics_listen: Option<SocketAddr>,
    /// Web origins whose pages may call the API from a browser (CORS), such as
    /// `["https://web.example"]`; `["*"]` lets any page (never with credentials: the API takes
    /// bearer tokens, not cookies). Default: none.
    pub(crate) allowed_origins: Vec<String>,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            header_read_timeout_secs: 10,
            idle_timeout_secs: 60,
            stalled_write_timeout_secs: 60,
            min_body_rate: 1024,
            body_rate_window_secs: 10,
            keep_alive_interval_secs: 20,
            max_connections: 0,
            max_connections_per_address: 256,
            trusted_proxies: Vec::new(),
            max_header_bytes: 64 * 1024,
            max_requests_per_connection: 10_000,
            allowed_origins: Vec::new(),
            max_concurrent_streams: 256,
            metrics_listen: None,
        }
    }
}

impl HttpConfig {
    /// The listener's options, with connection caps sized against `fd_limit`, this process's
    /// open-file limit.
    pub(crate) fn options(
        &self,
        tls: Option<std::sync::Arc<rustls::ServerConfig>>,
        grace_secs: u64,
        fd_limit: u64,
    ) -> crate::listener::HttpOptions {
        use std::time::Duration;
        let secs = |s: u64| Duration::from_secs(s.max(1));
        let fd_limit = usize::try_from(fd_limit).unwrap_or(usize::MAX);
        let max_connections = match self.max_connections {
            0 => fd_limit.saturating_sub((fd_limit / 10).max(256)).max(1),
            n => n,
        };
        let limits = crate::connections::Limits {
            max_connections,
            max_per_address: self.max_connections_per_address,
            trusted_proxies: self.trusted_proxies.clone(),
            first_request: secs(self.header_read_timeout_secs),
            idle: secs(self.idle_timeout_secs),
            stalled_write: secs(self.stalled_write_timeout_secs),
            min_body_rate: self.min_body_rate,
            body_rate_window: secs(self.body_rate_window_secs),
        };
        crate::listener::HttpOptions {
            header_read_timeout: secs(self.header_read_timeout_secs),
            max_header_bytes: self.max_header_bytes,
            max_requests_per_connection: self.max_requests_per_connection.max(1),
            max_concurrent_streams: self.max_concurrent_streams,
            keep_alive_interval: secs(self.keep_alive_interval_secs),
            keep_alive_timeout: secs(self.keep_alive_interval_secs),
            max_pending_accept_reset_streams: 20,
            max_local_error_reset_streams: 1024,
            tls,
            grace: Duration::from_secs(grace_secs),
            connections: crate::connections::Connections::new(limits),
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub(crate) enum LogFormat {
    Text,
    Json,
}

/// The sandboxed worker processes every probe and transcode runs in.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct TranscodeConfig {
    /// Worker processes for photos and voice notes. 0 means one per core; default 0.
    pub(crate) workers: usize,
    /// Whether this process works the job queue. false makes an API-only node whose jobs another
    /// process runs (or this one after a restart). Default true.
    pub(crate) run_jobs: bool,
    /// Jobs a photo or voice-note worker runs before it is replaced by a fresh one. Default 200.
    pub(crate) jobs_per_worker: u32,
    /// A worker whose resident memory has peaked above this is replaced after its job. Default 256 MiB.
    pub(crate) recycle_rss_bytes: u64,
    /// Worker processes for upload-time header checks. Default 2.
    pub(crate) probe_workers: usize,
    /// How long an upload's header check may take, waiting for a worker included. Default 5000.
    pub(crate) probe_timeout_ms: u64,
    /// Address space a header check may use beyond the worker's own. Default 256 MiB.
    pub(crate) probe_memory_bytes: u64,
    /// Run workers as this user, `NAME` or `UID[:GID]`, when `serve` runs as root. Default: unset
    /// (workers keep the server's user, inside their sandbox).
    pub(crate) worker_user: Option<String>,
    /// The program started as a worker, given the worker's flags. Default: this binary's
    /// `transcode-worker`. For wrapping workers in a further sandbox, and for tests.
    pub(crate) worker_program: Option<PathBuf>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct CacheConfig {
    /// Bytes of served blobs kept in memory. Default 256 MiB.
    pub(crate) memory_bytes: u64,
    /// Blobs larger than this are streamed from storage instead of kept in memory. Default 8 MiB.
    pub(crate) max_object_bytes: u64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            data_dir: PathBuf::from("./data"),
            database_url: None,
            blobs: None,
            token_key_file: None,
            url_key_file: None,
            admin_token: None,
            shutdown_grace_secs: 10,
            log: "info".into(),
            log_format: LogFormat::Text,
            http: Default::default(),
            ingest: Default::default(),
            transcode: Default::default(),
            cache: Default::default(),
            chat: Default::default(),
            auth: Default::default(),
        }
    }
}

impl Default for TranscodeConfig {
    fn default() -> Self {
        Self {
            workers: 0,
            run_jobs: true,
            jobs_per_worker: 200,
            recycle_rss_bytes: 256 * 1024 * 1024,
            probe_workers: 2,
            probe_timeout_ms: 5000,
            probe_memory_bytes: 256 * 1024 * 1024,
            worker_user: None,
            worker_program: None,
        }
    }
}

impl TranscodeConfig {
    /// `worker_user` as a uid and gid: a number (`UID` or `UID:GID`), or a name from /etc/passwd.
    pub(crate) fn worker_ids(&self) -> anyhow::Result<Option<(u32, u32)>> {
        let Some(user) = self.worker_user.as_deref() else { return Ok(None) };
        if let Some((uid, gid)) = user.split_once(':') {
            return Ok(Some((uid.parse().context("worker_user uid")?, gid.parse().context("worker_user gid")?)));
        }
        if let Ok(uid) = user.parse::<u32>() {
            return Ok(Some((uid, uid)));
        }
        let passwd = std::fs::read_to_string("/etc/passwd").context("reading /etc/passwd for worker_user")?;
        passwd
            .lines()
            .map(|line| line.split(':').collect::<Vec<_>>())
            .find(|fields| fields.first() == Some(&user))
            .and_then(|fields| Some((fields.get(2)?.parse().ok()?, fields.get(3)?.parse().ok()?)))
            .map(Some)
            .with_context(|| format!("worker_user {user:?} is not in /etc/passwd"))
    }
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self { memory_bytes: 256 * 1024 * 1024, max_object_bytes: 8 * 1024 * 1024 }
    }
}

/// Values given as flags; `None` leaves the lower layers' value.
#[derive(Debug, Default, Serialize)]
pub(crate) struct FlagOverrides {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) listen: Option<SocketAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) data_dir: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) database_url: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) blobs: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) token_key_file: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) url_key_file: Option<PathBuf>,
    /// `--transcode-workers`
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) transcode: Option<TranscodeFlag>,
    /// `--dev`: verification codes come back in the response.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) auth: Option<DevAuth>,
    /// `--bus`
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) chat: Option<BusFlag>,
}

/// `--transcode-workers N`: N photo and voice-note workers, or 0 for a node that runs no jobs.
#[derive(Debug, Serialize)]
pub(crate) struct TranscodeFlag {
    #[serde(skip_serializing_if = "Option::is_none")]
    workers: Option<usize>,
    run_jobs: bool,
}

impl TranscodeFlag {
    pub(crate) fn workers(n: usize) -> Self {
        Self { workers: (n > 0).then_some(n), run_jobs: n > 0 }
    }

    /// A node that runs jobs whatever a shared config says (`courier worker`).
    pub(crate) fn run_jobs() -> Self {
        Self { workers: None, run_jobs: true }
    }
}

#[derive(Debug, Serialize)]
pub(crate) struct BusFlag {
    pub(crate) bus_url: String,
}

#[derive(Debug, Serialize)]
pub(crate) struct DevAuth {
    pub(crate) dev_codes: bool,
}

/// defaults < TOML `file` < `{prefix}*` environment variables < `flags`. Environment keys that start
/// with one of `skip` (lowercase, after the prefix) belong to something else; `config` names the file.
pub(crate) fn layered<T: Serialize + serde::de::DeserializeOwned>(
    defaults: T,
    file: Option<&Path>,
    prefix: &str,
    skip: &[&str],
    flags: impl Serialize,
) -> anyhow::Result<T> {
    let mut figment = Figment::from(Serialized::defaults(defaults));
    if let Some(file) = file {
        anyhow::ensure!(file.exists(), "config file {} does not exist", file.display());
        figment = figment.merge(Toml::file(file));
    }
    let skip: Vec<String> = skip.iter().map(|s| s.to_string()).collect();
    let env = Env::prefixed(prefix).split("__").filter(move |key| {
        let key = key.as_str().to_ascii_lowercase();
        key != "config" && !skip.iter().any(|s| key.starts_with(s.as_str()))
    });
    figment.merge(env).merge(Serialized::defaults(flags)).extract().context("invalid configuration")
}

impl Config {
    pub(crate) fn load(file: Option<&Path>, flags: FlagOverrides) -> anyhow::Result<Self> {
        // COURIER_EDGE_* configure `courier edge`, and COURIER_TEST_* belong to the test suites.
        let config: Config = layered(Config::default(), file, "COURIER_", &["edge_", "test_"], flags)?;
        if let Some(base) = &config.ingest.public_base_url
            && !(base.starts_with("https://") || base.starts_with("http://"))
        {
            anyhow::bail!(
                "ingest.public_base_url is an http(s) origin such as https://media.example.com, not {base:?}"
            );
        }
        if let Some(token) = &config.admin_token {
            anyhow::ensure!(
                token.trim().len() >= crate::edge::MIN_ADMIN_TOKEN_CHARS,
                "admin_token must be at least {} characters (make one with `openssl rand -hex 32`)",
                crate::edge::MIN_ADMIN_TOKEN_CHARS
            );
        }
        Ok(config)
    }

    /// Ingest's database: `database_url` (SQLite or PostgreSQL), else `{data_dir}/courier.db`.
    pub(crate) fn ingest_database_url(&self) -> String {
        self.database_url.clone().unwrap_or_else(|| format!("sqlite://{}", self.data_dir.join("courier.db").display()))
    }

    /// chat-core's database: `database_url` (SQLite or PostgreSQL), else `{data_dir}/chat.db`, a file
    /// of its own so messaging and uploads do not queue for one SQLite write lock.
    pub(crate) fn chat_database_url(&self) -> String {
        self.database_url.clone().unwrap_or_else(|| format!("sqlite://{}", self.data_dir.join("chat.db").display()))
    }

    /// The token-signing and URL-signing keys: the files named, or the data dir's own.
    pub(crate) fn keys(&self) -> anyhow::Result<(types::Secret, types::Secret)> {
        let key = |file: &Option<PathBuf>, name| match file {
            Some(path) => crate::secrets::load(path),
            None => crate::secrets::load_or_create(&self.data_dir, name),
        };
        Ok((key(&self.token_key_file, crate::secrets::TOKEN_KEY)?, key(&self.url_key_file, crate::secrets::URL_KEY)?))
    }

    pub(crate) fn blobs(&self) -> String {
        self.blobs.clone().unwrap_or_else(|| self.data_dir.join("blobs").display().to_string())
    }

    pub(crate) fn workers(&self) -> usize {
        match self.transcode.workers {
            0 => std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            n => n,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The sample config files list real settings: a renamed or removed key fails here, not in
    /// front of an operator.
    #[test]
    fn the_deploy_files_parse() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy");
        let serve = Config::load(Some(&dir.join("courier.toml")), FlagOverrides::default()).unwrap();
        assert_eq!(serve.chat.retention_days, 30);
        assert_eq!(serve.chat.bus_subject, "courier.chat.fanout");
        assert!(!serve.auth.dev_codes, "the sample must never turn dev codes on");
        crate::edge::EdgeConfig::load(Some(&dir.join("edge.toml")), crate::edge::EdgeFlags::default()).unwrap();
    }
}

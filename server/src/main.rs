//! `courier`: the origin server (`serve`) and operator commands (`token`).
//!
//! Thin glue: configuration, wiring of the domain crates' routers and workers, authentication,
//! logging and shutdown. Domain logic lives in the crates it names.

mod admin;
mod auth;
mod config;
mod connections;
mod edge;
mod listener;
mod secrets;
mod serve;
mod worker;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "courier", version, about = "Courier: a media-first messaging backend")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the origin: HTTP API, transcode workers and blob serving.
    ///
    /// Settings come from built-in defaults, then --config, then COURIER_* environment variables
    /// (nested keys with "__", e.g. COURIER_INGEST__MAX_UPLOAD_BYTES), then these flags.
    Serve {
        /// Address to listen on [default: 127.0.0.1:8080] [env: COURIER_LISTEN]
        #[arg(long)]
        listen: Option<std::net::SocketAddr>,
        #[command(flatten)]
        node: NodeArgs,
        /// Photo and voice-note worker processes; 0 makes an API node that runs no jobs (a
        /// `courier worker` does) [default: one per core]
        #[arg(long)]
        transcode_workers: Option<usize>,
        /// NATS server for fan-out between nodes, nats://host:4222 [default: none, one node] [env: COURIER_CHAT__BUS_URL]
        #[arg(long)]
        bus: Option<String>,
        /// Development mode: sign-in codes come back in the response as "dev_code" (never in production)
        #[arg(long)]
        dev: bool,
    },
    /// Run a transcode node: claim jobs of any kind from the shared database and run them in
    /// sandboxed worker processes, reading originals from and writing variants to the shared blob
    /// store. Needs --database-url postgres://… (the queue `serve` nodes fill).
    Worker {
        /// Serve /healthz and /metrics (queue depth, jobs running) here [default: none]
        #[arg(long)]
        listen: Option<std::net::SocketAddr>,
        #[command(flatten)]
        node: NodeArgs,
        /// Photo and voice-note worker processes [default: one per core]
        #[arg(long)]
        transcode_workers: Option<usize>,
    },
    /// Run a CDN edge node: serve blobs from memory, local disk, then the upstreams, verifying
    /// every fill against its hash.
    ///
    /// Settings come from built-in defaults, then --config, then COURIER_EDGE_* environment
    /// variables, then these flags (see deploy/edge.toml).
    Edge {
        /// Address to listen on [default: 127.0.0.1:8081]
        #[arg(long)]
        listen: Option<std::net::SocketAddr>,
        /// An origin or parent edge (http://host:port) or the origin's blob folder (file:///path);
        /// repeat for fallbacks, tried in order
        #[arg(long)]
        upstream: Vec<String>,
        /// Folder of the disk tier [default: ./data/edge]
        #[arg(long)]
        cache_dir: Option<PathBuf>,
        /// Bytes of blobs kept in memory [default: 268435456]
        #[arg(long)]
        memory_bytes: Option<u64>,
        /// Bytes of blobs kept on disk [default: 10737418240]
        #[arg(long)]
        disk_bytes: Option<u64>,
        /// A copy of the origin's url-signing.key
        #[arg(long)]
        url_key: Option<PathBuf>,
        /// PEM certificate chain: serve HTTPS with HTTP/2 and HTTP/1.1
        #[arg(long)]
        tls_cert: Option<PathBuf>,
        /// PEM private key of --tls-cert
        #[arg(long)]
        tls_key: Option<PathBuf>,
        /// A TOML file with any of the settings
        #[arg(long, env = "COURIER_EDGE_CONFIG", hide_env_values = true)]
        config: Option<PathBuf>,
    },
    /// Print a signed `/b/{blob}` path that serve and edge nodes with this URL key accept.
    SignUrl {
        /// The url-signing.key (an origin's, or an edge's copy)
        #[arg(long)]
        url_key: PathBuf,
        /// The blob: 64 hex digits
        #[arg(long, required_unless_present = "file", conflicts_with = "file")]
        blob: Option<String>,
        /// Or a file, whose BLAKE3 names the blob
        #[arg(long)]
        file: Option<PathBuf>,
        /// Lifetime in seconds
        #[arg(long, default_value_t = 3600)]
        ttl: u64,
    },
    /// Print a bearer token for USER that `courier serve` on the same data dir accepts.
    Token {
        /// The data dir whose token-signing.key signs the token (made if missing)
        #[arg(long, default_value = "./data")]
        data_dir: PathBuf,
        /// Or the token key file a cluster's nodes share
        #[arg(long, env = "COURIER_TOKEN_KEY_FILE")]
        token_key_file: Option<PathBuf>,
        /// The user the token speaks for (1–64 of a-z A-Z 0-9 - _ .)
        #[arg(long)]
        user: String,
        /// Lifetime in seconds
        #[arg(long, default_value_t = 86400)]
        ttl: u64,
    },
    /// Internal: a sandboxed worker process `serve` runs probes and transcodes in (jobs as JSON
    /// lines on stdin, replies as JSON lines on stdout).
    #[command(hide = true)]
    TranscodeWorker {
        #[command(flatten)]
        sandbox: SandboxArgs,
    },
    /// Check the transcode workers' sandbox on this machine: enter it as a worker does with DIR as
    /// the worker's folder, try to open each --open path, then (with --socket) try to open a
    /// socket, which the sandbox answers by killing the process with SIGSYS.
    #[command(hide = true)]
    SandboxCheck {
        #[command(flatten)]
        sandbox: SandboxArgs,
        /// A path to try to open for reading; may repeat
        #[arg(long)]
        open: Vec<PathBuf>,
        /// Last, try to open a TCP socket
        #[arg(long)]
        socket: bool,
    },
}

/// What every node of a cluster is given alike: its settings, the shared database, blob store
/// and keys.
#[derive(Debug, clap::Args)]
struct NodeArgs {
    /// Folder for the database, blobs, keys and temp files [default: ./data] [env: COURIER_DATA_DIR]
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// A TOML file with any of the settings (see deploy/courier.toml)
    #[arg(long, env = "COURIER_CONFIG", hide_env_values = true)]
    config: Option<PathBuf>,
    /// Database URL, sqlite://FILE or postgres://… [default: SQLite files in the data dir] [env: COURIER_DATABASE_URL]
    #[arg(long)]
    database_url: Option<String>,
    /// Blob store: a folder, or s3://BUCKET[/PREFIX] (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID,
    /// AWS_SECRET_ACCESS_KEY, AWS_REGION, AWS_ALLOW_HTTP choose the service), gs://…, az://…
    /// [default: DATA_DIR/blobs] [env: COURIER_BLOBS]
    #[arg(long)]
    blobs: Option<String>,
    /// The token-signing key every node shares [default: DATA_DIR/token-signing.key, made if
    /// missing] [env: COURIER_TOKEN_KEY_FILE]
    #[arg(long)]
    token_key_file: Option<PathBuf>,
    /// The URL-signing key every node and edge shares [default: DATA_DIR/url-signing.key, made if
    /// missing] [env: COURIER_URL_KEY_FILE]
    #[arg(long)]
    url_key_file: Option<PathBuf>,
}

impl NodeArgs {
    /// The node's flags, layered over the defaults, --config and COURIER_* variables.
    fn config(
        self,
        listen: Option<std::net::SocketAddr>,
        extra: config::FlagOverrides,
    ) -> anyhow::Result<config::Config> {
        let flags = config::FlagOverrides {
            listen,
            data_dir: self.data_dir,
            database_url: self.database_url,
            blobs: self.blobs,
            token_key_file: self.token_key_file,
            url_key_file: self.url_key_file,
            ..extra
        };
        config::Config::load(self.config.as_deref(), flags)
    }
}

/// Where a worker lives and what it may use (set by `serve`).
#[derive(Debug, clap::Args)]
struct SandboxArgs {
    #[arg(long)]
    dir: PathBuf,
    /// The pid of the process that started it; the worker exits if that one is gone
    #[arg(long)]
    parent: Option<i32>,
    #[arg(long, default_value_t = 512 * 1024 * 1024)]
    memory_bytes: u64,
    #[arg(long, default_value_t = 256 * 1024 * 1024)]
    file_bytes: u64,
    #[arg(long, default_value_t = 64)]
    open_files: u64,
    #[arg(long, default_value_t = 0, allow_hyphen_values = true)]
    niceness: i32,
}

impl SandboxArgs {
    fn limits(&self) -> transcode::sandbox::Limits {
        transcode::sandbox::Limits {
            memory_bytes: self.memory_bytes,
            file_bytes: self.file_bytes,
            open_files: self.open_files,
            niceness: self.niceness,
        }
    }
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("courier: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::TranscodeWorker { sandbox } => {
            std::process::exit(transcode::worker::main(&sandbox.dir, sandbox.parent, &sandbox.limits()))
        }
        Command::SandboxCheck { sandbox, open, socket } => {
            std::process::exit(transcode::worker::check(&sandbox.dir, sandbox.parent, &sandbox.limits(), &open, socket))
        }
        Command::Serve { listen, node, transcode_workers, bus, dev } => {
            let extra = config::FlagOverrides {
                auth: dev.then_some(config::DevAuth { dev_codes: true }),
                chat: bus.map(|bus_url| config::BusFlag { bus_url }),
                transcode: transcode_workers.map(config::TranscodeFlag::workers),
                ..Default::default()
            };
            let config = node.config(listen, extra)?;
            serve::init_logging(&config.log, config.log_format)?;
            tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(serve::serve(config))
        }
        Command::Worker { listen, node, transcode_workers } => {
            let extra = config::FlagOverrides {
                transcode: Some(
                    transcode_workers.map_or_else(config::TranscodeFlag::run_jobs, config::TranscodeFlag::workers),
                ),
                ..Default::default()
            };
            let config = node.config(None, extra)?;
            serve::init_logging(&config.log, config.log_format)?;
            tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(worker::run(config, listen))
        }
        Command::Edge { listen, upstream, cache_dir, memory_bytes, disk_bytes, url_key, tls_cert, tls_key, config } => {
            let flags =
                edge::EdgeFlags { listen, upstream, cache_dir, memory_bytes, disk_bytes, url_key, tls_cert, tls_key };
            let config = edge::EdgeConfig::load(config.as_deref(), flags)?;
            serve::init_logging(&config.log, config.log_format)?;
            tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(edge::run(config))
        }
        Command::SignUrl { url_key, blob, file, ttl } => {
            let key: types::Secret = std::fs::read_to_string(&url_key)?.parse()?;
            let blob: types::BlobId = match (blob, file) {
                (Some(blob), _) => blob.parse()?,
                (None, Some(file)) => types::BlobId::of(&std::fs::read(file)?),
                (None, None) => anyhow::bail!("give --blob or --file"),
            };
            let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
            #[allow(clippy::print_stdout, reason = "the path is this command's output")]
            {
                println!("{}", types::UrlSigner::new(&key).path(&blob, now + ttl));
            }
            Ok(())
        }
        Command::Token { data_dir, token_key_file, user, ttl } => {
            let user: types::UserId = user.parse()?;
            let key = match token_key_file {
                Some(file) => secrets::load(&file)?,
                None => secrets::load_or_create(&data_dir, secrets::TOKEN_KEY)?,
            };
            let keys = types::TokenKeys::new(&key);
            let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
            #[allow(clippy::print_stdout, reason = "the token is this command's output")]
            {
                println!("{}", keys.mint(&user, now, ttl));
            }
            Ok(())
        }
    }
}

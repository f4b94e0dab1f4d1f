//! `courier`: the origin server (`serve`) and operator commands (`token`).
//!
//! Thin glue: configuration, wiring of the domain crates' routers and workers, authentication,
//! logging and shutdown. Domain logic lives in the crates it names.

mod auth;
mod config;
mod secrets;
mod serve;

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
        /// Folder for the database, blobs, keys and temp files [default: ./data] [env: COURIER_DATA_DIR]
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// A TOML file with any of the settings (see deploy/courier.toml)
        #[arg(long, env = "COURIER_CONFIG", hide_env_values = true)]
        config: Option<PathBuf>,
    },
    /// Print a bearer token for USER that `courier serve` on the same data dir accepts.
    Token {
        /// The data dir whose token-signing.key signs the token (made if missing)
        #[arg(long, default_value = "./data")]
        data_dir: PathBuf,
        /// The user the token speaks for (1–64 of a-z A-Z 0-9 - _ .)
        #[arg(long)]
        user: String,
        /// Lifetime in seconds
        #[arg(long, default_value_t = 86400)]
        ttl: u64,
    },
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
        Command::Serve { listen, data_dir, config } => {
            let config = config::Config::load(config.as_deref(), config::FlagOverrides { listen, data_dir })?;
            serve::init_logging(&config)?;
            tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(serve::serve(config))
        }
        Command::Token { data_dir, user, ttl } => {
            let user: types::UserId = user.parse()?;
            let keys = types::TokenKeys::new(&secrets::load_or_create(&data_dir, secrets::TOKEN_KEY)?);
            let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
            #[allow(clippy::print_stdout, reason = "the token is this command's output")]
            {
                println!("{}", keys.mint(&user, now, ttl));
            }
            Ok(())
        }
    }
}

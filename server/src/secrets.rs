//! The two keys `serve` makes on first start and keeps in the data dir, mode 0600, or reads from
//! files a cluster's nodes share; and the lock that keeps one process per data dir.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use anyhow::Context;
use types::Secret;

pub(crate) const TOKEN_KEY: &str = "token-signing.key";
pub(crate) const URL_KEY: &str = "url-signing.key";

/// Reads a key file that must exist (one a cluster's nodes share).
pub(crate) fn load(path: &Path) -> anyhow::Result<Secret> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading the key file {}", path.display()))?;
    text.parse().with_context(|| format!("{} is not a key file", path.display()))
}

/// Reads `dir/name`, or makes a new random key there if there is none.
pub(crate) fn load_or_create(dir: &Path, name: &str) -> anyhow::Result<Secret> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join(name);
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| anyhow::anyhow!("no randomness for a new key: {e}"))?;
    match std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&path) {
        Ok(mut file) => {
            let secret = Secret::from_bytes(bytes);
            writeln!(file, "{}", secret.to_hex())?;
            file.sync_all()?;
            Ok(secret)
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => load(&path),
        Err(e) => Err(e).with_context(|| format!("creating {}", path.display())),
    }
}

/// Holds `{dir}/courier.lock` for as long as the process lives: a second `serve` or `worker` on
/// the same data dir would empty the first one's worker folders and upload spool at start.
pub(crate) fn lock_data_dir(dir: &Path) -> anyhow::Result<std::fs::File> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join("courier.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive).map_err(|_| {
        anyhow::anyhow!(
            "{} is in use by another courier process; give each serve or worker a data dir of its own",
            dir.display()
        )
    })?;
    Ok(file)
}

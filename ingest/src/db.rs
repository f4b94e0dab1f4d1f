//! The SQLite pool and this crate's migrations.

use std::str::FromStr;
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};

/// Opens (creating if needed) the database at `url` and applies ingest's migrations.
pub async fn connect_sqlite(url: &str) -> Result<sqlx::SqlitePool, sqlx::Error> {
    let options = SqliteConnectOptions::from_str(url)?
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        // An accepted upload must survive a power cut, not only a crash.
        .synchronous(SqliteSynchronous::Full)
        .busy_timeout(Duration::from_secs(5))
        .foreign_keys(true);
    let pool = SqlitePoolOptions::new().max_connections(8).connect_with(options).await?;
    let mut migrator = sqlx::migrate!("./migrations");
    // Other crates keep their own migrations in the same database.
    migrator.set_ignore_missing(true);
    migrator.run(&pool).await?;
    Ok(pool)
}

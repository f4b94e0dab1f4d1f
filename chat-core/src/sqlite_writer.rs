//! The SQLite group-commit writer, run synchronously on a thread of its own.
//!
//! Through sqlx, every statement is handed to the driver's worker thread and its result handed
//! back: at thousands of messages a second those trips between threads were the server's largest
//! cost. This writer holds its own connection to the same file (rusqlite, over the same SQLite
//! library) and runs a whole batch — `BEGIN IMMEDIATE`, the batch's statements from prepared-
//! statement cache, `COMMIT` — without a thread switch. The statements are the ones the sqlx path
//! runs ([`crate::sql::write_sql`]), so both backends keep one meaning. Reads and the rarer writes
//! stay on the sqlx pool; WAL lets them read beside this writer, and SQLite's write lock orders the
//! writes (a rare sqlx write waits in the busy handler).

use rusqlite::{Connection, OptionalExtension, params};
use types::{ConversationId, DeviceId, UserId};

use crate::sql::write_sql::{BY_CLIENT_ID, GIVE_SEQ_BACK, INSERT_MESSAGE, MOVE_CURSOR, MOVE_RECEIPT, TAKE_SEQ};
use crate::store::{Acked, Appended, BlockingWriter, Cursor, Message, StoreError, Write, Written, check_message};

/// The writer for the database `pool` is open on, or `None` for one that has no file (in memory).
pub(crate) fn open(pool: &sqlx::SqlitePool) -> Option<Box<dyn BlockingWriter>> {
    let path = pool.connect_options().get_filename().to_owned();
    if path.as_os_str().is_empty() || path.to_string_lossy().contains(":memory:") {
        return None;
    }
    match Sqlite::open(&path) {
        Ok(writer) => Some(Box::new(writer)),
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "no blocking writer; batches go through sqlx");
            None
        }
    }
}

struct Sqlite {
    conn: Connection,
    sql: Statements,
}

/// The write path's statements with SQLite's positional parameters.
struct Statements {
    take_seq: String,
    insert_message: String,
    give_seq_back: String,
    by_client_id: String,
    move_cursor: String,
    move_receipt: String,
}

/// `$N` → `?N`. To SQLite `$N` is a named parameter, numbered by first appearance, which differs
/// from N when a statement uses `$3` before `$1` (sqlx maps the names back; rusqlite does not).
fn positional(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len());
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '$' && chars.peek().is_some_and(char::is_ascii_digit) {
            out.push('?');
        } else {
            out.push(c);
        }
    }
    out
}

impl Sqlite {
    fn open(path: &std::path::Path) -> rusqlite::Result<Self> {
        let conn = Connection::open(path)?;
        // The database is already in WAL mode (set by the pool); synchronous is per connection.
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "wal_autocheckpoint", crate::sql::WAL_AUTOCHECKPOINT)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.set_prepared_statement_cache_capacity(16);
        let sql = Statements {
            take_seq: positional(TAKE_SEQ),
            insert_message: positional(INSERT_MESSAGE),
            give_seq_back: positional(GIVE_SEQ_BACK),
            by_client_id: positional(BY_CLIENT_ID),
            move_cursor: positional(MOVE_CURSOR),
            move_receipt: positional(MOVE_RECEIPT),
        };
        Ok(Self { conn, sql })
    }

    fn batch(&mut self, batch: &[Write]) -> Result<Vec<Result<Written, StoreError>>, StoreError> {
        let tx = self.conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate).map_err(db)?;
        let mut results = Vec::with_capacity(batch.len());
        for write in batch {
            let result = match write {
                Write::Append { conversation, sender, device, client_id, body, now_ms } => {
                    append(&tx, &self.sql, conversation, sender, device, client_id, body, *now_ms)
                        .map(Written::Appended)
                }
                Write::Ack { user, device, conversation, seq, read } => {
                    move_cursor(&tx, &self.sql, user, device, conversation, *seq, *read).map(Written::Acked)
                }
            };
            // Refusals wrote nothing; a database error may have written half: roll it all back.
            if let Err(e @ (StoreError::Batch(_) | StoreError::Corrupt(_))) = result {
                return Err(e);
            }
            results.push(result);
        }
        tx.commit().map_err(db)?;
        Ok(results)
    }
}

impl BlockingWriter for Sqlite {
    fn write_batch(&mut self, batch: &[Write]) -> Vec<Result<Written, StoreError>> {
        match self.batch(batch) {
            Ok(results) => results,
            Err(e) => {
                let message = match e {
                    StoreError::Batch(m) => m,
                    e => e.to_string(),
                };
                batch.iter().map(|_| Err(StoreError::Batch(message.clone()))).collect()
            }
        }
    }
}

/// Any database error fails the whole batch.
fn db(e: rusqlite::Error) -> StoreError {
    StoreError::Batch(e.to_string())
}

#[allow(clippy::too_many_arguments)]
fn append(
    tx: &rusqlite::Transaction<'_>,
    sql: &Statements,
    conversation: &ConversationId,
    sender: &UserId,
    device: &DeviceId,
    client_id: &str,
    body: &str,
    now_ms: i64,
) -> Result<Appended, StoreError> {
    check_message(client_id, body)?;
    let conversation_text = conversation.to_string();
    let seq: Option<i64> = tx
        .prepare_cached(&sql.take_seq)
        .and_then(|mut s| s.query_row(params![conversation_text, sender.as_str()], |r| r.get(0)).optional())
        .map_err(db)?;
    let Some(seq) = seq else { return Err(StoreError::NotMember) };
    let inserted = tx
        .prepare_cached(&sql.insert_message)
        .and_then(|mut s| {
            s.execute(params![conversation_text, seq, sender.as_str(), device.to_string(), client_id, body, now_ms])
        })
        .map_err(db)?;
    if inserted == 0 {
        tx.prepare_cached(&sql.give_seq_back).and_then(|mut s| s.execute(params![conversation_text])).map_err(db)?;
        let first = tx
            .prepare_cached(&sql.by_client_id)
            .and_then(|mut s| {
                s.query_row(params![conversation_text, sender.as_str(), client_id], |r| {
                    Ok((r.get::<_, i64>(1)?, r.get::<_, String>(3)?, r.get::<_, String>(5)?, r.get::<_, i64>(6)?))
                })
                .optional()
            })
            .map_err(db)?;
        let (seq, first_device, body, created_at) =
            first.ok_or_else(|| StoreError::Corrupt("a conflicting message vanished".into()))?;
        let device = first_device.parse().map_err(|_| StoreError::Corrupt("device id".into()))?;
        return Ok(Appended::Duplicate(Message {
            conversation: *conversation,
            seq,
            sender: sender.clone(),
            device,
            client_id: client_id.to_owned(),
            body,
            created_at,
        }));
    }
    Ok(Appended::New(Message {
        conversation: *conversation,
        seq,
        sender: sender.clone(),
        device: *device,
        client_id: client_id.to_owned(),
        body: body.to_owned(),
        created_at: now_ms,
    }))
}

fn move_cursor(
    tx: &rusqlite::Transaction<'_>,
    sql: &Statements,
    user: &UserId,
    device: &DeviceId,
    conversation: &ConversationId,
    seq: i64,
    read: bool,
) -> Result<Acked, StoreError> {
    let conversation = conversation.to_string();
    let cursor = |r: &rusqlite::Row<'_>| Ok(Cursor { delivered: r.get(0)?, read: r.get(1)? });
    let moved = tx
        .prepare_cached(&sql.move_cursor)
        .and_then(|mut s| {
            s.query_row(
                params![user.as_str(), device.to_string(), conversation, seq, if read { seq } else { 0 }],
                cursor,
            )
            .optional()
        })
        .map_err(db)?;
    let Some(device) = moved else { return Err(StoreError::NotMember) };
    let receipt = tx
        .prepare_cached(&sql.move_receipt)
        .and_then(|mut s| {
            s.query_row(params![conversation, user.as_str(), device.delivered, device.read], cursor).optional()
        })
        .map_err(db)?;
    Ok(Acked { device, receipt })
}

#[cfg(test)]
mod tests {
    #[test]
    fn numbered_parameters_become_positional() {
        assert_eq!(super::positional("SET a = $3 WHERE b = $1 AND c = '$x'"), "SET a = ?3 WHERE b = ?1 AND c = '$x'");
    }
}

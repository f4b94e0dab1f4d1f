//! [`MessageStore`] for SQLite and PostgreSQL, from one body of SQL.
//!
//! The SQL is written once and instantiated for both pools by a macro; the statements stick to what
//! both engines share (`ON CONFLICT`, `RETURNING`, `CASE`, numbered parameters in order). Every write
//! transaction starts with a write, so SQLite takes its write lock up front (a read-then-write
//! transaction can fail on a stale snapshot) and PostgreSQL locks the conversation row, which
//! serialises appends and membership changes per conversation.

use std::time::{SystemTime, UNIX_EPOCH};

use sqlx::Row;
use types::{ConversationId, DeviceId, UserId};

use crate::store::{
    AccountStore, Acked, Appended, BlockingWriter, CodeCheck, Contact, Conversation, ConversationKind,
    ConversationSummary, Cursor, MAX_CODE_ATTEMPTS, MAX_DEVICES, MAX_GROUP_MEMBERS, MAX_PAGE, Message, MessageStore,
    PendingPush, Receipt, Role, Rotation, StoreError, SyncState, Write, Written, check_message,
};

/// The statements of the write path (appends and acks), shared by the sqlx bodies below and the
/// blocking SQLite writer (`sqlite_writer`), which runs whole batches without leaving its thread
/// (and numbers the parameters `?N` for SQLite, where `$N` would be a name, not a position).
pub(crate) mod write_sql {
    /// Takes the conversation's next seq; only a member gets one (no row otherwise).
    pub(crate) const TAKE_SEQ: &str = "UPDATE chat_conversations SET last_seq = last_seq + 1
          WHERE conversation_id = $1
            AND EXISTS (SELECT 1 FROM chat_members WHERE conversation_id = $1 AND user_id = $2)
          RETURNING last_seq";
    /// Inserts the message, or nothing when the sender already sent this client id.
    pub(crate) const INSERT_MESSAGE: &str =
        "INSERT INTO chat_messages (conversation_id, seq, sender_user, sender_device, client_id, body, created_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7)
         ON CONFLICT (conversation_id, sender_user, client_id) DO NOTHING";
    /// Gives a retry's seq back (the transaction holds the row, so it is still the last one).
    pub(crate) const GIVE_SEQ_BACK: &str =
        "UPDATE chat_conversations SET last_seq = last_seq - 1 WHERE conversation_id = $1";
    /// The first copy of a retried message.
    pub(crate) const BY_CLIENT_ID: &str =
        "SELECT conversation_id, seq, sender_user, sender_device, client_id, body, created_at FROM chat_messages
          WHERE conversation_id = $1 AND sender_user = $2 AND client_id = $3";
    /// Moves a device's cursors, clamped to the log's end; only a member gets a row.
    pub(crate) const MOVE_CURSOR: &str =
        "INSERT INTO chat_cursors (user_id, device_id, conversation_id, delivered_seq, read_seq)
         SELECT $1, $2, $3,
                CASE WHEN $4 > c.last_seq THEN c.last_seq WHEN $4 < 0 THEN 0 ELSE $4 END,
                CASE WHEN $5 > c.last_seq THEN c.last_seq WHEN $5 < 0 THEN 0 ELSE $5 END
           FROM chat_conversations c
           JOIN chat_members m ON m.conversation_id = c.conversation_id AND m.user_id = $1
          WHERE c.conversation_id = $3
         ON CONFLICT (user_id, device_id, conversation_id) DO UPDATE SET
           delivered_seq = CASE WHEN excluded.delivered_seq > chat_cursors.delivered_seq
                                THEN excluded.delivered_seq ELSE chat_cursors.delivered_seq END,
           read_seq = CASE WHEN excluded.read_seq > chat_cursors.read_seq
                           THEN excluded.read_seq ELSE chat_cursors.read_seq END
         RETURNING delivered_seq, read_seq";
    /// Raises the user's receipt to a device's cursors; a row comes back only when it moved.
    pub(crate) const MOVE_RECEIPT: &str = "UPDATE chat_members SET
           delivered_seq = CASE WHEN $3 > delivered_seq THEN $3 ELSE delivered_seq END,
           read_seq = CASE WHEN $4 > read_seq THEN $4 ELSE read_seq END
         WHERE conversation_id = $1 AND user_id = $2 AND (delivered_seq < $3 OR read_seq < $4)
         RETURNING delivered_seq, read_seq";
}
use write_sql::*;

/// Applies chat-core's migrations (other crates keep theirs in the same database).
pub async fn migrate<'a, A>(pool: A) -> Result<(), sqlx::migrate::MigrateError>
where
    A: sqlx::Acquire<'a>,
    <A::Connection as std::ops::Deref>::Target: sqlx::migrate::Migrate,
{
    let mut migrator = sqlx::migrate!("./migrations");
    migrator.set_ignore_missing(true);
    migrator.run(pool).await
}

/// WAL pages before a commit copies them back into the database (SQLite's default is 1,000). The
/// rows every append and ack touch (the conversation's `last_seq`, members, cursors) sit on a few
/// hot pages: checkpointing ten times less often copies them ten times less often.
pub(crate) const WAL_AUTOCHECKPOINT: &str = "10000";

/// Opens chat-core's SQLite pool on the database at `url` (created if missing) and migrates it.
///
/// One connection: SQLite has one writer at a time, and writers that wait for each other inside
/// SQLite sleep in its busy handler (milliseconds each), while waiters for this pool queue in
/// order and wake at once. Reads are short and share the same connection. WAL with
/// `synchronous=FULL`: an acknowledged message survives a power cut, not only a crash.
pub async fn open_sqlite(url: &str) -> Result<sqlx::SqlitePool, sqlx::Error> {
    use std::str::FromStr;
    let options = sqlx::sqlite::SqliteConnectOptions::from_str(url)?
        .create_if_missing(true)
        .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal)
        .synchronous(sqlx::sqlite::SqliteSynchronous::Full)
        .busy_timeout(std::time::Duration::from_secs(5))
        .pragma("wal_autocheckpoint", WAL_AUTOCHECKPOINT);
    let pool = sqlx::sqlite::SqlitePoolOptions::new().max_connections(1).connect_with(options).await?;
    migrate(&pool).await.map_err(|e| sqlx::Error::Migrate(Box::new(e)))?;
    Ok(pool)
}

/// Opens chat-core's PostgreSQL pool at `url` and migrates it.
pub async fn open_postgres(url: &str) -> Result<sqlx::PgPool, sqlx::Error> {
    let pool = sqlx::postgres::PgPoolOptions::new().max_connections(16).connect(url).await?;
    migrate(&pool).await.map_err(|e| sqlx::Error::Migrate(Box::new(e)))?;
    Ok(pool)
}

/// Users come into being the first time they are named.
const ENSURE_USER: &str =
    "INSERT INTO chat_users (user_id, created_at) VALUES ($1, $2) ON CONFLICT (user_id) DO NOTHING";

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

fn uuid_simple() -> String {
    // A v7 UUID (time-ordered) in hex, through the id type that already makes them.
    DeviceId::new().to_string().replace('-', "")
}

fn corrupt(what: &str) -> StoreError {
    StoreError::Corrupt(what.to_owned())
}

fn parse<T: std::str::FromStr>(s: &str, what: &str) -> Result<T, StoreError> {
    s.parse().map_err(|_| corrupt(what))
}

fn pair_key(a: &UserId, b: &UserId) -> String {
    if a < b { format!("{a}|{b}") } else { format!("{b}|{a}") }
}

/// Distinct users with the creator first, within the group limit.
fn group_roster(creator: &UserId, members: &[UserId]) -> Result<Vec<UserId>, StoreError> {
    let mut roster = vec![creator.clone()];
    for m in members {
        if !roster.contains(m) {
            roster.push(m.clone());
        }
    }
    if roster.len() > MAX_GROUP_MEMBERS {
        return Err(StoreError::TooManyMembers);
    }
    Ok(roster)
}

/// Where a device stands in the conversations of a user (`$1` user, `$2` device), for
/// [`MessageStore::sync_state`] and, narrowed to one conversation, `sync_one`.
macro_rules! sync_select {
    () => {
        "SELECT c.conversation_id, c.last_seq, c.purged_upto, COALESCE(cu.delivered_seq, 0) AS delivered
           FROM chat_memberships m
           JOIN chat_conversations c ON c.conversation_id = m.conversation_id
           LEFT JOIN chat_cursors cu
             ON cu.user_id = m.user_id AND cu.device_id = $2 AND cu.conversation_id = m.conversation_id
          WHERE m.user_id = $1"
    };
}

macro_rules! sql_store {
    // `$begin` starts a transaction that may read before it writes: SQLite must take the write lock
    // up front (BEGIN IMMEDIATE), or a commit by another connection in between fails it.
    ($pool:ty, $row:ty, $begin:literal, $writers:literal, $blocking:path) => {
        /// A text column parsed into one of our id types; `what` names it in the error.
        fn column<T: std::str::FromStr>(row: &$row, name: &str, what: &str) -> Result<T, StoreError> {
            parse(&row.try_get::<String, _>(name)?, what)
        }

        fn message_from(row: &$row) -> Result<Message, StoreError> {
            Ok(Message {
                conversation: column(row, "conversation_id", "conversation id")?,
                seq: row.try_get("seq")?,
                sender: column(row, "sender_user", "user id")?,
                device: column(row, "sender_device", "device id")?,
                client_id: row.try_get("client_id")?,
                body: row.try_get("body")?,
                created_at: row.try_get("created_at")?,
            })
        }

        fn conversation_from(row: &$row) -> Result<Conversation, StoreError> {
            let kind: String = row.try_get("kind")?;
            Ok(Conversation {
                id: column(row, "conversation_id", "conversation id")?,
                kind: ConversationKind::parse(&kind).ok_or_else(|| corrupt("conversation kind"))?,
                name: row.try_get("name")?,
                last_seq: row.try_get("last_seq")?,
            })
        }

        async fn load_conversation(pool: &$pool, id: &ConversationId) -> Result<Conversation, StoreError> {
            let row = sqlx::query("SELECT conversation_id, kind, name, last_seq FROM chat_conversations WHERE conversation_id = $1")
                .bind(id.to_string())
                .fetch_optional(pool)
                .await?
                .ok_or(StoreError::NotMember)?;
            conversation_from(&row)
        }

        async fn role<'c, E>(executor: E, conversation: &ConversationId, user: &UserId) -> Result<Option<Role>, StoreError>
        where
            E: sqlx::Executor<'c, Database = <$pool as PoolDb>::Db>,
        {
            let role: Option<String> =
                sqlx::query_scalar("SELECT role FROM chat_members WHERE conversation_id = $1 AND user_id = $2")
                    .bind(conversation.to_string())
                    .bind(user.as_str())
                    .fetch_optional(executor)
                    .await?;
            Ok(match role.as_deref() {
                None => None,
                Some("admin") => Some(Role::Admin),
                Some(_) => Some(Role::Member),
            })
        }

        async fn existing<'c, E>(executor: E, conversation: &ConversationId, sender: &UserId, client_id: &str) -> Result<Option<Message>, StoreError>
        where
            E: sqlx::Executor<'c, Database = <$pool as PoolDb>::Db>,
        {
            let row = sqlx::query(BY_CLIENT_ID)
            .bind(conversation.to_string())
            .bind(sender.as_str())
            .bind(client_id)
            .fetch_optional(executor)
            .await?;
            row.as_ref().map(message_from).transpose()
        }

        async fn ensure_users<'c, E>(executor: E, users: &[UserId], now: i64) -> Result<(), StoreError>
        where
            E: sqlx::Executor<'c, Database = <$pool as PoolDb>::Db> + Copy,
        {
            for user in users {
                sqlx::query(ENSURE_USER)
                    .bind(user.as_str())
                    .bind(now)
                    .execute(executor)
                    .await?;
            }
            Ok(())
        }

        /// Adds members inside a transaction; ignores users already in.
        async fn insert_members(
            tx: &mut sqlx::Transaction<'_, <$pool as PoolDb>::Db>,
            conversation: &ConversationId,
            users: &[(UserId, Role)],
            now: i64,
        ) -> Result<(), StoreError> {
            for (user, role) in users {
                sqlx::query(ENSURE_USER)
                    .bind(user.as_str())
                    .bind(now)
                    .execute(&mut **tx)
                    .await?;
                sqlx::query(
                    "INSERT INTO chat_members (conversation_id, user_id, role, joined_at) VALUES ($1, $2, $3, $4)
                     ON CONFLICT (conversation_id, user_id) DO NOTHING",
                )
                .bind(conversation.to_string())
                .bind(user.as_str())
                .bind(role.as_str())
                .bind(now)
                .execute(&mut **tx)
                .await?;
                sqlx::query(
                    "INSERT INTO chat_memberships (user_id, conversation_id) VALUES ($1, $2)
                     ON CONFLICT (user_id, conversation_id) DO NOTHING",
                )
                .bind(user.as_str())
                .bind(conversation.to_string())
                .execute(&mut **tx)
                .await?;
            }
            Ok(())
        }

        /// Starts a transaction that holds the conversation row: the first statement is a write.
        async fn lock_conversation<'t>(
            pool: &'t $pool,
            conversation: &ConversationId,
        ) -> Result<sqlx::Transaction<'t, <$pool as PoolDb>::Db>, StoreError> {
            let mut tx = pool.begin().await?;
            let found = sqlx::query("UPDATE chat_conversations SET last_seq = last_seq WHERE conversation_id = $1")
                .bind(conversation.to_string())
                .execute(&mut *tx)
                .await?
                .rows_affected();
            if found == 0 {
                return Err(StoreError::NotMember);
            }
            Ok(tx)
        }

        impl MessageStore for $pool {
            async fn add_device(&self, user: &UserId, name: &str) -> Result<DeviceId, StoreError> {
                let now = now_ms();
                ensure_users(self, std::slice::from_ref(user), now).await?;
                let linked: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM chat_devices WHERE user_id = $1")
                    .bind(user.as_str())
                    .fetch_one(self)
                    .await?;
                if linked >= MAX_DEVICES {
                    return Err(StoreError::TooManyDevices);
                }
                let device = DeviceId::new();
                sqlx::query("INSERT INTO chat_devices (user_id, device_id, name, created_at) VALUES ($1, $2, $3, $4)")
                    .bind(user.as_str())
                    .bind(device.to_string())
                    .bind(name)
                    .bind(now)
                    .execute(self)
                    .await?;
                Ok(device)
            }

            async fn direct(&self, a: &UserId, b: &UserId) -> Result<Conversation, StoreError> {
                if a == b {
                    return Err(StoreError::Invalid("a direct conversation needs two different users".into()));
                }
                let key = pair_key(a, b);
                let id = ConversationId::new();
                let now = now_ms();
                let mut tx = self.begin().await?;
                let claimed = sqlx::query(
                    "INSERT INTO chat_direct_pairs (pair_key, conversation_id) VALUES ($1, $2) ON CONFLICT (pair_key) DO NOTHING",
                )
                .bind(&key)
                .bind(id.to_string())
                .execute(&mut *tx)
                .await?
                .rows_affected();
                if claimed == 0 {
                    tx.rollback().await?;
                    let existing: String = sqlx::query_scalar("SELECT conversation_id FROM chat_direct_pairs WHERE pair_key = $1")
                        .bind(&key)
                        .fetch_one(self)
                        .await?;
                    return load_conversation(self, &parse(&existing, "conversation id")?).await;
                }
                sqlx::query("INSERT INTO chat_conversations (conversation_id, kind, name, last_seq, created_at) VALUES ($1, 'direct', NULL, 0, $2)")
                    .bind(id.to_string())
                    .bind(now)
                    .execute(&mut *tx)
                    .await?;
                insert_members(&mut tx, &id, &[(a.clone(), Role::Member), (b.clone(), Role::Member)], now).await?;
                tx.commit().await?;
                Ok(Conversation { id, kind: ConversationKind::Direct, name: None, last_seq: 0 })
            }

            async fn create_group(&self, creator: &UserId, name: &str, members: &[UserId]) -> Result<Conversation, StoreError> {
                let roster = group_roster(creator, members)?;
                let roles: Vec<(UserId, Role)> = roster
                    .into_iter()
                    .map(|u| { let r = if &u == creator { Role::Admin } else { Role::Member }; (u, r) })
                    .collect();
                let id = ConversationId::new();
                let now = now_ms();
                let mut tx = self.begin().await?;
                sqlx::query("INSERT INTO chat_conversations (conversation_id, kind, name, last_seq, created_at) VALUES ($1, 'group', $2, 0, $3)")
                    .bind(id.to_string())
                    .bind(name)
                    .bind(now)
                    .execute(&mut *tx)
                    .await?;
                insert_members(&mut tx, &id, &roles, now).await?;
                tx.commit().await?;
                Ok(Conversation { id, kind: ConversationKind::Group, name: Some(name.to_owned()), last_seq: 0 })
            }

            async fn add_members(&self, conversation: &ConversationId, actor: &UserId, users: &[UserId]) -> Result<(), StoreError> {
                let mut tx = lock_conversation(self, conversation).await?;
                match role(&mut *tx, conversation, actor).await? {
                    None => return Err(StoreError::NotMember),
                    Some(Role::Member) => return Err(StoreError::NotAdmin),
                    Some(Role::Admin) => {}
                }
                let kind: String = sqlx::query_scalar("SELECT kind FROM chat_conversations WHERE conversation_id = $1")
                    .bind(conversation.to_string())
                    .fetch_one(&mut *tx)
                    .await?;
                if kind != "group" {
                    return Err(StoreError::Invalid("members can only be added to groups".into()));
                }
                let count: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM chat_members WHERE conversation_id = $1")
                    .bind(conversation.to_string())
                    .fetch_one(&mut *tx)
                    .await?;
                let mut new = Vec::new();
                for user in users {
                    if role(&mut *tx, conversation, user).await?.is_none() && !new.iter().any(|(u, _)| u == user) {
                        new.push((user.clone(), Role::Member));
                    }
                }
                if count as usize + new.len() > MAX_GROUP_MEMBERS {
                    return Err(StoreError::TooManyMembers);
                }
                insert_members(&mut tx, conversation, &new, now_ms()).await?;
                tx.commit().await?;
                Ok(())
            }

            async fn remove_member(&self, conversation: &ConversationId, actor: &UserId, user: &UserId) -> Result<(), StoreError> {
                let mut tx = lock_conversation(self, conversation).await?;
                match role(&mut *tx, conversation, actor).await? {
                    None => return Err(StoreError::NotMember),
                    Some(Role::Member) if actor != user => return Err(StoreError::NotAdmin),
                    _ => {}
                }
                let kind: String = sqlx::query_scalar("SELECT kind FROM chat_conversations WHERE conversation_id = $1")
                    .bind(conversation.to_string())
                    .fetch_one(&mut *tx)
                    .await?;
                if kind != "group" {
                    return Err(StoreError::Invalid("nobody leaves a direct conversation".into()));
                }
                for table in ["chat_members", "chat_memberships"] {
                    sqlx::query(&format!("DELETE FROM {table} WHERE conversation_id = $1 AND user_id = $2"))
                        .bind(conversation.to_string())
                        .bind(user.as_str())
                        .execute(&mut *tx)
                        .await?;
                }
                tx.commit().await?;
                Ok(())
            }

            async fn members(&self, conversation: &ConversationId, user: &UserId) -> Result<Vec<(UserId, Role)>, StoreError> {
                role(self, conversation, user).await?.ok_or(StoreError::NotMember)?;
                let rows = sqlx::query("SELECT user_id, role FROM chat_members WHERE conversation_id = $1 ORDER BY joined_at, user_id")
                    .bind(conversation.to_string())
                    .fetch_all(self)
                    .await?;
                rows.iter()
                    .map(|row| {
                        let user: String = row.try_get("user_id")?;
                        let role: String = row.try_get("role")?;
                        Ok((parse(&user, "user id")?, if role == "admin" { Role::Admin } else { Role::Member }))
                    })
                    .collect()
            }

            async fn conversations(&self, user: &UserId, device: &DeviceId) -> Result<Vec<ConversationSummary>, StoreError> {
                let rows = sqlx::query(
                    "SELECT c.conversation_id, c.kind, c.name, c.last_seq,
                            (SELECT COUNT(*) FROM chat_messages msg
                              WHERE msg.conversation_id = c.conversation_id AND msg.sender_user <> $1
                                AND msg.seq > COALESCE(cu.read_seq, 0)) AS unread
                       FROM chat_memberships m
                       JOIN chat_conversations c ON c.conversation_id = m.conversation_id
                       LEFT JOIN chat_cursors cu
                         ON cu.user_id = m.user_id AND cu.device_id = $2 AND cu.conversation_id = m.conversation_id
                      WHERE m.user_id = $1
                      ORDER BY c.last_seq DESC, c.conversation_id",
                )
                .bind(user.as_str())
                .bind(device.to_string())
                .fetch_all(self)
                .await?;
                rows.iter()
                    .map(|row| Ok(ConversationSummary { conversation: conversation_from(row)?, unread: row.try_get("unread")? }))
                    .collect()
            }

            async fn append(
                &self,
                conversation: &ConversationId,
                sender: &UserId,
                device: &DeviceId,
                client_id: &str,
                body: &str,
                now_ms: i64,
            ) -> Result<Appended, StoreError> {
                let mut tx = self.begin().await?;
                let appended = append_in(&mut tx, conversation, sender, device, client_id, body, now_ms).await?;
                tx.commit().await?;
                Ok(appended)
            }

            fn writers(&self) -> usize {
                $writers
            }

            fn blocking_writer(&self) -> Option<Box<dyn BlockingWriter>> {
                $blocking(self)
            }

            async fn write_batch(&self, batch: &[Write]) -> Vec<Result<Written, StoreError>> {
                let failed = |e: &dyn std::fmt::Display| batch.iter().map(|_| Err(StoreError::Batch(e.to_string()))).collect();
                let mut tx = match self.begin_with($begin).await {
                    Ok(tx) => tx,
                    Err(e) => return failed(&e),
                };
                // Row locks are taken conversation by conversation in one order for every batch
                // (stable within a conversation), so two writers' batches [X, Y] and [Y, X] cannot
                // deadlock; results go back in the batch's order.
                let mut order: Vec<usize> = (0..batch.len()).collect();
                order.sort_by_key(|&i| batch[i].conversation());
                let mut results: Vec<Option<Result<Written, StoreError>>> = batch.iter().map(|_| None).collect();
                for i in order {
                    let write = &batch[i];
                    let result = match write {
                        Write::Append { conversation, sender, device, client_id, body, now_ms } => {
                            append_in(&mut tx, conversation, sender, device, client_id, body, *now_ms).await.map(Written::Appended)
                        }
                        Write::Ack { user, device, conversation, seq, read } => {
                            move_cursor_in(&mut tx, user, device, conversation, *seq, *read).await.map(Written::Acked)
                        }
                    };
                    // Refusals wrote nothing; a database error may have written half, so the whole
                    // batch is rolled back and every write in it fails.
                    if let Err(e @ (StoreError::Database(_) | StoreError::Corrupt(_))) = &result {
                        return failed(e);
                    }
                    results[i] = Some(result);
                }
                if let Err(e) = tx.commit().await {
                    return failed(&e);
                }
                results.into_iter().map(|r| r.expect("every write ran")).collect()
            }

            async fn messages_after(
                &self,
                conversation: &ConversationId,
                user: &UserId,
                after: i64,
                limit: i64,
            ) -> Result<Vec<Message>, StoreError> {
                role(self, conversation, user).await?.ok_or(StoreError::NotMember)?;
                let rows = sqlx::query(
                    "SELECT conversation_id, seq, sender_user, sender_device, client_id, body, created_at FROM chat_messages
                      WHERE conversation_id = $1 AND seq > $2 ORDER BY seq LIMIT $3",
                )
                .bind(conversation.to_string())
                .bind(after)
                .bind(limit.clamp(1, MAX_PAGE))
                .fetch_all(self)
                .await?;
                rows.iter().map(message_from).collect()
            }

            async fn ack(&self, user: &UserId, device: &DeviceId, conversation: &ConversationId, seq: i64) -> Result<Acked, StoreError> {
                let mut tx = self.begin_with($begin).await?;
                let acked = move_cursor_in(&mut tx, user, device, conversation, seq, false).await?;
                tx.commit().await?;
                Ok(acked)
            }

            async fn mark_read(&self, user: &UserId, device: &DeviceId, conversation: &ConversationId, seq: i64) -> Result<Acked, StoreError> {
                let mut tx = self.begin_with($begin).await?;
                let acked = move_cursor_in(&mut tx, user, device, conversation, seq, true).await?;
                tx.commit().await?;
                Ok(acked)
            }

            async fn device_exists(&self, user: &UserId, device: &DeviceId) -> Result<bool, StoreError> {
                let found: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM chat_devices WHERE user_id = $1 AND device_id = $2")
                    .bind(user.as_str())
                    .bind(device.to_string())
                    .fetch_one(self)
                    .await?;
                Ok(found > 0)
            }

            async fn remove_device(&self, user: &UserId, device: &DeviceId) -> Result<bool, StoreError> {
                let mut tx = self.begin().await?;
                let removed = sqlx::query("DELETE FROM chat_devices WHERE user_id = $1 AND device_id = $2")
                    .bind(user.as_str())
                    .bind(device.to_string())
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                for table in ["chat_cursors", "chat_refresh_tokens"] {
                    sqlx::query(&format!("DELETE FROM {table} WHERE user_id = $1 AND device_id = $2"))
                        .bind(user.as_str())
                        .bind(device.to_string())
                        .execute(&mut *tx)
                        .await?;
                }
                tx.commit().await?;
                Ok(removed > 0)
            }

            async fn sync_state(&self, user: &UserId, device: &DeviceId) -> Result<Vec<SyncState>, StoreError> {
                let rows = sqlx::query(sync_select!())
                .bind(user.as_str())
                .bind(device.to_string())
                .fetch_all(self)
                .await?;
                rows.iter().map(sync_from).collect()
            }

            async fn sync_one(&self, user: &UserId, device: &DeviceId, conversation: &ConversationId) -> Result<SyncState, StoreError> {
                let row = sqlx::query(concat!(sync_select!(), " AND m.conversation_id = $3"))
                .bind(user.as_str())
                .bind(device.to_string())
                .bind(conversation.to_string())
                .fetch_optional(self)
                .await?
                .ok_or(StoreError::NotMember)?;
                sync_from(&row)
            }

            async fn member_ids(&self, conversation: &ConversationId) -> Result<Vec<UserId>, StoreError> {
                let ids: Vec<String> = sqlx::query_scalar("SELECT user_id FROM chat_members WHERE conversation_id = $1")
                    .bind(conversation.to_string())
                    .fetch_all(self)
                    .await?;
                ids.iter().map(|u| parse(u, "user id")).collect()
            }

            async fn receipts(&self, user: &UserId) -> Result<Vec<Receipt>, StoreError> {
                let rows = sqlx::query(
                    "SELECT o.conversation_id, o.user_id, o.delivered_seq, o.read_seq
                       FROM chat_memberships m
                       JOIN chat_members o ON o.conversation_id = m.conversation_id
                      WHERE m.user_id = $1 AND o.user_id <> $1 AND o.delivered_seq > 0",
                )
                .bind(user.as_str())
                .fetch_all(self)
                .await?;
                rows.iter()
                    .map(|row| {
                        Ok(Receipt {
                            conversation: column(row, "conversation_id", "conversation id")?,
                            user: column(row, "user_id", "user id")?,
                            cursor: Cursor { delivered: row.try_get("delivered_seq")?, read: row.try_get("read_seq")? },
                        })
                    })
                    .collect()
            }

            async fn contacts(&self, user: &UserId) -> Result<Vec<Contact>, StoreError> {
                let rows = sqlx::query(
                    "SELECT DISTINCT o.user_id, u.last_seen
                       FROM chat_memberships m
                       JOIN chat_members o ON o.conversation_id = m.conversation_id
                       JOIN chat_users u ON u.user_id = o.user_id
                      WHERE m.user_id = $1 AND o.user_id <> $1",
                )
                .bind(user.as_str())
                .fetch_all(self)
                .await?;
                rows.iter()
                    .map(|row| {
                        Ok(Contact {
                            user: column(row, "user_id", "user id")?,
                            last_seen: row.try_get("last_seen")?,
                        })
                    })
                    .collect()
            }

            async fn set_last_seen(&self, user: &UserId, at_ms: i64) -> Result<(), StoreError> {
                sqlx::query("UPDATE chat_users SET last_seen = $2 WHERE user_id = $1")
                    .bind(user.as_str())
                    .bind(at_ms)
                    .execute(self)
                    .await?;
                Ok(())
            }

            async fn queue_pushes(
                &self,
                users: &[UserId],
                conversation: &ConversationId,
                seq: i64,
                sender: &UserId,
                now_ms: i64,
            ) -> Result<(), StoreError> {
                let mut tx = self.begin().await?;
                for user in users {
                    sqlx::query(
                        "INSERT INTO chat_push_outbox (user_id, conversation_id, seq, sender_user, attempts, next_attempt_at, created_at)
                         VALUES ($1, $2, $3, $4, 0, $5, $5)
                         ON CONFLICT (user_id, conversation_id) DO UPDATE SET
                           seq = CASE WHEN excluded.seq > chat_push_outbox.seq THEN excluded.seq ELSE chat_push_outbox.seq END,
                           sender_user = excluded.sender_user",
                    )
                    .bind(user.as_str())
                    .bind(conversation.to_string())
                    .bind(seq)
                    .bind(sender.as_str())
                    .bind(now_ms)
                    .execute(&mut *tx)
                    .await?;
                }
                tx.commit().await?;
                Ok(())
            }

            async fn due_pushes(&self, now_ms: i64, limit: i64) -> Result<Vec<PendingPush>, StoreError> {
                let rows = sqlx::query(
                    "SELECT user_id, conversation_id, seq, sender_user, attempts FROM chat_push_outbox
                      WHERE next_attempt_at <= $1 ORDER BY next_attempt_at LIMIT $2",
                )
                .bind(now_ms)
                .bind(limit)
                .fetch_all(self)
                .await?;
                rows.iter()
                    .map(|row| {
                        Ok(PendingPush {
                            user: column(row, "user_id", "user id")?,
                            conversation: column(row, "conversation_id", "conversation id")?,
                            seq: row.try_get("seq")?,
                            sender: column(row, "sender_user", "user id")?,
                            attempts: row.try_get("attempts")?,
                        })
                    })
                    .collect()
            }

            async fn push_done(&self, push: &PendingPush) -> Result<(), StoreError> {
                sqlx::query("DELETE FROM chat_push_outbox WHERE user_id = $1 AND conversation_id = $2 AND seq = $3")
                    .bind(push.user.as_str())
                    .bind(push.conversation.to_string())
                    .bind(push.seq)
                    .execute(self)
                    .await?;
                Ok(())
            }

            async fn push_failed(&self, push: &PendingPush, retry_at_ms: Option<i64>) -> Result<(), StoreError> {
                let query = match retry_at_ms {
                    Some(at) => sqlx::query(
                        "UPDATE chat_push_outbox SET attempts = attempts + 1, next_attempt_at = $3
                          WHERE user_id = $1 AND conversation_id = $2",
                    )
                    .bind(push.user.as_str())
                    .bind(push.conversation.to_string())
                    .bind(at),
                    None => sqlx::query("DELETE FROM chat_push_outbox WHERE user_id = $1 AND conversation_id = $2 AND seq = $3")
                        .bind(push.user.as_str())
                        .bind(push.conversation.to_string())
                        .bind(push.seq),
                };
                query.execute(self).await?;
                Ok(())
            }

            async fn purge_before(&self, before_ms: i64) -> Result<u64, StoreError> {
                // Marks how far each conversation is purged, then deletes, in one transaction.
                let mut tx = self.begin().await?;
                sqlx::query(
                    "UPDATE chat_conversations SET purged_upto = (
                        SELECT MAX(m.seq) FROM chat_messages m
                         WHERE m.conversation_id = chat_conversations.conversation_id AND m.created_at < $1)
                      WHERE conversation_id IN (SELECT conversation_id FROM chat_messages WHERE created_at < $1)",
                )
                .bind(before_ms)
                .execute(&mut *tx)
                .await?;
                let purged = sqlx::query("DELETE FROM chat_messages WHERE created_at < $1")
                    .bind(before_ms)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                tx.commit().await?;
                Ok(purged)
            }
        }

        impl AccountStore for $pool {
            async fn put_code(&self, phone: &str, code_hash: &str, expires_at_ms: i64, now_ms: i64) -> Result<(), StoreError> {
                sqlx::query(
                    "INSERT INTO chat_phone_codes (phone, code_hash, expires_at, attempts, created_at) VALUES ($1, $2, $3, 0, $4)
                     ON CONFLICT (phone) DO UPDATE SET code_hash = excluded.code_hash, expires_at = excluded.expires_at,
                       attempts = 0, created_at = excluded.created_at",
                )
                .bind(phone)
                .bind(code_hash)
                .bind(expires_at_ms)
                .bind(now_ms)
                .execute(self)
                .await?;
                Ok(())
            }

            async fn check_code(&self, phone: &str, code_hash: &str, now_ms: i64) -> Result<CodeCheck, StoreError> {
                let mut tx = self.begin().await?;
                let row = sqlx::query(
                    "UPDATE chat_phone_codes SET attempts = attempts + 1 WHERE phone = $1 RETURNING code_hash, expires_at, attempts",
                )
                .bind(phone)
                .fetch_optional(&mut *tx)
                .await?;
                let Some(row) = row else { return Ok(CodeCheck::Missing) };
                let (stored, expires_at, attempts): (String, i64, i64) =
                    (row.try_get("code_hash")?, row.try_get("expires_at")?, row.try_get("attempts")?);
                let verdict = if attempts > MAX_CODE_ATTEMPTS {
                    CodeCheck::Locked
                } else if expires_at <= now_ms {
                    CodeCheck::Expired
                } else if stored == code_hash {
                    CodeCheck::Valid
                } else {
                    CodeCheck::Wrong
                };
                if verdict == CodeCheck::Valid {
                    sqlx::query("DELETE FROM chat_phone_codes WHERE phone = $1").bind(phone).execute(&mut *tx).await?;
                }
                tx.commit().await?;
                Ok(verdict)
            }

            async fn user_for_phone(&self, phone: &str, now_ms: i64) -> Result<UserId, StoreError> {
                let fresh = UserId::try_from(format!("u{}", uuid_simple())).map_err(|_| corrupt("generated user id"))?;
                sqlx::query("INSERT INTO chat_phones (phone, user_id, created_at) VALUES ($1, $2, $3) ON CONFLICT (phone) DO NOTHING")
                    .bind(phone)
                    .bind(fresh.as_str())
                    .bind(now_ms)
                    .execute(self)
                    .await?;
                let user: String = sqlx::query_scalar("SELECT user_id FROM chat_phones WHERE phone = $1")
                    .bind(phone)
                    .fetch_one(self)
                    .await?;
                let user: UserId = parse(&user, "user id")?;
                ensure_users(self, std::slice::from_ref(&user), now_ms).await?;
                Ok(user)
            }

            async fn lookup_phone(&self, phone: &str) -> Result<Option<UserId>, StoreError> {
                let user: Option<String> = sqlx::query_scalar("SELECT user_id FROM chat_phones WHERE phone = $1")
                    .bind(phone)
                    .fetch_optional(self)
                    .await?;
                user.map(|u| parse(&u, "user id")).transpose()
            }

            async fn issue_refresh(&self, token_hash: &str, user: &UserId, device: &DeviceId, expires_at_ms: i64, now_ms: i64) -> Result<(), StoreError> {
                insert_refresh(self, token_hash, user, device, expires_at_ms, now_ms).await
            }

            async fn rotate_refresh(&self, old_hash: &str, new_hash: &str, expires_at_ms: i64, now_ms: i64) -> Result<Rotation, StoreError> {
                let mut tx = self.begin().await?;
                let spent = sqlx::query(
                    "UPDATE chat_refresh_tokens SET spent_at = $2 WHERE token_hash = $1 AND spent_at IS NULL AND expires_at > $2
                     RETURNING user_id, device_id",
                )
                .bind(old_hash)
                .bind(now_ms)
                .fetch_optional(&mut *tx)
                .await?;
                if let Some(row) = spent {
                    let user: UserId = column(&row, "user_id", "user id")?;
                    let device: DeviceId = column(&row, "device_id", "device id")?;
                    insert_refresh(&mut *tx, new_hash, &user, &device, expires_at_ms, now_ms).await?;
                    tx.commit().await?;
                    return Ok(Rotation::Rotated { user, device });
                }
                let row = sqlx::query("SELECT user_id, device_id, spent_at FROM chat_refresh_tokens WHERE token_hash = $1")
                    .bind(old_hash)
                    .fetch_optional(&mut *tx)
                    .await?;
                tx.rollback().await?;
                let Some(row) = row else { return Ok(Rotation::Invalid) };
                if row.try_get::<Option<i64>, _>("spent_at")?.is_none() {
                    return Ok(Rotation::Invalid);
                }
                let user: UserId = column(&row, "user_id", "user id")?;
                let device: DeviceId = column(&row, "device_id", "device id")?;
                self.remove_device(&user, &device).await?;
                Ok(Rotation::Reused { user, device })
            }
        }

        async fn insert_refresh<'c, E>(
            executor: E,
            token_hash: &str,
            user: &UserId,
            device: &DeviceId,
            expires_at_ms: i64,
            now_ms: i64,
        ) -> Result<(), StoreError>
        where
            E: sqlx::Executor<'c, Database = <$pool as PoolDb>::Db>,
        {
            sqlx::query(
                "INSERT INTO chat_refresh_tokens (token_hash, user_id, device_id, expires_at, spent_at, created_at)
                 VALUES ($1, $2, $3, $4, NULL, $5)",
            )
            .bind(token_hash)
            .bind(user.as_str())
            .bind(device.to_string())
            .bind(expires_at_ms)
            .bind(now_ms)
            .execute(executor)
            .await?;
            Ok(())
        }

        fn sync_from(row: &$row) -> Result<SyncState, StoreError> {
            Ok(SyncState {
                conversation: column(row, "conversation_id", "conversation id")?,
                last_seq: row.try_get("last_seq")?,
                delivered: row.try_get("delivered")?,
                purged_upto: row.try_get("purged_upto")?,
            })
        }

        /// Appends inside `tx`. A refusal (not a member, a bad message) writes nothing, and a
        /// duplicate undoes its seq, so a batch goes on after either without a savepoint.
        async fn append_in(
            tx: &mut sqlx::Transaction<'_, <$pool as PoolDb>::Db>,
            conversation: &ConversationId,
            sender: &UserId,
            device: &DeviceId,
            client_id: &str,
            body: &str,
            now_ms: i64,
        ) -> Result<Appended, StoreError> {
            check_message(client_id, body)?;
            // Taking the next seq locks the conversation row, and only a member takes one.
            let seq: Option<i64> = sqlx::query_scalar(TAKE_SEQ)
            .bind(conversation.to_string())
            .bind(sender.as_str())
            .fetch_optional(&mut **tx)
            .await?;
            let Some(seq) = seq else { return Err(StoreError::NotMember) };
            let inserted = sqlx::query(INSERT_MESSAGE)
            .bind(conversation.to_string())
            .bind(seq)
            .bind(sender.as_str())
            .bind(device.to_string())
            .bind(client_id)
            .bind(body)
            .bind(now_ms)
            .execute(&mut **tx)
            .await?
            .rows_affected();
            if inserted == 0 {
                // A retry: give the seq back (this transaction holds the row, so it is still the
                // last one) and answer with the first copy.
                sqlx::query(GIVE_SEQ_BACK)
                    .bind(conversation.to_string())
                    .execute(&mut **tx)
                    .await?;
                let first = existing(&mut **tx, conversation, sender, client_id).await?;
                return first.map(Appended::Duplicate).ok_or_else(|| corrupt("a conflicting message vanished"));
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

        /// Moves a device's cursor and the user's receipt inside `tx`; a non-member writes nothing.
        async fn move_cursor_in(
            tx: &mut sqlx::Transaction<'_, <$pool as PoolDb>::Db>,
            user: &UserId,
            device: &DeviceId,
            conversation: &ConversationId,
            seq: i64,
            read: bool,
        ) -> Result<Acked, StoreError> {
            let row = sqlx::query(MOVE_CURSOR)
            .bind(user.as_str())
            .bind(device.to_string())
            .bind(conversation.to_string())
            .bind(seq)
            .bind(if read { seq } else { 0 })
            .fetch_optional(&mut **tx)
            .await?;
            let Some(row) = row else { return Err(StoreError::NotMember) };
            let device = Cursor { delivered: row.try_get("delivered_seq")?, read: row.try_get("read_seq")? };
            // The user's receipt is the furthest any of their devices got; each column only grows.
            let moved = sqlx::query(MOVE_RECEIPT)
            .bind(conversation.to_string())
            .bind(user.as_str())
            .bind(device.delivered)
            .bind(device.read)
            .fetch_optional(&mut **tx)
            .await?;
            let receipt = match moved {
                Some(row) => Some(Cursor { delivered: row.try_get("delivered_seq")?, read: row.try_get("read_seq")? }),
                None => None,
            };
            Ok(Acked { device, receipt })
        }
    };
}

/// Names the database of a pool type, for the macro's bounds.
pub(crate) trait PoolDb {
    type Db: sqlx::Database;
}

impl PoolDb for sqlx::SqlitePool {
    type Db = sqlx::Sqlite;
}

impl PoolDb for sqlx::PgPool {
    type Db = sqlx::Postgres;
}

mod sqlite {
    use super::*;
    sql_store!(sqlx::SqlitePool, sqlx::sqlite::SqliteRow, "BEGIN IMMEDIATE", 1, crate::sqlite_writer::open);
}

mod postgres {
    use super::*;
    sql_store!(sqlx::PgPool, sqlx::postgres::PgRow, "BEGIN", 4, no_blocking_writer);

    /// PostgreSQL's writers stay async: its round trips are network waits, not hand-offs.
    fn no_blocking_writer(_: &sqlx::PgPool) -> Option<Box<dyn BlockingWriter>> {
        None
    }
}

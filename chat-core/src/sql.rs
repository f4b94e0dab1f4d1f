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
    Appended, Conversation, ConversationKind, ConversationSummary, Cursor, MAX_DEVICES, MAX_GROUP_MEMBERS, MAX_PAGE,
    Message, MessageStore, Role, StoreError, check_message,
};

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

/// Users come into being the first time they are named.
const ENSURE_USER: &str =
    "INSERT INTO chat_users (user_id, created_at) VALUES ($1, $2) ON CONFLICT (user_id) DO NOTHING";

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
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

macro_rules! sql_store {
    ($pool:ty, $row:ty) => {
        fn message_from(row: &$row) -> Result<Message, StoreError> {
            Ok(Message {
                conversation: parse(&row.try_get::<String, _>("conversation_id")?, "conversation id")?,
                seq: row.try_get("seq")?,
                sender: parse(&row.try_get::<String, _>("sender_user")?, "user id")?,
                device: parse(&row.try_get::<String, _>("sender_device")?, "device id")?,
                client_id: row.try_get("client_id")?,
                body: row.try_get("body")?,
                created_at: row.try_get("created_at")?,
            })
        }

        fn conversation_from(row: &$row) -> Result<Conversation, StoreError> {
            let kind: String = row.try_get("kind")?;
            Ok(Conversation {
                id: parse(&row.try_get::<String, _>("conversation_id")?, "conversation id")?,
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

        async fn existing(pool: &$pool, conversation: &ConversationId, sender: &UserId, client_id: &str) -> Result<Option<Message>, StoreError> {
            let row = sqlx::query(
                "SELECT conversation_id, seq, sender_user, sender_device, client_id, body, created_at FROM chat_messages
                  WHERE conversation_id = $1 AND sender_user = $2 AND client_id = $3",
            )
            .bind(conversation.to_string())
            .bind(sender.as_str())
            .bind(client_id)
            .fetch_optional(pool)
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
                check_message(client_id, body)?;
                // Taking the next seq first locks the conversation; a rollback gives it back, so seqs
                // stay gapless whatever happens below.
                let mut tx = self.begin().await?;
                let seq: Option<i64> = sqlx::query_scalar(
                    "UPDATE chat_conversations SET last_seq = last_seq + 1 WHERE conversation_id = $1 RETURNING last_seq",
                )
                .bind(conversation.to_string())
                .fetch_optional(&mut *tx)
                .await?;
                let Some(seq) = seq else { return Err(StoreError::NotMember) };
                if role(&mut *tx, conversation, sender).await?.is_none() {
                    return Err(StoreError::NotMember);
                }
                let inserted = sqlx::query(
                    "INSERT INTO chat_messages (conversation_id, seq, sender_user, sender_device, client_id, body, created_at)
                     VALUES ($1, $2, $3, $4, $5, $6, $7)
                     ON CONFLICT (conversation_id, sender_user, client_id) DO NOTHING",
                )
                .bind(conversation.to_string())
                .bind(seq)
                .bind(sender.as_str())
                .bind(device.to_string())
                .bind(client_id)
                .bind(body)
                .bind(now_ms)
                .execute(&mut *tx)
                .await?
                .rows_affected();
                if inserted == 0 {
                    tx.rollback().await?;
                    let first = existing(self, conversation, sender, client_id).await?;
                    return first.map(Appended::Duplicate).ok_or_else(|| corrupt("a conflicting message vanished"));
                }
                tx.commit().await?;
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

            async fn ack(&self, user: &UserId, device: &DeviceId, conversation: &ConversationId, seq: i64) -> Result<Cursor, StoreError> {
                move_cursor(self, user, device, conversation, seq, false).await
            }

            async fn mark_read(&self, user: &UserId, device: &DeviceId, conversation: &ConversationId, seq: i64) -> Result<Cursor, StoreError> {
                move_cursor(self, user, device, conversation, seq, true).await
            }
        }

        async fn move_cursor(
            pool: &$pool,
            user: &UserId,
            device: &DeviceId,
            conversation: &ConversationId,
            seq: i64,
            read: bool,
        ) -> Result<Cursor, StoreError> {
            role(pool, conversation, user).await?.ok_or(StoreError::NotMember)?;
            let last = load_conversation(pool, conversation).await?.last_seq;
            let seq = seq.clamp(0, last);
            let read_seq = if read { seq } else { 0 };
            let row = sqlx::query(
                "INSERT INTO chat_cursors (user_id, device_id, conversation_id, delivered_seq, read_seq) VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT (user_id, device_id, conversation_id) DO UPDATE SET
                   delivered_seq = CASE WHEN excluded.delivered_seq > chat_cursors.delivered_seq
                                        THEN excluded.delivered_seq ELSE chat_cursors.delivered_seq END,
                   read_seq = CASE WHEN excluded.read_seq > chat_cursors.read_seq
                                   THEN excluded.read_seq ELSE chat_cursors.read_seq END
                 RETURNING delivered_seq, read_seq",
            )
            .bind(user.as_str())
            .bind(device.to_string())
            .bind(conversation.to_string())
            .bind(seq)
            .bind(read_seq)
            .fetch_one(pool)
            .await?;
            Ok(Cursor { delivered: row.try_get("delivered_seq")?, read: row.try_get("read_seq")? })
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
    sql_store!(sqlx::SqlitePool, sqlx::sqlite::SqliteRow);
}

mod postgres {
    use super::*;
    sql_store!(sqlx::PgPool, sqlx::postgres::PgRow);
}

//! Every SQL statement of the application, noun first: the account
//! directory on the master (`account_*`), and the per-account tables on the
//! shards (`user_*`, `document_*`). Callers choose the pool or the
//! transaction; every per-account statement filters on `account`, so a
//! statement never touches another account's rows on the same shard.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use shardq::moves::AccountTable;
use sqlx::PgExecutor;
use uuid::Uuid;

/// The application's account-scoped tables on the shards, each with its
/// account column: what a move of an account carries besides its jobs
/// (`MoveOptions::tables`; for `shardq accounts move`, the `[accounts]`
/// tables of the example's `shards.toml`, which a test keeps equal to this
/// list). Every per-account
/// table of `migrations/shard` belongs here; a table left out would stay
/// behind on the old shard when its account moves.
///
/// A move keeps the rows' keys, so they must be unique across shards: every
/// primary key starts with the account, and the ids are UUIDs, never a
/// per-shard sequence (which would collide on the new shard). The mover
/// copies and deletes the tables in this order, users first, so the
/// documents' reference to their author is checked at commit (shard
/// migration `V2`).
pub fn account_tables() -> Vec<AccountTable> {
    ["users", "documents"]
        .into_iter()
        .map(|table| AccountTable {
            table: table.into(),
            column: "account".into(),
        })
        .collect()
}

/// A row of the master's account directory.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct AccountRow {
    /// The account id.
    pub account: String,
    /// Its display name.
    pub name: String,
    /// When it was created.
    pub created_at: DateTime<Utc>,
}

/// A row of a shard's `users` table.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct UserRow {
    /// The account it belongs to.
    pub account: String,
    /// Its id.
    pub id: Uuid,
    /// Its email address, unique within the account.
    pub email: String,
    /// Its name.
    pub name: String,
    /// How many of its documents are processed (kept by `refresh_user_stats`).
    pub documents_processed: i32,
    /// When it was created.
    pub created_at: DateTime<Utc>,
}

/// A row of a shard's `documents` table.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct DocumentRow {
    /// The account it belongs to.
    pub account: String,
    /// Its id.
    pub id: Uuid,
    /// The user who wrote it (none for the welcome document).
    pub author: Option<Uuid>,
    /// Its title.
    pub title: String,
    /// Its text.
    pub body: String,
    /// Whether it is the account's welcome document.
    pub welcome: bool,
    /// `pending` until `process_document` ran, then `processed`.
    pub status: String,
    /// Words in the body, once processed.
    pub word_count: Option<i32>,
    /// The body's first words, once processed.
    pub summary: Option<String>,
    /// When it was processed.
    pub processed_at: Option<DateTime<Utc>>,
    /// When it was created.
    pub created_at: DateTime<Utc>,
}

/// What a new document holds.
#[derive(Debug, Clone)]
pub struct NewDocument<'a> {
    /// The account it belongs to.
    pub account: &'a str,
    /// The user who wrote it.
    pub author: Option<Uuid>,
    /// Its title.
    pub title: &'a str,
    /// Its text.
    pub body: &'a str,
}

/// What processing found in a document.
#[derive(Debug, Clone)]
pub struct Processed<'a> {
    /// Words in the body.
    pub word_count: i32,
    /// The body's first words.
    pub summary: &'a str,
}

const DOCUMENT_COLUMNS: &str =
    "account, id, author, title, body, welcome, status, word_count, summary, processed_at, created_at";

/// Adds an account to the directory unless it is there: the new row, or
/// `None` when the account existed.
pub async fn account_insert<'e>(
    db: impl PgExecutor<'e>,
    account: &str,
    name: &str,
) -> sqlx::Result<Option<AccountRow>> {
    sqlx::query_as(
        "INSERT INTO accounts (account, name) VALUES ($1, $2)
         ON CONFLICT (account) DO NOTHING
         RETURNING account, name, created_at",
    )
    .bind(account)
    .bind(name)
    .fetch_optional(db)
    .await
}

/// An account's directory row.
pub async fn account_get<'e>(db: impl PgExecutor<'e>, account: &str) -> sqlx::Result<Option<AccountRow>> {
    sqlx::query_as("SELECT account, name, created_at FROM accounts WHERE account = $1")
        .bind(account)
        .fetch_optional(db)
        .await
}

/// Adds a user: the new row, or `None` when the account already has a user
/// with this email address.
pub async fn user_insert<'e>(
    db: impl PgExecutor<'e>,
    account: &str,
    email: &str,
    name: &str,
) -> sqlx::Result<Option<UserRow>> {
    sqlx::query_as(
        "INSERT INTO users (account, email, name) VALUES ($1, $2, $3)
         ON CONFLICT (account, email) DO NOTHING
         RETURNING account, id, email, name, documents_processed, created_at",
    )
    .bind(account)
    .bind(email)
    .bind(name)
    .fetch_optional(db)
    .await
}

/// One of an account's users.
pub async fn user_get<'e>(db: impl PgExecutor<'e>, account: &str, id: Uuid) -> sqlx::Result<Option<UserRow>> {
    sqlx::query_as(
        "SELECT account, id, email, name, documents_processed, created_at
           FROM users WHERE account = $1 AND id = $2",
    )
    .bind(account)
    .bind(id)
    .fetch_optional(db)
    .await
}

/// Whether the account has this user, locking the row against deletion
/// until the transaction ends (what the documents' foreign key needs).
pub async fn user_exists_locked<'e>(db: impl PgExecutor<'e>, account: &str, id: Uuid) -> sqlx::Result<bool> {
    let found: Option<i32> = sqlx::query_scalar("SELECT 1 FROM users WHERE account = $1 AND id = $2 FOR KEY SHARE")
        .bind(account)
        .bind(id)
        .fetch_optional(db)
        .await?;
    Ok(found.is_some())
}

/// Locks a user's row for an update of its statistics: false when the user
/// is gone.
pub async fn user_lock<'e>(db: impl PgExecutor<'e>, account: &str, id: Uuid) -> sqlx::Result<bool> {
    let found: Option<i32> = sqlx::query_scalar("SELECT 1 FROM users WHERE account = $1 AND id = $2 FOR UPDATE")
        .bind(account)
        .bind(id)
        .fetch_optional(db)
        .await?;
    Ok(found.is_some())
}

/// Recounts a user's processed documents into `documents_processed`: the
/// new count. Run it after [`user_lock`], in a statement of its own, so it
/// reads every document committed before the lock was granted.
pub async fn user_recount_processed<'e>(db: impl PgExecutor<'e>, account: &str, id: Uuid) -> sqlx::Result<i32> {
    sqlx::query_scalar(
        "UPDATE users SET documents_processed =
                (SELECT count(*) FROM documents
                  WHERE account = $1 AND author = $2 AND status = 'processed' AND deleted_at IS NULL)
          WHERE account = $1 AND id = $2
          RETURNING documents_processed",
    )
    .bind(account)
    .bind(id)
    .fetch_one(db)
    .await
}

/// Adds a pending document.
pub async fn document_insert<'e>(db: impl PgExecutor<'e>, doc: &NewDocument<'_>) -> sqlx::Result<DocumentRow> {
    sqlx::query_as(&format!(
        "INSERT INTO documents (account, author, title, body) VALUES ($1, $2, $3, $4)
         RETURNING {DOCUMENT_COLUMNS}"
    ))
    .bind(doc.account)
    .bind(doc.author)
    .bind(doc.title)
    .bind(doc.body)
    .fetch_one(db)
    .await
}

/// Adds the account's welcome document unless it has one: the new row, or
/// `None` when it existed.
pub async fn document_insert_welcome<'e>(
    db: impl PgExecutor<'e>,
    account: &str,
    title: &str,
    body: &str,
) -> sqlx::Result<Option<DocumentRow>> {
    sqlx::query_as(&format!(
        "INSERT INTO documents (account, title, body, welcome) VALUES ($1, $2, $3, true)
         ON CONFLICT (account) WHERE welcome DO NOTHING
         RETURNING {DOCUMENT_COLUMNS}"
    ))
    .bind(account)
    .bind(title)
    .bind(body)
    .fetch_optional(db)
    .await
}

/// One of an account's documents, unless it is deleted.
pub async fn document_get<'e>(db: impl PgExecutor<'e>, account: &str, id: Uuid) -> sqlx::Result<Option<DocumentRow>> {
    sqlx::query_as(&format!(
        "SELECT {DOCUMENT_COLUMNS} FROM documents
          WHERE account = $1 AND id = $2 AND deleted_at IS NULL"
    ))
    .bind(account)
    .bind(id)
    .fetch_optional(db)
    .await
}

/// An account's newest documents that are not deleted, at most `limit`.
pub async fn document_list<'e>(db: impl PgExecutor<'e>, account: &str, limit: i64) -> sqlx::Result<Vec<DocumentRow>> {
    sqlx::query_as(&format!(
        "SELECT {DOCUMENT_COLUMNS} FROM documents
          WHERE account = $1 AND deleted_at IS NULL
          ORDER BY created_at DESC, id
          LIMIT $2"
    ))
    .bind(account)
    .bind(limit)
    .fetch_all(db)
    .await
}

/// A document, locked for processing until the transaction ends; `None`
/// when it is gone or deleted.
pub async fn document_lock<'e>(db: impl PgExecutor<'e>, account: &str, id: Uuid) -> sqlx::Result<Option<DocumentRow>> {
    sqlx::query_as(&format!(
        "SELECT {DOCUMENT_COLUMNS} FROM documents
          WHERE account = $1 AND id = $2 AND deleted_at IS NULL
          FOR UPDATE"
    ))
    .bind(account)
    .bind(id)
    .fetch_optional(db)
    .await
}

/// Records what processing found in a document.
pub async fn document_set_processed<'e>(
    db: impl PgExecutor<'e>,
    account: &str,
    id: Uuid,
    processed: &Processed<'_>,
) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE documents
            SET status = 'processed', word_count = $3, summary = $4, processed_at = now()
          WHERE account = $1 AND id = $2",
    )
    .bind(account)
    .bind(id)
    .bind(processed.word_count)
    .bind(processed.summary)
    .execute(db)
    .await?;
    Ok(())
}

/// Marks a document deleted (the cleanup job removes it later): false when
/// there was no such document, or it was deleted already.
pub async fn document_mark_deleted<'e>(db: impl PgExecutor<'e>, account: &str, id: Uuid) -> sqlx::Result<bool> {
    let done = sqlx::query(
        "UPDATE documents SET deleted_at = now()
          WHERE account = $1 AND id = $2 AND deleted_at IS NULL",
    )
    .bind(account)
    .bind(id)
    .execute(db)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Removes up to `batch` documents of any account on this shard that were
/// deleted more than `older_than` ago, skipping rows other transactions
/// hold: how many were removed.
pub async fn document_purge_deleted<'e>(
    db: impl PgExecutor<'e>,
    older_than: Duration,
    batch: i64,
) -> sqlx::Result<u64> {
    let done = sqlx::query(
        "DELETE FROM documents
          WHERE (account, id) IN (
                SELECT account, id FROM documents
                 WHERE deleted_at < now() - make_interval(secs => $1)
                 ORDER BY deleted_at
                 LIMIT $2
                 FOR UPDATE SKIP LOCKED)",
    )
    .bind(older_than.as_secs_f64())
    .bind(batch)
    .execute(db)
    .await?;
    Ok(done.rows_affected())
}

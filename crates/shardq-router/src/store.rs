//! Every SQL statement of the router crate, as noun-first functions.

use sqlx::PgPool;

// ---- placements (master) ---------------------------------------------------------

/// The shard and epoch of an account's placement, if it has one.
pub(crate) async fn placement_get_epoch(master: &PgPool, account: &str) -> sqlx::Result<Option<(String, i64)>> {
    sqlx::query_as("SELECT shard, epoch FROM shardq.placements WHERE account = $1")
        .bind(account)
        .fetch_optional(master)
        .await
}

/// Accounts whose placement moved after `since` (the master's clock; `None`:
/// none yet), and the master's clock now, to pass as `since` next time.
pub(crate) async fn placements_moved_since(
    master: &PgPool,
    since: Option<chrono::DateTime<chrono::Utc>>,
) -> sqlx::Result<(Vec<String>, chrono::DateTime<chrono::Utc>)> {
    let now: chrono::DateTime<chrono::Utc> = sqlx::query_scalar("SELECT now()").fetch_one(master).await?;
    let Some(since) = since else {
        return Ok((Vec::new(), now));
    };
    let moved = sqlx::query_scalar(
        "SELECT account FROM shardq.placements WHERE moved_at IS NOT NULL AND moved_at > $1 - interval '1 second'",
    )
    .bind(since)
    .fetch_all(master)
    .await?;
    Ok((moved, now))
}

/// The notification channel of placement changes; the payload is the account.
pub(crate) const PLACEMENTS_CHANNEL: &str = "shardq_placements";

// ---- fences (shards) ----------------------------------------------------------------

/// SQLSTATE a shard raises for a write of an account fenced off it.
pub(crate) const FENCED_SQLSTATE: &str = "SQ001";

/// Where `account` goes, if this shard refuses its writes (it moved away, or
/// a move is switching it).
pub(crate) async fn fence_get(conn: &mut sqlx::PgConnection, account: &str) -> sqlx::Result<Option<String>> {
    sqlx::query_scalar("SELECT moved_to FROM shardq.fences WHERE account = $1 AND fenced_at IS NOT NULL")
        .bind(account)
        .fetch_optional(conn)
        .await
}

/// Inserts a placement unless the account already has one, or the shard is
/// draining. Returns the account's shard and whether this call placed it;
/// `None` when a concurrent insert committed after this statement's
/// snapshot (look again) or the shard is draining. The shard must be in the
/// registry (the foreign key; only the schema owner registers shards).
pub(crate) async fn placement_insert_if_absent(
    master: &PgPool,
    account: &str,
    shard: &str,
    pinned: bool,
) -> sqlx::Result<Option<(String, bool)>> {
    sqlx::query_as(
        "WITH ins AS (
             INSERT INTO shardq.placements (account, shard, pinned)
             SELECT $1, $2, $3
              WHERE NOT EXISTS (SELECT 1 FROM shardq.shards WHERE name = $2 AND draining)
             ON CONFLICT (account) DO NOTHING
             RETURNING shard
         )
         SELECT shard, true FROM ins
         UNION ALL
         SELECT shard, false FROM shardq.placements WHERE account = $1
         LIMIT 1",
    )
    .bind(account)
    .bind(shard)
    .bind(pinned)
    .fetch_optional(master)
    .await
}

/// Marks an account's placement on `shard` pinned (or not); false when the
/// account is not placed there.
pub(crate) async fn placement_set_pinned(
    master: &PgPool,
    account: &str,
    shard: &str,
    pinned: bool,
) -> sqlx::Result<bool> {
    sqlx::query("UPDATE shardq.placements SET pinned = $3 WHERE account = $1 AND shard = $2")
        .bind(account)
        .bind(shard)
        .bind(pinned)
        .execute(master)
        .await
        .map(|r| r.rows_affected() == 1)
}

/// Every placement (account, shard, pinned), in account order, only those
/// on `shard` when given.
pub(crate) async fn placements_all(master: &PgPool, shard: Option<&str>) -> sqlx::Result<Vec<(String, String, bool)>> {
    sqlx::query_as(
        "SELECT account, shard, pinned FROM shardq.placements
          WHERE $1::text IS NULL OR shard = $1 ORDER BY account",
    )
    .bind(shard)
    .fetch_all(master)
    .await
}

/// Whether an account's placement is pinned; `None` when it has none.
pub(crate) async fn placement_pinned(master: &PgPool, account: &str) -> sqlx::Result<Option<bool>> {
    sqlx::query_scalar("SELECT pinned FROM shardq.placements WHERE account = $1")
        .bind(account)
        .fetch_optional(master)
        .await
}

/// Placements and pinned placements per shard.
pub(crate) async fn placement_counts_pinned(master: &PgPool) -> sqlx::Result<Vec<(String, i64, i64)>> {
    sqlx::query_as(
        "SELECT shard, count(*), count(*) FILTER (WHERE pinned) FROM shardq.placements GROUP BY shard ORDER BY shard",
    )
    .fetch_all(master)
    .await
}

// ---- shard registry (master) ------------------------------------------------------

/// The registry: every registered shard's name and whether it is draining.
pub(crate) async fn shard_registry(master: &PgPool) -> sqlx::Result<Vec<(String, bool)>> {
    sqlx::query_as("SELECT name, draining FROM shardq.shards ORDER BY name")
        .fetch_all(master)
        .await
}

/// Registers the shards of `names` the registry lacks (the schema owner's
/// job: other roles get SQLSTATE 42501). Returns those registered now.
pub(crate) async fn shard_register(master: &PgPool, names: &[String]) -> sqlx::Result<Vec<String>> {
    sqlx::query_scalar(
        "INSERT INTO shardq.shards (name) SELECT unnest($1::text[])
         ON CONFLICT (name) DO NOTHING RETURNING name",
    )
    .bind(names)
    .fetch_all(master)
    .await
}

/// Sets a registered shard draining (or accepting again); false when the
/// registry has no such shard.
pub(crate) async fn shard_set_draining(master: &PgPool, name: &str, draining: bool) -> sqlx::Result<bool> {
    sqlx::query("UPDATE shardq.shards SET draining = $2 WHERE name = $1")
        .bind(name)
        .bind(draining)
        .execute(master)
        .await
        .map(|r| r.rows_affected() == 1)
}

/// The highest platform migration applied on a shard (`None`: none, or no
/// history table yet).
pub(crate) async fn shard_schema_version(shard: &PgPool) -> sqlx::Result<Option<i32>> {
    let exists: bool = sqlx::query_scalar("SELECT to_regclass('public.shardq_schema_history') IS NOT NULL")
        .fetch_one(shard)
        .await?;
    if !exists {
        return Ok(None);
    }
    sqlx::query_scalar("SELECT max(version) FROM public.shardq_schema_history")
        .fetch_one(shard)
        .await
}

/// Registered shards that hold placements but are not in `known`.
pub(crate) async fn placement_unknown_shards(master: &PgPool, known: &[String]) -> sqlx::Result<Vec<String>> {
    sqlx::query_scalar(
        "SELECT s.name FROM shardq.shards s
          WHERE s.name <> ALL($1)
            AND EXISTS (SELECT 1 FROM shardq.placements p WHERE p.shard = s.name)
          ORDER BY s.name",
    )
    .bind(known)
    .fetch_all(master)
    .await
}

/// Number of placements per shard.
pub(crate) async fn placement_counts(master: &PgPool) -> sqlx::Result<Vec<(String, i64)>> {
    sqlx::query_as("SELECT shard, count(*) FROM shardq.placements GROUP BY shard ORDER BY shard")
        .fetch_all(master)
        .await
}

// ---- migrations (tokio-postgres) ----

/// The history table of the platform's own migrations (`migrations/master`,
/// `migrations/shard`), written by refinery.
pub(crate) const MIGRATION_PLATFORM_TABLE: &str = "shardq_schema_history";

/// The history table of the application's migrations, written by refinery.
pub(crate) const MIGRATION_APP_TABLE: &str = "shardq_app_history";

/// The advisory lock key every migrator takes on a database before touching
/// its schema ("shardqmg" as big-endian bytes). Fixed forever: two releases
/// of shardq must exclude each other too.
const MIGRATION_LOCK_KEY: i64 = 0x7368_6172_6471_6d67;

/// One row of a refinery history table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct MigrationHistoryRow {
    /// The migration's version.
    pub version: i32,
    /// The migration's name (file name without `V{n}__` and `.sql`).
    pub name: String,
    /// refinery's checksum of name, version and SQL, as stored (a u64 in text).
    pub checksum: String,
}

/// Waits for the migration advisory lock of this database (session level:
/// held across refinery's transactions until [`migration_unlock`]).
pub(crate) async fn migration_lock(client: &tokio_postgres::Client) -> Result<(), tokio_postgres::Error> {
    client
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK_KEY])
        .await
        .map(drop)
}

/// Releases the migration advisory lock taken by [`migration_lock`].
pub(crate) async fn migration_unlock(client: &tokio_postgres::Client) -> Result<(), tokio_postgres::Error> {
    client
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK_KEY])
        .await
        .map(drop)
}

/// The rows of a history table in version order; empty when the table does
/// not exist yet (never creates it). `table` is one of the constants above.
pub(crate) async fn migration_history(
    client: &tokio_postgres::Client,
    table: &'static str,
) -> Result<Vec<MigrationHistoryRow>, tokio_postgres::Error> {
    let exists: bool = client
        .query_one("SELECT to_regclass($1) IS NOT NULL", &[&table])
        .await?
        .try_get(0)?;
    if !exists {
        return Ok(Vec::new());
    }
    let rows = client
        .query(
            &format!("SELECT version, name, checksum FROM {table} ORDER BY version"),
            &[],
        )
        .await?;
    rows.iter()
        .map(|r| {
            Ok(MigrationHistoryRow {
                version: r.try_get(0)?,
                name: r.try_get::<_, Option<String>>(1)?.unwrap_or_default(),
                checksum: r.try_get::<_, Option<String>>(2)?.unwrap_or_default(),
            })
        })
        .collect()
}

//! Every SQL statement of the router crate, as noun-first functions.

use crate::database::Database;
use crate::executor::Conn;

// ---- placements (master) ---------------------------------------------------------

/// The shard and epoch of an account's placement, if it has one.
pub(crate) async fn placement_get_epoch(master: &Database, account: &str) -> sqlx::Result<Option<(String, i64)>> {
    sqlx::query_as("SELECT shard, epoch FROM shardq.placements WHERE account = $1")
        .bind(account)
        .fetch_optional(master)
        .await
}

/// The shard and epoch of each of `accounts` that is placed, in one round trip.
pub(crate) async fn placements_get_many(
    master: &Database,
    accounts: &[&str],
) -> sqlx::Result<Vec<(String, String, i64)>> {
    sqlx::query_as("SELECT account, shard, epoch FROM shardq.placements WHERE account = ANY($1)")
        .bind(accounts)
        .fetch_all(master)
        .await
}

/// Places each of `accounts[i]` on `shards[i]` unless it is already placed
/// or that shard is draining, in one statement; returns the accounts this
/// call placed. A shard missing from the registry fails the statement
/// (foreign key).
pub(crate) async fn placements_insert_many(
    master: &Database,
    accounts: &[&str],
    shards: &[&str],
) -> sqlx::Result<Vec<String>> {
    sqlx::query_scalar(
        "INSERT INTO shardq.placements (account, shard)
         SELECT a, s FROM unnest($1::text[], $2::text[]) AS t(a, s)
          WHERE NOT EXISTS (SELECT 1 FROM shardq.shards WHERE name = t.s AND draining)
         ON CONFLICT (account) DO NOTHING
         RETURNING account",
    )
    .bind(accounts)
    .bind(shards)
    .fetch_all(master)
    .await
}

/// Accounts whose placement moved after `since` (the master's clock; `None`:
/// none yet), and the master's clock now, to pass as `since` next time.
pub(crate) async fn placements_moved_since(
    master: &Database,
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
pub(crate) async fn fence_get(conn: &mut Conn<'_>, account: &str) -> sqlx::Result<Option<String>> {
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
    master: &Database,
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
    master: &Database,
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
pub(crate) async fn placements_all(
    master: &Database,
    shard: Option<&str>,
) -> sqlx::Result<Vec<(String, String, bool)>> {
    sqlx::query_as(
        "SELECT account, shard, pinned FROM shardq.placements
          WHERE $1::text IS NULL OR shard = $1 ORDER BY account",
    )
    .bind(shard)
    .fetch_all(master)
    .await
}

/// Whether an account's placement is pinned; `None` when it has none.
pub(crate) async fn placement_pinned(master: &Database, account: &str) -> sqlx::Result<Option<bool>> {
    sqlx::query_scalar("SELECT pinned FROM shardq.placements WHERE account = $1")
        .bind(account)
        .fetch_optional(master)
        .await
}

/// Placements and pinned placements per shard.
pub(crate) async fn placement_counts_pinned(master: &Database) -> sqlx::Result<Vec<(String, i64, i64)>> {
    sqlx::query_as(
        "SELECT shard, count(*), count(*) FILTER (WHERE pinned) FROM shardq.placements GROUP BY shard ORDER BY shard",
    )
    .fetch_all(master)
    .await
}

// ---- shard registry (master) ------------------------------------------------------

/// The registry: every registered shard's name and whether it is draining.
pub(crate) async fn shard_registry(master: &Database) -> sqlx::Result<Vec<(String, bool)>> {
    sqlx::query_as("SELECT name, draining FROM shardq.shards ORDER BY name")
        .fetch_all(master)
        .await
}

/// Registers the shards of `names` the registry lacks (the schema owner's
/// job: other roles get SQLSTATE 42501). Returns those registered now.
pub(crate) async fn shard_register(master: &Database, names: &[String]) -> sqlx::Result<Vec<String>> {
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
pub(crate) async fn shard_set_draining(master: &Database, name: &str, draining: bool) -> sqlx::Result<bool> {
    sqlx::query("UPDATE shardq.shards SET draining = $2 WHERE name = $1")
        .bind(name)
        .bind(draining)
        .execute(master)
        .await
        .map(|r| r.rows_affected() == 1)
}

/// The highest platform migration applied on a shard (`None`: none, or no
/// history table yet).
pub(crate) async fn shard_schema_version(shard: &Database) -> sqlx::Result<Option<i32>> {
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

/// The fleet stamp of a database: (fleet id, name); `None` when it has
/// none (not migrated that far, or the migrator has not stamped it yet).
pub(crate) async fn fleet_stamp(db: &Database) -> sqlx::Result<Option<(String, String)>> {
    let exists: bool = sqlx::query_scalar("SELECT to_regclass('shardq.fleet_stamp') IS NOT NULL")
        .fetch_one(db)
        .await?;
    if !exists {
        return Ok(None);
    }
    sqlx::query_as("SELECT fleet_id::text, name FROM shardq.fleet_stamp")
        .fetch_optional(db)
        .await
}

/// Registered shards that hold placements but are not in `known`.
pub(crate) async fn placement_unknown_shards(master: &Database, known: &[String]) -> sqlx::Result<Vec<String>> {
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
pub(crate) async fn placement_counts(master: &Database) -> sqlx::Result<Vec<(String, i64)>> {
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

/// Takes the migration advisory lock of this database if it is free
/// (session level: held across the migrations' transactions until
/// [`migration_unlock`]); `false` when another session holds it. Never waits.
pub(crate) async fn migration_try_lock(client: &tokio_postgres::Client) -> Result<bool, tokio_postgres::Error> {
    client
        .query_one("SELECT pg_try_advisory_lock($1)", &[&MIGRATION_LOCK_KEY])
        .await?
        .try_get(0)
}

/// Releases the migration advisory lock taken by [`migration_try_lock`].
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

/// The fleet stamp of the migrator's database: (fleet id, name); `None`
/// when it has none yet (no stamp table, or no row).
pub(crate) async fn migration_stamp_get(
    client: &tokio_postgres::Client,
) -> Result<Option<(String, String)>, tokio_postgres::Error> {
    let exists: bool = client
        .query_one("SELECT to_regclass('shardq.fleet_stamp') IS NOT NULL", &[])
        .await?
        .try_get(0)?;
    if !exists {
        return Ok(None);
    }
    match client
        .query_opt("SELECT fleet_id::text, name FROM shardq.fleet_stamp", &[])
        .await?
    {
        Some(row) => Ok(Some((row.try_get(0)?, row.try_get(1)?))),
        None => Ok(None),
    }
}

/// Stamps the migrator's database with `fleet_id` and `name` unless it is
/// stamped already; returns the stamp it carries afterwards (the one found
/// when it had one).
pub(crate) async fn migration_stamp_write(
    client: &tokio_postgres::Client,
    fleet_id: &str,
    name: &str,
) -> Result<(String, String), tokio_postgres::Error> {
    client
        .execute(
            "INSERT INTO shardq.fleet_stamp (fleet_id, name) VALUES ($1::text::uuid, $2) ON CONFLICT DO NOTHING",
            &[&fleet_id, &name],
        )
        .await?;
    let row = client
        .query_one("SELECT fleet_id::text, name FROM shardq.fleet_stamp", &[])
        .await?;
    Ok((row.try_get(0)?, row.try_get(1)?))
}

/// Sets the migrator session's `lock_timeout` (milliseconds, 0: none) and
/// `statement_timeout` (milliseconds; `None`: back to the server's setting
/// for this role and database). Applied again before every migration file,
/// so a `SET` inside one file does not leak into the next.
pub(crate) async fn migration_session_timeouts(
    client: &tokio_postgres::Client,
    lock_timeout_ms: u64,
    statement_timeout_ms: Option<u64>,
) -> Result<(), tokio_postgres::Error> {
    let lock = lock_timeout_ms.to_string();
    let statement = statement_timeout_ms.map(|ms| ms.to_string());
    client
        .execute(
            "SELECT set_config('lock_timeout', $1, false), \
                    set_config('statement_timeout', \
                        coalesce($2, (SELECT reset_val FROM pg_settings WHERE name = 'statement_timeout')), false)",
            &[&lock, &statement],
        )
        .await
        .map(drop)
}

/// The server process id of this session (what `pg_locks` calls it).
pub(crate) async fn migration_backend_pid(client: &tokio_postgres::Client) -> Result<i32, tokio_postgres::Error> {
    client.query_one("SELECT pg_backend_pid()", &[]).await?.try_get(0)
}

/// Creates a history table if it does not exist, in refinery's layout (so
/// releases that still run refinery read it as their own).
pub(crate) async fn migration_history_create(
    client: &impl tokio_postgres::GenericClient,
    table: &'static str,
) -> Result<(), tokio_postgres::Error> {
    client
        .batch_execute(&format!(
            "CREATE TABLE IF NOT EXISTS {table} (version int4 PRIMARY KEY, name varchar(255), \
             applied_on varchar(255), checksum varchar(255))"
        ))
        .await
}

/// Records an applied migration in a history table, as refinery does:
/// `applied_on` in RFC 3339, the checksum as a decimal u64.
pub(crate) async fn migration_record(
    client: &impl tokio_postgres::GenericClient,
    table: &'static str,
    version: i32,
    name: &str,
    checksum: &str,
) -> Result<(), tokio_postgres::Error> {
    let applied_on = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
    client
        .execute(
            &format!("INSERT INTO {table} (version, name, applied_on, checksum) VALUES ($1, $2, $3, $4)"),
            &[&version, &name, &applied_on, &checksum],
        )
        .await
        .map(drop)
}

/// What the session `pid` is waiting for, if it waits for a lock: the lock
/// (mode and object) and the sessions holding it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct MigrationLockWait {
    /// The lock mode requested, e.g. `AccessExclusiveLock`.
    pub mode: String,
    /// The object: `relation shardq.jobs`, `transactionid`, `virtualxid`, ...
    pub object: String,
    /// The blocking sessions, each as `pid 123 (idle in transaction, since
    /// 2026-01-01 10:00:00+00)`.
    pub holders: Vec<String>,
}

/// The lock `pid` waits for right now, if any (read from another session).
pub(crate) async fn migration_lock_wait(
    observer: &tokio_postgres::Client,
    pid: i32,
) -> Result<Option<MigrationLockWait>, tokio_postgres::Error> {
    let Some(row) = observer
        .query_opt(
            "SELECT l.mode, \
                    CASE WHEN l.relation IS NOT NULL THEN 'relation ' || l.relation::regclass::text \
                         ELSE l.locktype END, \
                    ARRAY(SELECT format('pid %s (%s, since %s)', a.pid, coalesce(a.state, '?'), \
                                        coalesce(date_trunc('second', a.xact_start)::text, '?')) \
                          FROM pg_stat_activity a WHERE a.pid = ANY (pg_blocking_pids($1)) ORDER BY a.pid) \
             FROM pg_locks l WHERE l.pid = $1 AND NOT l.granted LIMIT 1",
            &[&pid],
        )
        .await?
    else {
        return Ok(None);
    };
    Ok(Some(MigrationLockWait {
        mode: row.try_get(0)?,
        object: row.try_get(1)?,
        holders: row.try_get(2)?,
    }))
}

/// The indexes of this database that are INVALID (what an interrupted
/// `CREATE INDEX CONCURRENTLY` leaves behind).
pub(crate) async fn migration_invalid_indexes(
    client: &tokio_postgres::Client,
) -> Result<Vec<String>, tokio_postgres::Error> {
    client
        .query(
            "SELECT indexrelid::regclass::text FROM pg_index WHERE NOT indisvalid ORDER BY 1",
            &[],
        )
        .await?
        .iter()
        .map(|r| r.try_get(0))
        .collect()
}

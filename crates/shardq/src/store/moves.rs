//! Moving an account: the move records in the master (`shardq.moves`, and
//! the placement switch), and on the shards the fence, the waits, the copy
//! and the clean-up. Called by `moves` only; every statement is safe to run
//! again after a crash (see `moves` for the steps).

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgPool};

/// One move as recorded in the master.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct MoveRow {
    /// The move's id.
    pub id: i64,
    /// The account moved.
    pub account: String,
    /// The shard it leaves.
    pub from_shard: String,
    /// The shard it goes to.
    pub to_shard: String,
    /// The placement epoch when the move started (the switch makes it + 1).
    pub epoch: i64,
    /// The last step done: started, paused, fenced, copied, switched, done, aborted.
    pub step: String,
    /// Why the last try of the next step failed, if it did.
    pub error: Option<String>,
    /// When the move started.
    pub started_at: DateTime<Utc>,
    /// When it last changed.
    pub updated_at: DateTime<Utc>,
}

const MOVE_COLUMNS: &str = "id, account, from_shard, to_shard, epoch, step, error, started_at, updated_at";

/// Starts a move of `account` (placed on `from` at `epoch`) to `to`; `None`
/// when the placement is not (or no longer) `from` at `epoch`. A move
/// already in progress for the account is a unique violation
/// (`moves_active_idx`).
pub async fn move_start(master: &PgPool, account: &str, to: &str) -> sqlx::Result<Option<MoveRow>> {
    sqlx::query_as(&format!(
        "INSERT INTO shardq.moves (account, from_shard, to_shard, epoch)
         SELECT account, shard, $2, epoch FROM shardq.placements WHERE account = $1
         RETURNING {MOVE_COLUMNS}"
    ))
    .bind(account)
    .bind(to)
    .fetch_optional(master)
    .await
}

/// One move by id.
pub async fn move_get(master: &PgPool, id: i64) -> sqlx::Result<Option<MoveRow>> {
    sqlx::query_as(&format!("SELECT {MOVE_COLUMNS} FROM shardq.moves WHERE id = $1"))
        .bind(id)
        .fetch_optional(master)
        .await
}

/// The moves not done or aborted, oldest first, then the last `recent` finished.
pub async fn move_list(master: &PgPool, recent: i64) -> sqlx::Result<Vec<MoveRow>> {
    sqlx::query_as(&format!(
        "(SELECT {MOVE_COLUMNS} FROM shardq.moves WHERE step NOT IN ('done', 'aborted') ORDER BY id)
         UNION ALL
         (SELECT {MOVE_COLUMNS} FROM shardq.moves WHERE step IN ('done', 'aborted') ORDER BY id DESC LIMIT $1)"
    ))
    .bind(recent)
    .fetch_all(master)
    .await
}

/// Records that move `id` finished step `from` and is now at `to`, clearing
/// its error; false when it was not at `from` (another mover got there).
pub async fn move_advance(master: &PgPool, id: i64, from: &str, to: &str) -> sqlx::Result<bool> {
    sqlx::query(
        "UPDATE shardq.moves SET step = $3, error = NULL, updated_at = now()
          WHERE id = $1 AND step = $2",
    )
    .bind(id)
    .bind(from)
    .bind(to)
    .execute(master)
    .await
    .map(|r| r.rows_affected() == 1)
}

/// Records why move `id`'s next step failed (it stays where it is).
pub async fn move_fail(master: &PgPool, id: i64, error: &str) -> sqlx::Result<()> {
    sqlx::query("UPDATE shardq.moves SET error = $2, updated_at = now() WHERE id = $1")
        .bind(id)
        .bind(error)
        .execute(master)
        .await
        .map(drop)
}

/// The switch: in one master transaction, places the account on `to` with
/// epoch + 1 (only if it is still on `from` at `epoch`) and records the move
/// as switched. False when the move was not at `copied`.
pub async fn move_switch(master: &PgPool, m: &MoveRow) -> sqlx::Result<bool> {
    let mut tx = master.begin().await?;
    let advanced = sqlx::query(
        "UPDATE shardq.moves SET step = 'switched', error = NULL, updated_at = now()
          WHERE id = $1 AND step = 'copied'",
    )
    .bind(m.id)
    .execute(&mut *tx)
    .await?
    .rows_affected()
        == 1;
    if !advanced {
        return Ok(false);
    }
    sqlx::query(
        "WITH reg AS (INSERT INTO shardq.shards (name) VALUES ($2) ON CONFLICT (name) DO NOTHING)
         UPDATE shardq.placements SET shard = $2, epoch = epoch + 1, moved_at = clock_timestamp()
          WHERE account = $1 AND shard = $3 AND epoch = $4",
    )
    .bind(&m.account)
    .bind(&m.to_shard)
    .bind(&m.from_shard)
    .bind(m.epoch)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(true)
}

// ---- the shard the account leaves

/// Stops `account`'s jobs from being claimed on this shard (it goes to `to`
/// at `epoch`); its writes are still taken. Keeps an existing fence as it is.
pub async fn fence_pause(shard: &PgPool, account: &str, to: &str, epoch: i64) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO shardq.fences (account, moved_to, epoch) VALUES ($1, $2, $3)
         ON CONFLICT (account) DO NOTHING",
    )
    .bind(account)
    .bind(to)
    .bind(epoch)
    .execute(shard)
    .await
    .map(drop)
}

/// Fences `account`'s writes off this shard: inserts of its jobs (and of
/// rows of tables with the fence trigger) by transactions that begin from
/// now on are refused, and `Router::begin` goes elsewhere. Keeps the first
/// time it was fenced.
pub async fn fence_writes(shard: &PgPool, account: &str, to: &str, epoch: i64) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE shardq.fences SET fenced_at = now()
          WHERE account = $1 AND moved_to = $2 AND epoch = $3 AND fenced_at IS NULL",
    )
    .bind(account)
    .bind(to)
    .bind(epoch)
    .execute(shard)
    .await
    .map(drop)
}

/// Lifts the fence a move to `to` at `epoch` put up (an aborted move).
pub async fn fence_delete(shard: &PgPool, account: &str, to: &str, epoch: i64) -> sqlx::Result<()> {
    sqlx::query("DELETE FROM shardq.fences WHERE account = $1 AND moved_to = $2 AND epoch = $3")
        .bind(account)
        .bind(to)
        .bind(epoch)
        .execute(shard)
        .await
        .map(drop)
}

/// This shard's clock now: read after the write fence committed, it is a
/// time before which every transaction the fence did not refuse began.
pub async fn shard_now(shard: &PgPool) -> sqlx::Result<DateTime<Utc>> {
    sqlx::query_scalar("SELECT now()").fetch_one(shard).await
}

/// Transactions on this shard's database that began before `cutoff` and are
/// still open (other than this session's): their writes must be waited for,
/// so the move carries them.
pub async fn writers_before(shard: &PgPool, cutoff: DateTime<Utc>) -> sqlx::Result<i64> {
    sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity a
          WHERE a.datname = current_database() AND a.pid <> pg_backend_pid()
            AND a.xact_start IS NOT NULL AND a.xact_start < $1",
    )
    .bind(cutoff)
    .fetch_one(shard)
    .await
}

/// The account's jobs running on this shard.
pub async fn jobs_running_of_account(shard: &PgPool, account: &str) -> sqlx::Result<i64> {
    sqlx::query_scalar("SELECT count(*) FROM shardq.jobs WHERE account = $1 AND state = 'running'")
        .bind(account)
        .fetch_one(shard)
        .await
}

/// The columns of `table` in order (name and type), to check that both
/// shards hold the same table. Empty when the table does not exist.
pub async fn table_columns(shard: &PgPool, table: &str) -> sqlx::Result<Vec<(String, String)>> {
    sqlx::query_as(
        "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod)
           FROM pg_attribute a
          WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped
          ORDER BY a.attnum",
    )
    .bind(table)
    .fetch_all(shard)
    .await
}

/// The account's rows of `table` (its account column `column`), as one
/// JSON array, locked until `tx` ends so nothing changes them meanwhile.
/// `table` and `column` are quoted as identifiers.
pub async fn rows_of_account(
    tx: &mut PgConnection,
    table: &str,
    column: &str,
    account: &str,
) -> sqlx::Result<serde_json::Value> {
    let (schema, name) = split_table(table);
    let rows: Option<sqlx::types::Json<serde_json::Value>> = sqlx::query_scalar(&format!(
        "SELECT jsonb_agg(to_jsonb(t)) FROM (SELECT * FROM {} WHERE {} = $1 FOR UPDATE) AS t",
        qualified(schema, name),
        quote(column)
    ))
    .bind(account)
    .fetch_one(tx)
    .await?;
    Ok(rows.map(|r| r.0).unwrap_or_else(|| serde_json::json!([])))
}

/// The account's jobs, in id order, as one JSON array (with their old ids),
/// locked until `tx` ends.
pub async fn jobs_of_account(tx: &mut PgConnection, account: &str) -> sqlx::Result<serde_json::Value> {
    let rows: Option<sqlx::types::Json<serde_json::Value>> = sqlx::query_scalar(
        "SELECT jsonb_agg(to_jsonb(j) ORDER BY j.id)
           FROM (SELECT * FROM shardq.jobs WHERE account = $1 ORDER BY id FOR UPDATE) AS j",
    )
    .bind(account)
    .fetch_one(tx)
    .await?;
    Ok(rows.map(|r| r.0).unwrap_or_else(|| serde_json::json!([])))
}

/// The periodic records of the jobs `ids` (an account's global periodic jobs).
pub async fn periodic_runs_of_jobs(tx: &mut PgConnection, ids: &[i64]) -> sqlx::Result<serde_json::Value> {
    let rows: Option<sqlx::types::Json<serde_json::Value>> =
        sqlx::query_scalar("SELECT jsonb_agg(to_jsonb(p)) FROM shardq.periodic_runs p WHERE p.job_id = ANY($1)")
            .bind(ids)
            .fetch_one(tx)
            .await?;
    Ok(rows.map(|r| r.0).unwrap_or_else(|| serde_json::json!([])))
}

/// Deletes the account's rows of `tables` (in reverse order, so children go
/// before the parents declared first; deferrable constraints are checked
/// at commit) and its jobs on the shard it left (the fence stays). Returns
/// the rows deleted.
pub async fn account_delete(shard: &PgPool, tables: &[(String, String)], account: &str) -> sqlx::Result<u64> {
    let mut tx = shard.begin().await?;
    sqlx::query("SET CONSTRAINTS ALL DEFERRED").execute(&mut *tx).await?;
    let mut n = 0;
    // Children before parents: the tables are declared parents first.
    for (table, column) in tables.iter().rev() {
        let (schema, name) = split_table(table);
        n += sqlx::query(&format!(
            "DELETE FROM {} WHERE {} = $1",
            qualified(schema, name),
            quote(column)
        ))
        .bind(account)
        .execute(&mut *tx)
        .await?
        .rows_affected();
    }
    n += sqlx::query("DELETE FROM shardq.jobs WHERE account = $1")
        .bind(account)
        .execute(&mut *tx)
        .await?
        .rows_affected();
    tx.commit().await?;
    Ok(n)
}

// ---- the shard the account goes to

/// Whether move `id`'s copy committed on this shard.
pub async fn move_applied(shard: &PgPool, id: i64) -> sqlx::Result<bool> {
    sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM shardq.moves_applied WHERE move_id = $1)")
        .bind(id)
        .fetch_one(shard)
        .await
}

/// Writes the copy of an account in `tx` on the shard it goes to: lifts a
/// fence left from an earlier move away, inserts the rows of each table,
/// the jobs (new ids, in the old id order; returned as old id → new id),
/// and marks move `id` applied.
pub async fn account_insert(
    tx: &mut PgConnection,
    id: i64,
    account: &str,
    tables: &[(String, String, serde_json::Value)],
    jobs: &serde_json::Value,
) -> sqlx::Result<Vec<(i64, i64)>> {
    sqlx::query("SET CONSTRAINTS ALL DEFERRED").execute(&mut *tx).await?;
    sqlx::query("DELETE FROM shardq.fences WHERE account = $1")
        .bind(account)
        .execute(&mut *tx)
        .await?;
    // Parents before children: the tables are declared parents first.
    for (table, _, rows) in tables {
        let (schema, name) = split_table(table);
        let t = qualified(schema, name);
        sqlx::query(&format!(
            "INSERT INTO {t} OVERRIDING SYSTEM VALUE SELECT * FROM jsonb_populate_recordset(NULL::{t}, $1)"
        ))
        .bind(sqlx::types::Json(rows))
        .execute(&mut *tx)
        .await?;
    }
    // Every column but the id, in the table's order.
    let columns: Vec<String> = sqlx::query_scalar(
        "SELECT quote_ident(attname) FROM pg_attribute
          WHERE attrelid = 'shardq.jobs'::regclass AND attnum > 0 AND NOT attisdropped AND attname <> 'id'
          ORDER BY attnum",
    )
    .fetch_all(&mut *tx)
    .await?;
    let list = columns.join(", ");
    let mapping: Vec<(i64, i64)> = sqlx::query_as(&format!(
        "WITH src AS (
             SELECT r.*, (e.value ->> 'id')::bigint AS old_id, e.ordinality
               FROM jsonb_array_elements($1) WITH ORDINALITY AS e(value, ordinality),
                    LATERAL jsonb_populate_record(NULL::shardq.jobs, e.value) AS r
         ), ins AS (
             INSERT INTO shardq.jobs ({list})
             SELECT {list} FROM src ORDER BY ordinality
             RETURNING id
         ), numbered AS (
             SELECT id, row_number() OVER (ORDER BY id) AS n FROM ins
         )
         SELECT s.old_id, i.id FROM numbered i JOIN src s ON s.ordinality = i.n"
    ))
    .bind(sqlx::types::Json(jobs))
    .fetch_all(&mut *tx)
    .await?;
    sqlx::query("INSERT INTO shardq.moves_applied (move_id, account) VALUES ($1, $2)")
        .bind(id)
        .bind(account)
        .execute(&mut *tx)
        .await?;
    Ok(mapping)
}

/// Writes periodic records moved with their jobs, with the jobs' new ids.
pub async fn periodic_runs_insert(
    tx: &mut PgConnection,
    runs: &serde_json::Value,
    old_ids: &[i64],
    new_ids: &[i64],
) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO shardq.periodic_runs (name, occurrence, job_id, recorded_at)
         SELECT r.name, r.occurrence, m.new_id, r.recorded_at
           FROM jsonb_populate_recordset(NULL::shardq.periodic_runs, $1) AS r
           JOIN unnest($2::bigint[], $3::bigint[]) AS m(old_id, new_id) ON m.old_id = r.job_id
         ON CONFLICT (name, occurrence) DO NOTHING",
    )
    .bind(sqlx::types::Json(runs))
    .bind(old_ids)
    .bind(new_ids)
    .execute(tx)
    .await
    .map(drop)
}

/// `schema.table` split; `public` when no schema is given.
fn split_table(table: &str) -> (&str, &str) {
    table.split_once('.').unwrap_or(("public", table))
}

fn qualified(schema: &str, name: &str) -> String {
    format!("{}.{}", quote(schema), quote(name))
}

/// `name` as a quoted SQL identifier.
fn quote(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

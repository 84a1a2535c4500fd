//! Moving an account: the move records in the master (`shardq.moves`, and
//! the placement switch), and on the shards the fence, the change capture,
//! the waits, the copy in batches, the catch-up and the clean-up. Called by
//! `moves` only; every statement is safe to run again after a crash (see
//! `moves` for the steps).

use chrono::{DateTime, Utc};
use shardq_router::router::Database;
use shardq_router::Conn;

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
    /// The last step done: started, paused, precopied, fenced, copied,
    /// switched, done, aborted.
    pub step: String,
    /// The account-scoped tables the move carries, as recorded when it
    /// started (`[{"table": .., "column": ..}]`); `None` for a move started
    /// before they were recorded.
    pub tables: Option<sqlx::types::Json<serde_json::Value>>,
    /// Why the last try of the next step failed, if it did.
    pub error: Option<String>,
    /// When the move started.
    pub started_at: DateTime<Utc>,
    /// When it last changed.
    pub updated_at: DateTime<Utc>,
}

const MOVE_COLUMNS: &str = "id, account, from_shard, to_shard, epoch, step, tables, error, started_at, updated_at";

/// Deletes every job of account `$1` on this shard: the ids from
/// `shardq.account_jobs` (its primary key's range), each row then by the
/// jobs' primary key; the delete trigger removes the ids it read.
const JOBS_OF_ACCOUNT_DELETE_SQL: &str = "DELETE FROM shardq.jobs j USING shardq.account_jobs a
  WHERE a.account = $1 AND j.id = a.id AND j.account = $1";

/// Starts a move of `account` from where it is placed to `to`, carrying
/// `tables` (recorded with it); `None` when the account has no placement. A
/// move already in progress for the account is a unique violation
/// (`moves_active_idx`).
pub async fn move_start(
    master: &Database,
    account: &str,
    to: &str,
    tables: &serde_json::Value,
) -> sqlx::Result<Option<MoveRow>> {
    sqlx::query_as(&format!(
        "INSERT INTO shardq.moves (account, from_shard, to_shard, epoch, tables)
         SELECT account, shard, $2, epoch, $3 FROM shardq.placements WHERE account = $1
         RETURNING {MOVE_COLUMNS}"
    ))
    .bind(account)
    .bind(to)
    .bind(sqlx::types::Json(tables))
    .fetch_optional(master)
    .await
}

/// One move by id.
pub async fn move_get(master: &Database, id: i64) -> sqlx::Result<Option<MoveRow>> {
    sqlx::query_as(&format!("SELECT {MOVE_COLUMNS} FROM shardq.moves WHERE id = $1"))
        .bind(id)
        .fetch_optional(master)
        .await
}

/// The moves not done or aborted, oldest first, then the last `recent` finished.
pub async fn move_list(master: &Database, recent: i64) -> sqlx::Result<Vec<MoveRow>> {
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
pub async fn move_advance(master: &Database, id: i64, from: &str, to: &str) -> sqlx::Result<bool> {
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
pub async fn move_fail(master: &Database, id: i64, error: &str) -> sqlx::Result<()> {
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
pub async fn move_switch(master: &Database, m: &MoveRow) -> sqlx::Result<bool> {
    let mut tx = master.begin().await?;
    let advanced = sqlx::query(
        "UPDATE shardq.moves SET step = 'switched', error = NULL, updated_at = now()
          WHERE id = $1 AND step = 'copied'",
    )
    .bind(m.id)
    .execute(&mut tx)
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
    .execute(&mut tx)
    .await?;
    tx.commit().await?;
    Ok(true)
}

// ---- the shard the account leaves

/// Stops `account`'s jobs from being claimed on this shard (it goes to `to`
/// at `epoch`); its writes are still taken. Keeps an existing fence as it is.
pub async fn fence_pause(shard: &Database, account: &str, to: &str, epoch: i64) -> sqlx::Result<()> {
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
pub async fn fence_writes(shard: &Database, account: &str, to: &str, epoch: i64) -> sqlx::Result<()> {
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
pub async fn fence_delete(shard: &Database, account: &str, to: &str, epoch: i64) -> sqlx::Result<()> {
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
pub async fn shard_now(shard: &Database) -> sqlx::Result<DateTime<Utc>> {
    sqlx::query_scalar("SELECT now()").fetch_one(shard).await
}

/// Transactions on this shard's database that began before `cutoff` and are
/// still open (other than this session's): their writes must be waited for,
/// so the move carries them.
pub async fn writers_before(shard: &Database, cutoff: DateTime<Utc>) -> sqlx::Result<i64> {
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
pub async fn jobs_running_of_account(shard: &Database, account: &str) -> sqlx::Result<i64> {
    sqlx::query_scalar("SELECT count(*) FROM shardq.jobs WHERE account = $1 AND state = 'running'")
        .bind(account)
        .fetch_one(shard)
        .await
}

/// The columns of `table` in order (name and type), to check that both
/// shards hold the same table. Empty when the table does not exist.
pub async fn table_columns(shard: &Database, table: &str) -> sqlx::Result<Vec<(String, String)>> {
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

/// The columns of `table`'s primary key, in key order; empty when it has
/// none (a move copies rows by key).
pub async fn table_key(shard: &Database, table: &str) -> sqlx::Result<Vec<String>> {
    sqlx::query_scalar(
        "SELECT a.attname::text
           FROM pg_index i
          CROSS JOIN LATERAL unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, n)
           JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
          WHERE i.indrelid = to_regclass($1) AND i.indisprimary
          ORDER BY k.n",
    )
    .bind(table)
    .fetch_all(shard)
    .await
}

/// Attaches the change capture triggers (`shardq.capture_moving_accounts`)
/// to `table`, whose account column is `column` and primary key `key`,
/// unless it has them. They stay: for accounts not moving they cost one
/// probe of the empty `shardq.move_captures` per statement.
pub async fn capture_attach(shard: &Database, table: &str, column: &str, key: &[String]) -> sqlx::Result<()> {
    let attached: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pg_trigger
                         WHERE tgrelid = to_regclass($1) AND tgname = 'shardq_capture_delete')",
    )
    .bind(table)
    .fetch_one(shard)
    .await?;
    if attached {
        return Ok(());
    }
    let (schema, name) = split_table(table);
    let t = qualified(schema, name);
    let args: Vec<String> = std::iter::once(column)
        .chain(key.iter().map(String::as_str))
        .map(literal)
        .collect();
    let args = args.join(", ");
    // One simple-protocol request: its statements run in one transaction.
    let sql: String = [
        ("insert", "NEW TABLE AS new_rows"),
        ("update", "NEW TABLE AS new_rows"),
        ("delete", "OLD TABLE AS old_rows"),
    ]
    .iter()
    .map(|(event, transition)| {
        format!(
            "CREATE OR REPLACE TRIGGER shardq_capture_{event} AFTER {} ON {t}
                 REFERENCING {transition}
                 FOR EACH STATEMENT EXECUTE FUNCTION shardq.capture_moving_accounts({args});\n",
            event.to_uppercase()
        )
    })
    .collect();
    sqlx::raw_sql(&sql).execute(shard).await.map(drop)
}

/// Starts capturing the changes of `account`'s rows for move `id`.
pub async fn capture_start(shard: &Database, account: &str, id: i64) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO shardq.move_captures (account, move_id) VALUES ($1, $2)
         ON CONFLICT (account) DO UPDATE SET move_id = EXCLUDED.move_id",
    )
    .bind(account)
    .bind(id)
    .execute(shard)
    .await
    .map(drop)
}

/// Stops capturing `account`'s changes for move `id` and forgets those captured.
pub async fn capture_stop(shard: &Database, account: &str, id: i64) -> sqlx::Result<()> {
    let mut tx = shard.begin().await?;
    sqlx::query("DELETE FROM shardq.move_captures WHERE account = $1 AND move_id = $2")
        .bind(account)
        .bind(id)
        .execute(&mut tx)
        .await?;
    sqlx::query("DELETE FROM shardq.move_changes WHERE move_id = $1")
        .bind(id)
        .execute(&mut tx)
        .await?;
    tx.commit().await
}

/// Up to `limit` of the account's rows of `table` (account column `column`,
/// primary key `key`) after the key `after` (a JSON object of the key's
/// columns; `None`: from the first), in key order, as one JSON array.
pub async fn rows_batch(
    tx: &mut Conn<'_>,
    table: &str,
    column: &str,
    key: &[String],
    account: &str,
    after: Option<&serde_json::Value>,
    limit: i64,
) -> sqlx::Result<serde_json::Value> {
    let (schema, name) = split_table(table);
    let t = qualified(schema, name);
    let of = |alias: &str| -> String {
        key.iter()
            .map(|k| format!("{alias}.{}", quote(k)))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let (tk, kk) = (of("t"), of("k"));
    let rows: sqlx::types::Json<serde_json::Value> = sqlx::query_scalar(&format!(
        "SELECT coalesce(jsonb_agg(to_jsonb(t) ORDER BY {tk}), '[]') FROM (
             SELECT t.* FROM {t} t
              CROSS JOIN jsonb_populate_record(NULL::{t}, coalesce($2::jsonb, '{{}}')) AS k
              WHERE t.{} = $1 AND ($2::jsonb IS NULL OR ({tk}) > ({kk}))
              ORDER BY {tk} LIMIT $3) AS t",
        quote(column)
    ))
    .bind(account)
    .bind(after.map(sqlx::types::Json))
    .bind(limit)
    .fetch_one(tx)
    .await?;
    Ok(rows.0)
}

/// Up to `limit` of the account's jobs with an id above `after`, in id
/// order, as one JSON array (with their ids here).
pub async fn jobs_batch(tx: &mut Conn<'_>, account: &str, after: i64, limit: i64) -> sqlx::Result<serde_json::Value> {
    let rows: sqlx::types::Json<serde_json::Value> = sqlx::query_scalar(
        "SELECT coalesce(jsonb_agg(to_jsonb(j) ORDER BY j.id), '[]')
           FROM shardq.jobs j
          WHERE j.account = $1
            AND j.id = ANY(ARRAY(SELECT a.id FROM shardq.account_jobs a
                                  WHERE a.account = $1 AND a.id > $2 ORDER BY a.id LIMIT $3))",
    )
    .bind(account)
    .bind(after)
    .bind(limit)
    .fetch_one(tx)
    .await?;
    Ok(rows.0)
}

/// The keys of `table`'s rows changed since move `id` began capturing (or
/// since the last catch-up removed them), as a JSON array of key objects,
/// with the sequence number of each one's last change.
pub async fn changes_of(tx: &mut Conn<'_>, id: i64, table: &str) -> sqlx::Result<(serde_json::Value, Vec<i64>)> {
    let (keys, seqs): (sqlx::types::Json<serde_json::Value>, Vec<i64>) = sqlx::query_as(
        "SELECT coalesce(jsonb_agg(key ORDER BY seq), '[]'), coalesce(array_agg(seq ORDER BY seq), '{}')
           FROM shardq.move_changes WHERE move_id = $1 AND tbl = to_regclass($2)::oid",
    )
    .bind(id)
    .bind(table)
    .fetch_one(tx)
    .await?;
    Ok((keys.0, seqs))
}

/// Removes the captured changes `seqs` of move `id` (copied by a catch-up;
/// a row changed again since has a newer sequence number and stays).
pub async fn changes_done(shard: &Database, id: i64, seqs: &[i64]) -> sqlx::Result<()> {
    sqlx::query("DELETE FROM shardq.move_changes WHERE move_id = $1 AND seq = ANY($2)")
        .bind(id)
        .bind(seqs)
        .execute(shard)
        .await
        .map(drop)
}

/// The account's rows of `table` whose keys are among `keys` (a JSON array
/// of key objects), as one JSON array: those of the keys that still exist.
pub async fn rows_by_keys(
    tx: &mut Conn<'_>,
    table: &str,
    column: &str,
    key: &[String],
    account: &str,
    keys: &serde_json::Value,
) -> sqlx::Result<serde_json::Value> {
    let (schema, name) = split_table(table);
    let t = qualified(schema, name);
    let list = |alias: &str| -> String {
        key.iter()
            .map(|k| format!("{alias}.{}", quote(k)))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let rows: sqlx::types::Json<serde_json::Value> = sqlx::query_scalar(&format!(
        "SELECT coalesce(jsonb_agg(to_jsonb(t)), '[]') FROM {t} t
          WHERE t.{} = $1
            AND ({}) IN (SELECT {} FROM jsonb_populate_recordset(NULL::{t}, $2) AS k)",
        quote(column),
        list("t"),
        list("k")
    ))
    .bind(account)
    .bind(sqlx::types::Json(keys))
    .fetch_one(tx)
    .await?;
    Ok(rows.0)
}

/// The periodic records of the jobs `ids` (an account's global periodic jobs).
pub async fn periodic_runs_of_jobs(tx: &mut Conn<'_>, ids: &[i64]) -> sqlx::Result<serde_json::Value> {
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
pub async fn account_delete(shard: &Database, tables: &[(String, String)], account: &str) -> sqlx::Result<u64> {
    let mut tx = shard.begin().await?;
    sqlx::query("SET CONSTRAINTS ALL DEFERRED").execute(&mut tx).await?;
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
        .execute(&mut tx)
        .await?
        .rows_affected();
    }
    n += sqlx::query(JOBS_OF_ACCOUNT_DELETE_SQL)
        .bind(account)
        .execute(&mut tx)
        .await?
        .rows_affected();
    n += sqlx::query("DELETE FROM shardq.account_weights WHERE account = $1")
        .bind(account)
        .execute(&mut tx)
        .await?
        .rows_affected();
    n += super::limits::account_limits_delete(&mut tx, account).await?;
    tx.commit().await?;
    Ok(n)
}

// ---- the shard the account goes to

/// Writes the account's fair-share weight as the shard it leaves has it
/// (`None`: no row there, so none here either). Idempotent.
pub async fn account_weight_put(shard: &Database, account: &str, weight: Option<i32>) -> sqlx::Result<()> {
    sqlx::query(
        "WITH gone AS (DELETE FROM shardq.account_weights WHERE account = $1 AND $2::int IS NULL)
         INSERT INTO shardq.account_weights (account, weight)
         SELECT $1, $2 WHERE $2::int IS NOT NULL
         ON CONFLICT (account) DO UPDATE SET weight = EXCLUDED.weight",
    )
    .bind(account)
    .bind(weight)
    .execute(shard)
    .await
    .map(drop)
}

/// Whether move `id`'s copy committed on this shard.
pub async fn move_applied(shard: &Database, id: i64) -> sqlx::Result<bool> {
    sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM shardq.moves_applied WHERE move_id = $1)")
        .bind(id)
        .fetch_one(shard)
        .await
}

/// Holds the account's jobs on the shard it goes to until the switch: a
/// fence that the claim skips and that makes `Router::begin` go to the
/// shard the account is on (`from`), while the copy's inserts are taken
/// (its time is never reached). Replaces a fence left by an earlier move
/// away.
pub async fn target_hold(shard: &Database, account: &str, from: &str, epoch: i64) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO shardq.fences (account, moved_to, epoch, fenced_at) VALUES ($1, $2, $3, 'infinity')
         ON CONFLICT (account) DO UPDATE
            SET moved_to = EXCLUDED.moved_to, epoch = EXCLUDED.epoch, fenced_at = EXCLUDED.fenced_at",
    )
    .bind(account)
    .bind(from)
    .bind(epoch)
    .execute(shard)
    .await
    .map(drop)
}

/// Deletes what a copy of move `id` wrote on the shard the account goes
/// to: the account's rows of `tables` (children first), its jobs and their
/// periodic records, the job mapping and the applied mark. Returns the rows
/// deleted. The account is not placed here, so nothing else is its.
pub async fn target_clear(shard: &Database, tables: &[(String, String)], account: &str, id: i64) -> sqlx::Result<u64> {
    let mut tx = shard.begin().await?;
    sqlx::query("SET CONSTRAINTS ALL DEFERRED").execute(&mut tx).await?;
    let mut n = 0;
    for (table, column) in tables.iter().rev() {
        let (schema, name) = split_table(table);
        n += sqlx::query(&format!(
            "DELETE FROM {} WHERE {} = $1",
            qualified(schema, name),
            quote(column)
        ))
        .bind(account)
        .execute(&mut tx)
        .await?
        .rows_affected();
    }
    sqlx::query(
        "DELETE FROM shardq.periodic_runs WHERE job_id IN (SELECT id FROM shardq.account_jobs WHERE account = $1)",
    )
    .bind(account)
    .execute(&mut tx)
    .await?;
    n += sqlx::query(JOBS_OF_ACCOUNT_DELETE_SQL)
        .bind(account)
        .execute(&mut tx)
        .await?
        .rows_affected();
    n += sqlx::query("DELETE FROM shardq.account_weights WHERE account = $1")
        .bind(account)
        .execute(&mut tx)
        .await?
        .rows_affected();
    n += super::limits::account_limits_delete(&mut tx, account).await?;
    sqlx::query("DELETE FROM shardq.move_jobs WHERE move_id = $1")
        .bind(id)
        .execute(&mut tx)
        .await?;
    sqlx::query("DELETE FROM shardq.moves_applied WHERE move_id = $1")
        .bind(id)
        .execute(&mut tx)
        .await?;
    tx.commit().await?;
    Ok(n)
}

/// After an abort: the fence the copy held the account's jobs with on the
/// shard it was going to now refuses its writes (they belong on `from`).
pub async fn target_refuse(shard: &Database, account: &str, from: &str) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE shardq.fences SET fenced_at = now(), moved_to = $2
          WHERE account = $1 AND (fenced_at IS NULL OR fenced_at = 'infinity')",
    )
    .bind(account)
    .bind(from)
    .execute(shard)
    .await
    .map(drop)
}

/// Writes `rows` (a JSON array) of `table`, whose primary key is `key` and
/// columns `columns`: inserts the new ones and overwrites those already
/// copied (keys kept).
pub async fn rows_upsert(
    tx: &mut Conn<'_>,
    table: &str,
    key: &[String],
    columns: &[String],
    rows: &serde_json::Value,
) -> sqlx::Result<u64> {
    let (schema, name) = split_table(table);
    let t = qualified(schema, name);
    let rest: Vec<&String> = columns.iter().filter(|c| !key.contains(c)).collect();
    let on_conflict = if rest.is_empty() {
        "DO NOTHING".to_string()
    } else {
        let names: Vec<String> = rest.iter().map(|c| quote(c)).collect();
        let excluded: Vec<String> = rest.iter().map(|c| format!("EXCLUDED.{}", quote(c))).collect();
        format!("DO UPDATE SET ({}) = ROW({})", names.join(", "), excluded.join(", "))
    };
    let key: Vec<String> = key.iter().map(|k| quote(k)).collect();
    sqlx::query(&format!(
        "INSERT INTO {t} OVERRIDING SYSTEM VALUE SELECT * FROM jsonb_populate_recordset(NULL::{t}, $1)
         ON CONFLICT ({}) {on_conflict}",
        key.join(", ")
    ))
    .bind(sqlx::types::Json(rows))
    .execute(tx)
    .await
    .map(|r| r.rows_affected())
}

/// Deletes the account's rows of `table` whose keys are among `keys` but
/// not among `rows` (changed rows the old shard no longer has).
pub async fn rows_delete_missing(
    tx: &mut Conn<'_>,
    table: &str,
    column: &str,
    key: &[String],
    account: &str,
    keys: &serde_json::Value,
    rows: &serde_json::Value,
) -> sqlx::Result<u64> {
    let (schema, name) = split_table(table);
    let t = qualified(schema, name);
    let list = |alias: &str| -> String {
        key.iter()
            .map(|k| format!("{alias}.{}", quote(k)))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let k = list("k");
    sqlx::query(&format!(
        "DELETE FROM {t} t
          WHERE t.{} = $1
            AND ({}) IN (SELECT {k} FROM jsonb_populate_recordset(NULL::{t}, $2) AS k
                         EXCEPT SELECT {k} FROM jsonb_populate_recordset(NULL::{t}, $3) AS k)",
        quote(column),
        list("t")
    ))
    .bind(account)
    .bind(sqlx::types::Json(keys))
    .bind(sqlx::types::Json(rows))
    .execute(tx)
    .await
    .map(|r| r.rows_affected())
}

/// Writes the jobs of move `id` on the shard the account goes to: `jobs`
/// (a JSON array of the old shard's rows, with their old ids) are updated
/// in place where an earlier copy wrote them (id, and so serial order,
/// kept), else inserted with new ids in the old id order (the mapping
/// recorded in `shardq.move_jobs`); the jobs `changed` that are not in
/// `jobs` (deleted on the old shard) are deleted. Then the periodic records
/// `runs` of these jobs are written with the new ids. Returns the jobs
/// inserted.
pub async fn jobs_apply(
    tx: &mut Conn<'_>,
    id: i64,
    jobs: &serde_json::Value,
    changed: &[i64],
    runs: &serde_json::Value,
) -> sqlx::Result<u64> {
    sqlx::query(
        "WITH gone AS (
             DELETE FROM shardq.move_jobs m
              WHERE m.move_id = $1 AND m.old_id = ANY($2)
                AND NOT EXISTS (SELECT 1 FROM jsonb_array_elements($3) e WHERE (e.value ->> 'id')::bigint = m.old_id)
             RETURNING new_id)
         DELETE FROM shardq.jobs WHERE id IN (SELECT new_id FROM gone)",
    )
    .bind(id)
    .bind(changed)
    .bind(sqlx::types::Json(jobs))
    .execute(&mut *tx)
    .await?;
    // Every column but the id, in the table's order.
    let columns: Vec<String> = sqlx::query_scalar(
        "SELECT quote_ident(attname) FROM pg_attribute
          WHERE attrelid = 'shardq.jobs'::regclass AND attnum > 0 AND NOT attisdropped AND attname <> 'id'
          ORDER BY attnum",
    )
    .fetch_all(&mut *tx)
    .await?;
    let list = columns.join(", ");
    let from_src: Vec<String> = columns.iter().map(|c| format!("s.{c}")).collect();
    let from_src = from_src.join(", ");
    let src = "SELECT r.*, (e.value ->> 'id')::bigint AS old_id
                 FROM jsonb_array_elements($1) AS e,
                      LATERAL jsonb_populate_record(NULL::shardq.jobs, e.value) AS r";
    sqlx::query(&format!(
        "WITH src AS ({src})
         UPDATE shardq.jobs j SET ({list}) = ROW({from_src})
           FROM src s JOIN shardq.move_jobs m ON m.move_id = $2 AND m.old_id = s.old_id
          WHERE j.id = m.new_id"
    ))
    .bind(sqlx::types::Json(jobs))
    .bind(id)
    .execute(&mut *tx)
    .await?;
    let inserted = sqlx::query(&format!(
        "WITH src AS (
             SELECT s.* FROM ({src}) AS s
              WHERE NOT EXISTS (SELECT 1 FROM shardq.move_jobs m WHERE m.move_id = $2 AND m.old_id = s.old_id)
         ), ins AS (
             INSERT INTO shardq.jobs ({list})
             SELECT {list} FROM src ORDER BY old_id
             RETURNING id
         ), numbered AS (
             SELECT id, row_number() OVER (ORDER BY id) AS n FROM ins
         ), olds AS (
             SELECT old_id, row_number() OVER (ORDER BY old_id) AS n FROM src
         )
         INSERT INTO shardq.move_jobs (move_id, old_id, new_id)
         SELECT $2, o.old_id, i.id FROM numbered i JOIN olds o ON o.n = i.n"
    ))
    .bind(sqlx::types::Json(jobs))
    .bind(id)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    sqlx::query(
        "INSERT INTO shardq.periodic_runs (name, occurrence, job_id, recorded_at)
         SELECT r.name, r.occurrence, m.new_id, r.recorded_at
           FROM jsonb_populate_recordset(NULL::shardq.periodic_runs, $1) AS r
           JOIN shardq.move_jobs m ON m.move_id = $2 AND m.old_id = r.job_id
         ON CONFLICT (name, occurrence) DO NOTHING",
    )
    .bind(sqlx::types::Json(runs))
    .bind(id)
    .execute(&mut *tx)
    .await?;
    Ok(inserted)
}

/// Ends move `id`'s copy in `tx` on the shard the account goes to: marks it
/// applied and turns the fence holding the account's jobs into a hold of
/// claims only (writes are taken, for writers that see the switch before
/// the hold is lifted).
pub async fn copy_applied(tx: &mut Conn<'_>, id: i64, account: &str) -> sqlx::Result<()> {
    sqlx::query("INSERT INTO shardq.moves_applied (move_id, account) VALUES ($1, $2) ON CONFLICT DO NOTHING")
        .bind(id)
        .bind(account)
        .execute(&mut *tx)
        .await?;
    sqlx::query("UPDATE shardq.fences SET fenced_at = NULL WHERE account = $1")
        .bind(account)
        .execute(&mut *tx)
        .await
        .map(drop)
}

/// After the switch: lifts the hold on the account's jobs on the shard it
/// went to (they run from now) and forgets move `id`'s job mapping.
pub async fn target_release(shard: &Database, account: &str, id: i64) -> sqlx::Result<()> {
    let mut tx = shard.begin().await?;
    sqlx::query("DELETE FROM shardq.fences WHERE account = $1 AND fenced_at IS NULL")
        .bind(account)
        .execute(&mut tx)
        .await?;
    sqlx::query("DELETE FROM shardq.move_jobs WHERE move_id = $1")
        .bind(id)
        .execute(&mut tx)
        .await?;
    tx.commit().await
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

/// `value` as a quoted SQL literal.
fn literal(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

//! Inserting jobs: one row, a batch in one statement, and the keyed insert of
//! unique and serial jobs (with the lookup of an existing duplicate). Called
//! by the client, the periodic scheduler and tests, on a pool connection or
//! inside the application's transaction.

use chrono::{DateTime, Utc};
use shardq_router::Conn;

use crate::job::NewJob;
use crate::unique;

const JOB_INSERT: &str =
    "INSERT INTO shardq.jobs (account, queue, kind, args, priority, max_attempts, run_at, resources)
     SELECT $1, $2, $3, $4::jsonb, $5, $6, COALESCE($7, now() + make_interval(secs => COALESCE($8, 0))), $10::text[]
       FROM (SELECT set_config('shardq.notify', $9, true)) AS notify
     RETURNING id";

/// When an insert wakes the shard's producers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Notify {
    /// From the inserting transaction, at its commit (the insert trigger):
    /// for inserts in the caller's transaction.
    AtCommit,
    /// Later, by [`jobs_notify`] once the one-statement insert committed:
    /// the insert's commit does not hold the server's notify lock while it
    /// waits for its flush, so concurrent enqueues share WAL flushes.
    Deferred,
}

impl Notify {
    fn setting(self) -> &'static str {
        match self {
            Notify::AtCommit => "at-commit",
            Notify::Deferred => "deferred",
        }
    }
}

/// Inserts one job on the connection (the caller's transaction, or a pool connection).
pub async fn job_insert(
    conn: &mut Conn<'_>,
    account: &str,
    job: &NewJob,
    args: &str,
    notify: Notify,
) -> sqlx::Result<i64> {
    sqlx::query_scalar(JOB_INSERT)
        .bind(account)
        .bind(&job.queue)
        .bind(&job.kind)
        .bind(args)
        .bind(job.priority)
        .bind(job.max_attempts)
        .bind(job.run_at)
        .bind(job.delay_secs())
        .bind(notify.setting())
        .bind(job.resource_names())
        .fetch_one(conn)
        .await
}

/// Wakes the producers of `queues` after a [`Notify::Deferred`] insert
/// committed: one NOTIFY per queue, in a transaction that does not wait for
/// its commit to be flushed (a lost wake-up only leaves the job to the
/// poll).
pub async fn jobs_notify(conn: &mut Conn<'_>, queues: &[&str]) -> sqlx::Result<()> {
    sqlx::query(
        "SELECT set_config('synchronous_commit', 'off', true),
                (SELECT count(pg_notify('shardq_jobs', q)) FROM (SELECT DISTINCT q FROM unnest($1::text[]) AS t(q)) AS d)",
    )
    .bind(queues)
    .execute(conn)
    .await
    .map(|_| ())
}

/// The tail of both batch inserts, after their `inserted` CTE: how they
/// return their ids. Rows are inserted in input order (`ORDER BY n` over
/// the input's ordinality), so their identity values rise in it, and the
/// ids in input order are the inserted ids sorted. When they are one
/// contiguous run (no other insert took a value of the sequence meanwhile:
/// the usual case), the statement returns only the first id and the count,
/// sparing the server the sorted array of every id and the client its
/// decoding; otherwise it returns the sorted array too.
macro_rules! batch_ids {
    () => {
        ", span AS (SELECT min(id) AS lo, max(id) AS hi, count(*) AS n FROM inserted)
     SELECT lo, n, CASE WHEN hi - lo + 1 = n THEN NULL ELSE (SELECT array_agg(id ORDER BY id) FROM inserted) END
       FROM span"
    };
}

/// The batch insert when its rows differ only in account and args (the
/// usual batch): `$1` accounts, `$2` args (JSON text), one value each for
/// `$3` queue, `$4` kind, `$5` priority, `$6` max attempts, `$7` run time,
/// `$8` delay in seconds and `$9` resources (NULL: none). Per row, the
/// server decodes two array elements and writes the row, as the floor's
/// `UNNEST` insert does; the run time is computed once. The ids come
/// back as `batch_ids!` describes.
const JOB_INSERT_MANY_UNIFORM: &str = concat!(
    "WITH inserted AS (
         INSERT INTO shardq.jobs (account, queue, kind, args, priority, max_attempts, run_at, resources)
         SELECT t.a, $3, $4, t.g::jsonb, $5, $6, c.run_at, $9::text[]
           FROM (SELECT set_config('shardq.notify', 'deferred', true) AS notify,
                        COALESCE($7, now() + make_interval(secs => COALESCE($8, 0))) AS run_at) AS c,
                unnest($1::text[], $2::text[]) WITH ORDINALITY AS t(a, g, n)
          ORDER BY t.n
         RETURNING id
     )",
    batch_ids!()
);

/// The batch insert of rows that differ in more than account and args: one
/// array per column (each job's resources as one comma-joined text, since
/// resource names hold no comma); ids as in [`JOB_INSERT_MANY_UNIFORM`].
const JOB_INSERT_MANY: &str = concat!(
    "WITH inserted AS (
         INSERT INTO shardq.jobs (account, queue, kind, args, priority, max_attempts, run_at, resources)
         SELECT a, q, k, g::jsonb, p, m, COALESCE(r, now() + make_interval(secs => COALESCE(d, 0))),
                string_to_array(rs, ',')
           FROM (SELECT set_config('shardq.notify', 'deferred', true)) AS notify,
                unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::smallint[], $6::int[],
                       $7::timestamptz[], $8::float8[], $9::text[])
                WITH ORDINALITY AS t(a, q, k, g, p, m, r, d, rs, n)
          ORDER BY n
         RETURNING id
     )",
    batch_ids!()
);

/// The ids of a batch insert in input order, from what it returned (see
/// `batch_ids!`): the sorted array when there is one, else `n` ids from `lo`.
fn batch_ids_in_order((lo, n, ids): (Option<i64>, i64, Option<Vec<i64>>)) -> Vec<i64> {
    match (ids, lo) {
        (Some(ids), _) => ids,
        (None, Some(lo)) => (lo..lo + n).collect(),
        (None, None) => Vec::new(),
    }
}

/// Whether job `b` is inserted with the same values as `a` in every column
/// but account and args.
fn same_columns(a: &NewJob, b: &NewJob) -> bool {
    a.queue == b.queue
        && a.kind == b.kind
        && a.priority == b.priority
        && a.max_attempts == b.max_attempts
        && a.run_at == b.run_at
        && a.delay_secs() == b.delay_secs()
        && a.resource_names() == b.resource_names()
}

/// Inserts many jobs in one statement; ids come back in input order.
/// The batch is a one-statement insert on a pool connection: its NOTIFY is
/// [`Notify::Deferred`] (call [`jobs_notify`] after it).
pub async fn job_insert_many(conn: &mut Conn<'_>, rows: &[(&str, &NewJob, &str)]) -> sqlx::Result<Vec<i64>> {
    let accounts: Vec<&str> = rows.iter().map(|r| r.0).collect();
    let args: Vec<&str> = rows.iter().map(|r| r.2).collect();
    let Some(first) = rows.first().map(|r| r.1) else {
        return Ok(Vec::new());
    };
    if rows.iter().all(|r| same_columns(first, r.1)) {
        return sqlx::query_as(JOB_INSERT_MANY_UNIFORM)
            .bind(accounts)
            .bind(args)
            .bind(&first.queue)
            .bind(&first.kind)
            .bind(first.priority)
            .bind(first.max_attempts)
            .bind(first.run_at)
            .bind(first.delay_secs())
            .bind(first.resource_names())
            .fetch_one(conn)
            .await
            .map(batch_ids_in_order);
    }
    let queues: Vec<&str> = rows.iter().map(|r| r.1.queue.as_str()).collect();
    let kinds: Vec<&str> = rows.iter().map(|r| r.1.kind.as_str()).collect();
    let priorities: Vec<i16> = rows.iter().map(|r| r.1.priority).collect();
    let max_attempts: Vec<i32> = rows.iter().map(|r| r.1.max_attempts).collect();
    let run_ats: Vec<Option<DateTime<Utc>>> = rows.iter().map(|r| r.1.run_at).collect();
    let delays: Vec<Option<f64>> = rows.iter().map(|r| r.1.delay_secs()).collect();
    let resources: Vec<Option<String>> = rows.iter().map(|r| r.1.resource_names().map(|n| n.join(","))).collect();
    sqlx::query_as(JOB_INSERT_MANY)
        .bind(accounts)
        .bind(queues)
        .bind(kinds)
        .bind(args)
        .bind(priorities)
        .bind(max_attempts)
        .bind(run_ats)
        .bind(delays)
        .bind(resources)
        .fetch_one(conn)
        .await
        .map(batch_ids_in_order)
}

// ---- unique jobs, serial keys, periodic jobs

/// The keyed insert: `$1`..`$7` as in the plain insert (`$11` the delay, `$12` the resources), `$8` the unique key
/// text (hashed here to hex SHA-256, so any length fits the index; NULL: not
/// unique), `$9` the unique states, `$10` the serial key. Inserts nothing
/// when a job holds the same unique key. The hash goes to both `unique_key`
/// (enforced, cleared when the job leaves its unique states) and
/// `unique_hash` (kept, so a manual retry can restore the key; shard
/// migration V6).
const JOB_INSERT_KEYED: &str = "INSERT INTO shardq.jobs
            (account, queue, kind, args, priority, max_attempts, run_at,
             unique_key, unique_hash, unique_states, serial_key, resources)
     VALUES ($1, $2, $3, $4::jsonb, $5, $6, COALESCE($7, now() + make_interval(secs => COALESCE($11, 0))),
             CASE WHEN $8::text IS NOT NULL THEN encode(sha256(convert_to($8::text, 'UTF8')), 'hex') END,
             CASE WHEN $8::text IS NOT NULL THEN encode(sha256(convert_to($8::text, 'UTF8')), 'hex') END,
             $9::text[], $10, $12::text[])
     ON CONFLICT (unique_key) WHERE unique_key IS NOT NULL DO NOTHING
     RETURNING id";

/// A job's unique key and serial key as stored, from the client's inputs.
struct JobKeys<'a> {
    /// The unique key's text (see `unique::key_text`); `None`: not unique.
    pub unique_text: Option<&'a str>,
    /// The unique states; `None` when not unique.
    pub unique_states: Option<&'a [&'a str]>,
    /// The stored serial key (account and ordering key); `None`: none.
    pub serial_key: Option<&'a str>,
}

/// Inserts one unique and/or serial job; `None` when a job with the same
/// unique key exists (nothing inserted).
async fn job_insert_keyed_once(
    conn: &mut Conn<'_>,
    account: &str,
    job: &NewJob,
    args: &str,
    keys: &JobKeys<'_>,
) -> sqlx::Result<Option<i64>> {
    sqlx::query_scalar(JOB_INSERT_KEYED)
        .bind(account)
        .bind(&job.queue)
        .bind(&job.kind)
        .bind(args)
        .bind(job.priority)
        .bind(job.max_attempts)
        .bind(job.run_at)
        .bind(keys.unique_text)
        .bind(keys.unique_states)
        .bind(keys.serial_key)
        .bind(job.delay_secs())
        .bind(job.resource_names())
        .fetch_optional(conn)
        .await
}

/// The job holding the unique key whose text is `unique_text`, if any
/// (through `jobs_unique_idx`).
async fn job_find_unique(conn: &mut Conn<'_>, unique_text: &str) -> sqlx::Result<Option<i64>> {
    sqlx::query_scalar(
        "SELECT id FROM shardq.jobs
          WHERE unique_key = encode(sha256(convert_to($1::text, 'UTF8')), 'hex') AND unique_key IS NOT NULL",
    )
    .bind(unique_text)
    .fetch_optional(conn)
    .await
}

/// How many times an insert that found a duplicate, which then finished
/// (and so released its key) before it could be read, is tried again.
const INSERT_TRIES: usize = 5;

/// Inserts a unique and/or serial job on `conn`: `Some((id, inserted))`,
/// with the existing job's id when it is a duplicate. `None` when every try
/// found a duplicate that was gone by the time it was read.
///
/// The lookup is its own statement so that, under READ COMMITTED, it sees
/// the row whose committed insert made `ON CONFLICT` do nothing (a
/// statement's snapshot predates the conflicting commit it waited for).
pub async fn job_insert_keyed(
    conn: &mut Conn<'_>,
    account: &str,
    job: &NewJob,
    args: &str,
) -> sqlx::Result<Option<(i64, bool)>> {
    let unique_text = job
        .unique
        .as_ref()
        .map(|u| unique::key_text(&job.kind, &job.queue, account, u, args, job.bucket_time()));
    let serial = job.serial_key.as_ref().map(|k| unique::serial_text(account, k));
    let keys = JobKeys {
        unique_text: unique_text.as_deref(),
        unique_states: job.unique.as_ref().map(|u| u.states.as_slice()),
        serial_key: serial.as_deref(),
    };
    for _ in 0..INSERT_TRIES {
        if let Some(id) = job_insert_keyed_once(conn, account, job, args, &keys).await? {
            return Ok(Some((id, true)));
        }
        let Some(text) = keys.unique_text else {
            // Not unique: the insert cannot have conflicted.
            return Ok(None);
        };
        if let Some(id) = job_find_unique(conn, text).await? {
            return Ok(Some((id, false)));
        }
    }
    Ok(None)
}

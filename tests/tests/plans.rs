//! The hot statements keep index plans on a large table, also when the
//! server uses a generic plan for the prepared statement (what it does after
//! a few executions when it judges that cheaper).
#![allow(clippy::unwrap_used, missing_docs)]

use shardq::store::{JOB_COMPLETE_MANY_SQL, JOB_FETCH_AVAILABLE_SQL, JOB_RESCUE_EXPIRED_SQL};
use shardq_tests::{assert_indexed, fleet, generic_plan};

/// Rows in the table when plans are checked.
const ROWS: i64 = 300_000;

#[tokio::test]
async fn hot_statements_use_indexes_under_generic_plans_on_a_large_table() {
    let f = fleet().await;
    let db = f.router.shards()[0].clone();
    let mut conn = db.pool.acquire().await.unwrap();
    sqlx::query(
        "INSERT INTO shardq.jobs (account, queue, kind, args, state, lease_expires_at)
         SELECT 'a' || (i % 1000), 'default', 'noop', '{}',
                CASE WHEN i % 10 = 0 THEN 'running' WHEN i % 3 = 0 THEN 'completed' ELSE 'available' END,
                CASE WHEN i % 10 = 0 THEN now() + interval '1 hour' END
           FROM generate_series(1, $1) AS i",
    )
    .bind(ROWS)
    .execute(&mut *conn)
    .await
    .unwrap();
    sqlx::query("ANALYZE shardq.jobs").execute(&mut *conn).await.unwrap();
    for (name, types, sql, args) in [
        (
            "fetch",
            "text, bigint, text, float8",
            JOB_FETCH_AVAILABLE_SQL,
            "'default', 64, 'node', 30",
        ),
        (
            "complete",
            "bigint[], int[]",
            JOB_COMPLETE_MANY_SQL,
            "'{1,2,3}', '{1,1,1}'",
        ),
        ("rescue", "bigint", JOB_RESCUE_EXPIRED_SQL, "1000"),
    ] {
        assert_indexed(name, &generic_plan(&mut conn, types, sql, args).await);
    }
}

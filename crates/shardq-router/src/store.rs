//! Every SQL statement of the router crate, as noun-first functions.

use sqlx::PgPool;

// ---- placements (master) ---------------------------------------------------------

/// The shard an account is placed on, if any.
pub(crate) async fn placement_get(master: &PgPool, account: &str) -> sqlx::Result<Option<String>> {
    sqlx::query_scalar("SELECT shard FROM shardq.placements WHERE account = $1")
        .bind(account)
        .fetch_optional(master)
        .await
}

/// Inserts a placement unless the account already has one. Returns the
/// account's shard and whether this call placed it; `None` when a concurrent
/// insert committed after this statement's snapshot (look again).
pub(crate) async fn placement_insert_if_absent(
    master: &PgPool,
    account: &str,
    shard: &str,
) -> sqlx::Result<Option<(String, bool)>> {
    sqlx::query_as(
        "WITH reg AS (
             INSERT INTO shardq.shards (name) VALUES ($2) ON CONFLICT (name) DO NOTHING
         ), ins AS (
             INSERT INTO shardq.placements (account, shard) VALUES ($1, $2)
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
    .fetch_optional(master)
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

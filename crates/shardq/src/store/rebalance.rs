//! The loads of a rebalance (`crate::rebalance`): how many jobs and how many
//! bytes each account has on its shard.

use shardq_router::router::Database;

/// Jobs per account among `accounts`, on one shard (0 for an account
/// without jobs). One range of `shardq.account_jobs`' primary key per
/// account.
pub async fn rebalance_job_counts(shard: &Database, accounts: &[String]) -> sqlx::Result<Vec<(String, i64)>> {
    sqlx::query_as(
        "SELECT a.account, (SELECT count(*) FROM shardq.account_jobs aj WHERE aj.account = a.account)
           FROM unnest($1::text[]) AS a(account)",
    )
    .bind(accounts)
    .fetch_all(shard)
    .await
}

/// Estimated bytes per account among `accounts`, on one shard: the sum of
/// `pg_column_size` of the account's job rows plus its rows of each
/// account-scoped `(table, column)` (row data as stored, TOASTed values
/// counted compressed; indexes and page overhead left out). `tables` are
/// validated identifiers (`schema.name` or `name`, and a column).
pub async fn rebalance_bytes(
    shard: &Database,
    accounts: &[String],
    tables: &[(String, String)],
) -> sqlx::Result<Vec<(String, i64)>> {
    let mut sum =
        String::from("(SELECT coalesce(sum(pg_column_size(j.*)), 0) FROM shardq.account_jobs aj JOIN shardq.jobs j ON j.id = aj.id WHERE aj.account = a.account)");
    for (table, column) in tables {
        let table = table
            .split('.')
            .map(|part| format!("\"{}\"", part.replace('"', "\"\"")))
            .collect::<Vec<_>>()
            .join(".");
        let column = format!("\"{}\"", column.replace('"', "\"\""));
        sum.push_str(&format!(
            " + (SELECT coalesce(sum(pg_column_size(t.*)), 0) FROM {table} t WHERE t.{column} = a.account)"
        ));
    }
    sqlx::query_as(&format!(
        "SELECT a.account, ({sum})::bigint FROM unnest($1::text[]) AS a(account)"
    ))
    .bind(accounts)
    .fetch_all(shard)
    .await
}

//! How statements run on a [`Database`]: `&Database`, [`Conn`] (a borrowed
//! connection) and [`Tx`] (a transaction) are sqlx executors that run a
//! statement the way the database's pooler allows.
//!
//! Without a pooler (`pooler = "none"`) they hand the statement to sqlx as
//! it is: prepared once per connection, cached, executed (one round trip).
//!
//! Behind a transaction pooler (`pooler = "transaction"`, PgBouncer in
//! transaction mode before 1.21) the pooler may give the client another
//! server connection after every Sync outside a transaction, and tracks no
//! prepared statement. sqlx sends a statement as Parse, Describe, Sync and
//! then Bind, Execute, Sync, so each statement here is
//! - unnamed (never prepared under a name nor cached, so no server
//!   connection holds a statement another client could run into), and
//! - inside a transaction: the caller's when the connection is in one
//!   (opened through sqlx, e.g. `Router::begin`'s), else its
//!   own (BEGIN, the statement, COMMIT), so both halves reach the same
//!   server connection. A statement alone keeps its meaning: it was its
//!   own transaction before too.
//!
//! The price behind the pooler is three more round trips per statement
//! outside a transaction (BEGIN, the separate Parse, COMMIT), one more
//! inside one (the Parse).
//!
//! `prepare` and `describe` are passed on unchanged: they prepare named
//! statements, which a transaction pooler before 1.21 cannot carry.

use futures::future::BoxFuture;
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use sqlx::postgres::{PgQueryResult, PgRow, PgStatement, PgTypeInfo};
use sqlx::{Connection, Describe, Either, Execute, Executor, PgConnection, Postgres, Transaction};

use crate::config::Pooler;
use crate::database::Database;

/// One result of a statement, as sqlx streams it.
type Step = Either<PgQueryResult, PgRow>;

/// Implements sqlx's `Executor` for `$ty` by handing every call to the
/// [`Conn`] that `self.$conn()` returns, so the wrapper runs statements the
/// way its database's pooler allows.
macro_rules! executor_through_conn {
    ($ty:ty, $conn:ident) => {
        impl<'c> sqlx::Executor<'c> for $ty {
            type Database = sqlx::Postgres;

            fn fetch_many<'e, 'q: 'e, E>(
                self,
                query: E,
            ) -> futures::stream::BoxStream<
                'e,
                sqlx::Result<sqlx::Either<sqlx::postgres::PgQueryResult, sqlx::postgres::PgRow>>,
            >
            where
                'c: 'e,
                E: 'q + sqlx::Execute<'q, sqlx::Postgres>,
            {
                sqlx::Executor::fetch_many(self.$conn(), query)
            }

            fn fetch_optional<'e, 'q: 'e, E>(
                self,
                query: E,
            ) -> futures::future::BoxFuture<'e, sqlx::Result<Option<sqlx::postgres::PgRow>>>
            where
                'c: 'e,
                E: 'q + sqlx::Execute<'q, sqlx::Postgres>,
            {
                sqlx::Executor::fetch_optional(self.$conn(), query)
            }

            fn prepare_with<'e, 'q: 'e>(
                self,
                sql: &'q str,
                parameters: &'e [sqlx::postgres::PgTypeInfo],
            ) -> futures::future::BoxFuture<'e, sqlx::Result<sqlx::postgres::PgStatement<'q>>>
            where
                'c: 'e,
            {
                sqlx::Executor::prepare_with(self.$conn(), sql, parameters)
            }

            fn describe<'e, 'q: 'e>(
                self,
                sql: &'q str,
            ) -> futures::future::BoxFuture<'e, sqlx::Result<sqlx::Describe<sqlx::Postgres>>>
            where
                'c: 'e,
            {
                sqlx::Executor::describe(self.$conn(), sql)
            }
        }
    };
}
pub(crate) use executor_through_conn;

/// A connection of a database borrowed for statements that run the way
/// the database's pooler allows (see the module doc). Made by
/// [`Database::conn`]; run statements on `&mut conn` (or on `conn`, which
/// it uses up).
#[derive(Debug)]
pub struct Conn<'a> {
    /// The connection (a pool connection, or a transaction's).
    conn: &'a mut PgConnection,
    /// Whether statements run unnamed and inside a transaction (behind a
    /// transaction pooler).
    unnamed: bool,
}

impl<'a> Conn<'a> {
    /// `conn`, whose statements run as `pooler` allows.
    pub fn new(conn: &'a mut PgConnection, pooler: Pooler) -> Conn<'a> {
        Conn {
            conn,
            unnamed: pooler == Pooler::Transaction,
        }
    }

    /// The same connection for a shorter borrow, e.g. to pass it on.
    pub fn reborrow(&mut self) -> Conn<'_> {
        Conn {
            conn: self.conn,
            unnamed: self.unnamed,
        }
    }

    /// The underlying connection: statements on it bypass this wrapper.
    pub fn raw(&mut self) -> &mut PgConnection {
        self.conn
    }
}

impl Database {
    /// `conn` (a connection of this database) for statements that run the
    /// way this database's pooler allows.
    pub fn conn<'a>(&self, conn: &'a mut PgConnection) -> Conn<'a> {
        Conn::new(conn, self.pooler)
    }

    /// Opens a transaction on a connection of this database's pool.
    pub async fn begin(&self) -> sqlx::Result<Tx> {
        Ok(Tx {
            tx: self.pool.begin().await?,
            pooler: self.pooler,
        })
    }

    /// Whether statements on this database run unnamed and inside a
    /// transaction (it is behind a transaction pooler).
    pub fn unnamed_statements(&self) -> bool {
        self.pooler == Pooler::Transaction
    }
}

/// A transaction on a database whose statements run the way the
/// database's pooler allows (run them on `&mut tx`). Made by
/// [`Database::begin`]; end it with [`Tx::commit`] (dropping it rolls back).
#[derive(Debug)]
pub struct Tx {
    /// The transaction.
    tx: Transaction<'static, Postgres>,
    /// The database's pooler.
    pooler: Pooler,
}

impl Tx {
    /// The transaction's connection, e.g. to pass on to a function taking
    /// a [`Conn`].
    pub fn conn(&mut self) -> Conn<'_> {
        Conn::new(&mut self.tx, self.pooler)
    }

    /// Commits the transaction.
    pub async fn commit(self) -> sqlx::Result<()> {
        self.tx.commit().await
    }

    /// Rolls the transaction back.
    pub async fn rollback(self) -> sqlx::Result<()> {
        self.tx.rollback().await
    }
}

executor_through_conn!(&'c mut Tx, conn);

/// A statement with sqlx's statement cache bypassed: prepared unnamed
/// (`persistent = false`), so nothing of it outlives its execution on the
/// server connection.
struct Unnamed<E>(E);

impl<'q, E: Execute<'q, Postgres>> Execute<'q, Postgres> for Unnamed<E> {
    fn sql(&self) -> &'q str {
        self.0.sql()
    }

    fn statement(&self) -> Option<&PgStatement<'q>> {
        self.0.statement()
    }

    fn take_arguments(&mut self) -> Result<Option<sqlx::postgres::PgArguments>, sqlx::error::BoxDynError> {
        self.0.take_arguments()
    }

    fn persistent(&self) -> bool {
        false
    }
}

/// Runs `query` on `conn` unnamed and inside a transaction: `conn`'s when
/// it is in one, else its own, committed when the statement succeeded and
/// rolled back when it failed. Collects what the statement returned.
async fn run_unnamed<'q, E>(conn: &mut PgConnection, query: E) -> sqlx::Result<Vec<Step>>
where
    E: 'q + Execute<'q, Postgres>,
{
    let query = Unnamed(query);
    if conn.is_in_transaction() {
        return conn.fetch_many(query).try_collect().await;
    }
    let mut tx = conn.begin().await?;
    let out: sqlx::Result<Vec<Step>> = (&mut *tx).fetch_many(query).try_collect().await;
    match out {
        Ok(steps) => {
            tx.commit().await?;
            Ok(steps)
        }
        Err(e) => {
            // The server may be in a failed transaction: end it now, so the
            // pooler's server connection is free before this one is reused.
            let _ = tx.rollback().await;
            Err(e)
        }
    }
}

/// `steps` as the stream sqlx's executors return.
fn stream_of<'e>(
    steps: impl std::future::Future<Output = sqlx::Result<Vec<Step>>> + Send + 'e,
) -> BoxStream<'e, sqlx::Result<Step>> {
    futures::stream::once(steps)
        .map_ok(|steps| futures::stream::iter(steps.into_iter().map(Ok)))
        .try_flatten()
        .boxed()
}

/// The first row among `steps`.
fn first_row(steps: Vec<Step>) -> Option<PgRow> {
    steps.into_iter().find_map(|s| s.right())
}

impl<'c> Executor<'c> for &'_ Database {
    type Database = Postgres;

    fn fetch_many<'e, 'q: 'e, E>(self, query: E) -> BoxStream<'e, sqlx::Result<Step>>
    where
        'c: 'e,
        E: 'q + Execute<'q, Postgres>,
    {
        if !self.unnamed_statements() {
            return (&self.pool).fetch_many(query);
        }
        let pool = self.pool.clone();
        stream_of(async move {
            let mut conn = pool.acquire().await?;
            run_unnamed(&mut conn, query).await
        })
    }

    fn fetch_optional<'e, 'q: 'e, E>(self, query: E) -> BoxFuture<'e, sqlx::Result<Option<PgRow>>>
    where
        'c: 'e,
        E: 'q + Execute<'q, Postgres>,
    {
        if !self.unnamed_statements() {
            return (&self.pool).fetch_optional(query);
        }
        let pool = self.pool.clone();
        Box::pin(async move {
            let mut conn = pool.acquire().await?;
            run_unnamed(&mut conn, query).await.map(first_row)
        })
    }

    fn prepare_with<'e, 'q: 'e>(
        self,
        sql: &'q str,
        parameters: &'e [PgTypeInfo],
    ) -> BoxFuture<'e, sqlx::Result<PgStatement<'q>>>
    where
        'c: 'e,
    {
        (&self.pool).prepare_with(sql, parameters)
    }

    fn describe<'e, 'q: 'e>(self, sql: &'q str) -> BoxFuture<'e, sqlx::Result<Describe<Postgres>>>
    where
        'c: 'e,
    {
        (&self.pool).describe(sql)
    }
}

impl<'c> Executor<'c> for Conn<'c> {
    type Database = Postgres;

    fn fetch_many<'e, 'q: 'e, E>(self, query: E) -> BoxStream<'e, sqlx::Result<Step>>
    where
        'c: 'e,
        E: 'q + Execute<'q, Postgres>,
    {
        if !self.unnamed {
            return self.conn.fetch_many(query);
        }
        stream_of(run_unnamed(self.conn, query))
    }

    fn fetch_optional<'e, 'q: 'e, E>(self, query: E) -> BoxFuture<'e, sqlx::Result<Option<PgRow>>>
    where
        'c: 'e,
        E: 'q + Execute<'q, Postgres>,
    {
        if !self.unnamed {
            return self.conn.fetch_optional(query);
        }
        Box::pin(async move { run_unnamed(self.conn, query).await.map(first_row) })
    }

    fn prepare_with<'e, 'q: 'e>(
        self,
        sql: &'q str,
        parameters: &'e [PgTypeInfo],
    ) -> BoxFuture<'e, sqlx::Result<PgStatement<'q>>>
    where
        'c: 'e,
    {
        self.conn.prepare_with(sql, parameters)
    }

    fn describe<'e, 'q: 'e>(self, sql: &'q str) -> BoxFuture<'e, sqlx::Result<Describe<Postgres>>>
    where
        'c: 'e,
    {
        self.conn.describe(sql)
    }
}

executor_through_conn!(&'c mut Conn<'_>, reborrow);

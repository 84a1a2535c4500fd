//! Accounts: creating one (the master's directory, its placement, its
//! provisioning job) and showing one.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::api::extract::{Json, Path};
use crate::api::{required, AppState};
use crate::directory::parse_account;
use crate::error::ApiError;
use crate::jobs::provision;
use crate::store;

/// Longest display name, in bytes.
pub const MAX_NAME_BYTES: usize = 200;

/// `POST /accounts` body.
#[derive(Debug, Deserialize)]
pub struct CreateAccount {
    /// The account id (shardq's rules; not starting with `_`).
    pub id: String,
    /// Its display name.
    pub name: String,
}

/// An account as the API shows it.
#[derive(Debug, Serialize)]
pub struct AccountView {
    /// Its id.
    pub account: String,
    /// Its display name.
    pub name: String,
    /// When it was created.
    pub created_at: DateTime<Utc>,
    /// The shard its rows and jobs live on.
    pub shard: String,
}

/// `POST /accounts` answer.
#[derive(Debug, Serialize)]
pub struct Created {
    /// The account.
    #[serde(flatten)]
    pub account: AccountView,
    /// False when the account existed (the answer is then 200, not 201).
    pub created: bool,
    /// Its provisioning job, `SHARD:ID`.
    pub provision_job: String,
    /// True when that job was enqueued by an earlier call.
    pub provision_duplicate: bool,
}

/// Creates an account; idempotent (an existing account keeps its name and
/// answers 200 with its provisioning job). The directory (master) and the account's
/// shard are two databases, so there is no transaction across them: the
/// directory row is written first, then the account is placed and its
/// unique provisioning job enqueued. A call that fails in between is
/// completed by repeating it. The enqueue writes nothing else, so it needs
/// no transaction of ours: `Client::enqueue_unique` is fenced on its own
/// (during a move it waits for the switch and inserts on the new shard).
pub async fn create(
    State(state): State<Arc<AppState>>,
    Json(body): Json<CreateAccount>,
) -> Result<impl IntoResponse, ApiError> {
    let account = parse_account(&body.id)?;
    let name = required("name", &body.name, MAX_NAME_BYTES)?;
    let master = state.router.master();
    let inserted = store::account_insert(&master.pool, account.as_str(), name)
        .await
        .map_err(|e| master.error(e))?;
    let created = inserted.is_some();
    let row = match inserted {
        Some(row) => row,
        None => state.directory.get(&state.router, &account).await?,
    };
    state.directory.remember(&account);
    let placement = state.router.shard_for(&account).await?;
    let job = state
        .client
        .enqueue_unique(&account, provision::job(&row.name)?)
        .await?;
    let status = if created { StatusCode::CREATED } else { StatusCode::OK };
    let answer = Created {
        account: AccountView {
            account: row.account,
            name: row.name,
            created_at: row.created_at,
            shard: placement.shard,
        },
        created,
        provision_job: job.id.to_string(),
        provision_duplicate: job.duplicate,
    };
    Ok((status, axum::Json(answer)))
}

/// `GET /accounts/{account}`.
pub async fn show(
    State(state): State<Arc<AppState>>,
    Path(account): Path<String>,
) -> Result<axum::Json<AccountView>, ApiError> {
    let account = parse_account(&account)?;
    let row = state.directory.get(&state.router, &account).await?;
    let placement = state.router.shard_for(&account).await?;
    Ok(axum::Json(AccountView {
        account: row.account,
        name: row.name,
        created_at: row.created_at,
        shard: placement.shard,
    }))
}

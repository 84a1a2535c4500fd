//! An account's users, on its shard: written in a fenced transaction
//! ([`crate::fenced`]), read through `router.pool_for`.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use shardq::Account;
use uuid::Uuid;

use crate::api::extract::{Json, Path};
use crate::api::{required, AppState};
use crate::directory::parse_account;
use crate::error::ApiError;
use crate::fenced::retry_fenced;
use crate::store::{self, UserRow};

/// Longest email address or name, in bytes.
pub const MAX_FIELD_BYTES: usize = 320;

/// `POST /accounts/{account}/users` body.
#[derive(Debug, Deserialize)]
pub struct CreateUser {
    /// Email address, unique within the account.
    pub email: String,
    /// Name.
    pub name: String,
}

/// A user as the API shows it.
#[derive(Debug, Serialize)]
pub struct UserView {
    /// The shard the row lives on.
    pub shard: String,
    /// The row.
    pub user: UserRow,
}

/// Adds a user to the account (409 when the email address is taken).
pub async fn create(
    State(state): State<Arc<AppState>>,
    Path(account): Path<String>,
    Json(body): Json<CreateUser>,
) -> Result<(StatusCode, axum::Json<UserView>), ApiError> {
    let account = parse_account(&account)?;
    let email = required("email", &body.email, MAX_FIELD_BYTES)?;
    if !email.contains('@') {
        return Err(ApiError::bad_request(format!(
            "email {email:?} is not an email address"
        )));
    }
    let name = required("name", &body.name, MAX_FIELD_BYTES)?;
    state.directory.require(&state.router, &account).await?;
    let user = retry_fenced(|| insert(&state, &account, email, name)).await?;
    Ok((StatusCode::CREATED, axum::Json(user)))
}

/// [`create`]'s transaction, fenced ([`crate::fenced`]).
async fn insert(state: &AppState, account: &Account, email: &str, name: &str) -> Result<UserView, ApiError> {
    let mut tx = state.router.begin(account).await?;
    let db = state.router.shard(tx.shard())?;
    let user = store::user_insert(&mut *tx, account.as_str(), email, name)
        .await
        .map_err(|e| db.error(e))?
        .ok_or_else(|| ApiError::Conflict(format!("account {account} already has a user with email {email:?}")))?;
    tx.commit().await.map_err(|e| db.error(e))?;
    Ok(UserView {
        shard: db.name.clone(),
        user,
    })
}

/// `GET /accounts/{account}/users/{id}`.
pub async fn show(
    State(state): State<Arc<AppState>>,
    Path((account, id)): Path<(String, Uuid)>,
) -> Result<axum::Json<UserView>, ApiError> {
    let account = parse_account(&account)?;
    state.directory.require(&state.router, &account).await?;
    let db = state.router.pool_for(&account).await?;
    let user = store::user_get(&db.pool, account.as_str(), id)
        .await
        .map_err(|e| db.error(e))?
        .ok_or_else(|| ApiError::NotFound(format!("account {account} has no user {id}")))?;
    Ok(axum::Json(UserView {
        shard: db.name.clone(),
        user,
    }))
}

//! An account's documents, on its shard. Creating one writes the row and
//! enqueues its `process_document` job in one fenced transaction
//! ([`crate::fenced`]); reads go through `router.pool_for`.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use shardq::Account;
use uuid::Uuid;

use crate::api::extract::{Json, Path, Query};
use crate::api::{limit, required, AppState};
use crate::directory::parse_account;
use crate::error::ApiError;
use crate::fenced::retry_fenced;
use crate::jobs::process_document;
use crate::store::{self, DocumentRow, NewDocument};

/// Longest title, in bytes.
pub const MAX_TITLE_BYTES: usize = 200;
/// Longest body, in bytes.
pub const MAX_BODY_BYTES: usize = 100_000;

/// `POST /accounts/{account}/documents` body.
#[derive(Debug, Deserialize)]
pub struct CreateDocument {
    /// The user who wrote it, if any (must be one of the account's users).
    pub author: Option<Uuid>,
    /// Title.
    pub title: String,
    /// Text.
    pub body: String,
}

/// A document as the API shows it.
#[derive(Debug, Serialize)]
pub struct DocumentView {
    /// The shard the row lives on.
    pub shard: String,
    /// The row.
    pub document: DocumentRow,
}

/// `POST /accounts/{account}/documents` answer.
#[derive(Debug, Serialize)]
pub struct CreatedDocument {
    /// The shard the row and the job live on.
    pub shard: String,
    /// The new row (pending).
    pub document: DocumentRow,
    /// Its `process_document` job, `SHARD:ID`.
    pub job: String,
}

/// `GET /accounts/{account}/documents` query.
#[derive(Debug, Deserialize)]
pub struct ListQuery {
    /// Most documents returned (1 to 500, default 100).
    pub limit: Option<i64>,
}

/// Adds a document and enqueues its processing, in one fenced transaction
/// on the account's shard: the job exists if and only if the row does, and
/// both follow the account if it moves meanwhile.
pub async fn create(
    State(state): State<Arc<AppState>>,
    Path(account): Path<String>,
    Json(body): Json<CreateDocument>,
) -> Result<(StatusCode, axum::Json<CreatedDocument>), ApiError> {
    let account = parse_account(&account)?;
    let title = required("title", &body.title, MAX_TITLE_BYTES)?;
    if body.body.len() > MAX_BODY_BYTES {
        return Err(ApiError::bad_request(format!(
            "body is {} bytes long; at most {MAX_BODY_BYTES} are allowed",
            body.body.len()
        )));
    }
    state.directory.require(&state.router, &account).await?;
    let new = NewDocument {
        account: account.as_str(),
        author: body.author,
        title,
        body: &body.body,
    };
    let created = retry_fenced(|| insert(&state, &account, &new)).await?;
    Ok((StatusCode::CREATED, axum::Json(created)))
}

/// [`create`]'s transaction: checks the author, writes the row and enqueues
/// its job, and commits.
async fn insert(state: &AppState, account: &Account, new: &NewDocument<'_>) -> Result<CreatedDocument, ApiError> {
    let mut tx = state.router.begin(account).await?;
    let db = state.router.shard(tx.shard())?;
    if let Some(author) = new.author {
        if !store::user_exists_locked(&mut *tx, account.as_str(), author)
            .await
            .map_err(|e| db.error(e))?
        {
            return Err(ApiError::NotFound(format!("account {account} has no user {author}")));
        }
    }
    let document = store::document_insert(&mut *tx, new).await.map_err(|e| db.error(e))?;
    let job = state
        .client
        .enqueue_in(&mut tx, account, process_document::job(document.id)?)
        .await?;
    tx.commit().await.map_err(|e| db.error(e))?;
    Ok(CreatedDocument {
        shard: db.name.clone(),
        document,
        job: job.to_string(),
    })
}

/// `GET /accounts/{account}/documents/{id}`.
pub async fn show(
    State(state): State<Arc<AppState>>,
    Path((account, id)): Path<(String, Uuid)>,
) -> Result<axum::Json<DocumentView>, ApiError> {
    let account = parse_account(&account)?;
    state.directory.require(&state.router, &account).await?;
    let db = state.router.pool_for(&account).await?;
    let document = store::document_get(&db.pool, account.as_str(), id)
        .await
        .map_err(|e| db.error(e))?
        .ok_or_else(|| ApiError::NotFound(format!("account {account} has no document {id}")))?;
    Ok(axum::Json(DocumentView {
        shard: db.name.clone(),
        document,
    }))
}

/// `GET /accounts/{account}/documents`: the newest first.
pub async fn list(
    State(state): State<Arc<AppState>>,
    Path(account): Path<String>,
    Query(query): Query<ListQuery>,
) -> Result<axum::Json<Vec<DocumentRow>>, ApiError> {
    let account = parse_account(&account)?;
    let limit = limit(query.limit, 100, 500)?;
    state.directory.require(&state.router, &account).await?;
    let db = state.router.pool_for(&account).await?;
    let documents = store::document_list(&db.pool, account.as_str(), limit)
        .await
        .map_err(|e| db.error(e))?;
    Ok(axum::Json(documents))
}

/// `DELETE /accounts/{account}/documents/{id}`: 204; the row stays until
/// the cleanup job removes it.
pub async fn delete(
    State(state): State<Arc<AppState>>,
    Path((account, id)): Path<(String, Uuid)>,
) -> Result<StatusCode, ApiError> {
    let account = parse_account(&account)?;
    state.directory.require(&state.router, &account).await?;
    if retry_fenced(|| mark_deleted(&state, &account, id)).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::NotFound(format!("account {account} has no document {id}")))
    }
}

/// [`delete`]'s transaction: false when there is no such document.
async fn mark_deleted(state: &AppState, account: &Account, id: Uuid) -> Result<bool, ApiError> {
    let mut tx = state.router.begin(account).await?;
    let db = state.router.shard(tx.shard())?;
    let deleted = store::document_mark_deleted(&mut *tx, account.as_str(), id)
        .await
        .map_err(|e| db.error(e))?;
    tx.commit().await.map_err(|e| db.error(e))?;
    Ok(deleted)
}

//! The accounts pages: placements in account order (paged by keyset) with
//! the moves in progress, and one account: its placement, epoch, its jobs
//! per state (among its newest `store::ACCOUNT_COUNT_CAP`) and its moves.

use askama::Template;
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Redirect, Response};
use serde::Deserialize;
use shardq::Account;

use super::jobs::encode;
use super::layout::{self, field, Nav};
use crate::display;
use crate::error::{Error, Result};
use crate::state::Dashboard;
use crate::store::{self, MoveRow, PlacementRow};

/// Accounts per page.
const PAGE: i64 = 50;

/// Most moves listed.
const MOVES: i64 = 50;

/// The list's query.
#[derive(Debug, Default, Deserialize)]
pub struct AccountsQuery {
    account: Option<String>,
    after: Option<String>,
}

#[derive(Template)]
#[template(path = "accounts.html")]
struct AccountsPage {
    nav: Nav,
    title: String,
    accounts: Vec<PlacementView>,
    moves: Vec<MoveView>,
    next: String,
}

#[derive(Template)]
#[template(path = "account.html")]
struct AccountPage {
    nav: Nav,
    title: String,
    placement: PlacementView,
    counts: Vec<CountView>,
    counts_error: String,
    counts_note: String,
    moves: Vec<MoveView>,
}

struct PlacementView {
    account: String,
    shard: String,
    epoch: i64,
    placed: String,
    moved: String,
}

struct CountView {
    state: String,
    count: String,
}

struct MoveView {
    id: i64,
    account: String,
    from: String,
    to: String,
    epoch: i64,
    step: String,
    error: String,
    started: String,
    updated: String,
}

fn placement_view(p: PlacementRow) -> PlacementView {
    PlacementView {
        placed: display::time(&p.placed_at),
        moved: display::time_opt(p.moved_at.as_ref()),
        account: p.account,
        shard: p.shard,
        epoch: p.epoch,
    }
}

fn move_view(m: MoveRow) -> MoveView {
    MoveView {
        started: display::time(&m.started_at),
        updated: display::time(&m.updated_at),
        id: m.id,
        account: m.account,
        from: m.from_shard,
        to: m.to_shard,
        epoch: m.epoch,
        step: m.step,
        error: m.error.unwrap_or_default(),
    }
}

fn master_error(message: String) -> Error {
    Error::Database {
        database: "master".to_string(),
        message,
    }
}

/// `GET /accounts`: placements after `after`; `account` opens one.
pub async fn list(State(dashboard): State<Dashboard>, Query(q): Query<AccountsQuery>) -> Result<Response> {
    let base = &dashboard.options().base;
    if let Some(account) = field(&q.account) {
        return Ok(Redirect::to(&format!("{base}/accounts/{}", encode(&account))).into_response());
    }
    let master = dashboard.router().master();
    let after = field(&q.after).unwrap_or_default();
    let (accounts, moves) = futures::join!(
        dashboard.within(master, store::placements_page(&master.pool, &after, PAGE)),
        dashboard.within(master, store::moves_active(&master.pool, MOVES))
    );
    let accounts = accounts.map_err(master_error)?;
    let moves = moves.map_err(master_error)?;
    let next = match accounts.last() {
        Some(last) if accounts.len() as i64 == PAGE => format!("{base}/accounts?after={}", encode(&last.account)),
        _ => String::new(),
    };
    let page = AccountsPage {
        nav: Nav::of(&dashboard),
        title: "Accounts".to_string(),
        accounts: accounts.into_iter().map(placement_view).collect(),
        moves: moves.into_iter().map(move_view).collect(),
        next,
    };
    Ok(layout::render("accounts", &page)?.into_response())
}

/// `GET /accounts/{account}`.
pub async fn one(State(dashboard): State<Dashboard>, Path(account): Path<String>) -> Result<Response> {
    let account = Account::new(account)?;
    let master = dashboard.router().master();
    let (placement, moves) = futures::join!(
        dashboard.within(master, store::placement(&master.pool, account.as_str())),
        dashboard.within(master, store::moves_of_account(&master.pool, account.as_str(), MOVES))
    );
    let placement = placement
        .map_err(master_error)?
        .ok_or_else(|| Error::NotFound(format!("account {:?} (it has no placement)", account.as_str())))?;
    let moves = moves.map_err(master_error)?;
    let (counts, counts_error, counts_note) = match dashboard.router().shard(&placement.shard) {
        Err(e) => (Vec::new(), display::error_chain(&e), String::new()),
        Ok(db) => match dashboard
            .within(db, store::account_counts(&db.pool, account.as_str()))
            .await
        {
            Ok(counts) => {
                let total: i64 = counts.iter().map(|(_, n)| n).sum();
                let capped = total >= store::ACCOUNT_COUNT_CAP;
                let note = if capped {
                    format!(
                        "Counted among the account's newest {} jobs.",
                        display::count(store::ACCOUNT_COUNT_CAP, false)
                    )
                } else {
                    String::new()
                };
                let counts = counts
                    .into_iter()
                    .map(|(state, n)| CountView {
                        state,
                        count: display::count(n, capped),
                    })
                    .collect();
                (counts, String::new(), note)
            }
            Err(e) => (Vec::new(), e, String::new()),
        },
    };
    let page = AccountPage {
        nav: Nav::of(&dashboard),
        title: format!("Account {}", account.as_str()),
        placement: placement_view(placement),
        counts,
        counts_error,
        counts_note,
        moves: moves.into_iter().map(move_view).collect(),
    };
    Ok(layout::render("account", &page)?.into_response())
}

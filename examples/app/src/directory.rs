//! The account directory: which account ids the service accepts, and which
//! accounts exist (the master's `accounts` table, cached in memory).
//!
//! Every per-account request checks the directory first, so a mistyped
//! account id answers 404 instead of creating a placement for an account
//! nobody created. Accounts are never deleted in this example, so an
//! account seen once is remembered for the life of the process and the
//! master is read only the first time.

use std::collections::HashSet;
use std::sync::RwLock;

use shardq::periodic::SYSTEM_ACCOUNT;
use shardq::{Account, Router};

use crate::error::ApiError;
use crate::store::{self, AccountRow};

/// Parses an account id from a request: shardq's rules (1 to 255 bytes, no
/// NUL) plus the application's own, which reserves ids starting with `_`
/// for the platform (per-shard periodic jobs run as [`SYSTEM_ACCOUNT`]).
pub fn parse_account(id: &str) -> Result<Account, ApiError> {
    if id.starts_with('_') {
        return Err(ApiError::bad_request(format!(
            "invalid account id {id:?}: ids starting with '_' are reserved (e.g. {SYSTEM_ACCOUNT:?})"
        )));
    }
    Account::new(id).map_err(|e| ApiError::bad_request(e.to_string()))
}

/// The accounts known to exist. Shared by every request.
#[derive(Debug, Default)]
pub struct Directory {
    /// Written when an account is created or first found in the master.
    known: RwLock<HashSet<Account>>,
}

impl Directory {
    /// Remembers that `account` exists.
    pub fn remember(&self, account: &Account) {
        if let Ok(mut known) = self.known.write() {
            known.insert(account.clone());
        }
    }

    /// Succeeds when `account` exists; otherwise a 404 naming it.
    pub async fn require(&self, router: &Router, account: &Account) -> Result<(), ApiError> {
        if self.known.read().is_ok_and(|known| known.contains(account)) {
            return Ok(());
        }
        self.get(router, account).await.map(|_| ())
    }

    /// The account's directory row (read from the master); a 404 naming it
    /// when it does not exist.
    pub async fn get(&self, router: &Router, account: &Account) -> Result<AccountRow, ApiError> {
        let master = router.master();
        match store::account_get(&master.pool, account.as_str())
            .await
            .map_err(|e| master.error(e))?
        {
            Some(row) => {
                self.remember(account);
                Ok(row)
            }
            None => Err(ApiError::NotFound(format!(
                "account {:?} does not exist; create it with POST /accounts",
                account.as_str()
            ))),
        }
    }
}

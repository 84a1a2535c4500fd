//! Account ids: opaque strings; integers and UUIDs in their usual text form.

use crate::error::{Error, Result};

/// Longest account id, in bytes.
pub const MAX_ACCOUNT_BYTES: usize = 255;

/// A validated account id: 1 to 255 bytes of UTF-8 without NUL. Quotes,
/// unicode and SQL-looking text are just data.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Account(String);

impl Account {
    /// Validates an account id.
    pub fn new(id: impl Into<String>) -> Result<Account> {
        let id = id.into();
        let reject = |message: &str| {
            let shown: String = id.chars().take(40).collect();
            Err(Error::InvalidAccount {
                account: shown,
                message: message.to_string(),
            })
        };
        if id.is_empty() {
            return reject("must not be empty");
        }
        if id.len() > MAX_ACCOUNT_BYTES {
            return reject(&format!(
                "is {} bytes long; at most {MAX_ACCOUNT_BYTES} are allowed",
                id.len()
            ));
        }
        if id.contains('\0') {
            return reject("must not contain a NUL character");
        }
        Ok(Account(id))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for Account {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for Account {
    type Err = Error;
    fn from_str(s: &str) -> Result<Account> {
        Account::new(s)
    }
}

impl From<u64> for Account {
    fn from(n: u64) -> Account {
        Account(n.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules() {
        assert!(Account::new("").unwrap_err().to_string().contains("must not be empty"));
        assert!(Account::new("x".repeat(256))
            .unwrap_err()
            .to_string()
            .contains("256 bytes"));
        assert!(Account::new("x".repeat(255)).is_ok());
        assert!(Account::new("a\0b").is_err());
        for ok in [
            "42",
            "O'Brien; DROP TABLE x; --",
            "日本",
            "8f14e45f-ceea-467f-a0e6-7b8e3c2f1d0a",
        ] {
            assert_eq!(Account::new(ok).map(|a| a.to_string()).ok().as_deref(), Some(ok));
        }
        assert_eq!(Account::from(7u64).as_str(), "7");
    }
}

//! [`JobId`], a job's identity (`SHARD:ID`), and the error of parsing one.
//! At the bottom of the crate: the error enum names job ids, so this file
//! imports nothing of the crate. Re-exported by `job`.

use serde::Serialize;

/// A job's identity: the shard it lives on and its row id there.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct JobId {
    /// The shard's name.
    pub shard: String,
    /// The row id in that shard's jobs table.
    pub id: i64,
}

impl std::fmt::Display for JobId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.shard, self.id)
    }
}

/// A job id in text form (`SHARD:ID`) that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid job id {text:?}: expected SHARD:ID, e.g. shard_1:42")]
pub struct InvalidJobId {
    /// The text given.
    pub text: String,
}

impl std::str::FromStr for JobId {
    type Err = InvalidJobId;
    fn from_str(s: &str) -> Result<JobId, InvalidJobId> {
        let bad = || InvalidJobId { text: s.to_string() };
        let (shard, id) = s.rsplit_once(':').ok_or_else(bad)?;
        let id = id.parse::<i64>().map_err(|_| bad())?;
        if shard.is_empty() || id <= 0 {
            return Err(bad());
        }
        Ok(JobId {
            shard: shard.to_string(),
            id,
        })
    }
}

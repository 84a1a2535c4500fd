//! `shards.toml` as written: the `Raw*` serde structs (unknown keys are
//! rejected) and the `${VAR}` / `${VAR:-default}` expansion of field values.
//!
//! Only `mod.rs` uses this: `Config::parse` deserializes a [`RawConfig`] and
//! its `Check` expands and validates each field into the public types.
//! Nothing here knows the file name or the field being read; [`expand`]
//! returns the message and `Check` turns it into a field-located error.

use serde::Deserialize;

/// The whole file.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    pub(super) master: RawDatabase,
    #[serde(default)]
    pub(super) shards: Vec<RawShard>,
    #[serde(default)]
    pub(super) migrations: RawMigrations,
}

/// `[migrations]`: the application's migration folders.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawMigrations {
    pub(super) master: Option<String>,
    pub(super) shard: Option<String>,
}

/// One `[[shards]]` table: name, weight and the database fields inline.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawShard {
    pub(super) name: String,
    pub(super) weight: Option<i64>,
    #[serde(flatten)]
    pub(super) database: RawDatabase,
}

/// `[master]` or the database part of a shard: a URL and/or fields.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDatabase {
    pub(super) url: Option<String>,
    pub(super) host: Option<String>,
    pub(super) port: Option<i64>,
    pub(super) user: Option<String>,
    pub(super) password: Option<String>,
    pub(super) dbname: Option<String>,
    pub(super) sslmode: Option<String>,
    pub(super) sslrootcert: Option<String>,
    #[serde(default)]
    pub(super) pool: RawPool,
}

/// `pool = { ... }` of a database.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPool {
    pub(super) max_connections: Option<i64>,
    pub(super) min_connections: Option<i64>,
    pub(super) acquire_timeout: Option<String>,
    pub(super) statement_timeout: Option<String>,
    pub(super) lock_timeout: Option<String>,
    /// Not a setting: read only to refuse it with a message that points at
    /// `acquire_timeout` (sqlx 0.8 has no separate connect timeout).
    pub(super) connect_timeout: Option<toml::Value>,
}

/// Expands `${VAR}` and `${VAR:-default}` in `value`, looking variables up
/// with `env`. The error is the message alone; the caller adds the file
/// and the field.
pub(super) fn expand(value: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::with_capacity(value.len());
    let mut rest = value;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after
            .find('}')
            .ok_or_else(|| format!("unterminated `${{` in {value:?}"))?;
        let inner = &after[..end];
        let (name, default) = match inner.split_once(":-") {
            Some((n, d)) => (n, Some(d)),
            None => (inner, None),
        };
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(format!("`${{{inner}}}` is not a valid variable reference"));
        }
        match (env(name), default) {
            (Some(v), _) => out.push_str(&v),
            (None, Some(d)) => out.push_str(d),
            (None, None) => {
                return Err(format!(
                    "environment variable {name} is not set and `${{{name}}}` has no default (write `${{{name}:-value}}` to give one)"
                ))
            }
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

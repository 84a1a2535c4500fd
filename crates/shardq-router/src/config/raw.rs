//! `shards.toml` as written: the `Raw*` serde structs (unknown keys are
//! rejected), the `${VAR}` / `${VAR:-default}` / `$${` expansion of field
//! values, and [`syntax_error`], which turns a TOML error into a message
//! that shows no value of the file.
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
    #[serde(default)]
    pub(super) accounts: RawAccounts,
    #[serde(default)]
    pub(super) placement: RawPlacement,
}

/// `[placement]`: how new accounts are placed.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPlacement {
    pub(super) strategy: Option<String>,
}

/// `[accounts]`: what belongs to an account besides its jobs.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAccounts {
    #[serde(default)]
    pub(super) tables: Vec<RawAccountTable>,
}

/// `[[accounts.tables]]`: an account-scoped application table.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAccountTable {
    pub(super) table: String,
    pub(super) column: Option<String>,
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
    pub(super) sslcert: Option<String>,
    pub(super) sslkey: Option<String>,
    #[serde(default)]
    pub(super) pool: RawPool,
    pub(super) pooler: Option<String>,
    pub(super) listen_url: Option<String>,
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
/// with `env`; `$${` is a literal `${`. With `encode` (the `url` field),
/// each value put in (from the environment or the default) is
/// percent-encoded, so it stays data inside the part of the URL where it
/// stands: a password with `/`, `@` or `?` cannot change the host, port or
/// database. A value that is one reference and nothing else (`url =
/// "${DATABASE_URL}"`) is a whole URL and is put in as it is.
///
/// The error is the message alone; the caller adds the file and the field.
/// It never quotes the value (it may be a password): it says where in it
/// (the character position) and, for an unset variable, its name.
pub(super) fn expand(value: &str, env: &dyn Fn(&str) -> Option<String>, encode: bool) -> Result<String, String> {
    let mut out = String::with_capacity(value.len());
    let mut rest = value;
    while let Some(dollar) = rest.find('$') {
        out.push_str(&rest[..dollar]);
        let at = &rest[dollar..];
        // Characters before this `$`, counted from 1, for messages.
        let position = value[..value.len() - at.len()].chars().count() + 1;
        if let Some(after) = at.strip_prefix("$${") {
            out.push_str("${");
            rest = after;
            continue;
        }
        let Some(after) = at.strip_prefix("${") else {
            out.push('$');
            rest = &at[1..];
            continue;
        };
        let end = after
            .find('}')
            .ok_or_else(|| format!("unterminated `${{` at character {position} (write `$${{` for a literal `${{`)"))?;
        let inner = &after[..end];
        let (name, default) = match inner.split_once(":-") {
            Some((n, d)) => (n, Some(d)),
            None => (inner, None),
        };
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(format!(
                "the `${{...}}` at character {position} is not a variable reference (a name of letters, \
                 digits and `_`, then optionally `:-default`); write `$${{` for a literal `${{`"
            ));
        }
        let found = match (env(name), default) {
            (Some(v), _) => v,
            (None, Some(d)) => d.to_string(),
            (None, None) => {
                return Err(format!(
                    "environment variable {name} is not set and `${{{name}}}` has no default (write `${{{name}:-value}}` to give one)"
                ))
            }
        };
        rest = &after[end + 1..];
        let whole = position == 1 && rest.is_empty();
        if encode && !whole {
            percent_encode(&found, &mut out);
        } else {
            out.push_str(&found);
        }
    }
    out.push_str(rest);
    Ok(out)
}

/// Appends `value` to `out` with every byte but the URL-unreserved ones
/// (`A-Z a-z 0-9 - . _ ~`) written as `%XX`.
fn percent_encode(value: &str, out: &mut String) {
    for byte in value.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
}

/// Where a TOML error is (line and column, from 1, when known) and what it
/// says, with no value of the file in it: toml's own text quotes the
/// offending line, and serde quotes the value of a mistyped field
/// (`invalid type: integer `12345`, expected a string`); either may be a
/// password. Key names (`unknown field `pasword``) are kept.
pub(super) fn syntax_error(text: &str, error: &toml::de::Error) -> (Option<(usize, usize)>, String) {
    let position = error.span().map(|span| {
        let before = text.get(..span.start).unwrap_or(text);
        let line = before.matches('\n').count() + 1;
        let column = before.rsplit('\n').next().unwrap_or("").chars().count() + 1;
        (line, column)
    });
    let message = error.message();
    let message = match ["invalid type: ", "invalid value: "]
        .iter()
        .find(|prefix| message.starts_with(*prefix))
    {
        Some(prefix) => {
            let (found, expected) = message.split_once(", expected").unwrap_or((message, ""));
            // "integer `12345`" or "string \"s3cret\"": keep the kind only.
            let kind = found
                .get(prefix.len()..)
                .unwrap_or("")
                .split(['`', '"'])
                .next()
                .unwrap_or("")
                .trim_end();
            let expected = if expected.is_empty() {
                String::new()
            } else {
                format!(", expected{expected}")
            };
            format!("{prefix}{kind}{expected} (the value is not shown)")
        }
        None => message.to_string(),
    };
    (position, message.replace('\n', "; "))
}

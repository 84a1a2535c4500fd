//! How a migration file runs: in one transaction (the default) or, with the
//! marker line `-- shardq:no-transaction` first, statement by statement
//! outside any transaction (for `CREATE INDEX CONCURRENTLY` and the like,
//! which Postgres refuses inside a transaction block, and also inside a
//! multi-statement query string). Also the line-ending forms of a file that
//! count as the same migration.

use refinery::Migration;

/// The marker that makes a file run outside a transaction. It must be the
/// first line of the file (leading blank lines and spaces are allowed).
pub const NO_TRANSACTION_MARKER: &str = "-- shardq:no-transaction";

/// Whether `sql` opts out of the transaction.
pub(crate) fn no_transaction(sql: &str) -> bool {
    sql.lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .is_some_and(|first| first == NO_TRANSACTION_MARKER)
}

/// The statements of `sql`, split at the semicolons that end them (not
/// those inside quotes, quoted identifiers, dollar-quoted bodies or
/// comments). Statements that hold only comments and blanks are left out.
pub(crate) fn split(sql: &str) -> Vec<String> {
    let bytes = sql.as_bytes();
    let mut out = Vec::new();
    let mut start = 0;
    let mut i = 0;
    while i < bytes.len() {
        i = match bytes[i] {
            b'-' if bytes.get(i + 1) == Some(&b'-') => sql[i..].find('\n').map_or(bytes.len(), |n| i + n + 1),
            b'/' if bytes.get(i + 1) == Some(&b'*') => skip_block_comment(bytes, i),
            b'\'' => skip_quoted(bytes, i, b'\'', escapes_backslash(bytes, i)),
            b'"' => skip_quoted(bytes, i, b'"', false),
            // A `$` inside an identifier (`a$b`) opens nothing.
            b'$' if i == 0 || !(bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_') => skip_dollar(sql, i),
            b';' => {
                push(&mut out, &sql[start..i]);
                start = i + 1;
                i + 1
            }
            _ => i + 1,
        };
    }
    push(&mut out, &sql[start.min(sql.len())..]);
    out
}

fn push(out: &mut Vec<String>, statement: &str) {
    if has_code(statement) {
        out.push(statement.trim().to_string());
    }
}

/// Whether a piece of SQL holds anything but comments and blanks.
fn has_code(s: &str) -> bool {
    let mut rest = s;
    loop {
        rest = rest.trim_start();
        if let Some(r) = rest.strip_prefix("--") {
            rest = r.split_once('\n').map_or("", |(_, after)| after);
        } else if rest.starts_with("/*") {
            let end = skip_block_comment(rest.as_bytes(), 0);
            rest = &rest[end.min(rest.len())..];
        } else {
            return !rest.is_empty();
        }
    }
}

/// `E'...'` strings treat a backslash as an escape.
fn escapes_backslash(bytes: &[u8], quote: usize) -> bool {
    quote > 0
        && matches!(bytes[quote - 1], b'E' | b'e')
        && (quote == 1 || !(bytes[quote - 2].is_ascii_alphanumeric() || bytes[quote - 2] == b'_'))
}

/// The index after the quoted text opened at `open` (a doubled quote is
/// part of the text).
fn skip_quoted(bytes: &[u8], open: usize, quote: u8, backslash: bool) -> usize {
    let mut i = open + 1;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' if backslash => i += 2,
            q if q == quote && bytes.get(i + 1) == Some(&quote) => i += 2,
            q if q == quote => return i + 1,
            _ => i += 1,
        }
    }
    bytes.len()
}

/// The index after a (nested) block comment opened at `open`.
fn skip_block_comment(bytes: &[u8], open: usize) -> usize {
    let (mut depth, mut i) = (0usize, open);
    while i + 1 < bytes.len() {
        match (bytes[i], bytes[i + 1]) {
            (b'/', b'*') => {
                depth += 1;
                i += 2;
            }
            (b'*', b'/') => {
                depth -= 1;
                i += 2;
                if depth == 0 {
                    return i;
                }
            }
            _ => i += 1,
        }
    }
    bytes.len()
}

/// The index after a dollar-quoted body opened at `open` (`$$` or `$tag$`);
/// `open + 1` when the `$` does not open one (a parameter such as `$1`).
fn skip_dollar(sql: &str, open: usize) -> usize {
    let rest = &sql[open + 1..];
    let tag_len = rest
        .find(|c: char| !(c.is_alphanumeric() || c == '_'))
        .unwrap_or(rest.len());
    let tag = &rest[..tag_len];
    if !rest[tag_len..].starts_with('$') || tag.starts_with(|c: char| c.is_ascii_digit()) {
        return open + 1;
    }
    let delimiter = &sql[open..open + tag_len + 2];
    let body = open + delimiter.len();
    sql[body..]
        .find(delimiter)
        .map_or(sql.len(), |n| body + n + delimiter.len())
}

/// The checksums a database may have recorded for `file` and still mean
/// this very file: as it is, with LF line endings, and with CRLF line
/// endings. A checkout that converted line endings therefore never makes a
/// history diverge.
pub(crate) fn equivalent_checksums(file: &Migration) -> Vec<String> {
    let mut sums = vec![file.checksum().to_string()];
    let Some(sql) = file.sql() else { return sums };
    let lf = sql.replace("\r\n", "\n");
    let crlf = lf.replace('\n', "\r\n");
    for text in [lf, crlf] {
        let name = format!("V{}__{}", file.version(), file.name());
        if let Ok(m) = Migration::unapplied(&name, &text) {
            let sum = m.checksum().to_string();
            if !sums.contains(&sum) {
                sums.push(sum);
            }
        }
    }
    sums
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marker_is_recognised_only_on_the_first_line() {
        assert!(no_transaction(
            "-- shardq:no-transaction\nCREATE INDEX CONCURRENTLY i ON t (a);"
        ));
        assert!(no_transaction("\r\n  -- shardq:no-transaction\r\nSELECT 1;"));
        assert!(!no_transaction("SELECT 1;\n-- shardq:no-transaction\n"));
        assert!(!no_transaction("-- shardq:no-transactions\nSELECT 1;"));
    }

    #[test]
    fn split_respects_quotes_comments_and_dollar_bodies() {
        let sql = "-- shardq:no-transaction\n\
                   DROP INDEX CONCURRENTLY IF EXISTS a_idx; -- a; comment\n\
                   CREATE INDEX CONCURRENTLY a_idx ON t (\"we;ird\") WHERE note <> 'x;''y';\n\
                   /* a ; /* nested ; */ block */\n\
                   CREATE FUNCTION f() RETURNS int LANGUAGE sql AS $body$ SELECT 1; $body$;\n\
                   SELECT E'it\\'s;', $1, a$b FROM t$;\n\
                   -- trailing comment only";
        let parts = split(sql);
        assert_eq!(parts.len(), 4, "{parts:#?}");
        assert!(parts[0].ends_with("DROP INDEX CONCURRENTLY IF EXISTS a_idx"));
        assert!(parts[1].starts_with("-- a; comment\nCREATE INDEX CONCURRENTLY a_idx"));
        assert!(parts[1].ends_with("'x;''y'"));
        assert!(parts[2].ends_with("AS $body$ SELECT 1; $body$"));
        assert_eq!(parts[3], "SELECT E'it\\'s;', $1, a$b FROM t$");
    }

    #[test]
    fn crlf_and_lf_forms_of_a_file_have_equivalent_checksums() {
        let lf = Migration::unapplied("V3__note", "ALTER TABLE t\n  ADD note text;\n").expect("valid");
        let crlf = Migration::unapplied("V3__note", "ALTER TABLE t\r\n  ADD note text;\r\n").expect("valid");
        assert_ne!(lf.checksum(), crlf.checksum(), "refinery hashes the bytes as they are");
        assert!(equivalent_checksums(&crlf).contains(&lf.checksum().to_string()));
        assert!(equivalent_checksums(&lf).contains(&crlf.checksum().to_string()));
        let edited = Migration::unapplied("V3__note", "ALTER TABLE t ADD note int;\n").expect("valid");
        assert!(!equivalent_checksums(&edited).contains(&lf.checksum().to_string()));
    }
}

//! How values are written on the pages: capped counts ("10,000+"), ages
//! ("3m 12s"), times (UTC), error chains. Plain text only: the templates
//! escape it.

use chrono::{DateTime, Utc};

/// `n` with thousands separators, and a `+` when it stopped at a cap.
pub fn count(n: i64, capped: bool) -> String {
    let digits = n.unsigned_abs().to_string();
    let mut out = String::with_capacity(digits.len() + 4);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    if n < 0 {
        out.insert(0, '-');
    }
    if capped {
        out.push('+');
    }
    out
}

/// An age in seconds as `1h 02m`, `3m 12s` or `4.2s`; `-` for none.
pub fn age(secs: f64) -> String {
    if secs.is_nan() || secs <= 0.0 {
        return "-".to_string();
    }
    let whole = secs as u64;
    if whole >= 3600 {
        format!("{}h {:02}m", whole / 3600, (whole % 3600) / 60)
    } else if whole >= 60 {
        format!("{}m {:02}s", whole / 60, whole % 60)
    } else {
        format!("{secs:.1}s")
    }
}

/// A time as `2026-01-02 03:04:05 UTC`.
pub fn time(at: &DateTime<Utc>) -> String {
    at.format("%Y-%m-%d %H:%M:%S UTC").to_string()
}

/// An optional time; `-` for none.
pub fn time_opt(at: Option<&DateTime<Utc>>) -> String {
    at.map_or_else(|| "-".to_string(), time)
}

/// A failure rate as a percentage of `failed` among `failed + done`.
pub fn rate(failed: i64, done: i64) -> String {
    let total = failed + done;
    if total == 0 {
        "-".to_string()
    } else {
        format!("{:.1}%", failed as f64 * 100.0 / total as f64)
    }
}

/// An error with its causes (`outer: cause: root`), a cause whose text the
/// previous message already ends with left out.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    shardq::error::ErrorChain(e).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_are_grouped_and_capped() {
        assert_eq!(count(0, false), "0");
        assert_eq!(count(999, false), "999");
        assert_eq!(count(1000, false), "1,000");
        assert_eq!(count(10_000, true), "10,000+");
        assert_eq!(count(1_234_567, false), "1,234,567");
    }

    #[test]
    fn ages_pick_their_unit() {
        assert_eq!(age(0.0), "-");
        assert_eq!(age(4.25), "4.2s");
        assert_eq!(age(192.0), "3m 12s");
        assert_eq!(age(3720.0), "1h 02m");
    }
}

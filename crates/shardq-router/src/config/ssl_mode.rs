//! [`SslMode`]: the `sslmode` of one database, as libpq spells it, and its
//! mapping to tokio-postgres' own mode.
//!
//! Called by `Target::tokio_postgres_config` (in `target.rs`) and by the
//! `tls` module, which builds the migrator's TLS connector from it
//! and re-exports it as `tls::SslMode`. What each mode means for both drivers
//! is described in the `tls` module. Depends on nothing else in the crate.

/// An `sslmode` of `shards.toml`, as libpq spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    /// Never use TLS.
    Disable,
    /// Treated as [`SslMode::Disable`] (as sqlx does).
    Allow,
    /// TLS when the server offers it, without verifying its certificate.
    Prefer,
    /// TLS always, without verifying the server's certificate.
    Require,
    /// TLS always; the certificate chain must lead to a trusted root.
    VerifyCa,
    /// TLS always; the chain must be trusted and name the host.
    VerifyFull,
}

impl SslMode {
    /// Parses libpq's spelling (`disable`, `allow`, `prefer`, `require`,
    /// `verify-ca`, `verify-full`).
    pub fn parse(text: &str) -> Option<SslMode> {
        Some(match text {
            "disable" => SslMode::Disable,
            "allow" => SslMode::Allow,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            _ => return None,
        })
    }

    /// Whether the server's certificate is verified at all.
    pub fn verifies(self) -> bool {
        matches!(self, SslMode::VerifyCa | SslMode::VerifyFull)
    }

    /// The tokio-postgres mode: whether TLS is attempted and whether it is
    /// required.
    pub(crate) fn tokio_postgres(self) -> tokio_postgres::config::SslMode {
        use tokio_postgres::config::SslMode as Tp;
        match self {
            SslMode::Disable | SslMode::Allow => Tp::Disable,
            SslMode::Prefer => Tp::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => Tp::Require,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_map_to_tokio_postgres() {
        use tokio_postgres::config::SslMode as Tp;
        assert_eq!(SslMode::parse("disable").unwrap().tokio_postgres(), Tp::Disable);
        assert_eq!(SslMode::parse("allow").unwrap().tokio_postgres(), Tp::Disable);
        assert_eq!(SslMode::parse("prefer").unwrap().tokio_postgres(), Tp::Prefer);
        for m in ["require", "verify-ca", "verify-full"] {
            assert_eq!(SslMode::parse(m).unwrap().tokio_postgres(), Tp::Require, "{m}");
        }
        assert!(SslMode::parse("verify-ca").unwrap().verifies());
        assert!(!SslMode::parse("require").unwrap().verifies());
        assert_eq!(SslMode::parse("VERIFY-FULL"), None);
    }
}

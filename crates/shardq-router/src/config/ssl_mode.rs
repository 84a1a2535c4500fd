//! The TLS settings of one database as libpq spells them: [`SslMode`],
//! [`SslRootCert`], and [`ServerCheck`], what the server's certificate must
//! pass once both are known.
//!
//! This is the one place that gives `sslmode` and `sslrootcert` a meaning:
//! `Check::database` (in `mod.rs`) parses them here and rejects what
//! [`ServerCheck::of`] refuses, so a loaded [`Target`](super::Target) only
//! holds combinations that mean something; `Target::connect_options` (the
//! router's driver) and the `tls` module (the migrator's driver and the TLS
//! relay) read the same [`ServerCheck`]. Depends on nothing else in the
//! crate.

use std::fmt;
use std::path::{Path, PathBuf};

/// An `sslmode`, as libpq spells it (lower case; anything else is refused,
/// as libpq refuses it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SslMode {
    /// Never use TLS.
    Disable,
    /// Treated as [`SslMode::Disable`] (as sqlx does; libpq would try a
    /// plain connection first and TLS only if the server insists).
    Allow,
    /// TLS when the server offers it, without verifying its certificate.
    Prefer,
    /// TLS always; the certificate is verified only when a `sslrootcert`
    /// file is given (then as [`SslMode::VerifyCa`], as libpq does).
    Require,
    /// TLS always; the certificate chain must lead to a root of
    /// `sslrootcert`. The host name is not checked.
    VerifyCa,
    /// TLS always; the chain must lead to a root of `sslrootcert` (or of the
    /// public web roots with `sslrootcert=system`) and the certificate must
    /// name the host.
    VerifyFull,
}

/// The spellings [`SslMode::parse`] accepts, for messages.
pub const SSL_MODES: &str = "disable, allow, prefer, require, verify-ca, verify-full";

impl SslMode {
    /// Parses libpq's spelling: exactly `disable`, `allow`, `prefer`,
    /// `require`, `verify-ca` or `verify-full`. Like libpq, nothing else is
    /// accepted, not even another case (`VERIFY-FULL` is `None`): a
    /// connection string means the same here as in `psql`.
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

    /// libpq's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Allow => "allow",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }

    /// Whether TLS is ever attempted (`prefer` and stronger).
    pub fn uses_tls(self) -> bool {
        !matches!(self, SslMode::Disable | SslMode::Allow)
    }

    /// Whether the mode itself asks for verification (`verify-ca`,
    /// `verify-full`). `require` also verifies when given a root file; see
    /// [`ServerCheck::of`].
    pub fn verifies(self) -> bool {
        matches!(self, SslMode::VerifyCa | SslMode::VerifyFull)
    }

    /// The tokio-postgres mode: whether TLS is attempted and whether it is
    /// required. What is verified is the connector's business (`tls`).
    pub(crate) fn tokio_postgres(self) -> tokio_postgres::config::SslMode {
        use tokio_postgres::config::SslMode as Tp;
        match self {
            SslMode::Disable | SslMode::Allow => Tp::Disable,
            SslMode::Prefer => Tp::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => Tp::Require,
        }
    }
}

impl fmt::Display for SslMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An `sslrootcert`: the roots a server certificate is verified against.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum SslRootCert {
    /// A PEM file: its certificates are the only roots trusted.
    File(PathBuf),
    /// `sslrootcert=system`: the public web roots bundled with shardq
    /// (Mozilla's list, as the webpki-roots crate ships it). Only with
    /// `verify-full`, which it makes the default, as in libpq. (A file
    /// called `system` is written `./system`.)
    System,
}

impl SslRootCert {
    /// Reads libpq's spelling: `system`, or a file name.
    pub fn parse(text: &str) -> SslRootCert {
        if text == "system" {
            SslRootCert::System
        } else {
            SslRootCert::File(PathBuf::from(text))
        }
    }

    /// The file, unless this is `system`.
    pub fn file(&self) -> Option<&Path> {
        match self {
            SslRootCert::File(path) => Some(path),
            SslRootCert::System => None,
        }
    }
}

impl fmt::Display for SslRootCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SslRootCert::File(path) => write!(f, "{}", path.display()),
            SslRootCert::System => f.write_str("system"),
        }
    }
}

/// What the server's certificate must pass: the meaning of one
/// `sslmode` + `sslrootcert` pair, the same for both drivers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerCheck<'a> {
    /// No TLS (`disable`, `allow`).
    NoTls,
    /// TLS, the certificate not verified (`prefer`; `require` without a
    /// root file). The handshake signatures are still checked.
    Unverified,
    /// The chain must lead to one of these roots; any host name
    /// (`verify-ca`; `require` with a root file).
    Chain(&'a SslRootCert),
    /// The chain must lead to one of these roots and the certificate must
    /// name the host (`verify-full`).
    ChainAndHost(&'a SslRootCert),
}

impl<'a> ServerCheck<'a> {
    /// The check of `mode` with `root`, following libpq: with a root file
    /// only its certificates are trusted (`require` then verifies the chain
    /// too); `system` goes only with `verify-full`; `verify-ca` and
    /// `verify-full` need a root (shardq reads no default
    /// `~/.postgresql/root.crt`). The error says what to write instead.
    pub fn of(mode: SslMode, root: Option<&'a SslRootCert>) -> Result<ServerCheck<'a>, String> {
        match (mode, root) {
            (SslMode::VerifyFull, Some(root)) => Ok(ServerCheck::ChainAndHost(root)),
            (mode, Some(SslRootCert::System)) => Err(format!(
                "sslrootcert=system goes only with sslmode verify-full (the public web roots vouch for \
                 anyone's host name, so any weaker mode would trust any public certificate), not {mode}"
            )),
            (SslMode::VerifyCa | SslMode::Require, Some(root)) => Ok(ServerCheck::Chain(root)),
            (SslMode::VerifyCa | SslMode::VerifyFull, None) => Err(format!(
                "sslmode {mode} needs sslrootcert: the CA certificate file (PEM) to trust{}",
                if mode == SslMode::VerifyFull {
                    ", or `system` for the public web roots"
                } else {
                    ""
                }
            )),
            (SslMode::Disable | SslMode::Allow, _) => Ok(ServerCheck::NoTls),
            (SslMode::Prefer, _) | (SslMode::Require, None) => Ok(ServerCheck::Unverified),
        }
    }

    /// Whether the certificate is verified at all.
    pub fn verifies(self) -> bool {
        matches!(self, ServerCheck::Chain(_) | ServerCheck::ChainAndHost(_))
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
    }

    #[test]
    fn parsing_is_libpq_s_exact_spelling_and_round_trips() {
        for m in SSL_MODES.split(", ") {
            assert_eq!(SslMode::parse(m).unwrap().as_str(), m);
        }
        // Case-sensitive, as in libpq: the config refuses these with an
        // error naming the field (see `config::tests`), so no driver ever
        // falls back to another mode.
        for bad in ["VERIFY-FULL", "Require", "verify_full", " prefer", ""] {
            assert_eq!(SslMode::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn server_checks_follow_libpq() {
        let file = SslRootCert::parse("ca.pem");
        let system = SslRootCert::parse("system");
        assert_eq!(system, SslRootCert::System);
        assert_eq!(SslRootCert::parse("./system").file(), Some(Path::new("./system")));
        let of = ServerCheck::of;
        assert_eq!(of(SslMode::Disable, None), Ok(ServerCheck::NoTls));
        assert_eq!(of(SslMode::Prefer, Some(&file)), Ok(ServerCheck::Unverified));
        assert_eq!(of(SslMode::Require, None), Ok(ServerCheck::Unverified));
        assert_eq!(of(SslMode::Require, Some(&file)), Ok(ServerCheck::Chain(&file)));
        assert_eq!(of(SslMode::VerifyCa, Some(&file)), Ok(ServerCheck::Chain(&file)));
        assert_eq!(
            of(SslMode::VerifyFull, Some(&file)),
            Ok(ServerCheck::ChainAndHost(&file))
        );
        assert_eq!(
            of(SslMode::VerifyFull, Some(&system)),
            Ok(ServerCheck::ChainAndHost(&system))
        );
        for weaker in [SslMode::Disable, SslMode::Prefer, SslMode::Require, SslMode::VerifyCa] {
            let err = of(weaker, Some(&system)).unwrap_err();
            assert!(err.contains("verify-full") && err.contains(weaker.as_str()), "{err}");
        }
        for needs_root in [SslMode::VerifyCa, SslMode::VerifyFull] {
            assert!(of(needs_root, None).unwrap_err().contains("needs sslrootcert"));
        }
    }
}

//! TLS to Postgres: what each `sslmode` and `sslrootcert` means, and the one
//! TLS client both drivers use.
//!
//! The meaning follows libpq (see [`ServerCheck::of`]) and is the same for
//! the router and job engine (sqlx) and the migrator (tokio-postgres):
//!
//! | sslmode | TLS | the server's certificate |
//! |---|---|---|
//! | `disable`, `allow` | never | - |
//! | `prefer` (default) | if the server offers it, else plain | not verified |
//! | `require` | always; a server without TLS is an error | not verified; with an `sslrootcert` file, as `verify-ca` |
//! | `verify-ca` | always | chain must lead to a root in `sslrootcert`; host name not checked |
//! | `verify-full` | always | chain must lead to a root in `sslrootcert`, and the certificate must name the host (DNS name or IP) |
//!
//! - An `sslrootcert` file (PEM) is the only thing trusted: the public web
//!   roots are not added to it.
//! - `sslrootcert=system` trusts the public web roots bundled with shardq
//!   (webpki-roots, Mozilla's list) and goes only with `verify-full`, which
//!   it makes the default sslmode; any other sslmode with it is a
//!   configuration error (as in libpq: a public CA vouches for anyone's own
//!   host name, so nothing weaker means anything).
//! - `verify-ca` and `verify-full` without `sslrootcert` are configuration
//!   errors: no `~/.postgresql/root.crt` default is read.
//! - `sslcert` + `sslkey` (PEM; both or neither) are presented when the
//!   server asks for a client certificate. The key file must not be
//!   readable by group or others (0600; 0640 when owned by root), as libpq
//!   requires. Files are read at each new connection, so renewed
//!   certificates are picked up without a restart.
//! - `allow` is treated as `disable` (as sqlx does); `prefer` never
//!   verifies (libpq verifies when a root file exists but then falls back
//!   to plain text when verification fails, which protects nothing).
//!
//! How each driver gets it: the migrator's tokio-postgres connections use
//! [`tokio_postgres_connector`], a `tokio-postgres-rustls` connector over
//! [`client_config`]. sqlx can be given neither a rustls configuration nor
//! a root store without the web roots, so for a target whose certificate is
//! verified or that presents a client certificate, its connect options
//! point at a local socket of the relay (`tls/relay.rs`), which makes the
//! TLS connection with the same [`client_config`] and forwards the bytes.
//! Other targets (`prefer`, `require` without root file or client
//! certificate) use sqlx's own TLS, which then verifies nothing either.

use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio_postgres_rustls::MakeRustlsConnect;

// The TLS settings live with the configuration they are read from; they
// stay reachable here.
pub use crate::config::{ServerCheck, SslMode, SslRootCert};

use crate::config::Target;
use crate::error::{Error, Result};

mod relay;

pub(crate) use relay::socket_dir as relay_socket_dir;

/// The tokio-postgres TLS connector for `target` (used by the migrator):
/// [`client_config`] behind `tokio-postgres-rustls`.
pub fn tokio_postgres_connector(target: &Target) -> Result<MakeRustlsConnect> {
    Ok(MakeRustlsConnect::new(client_config(target)?))
}

/// The rustls client for `target`, the one both drivers use: it verifies
/// the server's certificate as [`Target::server_check`] says and presents
/// `sslcert`/`sslkey` when set.
///
/// Reads the files it needs now; a missing or unreadable file, one without
/// a certificate or key, or a key others can read is an
/// [`Error::TlsFile`] naming the setting and the file. A target whose TLS
/// settings mean nothing (e.g. `verify-full` without `sslrootcert`, only
/// possible when built in code) is an [`Error::Tls`].
pub fn client_config(target: &Target) -> Result<ClientConfig> {
    // Without TLS nothing is checked (a target built in code with, say,
    // `disable` and `sslrootcert=system` connects in plain text with sqlx
    // too).
    let check = if target.sslmode.uses_tls() {
        target.server_check().map_err(|message| Error::Tls { message })?
    } else {
        ServerCheck::NoTls
    };
    // The ring provider, as sqlx's own TLS (feature `tls-rustls-ring-webpki`)
    // uses: rustls 0.23.48 marks it deprecated for lacking post-quantum key
    // exchange, which the aws-lc-rs provider has at the cost of a C build.
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Tls {
            message: format!("no usable TLS protocol version: {e}"),
        })?;
    let verifier: Arc<dyn ServerCertVerifier> = match check {
        ServerCheck::NoTls | ServerCheck::Unverified => Arc::new(NoVerification(provider)),
        ServerCheck::Chain(root) => Arc::new(AnyHostName(webpki_verifier(root, provider)?)),
        ServerCheck::ChainAndHost(root) => webpki_verifier(root, provider)?,
    };
    let builder = builder.dangerous().with_custom_certificate_verifier(verifier);
    let config = match target.client_cert().filter(|_| target.sslmode.uses_tls()) {
        Some((cert, key)) => builder
            .with_client_auth_cert(certificates(cert)?, private_key(key)?)
            .map_err(|e| Error::TlsFile {
                setting: "sslkey",
                file: key.to_path_buf(),
                message: format!("does not go with sslcert {}: {e}", cert.display()),
            })?,
        None => builder.with_no_client_auth(),
    };
    Ok(config)
}

/// A TLS failure becomes [`sqlx::Error::Tls`], so the message says it is
/// about TLS ("error occurred while attempting to establish a TLS
/// connection: invalid peer certificate: UnknownIssuer"):
/// - a rustls error during sqlx's own handshake, which reaches sqlx wrapped
///   in `std::io::Error`;
/// - a failure the TLS relay reported for a relayed target (its TLS errors;
///   its failures to reach the server become the [`sqlx::Error::Io`] a
///   direct connection would have given).
///
/// Other errors are returned as they are.
pub fn classify(error: sqlx::Error) -> sqlx::Error {
    match error {
        sqlx::Error::Io(io) if io.get_ref().is_some_and(|inner| inner.is::<rustls::Error>()) => {
            sqlx::Error::Tls(Box::new(io))
        }
        sqlx::Error::Database(db) => relay::classify(db),
        other => other,
    }
}

/// A webpki verifier (chain and host name) over the roots of `root`.
fn webpki_verifier(root: &SslRootCert, provider: Arc<CryptoProvider>) -> Result<Arc<WebPkiServerVerifier>> {
    WebPkiServerVerifier::builder_with_provider(Arc::new(root_store(root)?), provider)
        .build()
        .map_err(|e| Error::Tls {
            message: format!("cannot build the certificate verifier: {e}"),
        })
}

/// The roots of `root`: the certificates of the file and nothing else, or
/// the bundled public web roots for `system`.
fn root_store(root: &SslRootCert) -> Result<RootCertStore> {
    let file = match root {
        SslRootCert::System => {
            return Ok(RootCertStore {
                roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
            })
        }
        SslRootCert::File(file) => file,
    };
    let bad = |message: String| Error::TlsFile {
        setting: "sslrootcert",
        file: file.to_path_buf(),
        message,
    };
    let mut roots = RootCertStore::empty();
    for cert in read_certificates(file).map_err(bad)? {
        roots
            .add(cert)
            .map_err(|e| bad(format!("not a usable CA certificate: {e}")))?;
    }
    Ok(roots)
}

/// The certificates of the `sslcert` file.
fn certificates(file: &Path) -> Result<Vec<CertificateDer<'static>>> {
    read_certificates(file).map_err(|message| Error::TlsFile {
        setting: "sslcert",
        file: file.to_path_buf(),
        message,
    })
}

/// The PEM certificates of `file`, at least one.
fn read_certificates(file: &Path) -> std::result::Result<Vec<CertificateDer<'static>>, String> {
    let pem = std::fs::read(file).map_err(|e| format!("cannot read: {e}"))?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| format!("not a PEM certificate file: {e}"))?;
    if certs.is_empty() {
        return Err("holds no PEM certificate".into());
    }
    Ok(certs)
}

/// The private key of the `sslkey` file (PKCS#8, PKCS#1 or SEC1 PEM),
/// after libpq's permission check. Its contents never reach a message.
fn private_key(file: &Path) -> Result<PrivateKeyDer<'static>> {
    let bad = |message: String| Error::TlsFile {
        setting: "sslkey",
        file: file.to_path_buf(),
        message,
    };
    check_key_permissions(file).map_err(bad)?;
    let pem = std::fs::read(file).map_err(|e| bad(format!("cannot read: {e}")))?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => bad("holds no PEM private key".into()),
        _ => bad("not a PEM private key file".into()),
    })
}

/// libpq's rule for a key file: no access for others, and for the group at
/// most read when root owns it.
fn check_key_permissions(file: &Path) -> std::result::Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(file).map_err(|e| format!("cannot read: {e}"))?;
    if !meta.is_file() {
        return Err("is not a regular file".into());
    }
    let mode = meta.mode() & 0o777;
    let allowed = if meta.uid() == 0 { 0o640 } else { 0o600 };
    if mode & !allowed != 0 {
        return Err(format!(
            "has permissions {mode:04o}: a private key must be readable by its owner only \
             (chmod 0600; 0640 when owned by root)"
        ));
    }
    Ok(())
}

/// `verify-ca`: the chain must be trusted; any host name is accepted.
#[derive(Debug)]
struct AnyHostName(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for AnyHostName {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForName))
            | Err(rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForNameContext { .. })) => {
                Ok(ServerCertVerified::assertion())
            }
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// `prefer` / `require`: encryption without authenticating the server (the
/// handshake signatures are still checked).
#[derive(Debug)]
struct NoVerification(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    /// A self-signed CA certificate (only parsed here, never used to verify).
    const TEST_CA_PEM: &str = "-----BEGIN CERTIFICATE-----
MIIBkjCCATmgAwIBAgIUEPxub2tj2fp9GxMAx4z/gkqZE/swCgYIKoZIzj0EAwIw
HjEcMBoGA1UEAwwTc2hhcmRxIHVuaXQgdGVzdCBDQTAgFw0yNjEyMDIxMDA0MTZa
GA8yMTI2MTEwODEwMDQxNlowHjEcMBoGA1UEAwwTc2hhcmRxIHVuaXQgdGVzdCBD
QTBZMBMGByqGSM49AgEGCCqGSM49AwEHA0IABBgP+NfKWyO2BhePsYDW7IxQSCDD
fQ77JDTLvhjeDL1Cp9ftgEgs91WlNGhzmT0Ojor6nLrZyzrx2ESGquROQi2jUzBR
MB0GA1UdDgQWBBQpT7Un55v+7oe0Z0wXc9nW8L+sODAfBgNVHSMEGDAWgBQpT7Un
55v+7oe0Z0wXc9nW8L+sODAPBgNVHRMBAf8EBTADAQH/MAoGCCqGSM49BAMCA0cA
MEQCID5wwg9mhmWiYeauUkPLhx8EIiLQrvICjdW2DETSrUrAAiBRxTP40jFygnxu
z/P84v/np1wVMQX1JbrB31qpQyF2dQ==
-----END CERTIFICATE-----\n";

    /// A fresh directory for one test's files.
    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("shardq-tls-unit-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn missing_root_cert_names_the_file() {
        let err = root_store(&SslRootCert::parse("/nonexistent/ca.pem"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("sslrootcert /nonexistent/ca.pem") && err.contains("cannot read"),
            "{err}"
        );
    }

    #[test]
    fn a_root_file_is_the_only_thing_trusted_and_system_is_the_web_roots() {
        let dir = scratch("roots");
        let ca = dir.join("ca.pem");
        std::fs::write(&ca, TEST_CA_PEM).unwrap();
        let roots = root_store(&SslRootCert::File(ca)).unwrap();
        assert_eq!(roots.len(), 1, "the web roots were added to the sslrootcert file's");
        let system = root_store(&SslRootCert::System).unwrap();
        assert_eq!(system.len(), webpki_roots::TLS_SERVER_ROOTS.len());
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "").unwrap();
        let err = root_store(&SslRootCert::File(empty)).unwrap_err().to_string();
        assert!(err.contains("holds no PEM certificate"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_key_others_can_read_is_refused_naming_the_file_not_its_contents() {
        use std::os::unix::fs::PermissionsExt;
        let dir = scratch("key");
        let key = dir.join("client.key");
        std::fs::write(
            &key,
            "-----BEGIN PRIVATE KEY-----\nc2VjcmV0LWtleS1ieXRlcw==\n-----END PRIVATE KEY-----\n",
        )
        .unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = private_key(&key).unwrap_err().to_string();
        assert!(
            err.starts_with("sslkey ") && err.contains("client.key") && err.contains("0644"),
            "{err}"
        );
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        // Readable now; the bytes are not a key, and the message does not show them.
        std::fs::write(&key, "c2VjcmV0LWtleS1ieXRlcw==\n").unwrap();
        let err = private_key(&key).unwrap_err().to_string();
        assert!(err.contains("PEM private key") && !err.contains("c2VjcmV0"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_target_whose_tls_settings_mean_nothing_is_refused_by_both_drivers() {
        let mut target = crate::Config::from_urls("postgres://127.0.0.1:1/m", &[("s", "postgres://127.0.0.1:2/s")])
            .unwrap()
            .master
            .target;
        target.sslmode = SslMode::VerifyFull;
        target.sslrootcert = None;
        let err = client_config(&target).unwrap_err().to_string();
        assert!(err.contains("needs sslrootcert"), "{err}");
        assert!(tokio_postgres_connector(&target).is_err());
        assert!(target.relayed(), "sqlx must not verify it with its own (web) roots");
    }
}

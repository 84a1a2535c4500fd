//! TLS to Postgres: what each `sslmode` means, for both drivers.
//!
//! The router and the job engine connect with sqlx (rustls, ring); the
//! migrator connects with tokio-postgres, through `tokio-postgres-rustls`
//! configured here so that both drivers give every mode the same meaning:
//!
//! | sslmode | TLS | server certificate |
//! |---|---|---|
//! | `disable`, `allow` | never | - |
//! | `prefer` (default) | if the server offers it, else plain | not verified |
//! | `require` | always; a server without TLS is an error | not verified |
//! | `verify-ca` | always | chain verified against the roots; host name not checked |
//! | `verify-full` | always | chain verified and the host (name or IP) must match the certificate |
//!
//! The roots are the bundled public web roots plus every certificate in
//! `sslrootcert` (a PEM file), as in sqlx. `allow` is treated as `disable`
//! (sqlx does the same). Unlike libpq, `require` does not start verifying
//! when a root certificate file exists: use `verify-ca` or `verify-full` to
//! verify, which is what production configurations should say.

use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio_postgres_rustls::MakeRustlsConnect;

// `SslMode` lives with the configuration it is read from; it stays
// reachable here as `tls::SslMode`.
pub use crate::config::SslMode;

use crate::config::Target;
use crate::error::{Error, Result};

/// The tokio-postgres TLS connector for `target` (used by the migrator).
///
/// Reads `sslrootcert` for the verifying modes; a missing or unreadable
/// file, or one without a certificate, is an [`Error::TlsRootCert`] naming
/// the file.
pub fn tokio_postgres_connector(target: &Target) -> Result<MakeRustlsConnect> {
    let mode = SslMode::parse(&target.sslmode).unwrap_or(SslMode::Prefer);
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Tls {
            message: format!("no usable TLS protocol version: {e}"),
        })?;
    let config = if mode.verifies() {
        let roots = Arc::new(root_store(target.sslrootcert.as_deref())?);
        let webpki = WebPkiServerVerifier::builder_with_provider(roots, provider)
            .build()
            .map_err(|e| Error::Tls {
                message: format!("cannot build the certificate verifier: {e}"),
            })?;
        let verifier: Arc<dyn ServerCertVerifier> = if mode == SslMode::VerifyFull {
            webpki
        } else {
            Arc::new(AnyHostName(webpki))
        };
        builder
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth()
    } else {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerification(provider)))
            .with_no_client_auth()
    };
    Ok(MakeRustlsConnect::new(config))
}

/// A TLS failure that sqlx reports as an I/O error (rustls errors during the
/// handshake reach it wrapped in `std::io::Error`) becomes
/// [`sqlx::Error::Tls`], so the message says it is about TLS: "error
/// occurred while attempting to establish a TLS connection: invalid peer
/// certificate: UnknownIssuer". Other errors are returned as they are.
pub fn classify(error: sqlx::Error) -> sqlx::Error {
    match error {
        sqlx::Error::Io(io) if io.get_ref().is_some_and(|inner| inner.is::<rustls::Error>()) => {
            sqlx::Error::Tls(Box::new(io))
        }
        other => other,
    }
}

/// The public web roots plus the certificates of `sslrootcert`, if given.
fn root_store(sslrootcert: Option<&Path>) -> Result<RootCertStore> {
    let mut roots = RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    let Some(file) = sslrootcert else {
        return Ok(roots);
    };
    let bad = |message: String| Error::TlsRootCert {
        file: file.to_path_buf(),
        message,
    };
    let pem = std::fs::read(file).map_err(|e| bad(format!("cannot read: {e}")))?;
    let mut added = 0;
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| bad(format!("not a PEM certificate file: {e}")))?;
        roots
            .add(cert)
            .map_err(|e| bad(format!("not a usable CA certificate: {e}")))?;
        added += 1;
    }
    if added == 0 {
        return Err(bad("holds no PEM certificate".into()));
    }
    Ok(roots)
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
    use super::*;

    #[test]
    fn missing_root_cert_names_the_file() {
        let err = root_store(Some(Path::new("/nonexistent/ca.pem")))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("/nonexistent/ca.pem") && err.contains("cannot read"),
            "{err}"
        );
    }
}

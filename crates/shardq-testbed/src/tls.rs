//! Test certificates (generated with rcgen, nothing to install): a
//! self-signed CA ([`TestCa`]) that issues server certificates (for
//! `127.0.0.1` and `localhost`, or for names of the test's choosing) and
//! client certificates ([`ClientCert`], for a role), and the files a server
//! with `ssl = on` needs ([`Server::enable_tls`](crate::Server::enable_tls)).

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose};

use crate::error::{Error, Result};

/// A self-signed certificate authority for tests.
pub struct TestCa {
    /// Its certificate (PEM).
    cert_pem: String,
    /// Its certificate, for signing.
    cert: rcgen::Certificate,
    /// Its private key, for signing.
    key: KeyPair,
}

impl std::fmt::Debug for TestCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestCa").finish_non_exhaustive()
    }
}

/// A server certificate and its key, both PEM.
#[derive(Clone)]
pub struct ServerCert {
    /// The certificate.
    pub cert_pem: String,
    /// The private key (keep it mode 0600).
    pub key_pem: String,
}

impl std::fmt::Debug for ServerCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerCert").finish_non_exhaustive()
    }
}

/// A client certificate and its key, both PEM, for one role.
#[derive(Clone)]
pub struct ClientCert {
    /// The certificate; its common name is the role.
    pub cert_pem: String,
    /// The private key.
    pub key_pem: String,
}

impl std::fmt::Debug for ClientCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientCert").finish_non_exhaustive()
    }
}

/// A client certificate's files, to set as `sslcert` and `sslkey`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientFiles {
    /// The certificate (PEM, mode 0644).
    pub cert: PathBuf,
    /// The private key (PEM, mode 0600, as libpq requires).
    pub key: PathBuf,
}

impl ClientCert {
    /// Writes `{stem}.crt` and `{stem}.key` (mode 0600) into `dir`.
    pub fn write(&self, dir: &Path, stem: &str) -> Result<ClientFiles> {
        let files = ClientFiles {
            cert: dir.join(format!("{stem}.crt")),
            key: dir.join(format!("{stem}.key")),
        };
        write_private(&files.cert, &self.cert_pem, 0o644)?;
        write_private(&files.key, &self.key_pem, 0o600)?;
        Ok(files)
    }
}

/// The TLS files of a server, for clients: the CA that signed its certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM file of the CA certificate; set it as `sslrootcert`.
    pub ca_cert: PathBuf,
}

fn cert_error(what: &str, e: rcgen::Error) -> Error {
    Error::Certificate {
        message: format!("{what}: {e}"),
    }
}

impl TestCa {
    /// Generates a new CA whose certificate's common name is `name`.
    pub fn generate(name: &str) -> Result<TestCa> {
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(|e| cert_error("CA parameters", e))?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().map_err(|e| cert_error("CA key", e))?;
        let cert = params
            .self_signed(&key)
            .map_err(|e| cert_error("self-sign the CA", e))?;
        Ok(TestCa {
            cert_pem: cert.pem(),
            cert,
            key,
        })
    }

    /// The CA certificate (PEM).
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Writes the CA certificate to `path` (readable by everyone: it is public).
    pub fn write_cert(&self, path: &Path) -> Result<()> {
        fs::write(path, &self.cert_pem).map_err(|e| Error::io("write CA certificate", path, e))
    }

    /// Issues a server certificate for `127.0.0.1` and `localhost`.
    pub fn issue_server(&self) -> Result<ServerCert> {
        self.issue_server_for(&["127.0.0.1", "localhost"])
    }

    /// Issues a server certificate for `names` (DNS names or IP addresses),
    /// e.g. one that does not name the address clients connect to.
    pub fn issue_server_for(&self, names: &[&str]) -> Result<ServerCert> {
        let mut params = CertificateParams::new(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>())
            .map_err(|e| cert_error("server certificate parameters", e))?;
        params
            .distinguished_name
            .push(DnType::CommonName, names.first().copied().unwrap_or("localhost"));
        let key = KeyPair::generate().map_err(|e| cert_error("server key", e))?;
        let cert = params
            .signed_by(&key, &self.cert, &self.key)
            .map_err(|e| cert_error("sign the server certificate", e))?;
        Ok(ServerCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// Issues a client certificate for role `user` (its common name, which
    /// is what the server's `cert` authentication compares with the role).
    pub fn issue_client(&self, user: &str) -> Result<ClientCert> {
        let mut params =
            CertificateParams::new(Vec::<String>::new()).map_err(|e| cert_error("client certificate parameters", e))?;
        params.distinguished_name.push(DnType::CommonName, user);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let key = KeyPair::generate().map_err(|e| cert_error("client key", e))?;
        let cert = params
            .signed_by(&key, &self.cert, &self.key)
            .map_err(|e| cert_error("sign the client certificate", e))?;
        Ok(ClientCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// Writes `contents` to `path` with permissions `mode`, replacing the file.
pub(crate) fn write_private(path: &Path, contents: &str, mode: u32) -> Result<()> {
    let _ = fs::remove_file(path);
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| Error::io("create", path, e))?;
    file.write_all(contents.as_bytes())
        .map_err(|e| Error::io("write", path, e))?;
    // The umask may have narrowed the mode; set it exactly.
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(|e| Error::io("chmod", path, e))
}

//! A server with `ssl = on`: its key file is private, and a client that
//! verifies against the bed's CA gets an encrypted connection.
#![allow(clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt;

use shardq_testbed::{TestBed, TestCa};
use sqlx::{Connection, PgConnection};

async fn ssl_in_use(url: &str) -> Result<bool, sqlx::Error> {
    let mut conn = PgConnection::connect(url).await?;
    let ssl = sqlx::query_scalar("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        .fetch_one(&mut conn)
        .await?;
    conn.close().await?;
    Ok(ssl)
}

#[tokio::test]
async fn enable_tls_serves_a_certificate_from_the_returned_ca() {
    let bed = TestBed::start(0).unwrap();
    let master = bed.master();
    let plain = master.url("postgres");
    assert!(!ssl_in_use(&plain).await.unwrap());

    let files = master.enable_tls().unwrap(); // blocks while it restarts
    let mode = std::fs::metadata(master.data_dir().join("server.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let verified = format!("{plain}?sslmode=verify-full&sslrootcert={}", files.ca_cert.display());
    assert!(ssl_in_use(&verified).await.unwrap());
    // Plain connections are still accepted (the client chooses).
    assert!(!ssl_in_use(&format!("{plain}?sslmode=disable")).await.unwrap());

    // Another CA's certificate does not verify the server.
    let other = bed.dir().join("other-ca.crt");
    TestCa::generate("other").unwrap().write_cert(&other).unwrap();
    let err = ssl_in_use(&format!("{plain}?sslmode=verify-full&sslrootcert={}", other.display()))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("certificate"), "{err}");
}

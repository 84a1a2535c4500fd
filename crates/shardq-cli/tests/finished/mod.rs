//! Running the `shardq` binary to its end, for the tests that check its
//! output.

use std::path::Path;
use std::process::{Command, Stdio};

/// What a finished `shardq` process did.
pub struct Run {
    /// Whether it exited 0.
    pub ok: bool,
    /// Everything it printed on stdout.
    pub stdout: String,
    /// Everything it printed on stderr.
    pub stderr: String,
}

/// Runs `shardq --config CONFIG ARGS...` to its end (off the async threads),
/// with `RUST_LOG` unset so its own logging defaults apply.
pub async fn shardq(config: &Path, args: &[&str]) -> Run {
    let config = config.to_path_buf();
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let out = Command::new(env!("CARGO_BIN_EXE_shardq"))
            .arg("--config")
            .arg(&config)
            .args(&args)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        Run {
            ok: out.status.success(),
            stdout: String::from_utf8(out.stdout).unwrap(),
            stderr: String::from_utf8(out.stderr).unwrap(),
        }
    })
    .await
    .unwrap()
}

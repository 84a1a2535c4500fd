//! Finding the PostgreSQL server binaries (`initdb`, `pg_ctl`, `postgres`).

use std::env;
use std::ffi::OsStr;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::error::{Error, Result};

/// The environment variable that names the binary directory explicitly.
pub const PG_BIN_ENV: &str = "SHARDQ_PG_BIN";

/// Where the distribution packages put one directory per major version.
const DEBIAN_ROOT: &str = "/usr/lib/postgresql";

/// A directory holding working `initdb`, `pg_ctl` and `postgres` binaries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgBin {
    /// The real (symlink-resolved) binary directory.
    dir: PathBuf,
    /// `initdb --version` output, e.g. "initdb (PostgreSQL) 15.18".
    version: String,
}

impl PgBin {
    /// Finds the binaries, looking in order at `$SHARDQ_PG_BIN`, the `PATH`,
    /// `pg_config --bindir`, then `/usr/lib/postgresql/*/bin` (highest
    /// version first).
    pub fn find() -> Result<PgBin> {
        Self::find_in(env::var_os(PG_BIN_ENV).as_deref(), env::var_os("PATH").as_deref())
    }

    /// [`PgBin::find`] with the values of `SHARDQ_PG_BIN` and `PATH` passed
    /// in rather than read from the process environment (for tests).
    ///
    /// A set, non-empty `env_dir` is final: if it is unusable the error says
    /// so instead of silently falling back to other places.
    pub fn find_in(env_dir: Option<&OsStr>, path: Option<&OsStr>) -> Result<PgBin> {
        if let Some(dir) = env_dir.filter(|d| !d.is_empty()) {
            return Self::at(Path::new(dir)).map_err(|reason| Error::BinEnv {
                dir: PathBuf::from(dir),
                reason,
            });
        }
        // PATH: only directories that hold both initdb and pg_ctl.
        for dir in path.map(env::split_paths).into_iter().flatten() {
            if dir.join("initdb").is_file() && dir.join("pg_ctl").is_file() {
                match Self::at(&dir) {
                    Ok(bin) => return Ok(bin),
                    Err(reason) => {
                        tracing::debug!(dir = %dir.display(), %reason, "skipping PATH entry")
                    }
                }
            }
        }
        let pg_config = Command::new("pg_config")
            .arg("--bindir")
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output()
            .ok()
            .filter(|out| out.status.success())
            .map(|out| PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()));
        if let Some(bin) = pg_config.as_deref().and_then(|dir| Self::at(dir).ok()) {
            return Ok(bin);
        }
        for dir in debian_bindirs() {
            if let Ok(bin) = Self::at(&dir) {
                return Ok(bin);
            }
        }
        let pg_config = match &pg_config {
            Some(dir) => format!("`pg_config --bindir` ({})", dir.display()),
            None => "`pg_config --bindir` (not runnable)".to_owned(),
        };
        Err(Error::BinNotFound {
            tried: format!("${PG_BIN_ENV} (unset), PATH, {pg_config}, {DEBIAN_ROOT}/*/bin"),
        })
    }

    /// Checks one candidate directory; the error is a reason for a message.
    fn at(dir: &Path) -> std::result::Result<PgBin, String> {
        let initdb = dir.join("initdb");
        if !initdb.is_file() {
            return Err(format!("no initdb in {}", dir.display()));
        }
        // Prefer the real bindir over a directory of symlinks to it.
        let real = fs::canonicalize(&initdb)
            .ok()
            .and_then(|p| p.parent().map(Path::to_path_buf))
            .unwrap_or_else(|| dir.to_path_buf());
        for name in ["initdb", "pg_ctl", "postgres"] {
            if !real.join(name).is_file() {
                return Err(format!("no {name} in {}", real.display()));
            }
        }
        let out = Command::new(real.join("initdb"))
            .arg("--version")
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run {}/initdb: {e}", real.display()))?;
        let version = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        if !out.status.success() || !version.contains("PostgreSQL") {
            return Err(format!(
                "`{}/initdb --version` did not work ({}): {}{}",
                real.display(),
                out.status,
                version,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(PgBin { dir: real, version })
    }

    /// The binary directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Path of `initdb`.
    pub fn initdb(&self) -> PathBuf {
        self.dir.join("initdb")
    }

    /// Path of `pg_ctl`.
    pub fn pg_ctl(&self) -> PathBuf {
        self.dir.join("pg_ctl")
    }

    /// `initdb --version` output, e.g. "initdb (PostgreSQL) 15.18".
    pub fn version(&self) -> &str {
        &self.version
    }
}

/// `/usr/lib/postgresql/<version>/bin`, highest version first.
fn debian_bindirs() -> Vec<PathBuf> {
    let mut found: Vec<(Vec<u32>, PathBuf)> = fs::read_dir(DEBIAN_ROOT)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name();
            let version: Option<Vec<u32>> = name.to_str()?.split('.').map(|part| part.parse().ok()).collect();
            Some((version?, entry.path().join("bin")))
        })
        .collect();
    found.sort_by(|a, b| b.0.cmp(&a.0));
    found.into_iter().map(|(_, dir)| dir).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_dir_without_binaries_names_the_variable() {
        let empty = tempfile::tempdir().expect("temp dir");
        let err = PgBin::find_in(Some(empty.path().as_os_str()), None).expect_err("an empty SHARDQ_PG_BIN must fail");
        let msg = err.to_string();
        assert!(msg.contains("SHARDQ_PG_BIN"), "{msg}");
        assert!(msg.contains(&empty.path().display().to_string()), "{msg}");
    }

    #[test]
    fn finds_binaries_without_env() {
        let bin = PgBin::find_in(None, env::var_os("PATH").as_deref()).expect("binaries");
        assert!(bin.initdb().is_file() && bin.pg_ctl().is_file());
        assert!(bin.version().contains("PostgreSQL"), "{}", bin.version());
    }
}

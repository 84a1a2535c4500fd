//! The exit guard: a child process that stops a bed's servers and removes its
//! directory once our process is gone, however it ends.
//!
//! The guard is `sh`, running as the server user in its own process group
//! (so a terminal's Ctrl-C does not kill it first), blocked reading its
//! stdin, a pipe whose only write end we hold (std opens it close-on-exec,
//! so no other child inherits it). When we exit, crash or are killed, the
//! kernel closes that end, `read` returns, and the guard thaws every server
//! (a test may have frozen one with `Server::freeze`, and a stopped
//! postmaster would ignore pg_ctl: SIGCONT to the postmaster named by
//! `postmaster.pid`, if its working directory is that data directory, and
//! to its descendants, found by parent pid in `/proc/*/stat`), runs
//! `pg_ctl stop -m immediate` on every data directory and `rm -rf` on the
//! bed directory. Dropping an [`ExitGuard`] does the same and waits for it.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};

use crate::error::{Error, Result};
use crate::pg_bin::PgBin;
use crate::server_user::ServerUser;

/// Arguments: `$1` pg_ctl, `$2` bed directory, then the data directories.
/// `thaw DIR` is the shell twin of `freeze::thaw`: it grows the set of the
/// postmaster's descendants by `ppid` (the field after the state, read after
/// the `)` that ends `comm` in `/proc/PID/stat`) until a scan adds none,
/// then sends SIGCONT to all of them.
const SCRIPT: &str = r#"trap '' HUP INT
read -r _line
pg_ctl="$1"; root="$2"; shift 2
thaw() {
  read -r pm < "$1/postmaster.pid" 2>/dev/null || return 0
  [ -n "$pm" ] && [ "$(cd "/proc/$pm/cwd" 2>/dev/null && pwd -P)" = "$(cd "$1" && pwd -P)" ] || return 0
  tree=" $pm "; grown=1
  while [ "$grown" = 1 ]; do
    grown=0
    for stat in /proc/[0-9]*/stat; do
      read -r line < "$stat" 2>/dev/null || continue
      pid=${line%% *}
      set -- ${line##*") "}
      case "$tree" in *" $pid "*) continue ;; esac
      case "$tree" in *" $2 "*) tree="$tree$pid "; grown=1 ;; esac
    done
  done
  for pid in $tree; do kill -CONT "$pid" 2>/dev/null; done
}
for d in "$@"; do thaw "$d"; "$pg_ctl" stop -w -m immediate -D "$d" >/dev/null 2>&1; done
rm -rf -- "$root""#;

/// A running guard child; see the module docs.
#[derive(Debug)]
pub(crate) struct ExitGuard {
    /// The guard process, waited for on drop.
    child: Child,
    /// The write end of its stdin; closing it triggers the cleanup.
    stdin: Option<ChildStdin>,
}

impl ExitGuard {
    /// Spawns a guard for the servers in `data_dirs` under `root`.
    pub(crate) fn spawn(bin: &PgBin, user: &ServerUser, root: &Path, data_dirs: &[PathBuf]) -> Result<ExitGuard> {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", SCRIPT, "shardq-testbed-guard"])
            .arg(bin.pg_ctl())
            .arg(root)
            .args(data_dirs)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0);
        user.apply(&mut cmd);
        let mut child = cmd
            .spawn()
            .map_err(|e| Error::io("spawn the exit guard (sh) for", root, e))?;
        let stdin = child.stdin.take();
        Ok(ExitGuard { child, stdin })
    }
}

impl Drop for ExitGuard {
    fn drop(&mut self) {
        drop(self.stdin.take());
        if let Err(e) = self.child.wait() {
            tracing::warn!(error = %e, "waiting for the test bed exit guard failed");
        }
    }
}

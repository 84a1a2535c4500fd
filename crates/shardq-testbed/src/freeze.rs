//! Freezing a server: SIGSTOP, and later SIGCONT, to its postmaster and every
//! process below it (backends, checkpointer, walwriter, ...), found through
//! `/proc` (Linux).
//!
//! [`Server::freeze`](crate::Server::freeze) and
//! [`Server::thaw`](crate::Server::thaw) call [`freeze`] and [`thaw`].
//!
//! - The processes are found by `process_tree` (the postmaster of the data
//!   directory, and by parent pid, since the postmaster's children call
//!   `setsid()` and signalling its process group would miss them).
//! - The postmaster is stopped first and waited for, so it forks no new
//!   child while the others are stopped; the children are then stopped
//!   until a scan finds none still running.
//!
//! The exit guard's script (`exit_guard`) thaws the same way in `sh`, so a
//! bed whose process died with a server frozen still stops it.

use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::error::{Error, Result};
use crate::process_tree::{descendants, postmaster, stat};

/// How long freezing waits for all of a server's processes to stop.
const STOP_DEADLINE: Duration = Duration::from_secs(10);
/// Interval between looks at a process that was sent SIGSTOP.
const STOP_POLL: Duration = Duration::from_millis(1);

/// Stops the postmaster of `data_dir` and, unless `postmaster_only`, all
/// its descendants. `server` names the server in errors.
pub(crate) fn freeze(server: &str, data_dir: &Path, postmaster_only: bool) -> Result<()> {
    let fail = |reason: String| Error::Freeze {
        server: server.to_owned(),
        action: "freeze",
        reason,
    };
    let postmaster = postmaster(data_dir)?.ok_or_else(|| {
        fail(format!(
            "no postmaster runs in {} (postmaster.pid is missing or stale)",
            data_dir.display()
        ))
    })?;
    let deadline = Instant::now() + STOP_DEADLINE;
    let mut running = vec![postmaster];
    while !running.is_empty() {
        for &pid in &running {
            signal(pid, Signal::SIGSTOP).map_err(|e| fail(format!("SIGSTOP to process {pid}: {e}")))?;
        }
        for &pid in &running {
            while !stopped_or_gone(pid) {
                if Instant::now() >= deadline {
                    return Err(fail(format!(
                        "process {pid} was sent SIGSTOP but did not stop within {STOP_DEADLINE:?}"
                    )));
                }
                thread::sleep(STOP_POLL);
            }
        }
        if postmaster_only {
            break;
        }
        running = descendants(postmaster)?
            .into_iter()
            .filter(|pid| !stopped_or_gone(*pid))
            .collect();
    }
    Ok(())
}

/// Continues the descendants of the postmaster of `data_dir`, then the
/// postmaster. Nothing to do when no postmaster runs there; harmless when
/// nothing is stopped.
pub(crate) fn thaw(server: &str, data_dir: &Path) -> Result<()> {
    let Some(postmaster) = postmaster(data_dir)? else {
        return Ok(());
    };
    for pid in descendants(postmaster)?.into_iter().chain([postmaster]) {
        signal(pid, Signal::SIGCONT).map_err(|e| Error::Freeze {
            server: server.to_owned(),
            action: "thaw",
            reason: format!("SIGCONT to process {pid}: {e}"),
        })?;
    }
    Ok(())
}

/// Sends `sig` to `pid`; a process that is already gone is not an error.
fn signal(pid: i32, sig: Signal) -> std::result::Result<(), Errno> {
    match kill(Pid::from_raw(pid), sig) {
        Ok(()) | Err(Errno::ESRCH) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Whether `pid` is stopped (`T`), a zombie or gone.
fn stopped_or_gone(pid: i32) -> bool {
    match stat(pid) {
        None => true,
        Some((state, _)) => matches!(state, 'T' | 'Z' | 'X' | 'x'),
    }
}

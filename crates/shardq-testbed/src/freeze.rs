//! Freezing a server: SIGSTOP, and later SIGCONT, to its postmaster and every
//! process below it (backends, checkpointer, walwriter, ...), found through
//! `/proc` (Linux).
//!
//! [`Server::freeze`](crate::Server::freeze) and
//! [`Server::thaw`](crate::Server::thaw) call [`freeze`] and [`thaw`].
//!
//! - The postmaster's pid is the first line of `postmaster.pid` in the data
//!   directory. It is trusted only while `/proc/<pid>/cwd` is that data
//!   directory (the postmaster runs there), so a stale file left by a crash
//!   never gets an unrelated process signalled; where that link may not be
//!   read, while the process is called `postgres`.
//! - The postmaster's children call `setsid()`, so signalling its process
//!   group would miss them: they are found by parent pid in
//!   `/proc/<pid>/stat`.
//! - The postmaster is stopped first and waited for, so it forks no new
//!   child while the others are stopped; the children are then stopped
//!   until a scan finds none still running.
//!
//! The exit guard's script (`exit_guard`) thaws the same way in `sh`, so a
//! bed whose process died with a server frozen still stops it.

use std::collections::HashMap;
use std::fs;
use std::io::ErrorKind;
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::error::{Error, Result};

/// How long freezing waits for all of a server's processes to stop.
const STOP_DEADLINE: Duration = Duration::from_secs(10);
/// Interval between looks at a process that was sent SIGSTOP.
const STOP_POLL: Duration = Duration::from_millis(1);

/// Stops the postmaster of `data_dir` and all its descendants. `server`
/// names the server in errors.
pub(crate) fn freeze(server: &str, data_dir: &Path) -> Result<()> {
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

/// The pid of the postmaster running in `data_dir`, if one does.
fn postmaster(data_dir: &Path) -> Result<Option<i32>> {
    let file = data_dir.join("postmaster.pid");
    let text = match fs::read_to_string(&file) {
        Ok(text) => text,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io("read", file, e)),
    };
    // An empty or partial first line: the postmaster is still writing it.
    let Some(pid) = text
        .lines()
        .next()
        .and_then(|line| line.trim().parse::<i32>().ok())
        .filter(|pid| *pid > 0)
    else {
        return Ok(None);
    };
    let dir = fs::canonicalize(data_dir).map_err(|e| Error::io("resolve", data_dir, e))?;
    let cwd = format!("/proc/{pid}/cwd");
    match fs::read_link(&cwd) {
        Ok(cwd) => Ok((cwd == dir).then_some(pid)),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
        // Root without CAP_SYS_PTRACE (a container's default) may not read
        // another user's cwd; the command name, readable by all, will do.
        Err(e) if e.kind() == ErrorKind::PermissionDenied => {
            Ok(command(pid).is_some_and(|c| c == "postgres").then_some(pid))
        }
        Err(e) => Err(Error::io("read the working directory of the postmaster at", cwd, e)),
    }
}

/// The command name of `pid` (`comm` in `/proc/<pid>/stat`).
fn command(pid: i32) -> Option<String> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    text.get(open + 1..close).map(str::to_owned)
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

/// The state letter and parent pid of `pid`, from `/proc/<pid>/stat`; `None`
/// once it is gone.
fn stat(pid: i32) -> Option<(char, i32)> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) state ppid ...": comm may hold spaces and parentheses.
    let mut fields = text.get(text.rfind(')')? + 1..)?.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    Some((state, ppid))
}

/// Every process below `root` (children, their children, ...), from one scan
/// of `/proc`.
fn descendants(root: i32) -> Result<Vec<i32>> {
    let entries = fs::read_dir("/proc").map_err(|e| Error::io("list", "/proc", e))?;
    let mut children: HashMap<i32, Vec<i32>> = HashMap::new();
    for entry in entries.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|name| name.parse::<i32>().ok()) else {
            continue;
        };
        if let Some((_, ppid)) = stat(pid) {
            children.entry(ppid).or_default().push(pid);
        }
    }
    let mut found = Vec::new();
    let mut todo = vec![root];
    while let Some(parent) = todo.pop() {
        if let Some(kids) = children.remove(&parent) {
            found.extend_from_slice(&kids);
            todo.extend(kids);
        }
    }
    Ok(found)
}

//! A server's processes, read from `/proc` (Linux): its postmaster (trusted
//! only while it runs in the data directory), the processes below it, and
//! the CPU time they used.
//!
//! - The postmaster's pid is the first line of `postmaster.pid` in the data
//!   directory. It is trusted only while `/proc/<pid>/cwd` is that data
//!   directory (the postmaster runs there), so a stale file left by a crash
//!   never names an unrelated process; where that link may not be read,
//!   while the process is called `postgres`.
//! - The postmaster's children call `setsid()`, so they are found by parent
//!   pid in `/proc/<pid>/stat`, not by process group.

use std::collections::HashMap;
use std::fs;
use std::io::ErrorKind;
use std::path::Path;
use std::time::Duration;

use crate::error::{Error, Result};

/// Clock ticks per second of the times in `/proc/<pid>/stat` (`USER_HZ`,
/// 100 on every Linux architecture that shardq runs on).
const TICKS_PER_SECOND: u64 = 100;

/// The pid of the postmaster running in `data_dir`, if one does.
pub(crate) fn postmaster(data_dir: &Path) -> Result<Option<i32>> {
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

/// The state letter and parent pid of `pid`, from `/proc/<pid>/stat`; `None`
/// once it is gone.
pub(crate) fn stat(pid: i32) -> Option<(char, i32)> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) state ppid ...": comm may hold spaces and parentheses.
    let mut fields = text.get(text.rfind(')')? + 1..)?.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    Some((state, ppid))
}

/// Every process below `root` (children, their children, ...), from one scan
/// of `/proc`.
pub(crate) fn descendants(root: i32) -> Result<Vec<i32>> {
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

/// How often [`cpu_time`] reads the processes again when the postmaster
/// reaped a child while they were read.
const CPU_TIME_ATTEMPTS: usize = 100;

/// The CPU time (user + system) used by the postmaster of `data_dir` and
/// every process below it, including processes that have exited (their
/// time is in their parent's reaped children's times); zero when no
/// postmaster runs there.
///
/// The processes are read one by one, so a backend that exits and is
/// reaped between the postmaster's reading and its own would be counted
/// nowhere. The postmaster's reaped children's time is therefore read
/// again after the others, and everything is read again when it changed.
pub(crate) fn cpu_time(data_dir: &Path) -> Result<Duration> {
    let Some(root) = postmaster(data_dir)? else {
        return Ok(Duration::ZERO);
    };
    for _ in 0..CPU_TIME_ATTEMPTS {
        let Some(postmaster) = times(root) else {
            return Ok(Duration::ZERO);
        };
        let mut ticks = postmaster.own + postmaster.reaped;
        for pid in descendants(root)? {
            ticks += times(pid).map_or(0, |t| t.own + t.reaped);
        }
        match times(root) {
            None => return Ok(Duration::ZERO),
            Some(again) if again.reaped == postmaster.reaped => {
                return Ok(Duration::from_millis(ticks * 1000 / TICKS_PER_SECOND));
            }
            Some(_) => continue,
        }
    }
    Err(Error::Unsettled {
        what: format!(
            "the CPU time of the server in {}: its postmaster reaped children during each of {CPU_TIME_ATTEMPTS} readings",
            data_dir.display()
        ),
    })
}

/// A process's CPU time in clock ticks, from `/proc/<pid>/stat`.
struct Times {
    /// `utime + stime`: its own.
    own: u64,
    /// `cutime + cstime`: its children's that it has waited for.
    reaped: u64,
}

/// The CPU times of `pid`; `None` once it is gone.
fn times(pid: i32) -> Option<Times> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // After "pid (comm)": state is field 3, utime 14, stime 15, cutime 16, cstime 17.
    let fields: Vec<&str> = text.get(text.rfind(')')? + 1..)?.split_whitespace().collect();
    let field = |n: usize| fields.get(n - 3).and_then(|v| v.parse::<u64>().ok());
    Some(Times {
        own: field(14)? + field(15)?,
        reaped: field(16)? + field(17)?,
    })
}

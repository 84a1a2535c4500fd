//! The OS user that runs the servers: the current user, or `postgres` when
//! running as root (initdb, pg_ctl and postgres refuse to run as root).

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};

use nix::unistd::{Gid, Uid, User};

use crate::error::{Error, Result};

/// The unprivileged user the servers run as when we are root.
const SERVER_USER: &str = "postgres";

/// Who runs server commands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ServerUser {
    /// We are not root: run as ourselves.
    Current,
    /// We are root: switch to this user for every server command.
    Other {
        /// User name, for messages.
        name: String,
        /// Its uid.
        uid: Uid,
        /// Its primary gid.
        gid: Gid,
    },
}

impl ServerUser {
    /// Decides who runs the servers, from the effective uid.
    pub(crate) fn resolve() -> Result<ServerUser> {
        if !Uid::effective().is_root() {
            return Ok(ServerUser::Current);
        }
        match User::from_name(SERVER_USER) {
            Ok(Some(user)) => Ok(ServerUser::Other {
                name: user.name,
                uid: user.uid,
                gid: user.gid,
            }),
            Ok(None) => Err(Error::NoServerUser {
                user: SERVER_USER.to_owned(),
            }),
            Err(errno) => Err(Error::io("look up user", SERVER_USER, errno.into())),
        }
    }

    /// Makes `cmd` run as this user, from `/` (the caller's working
    /// directory may be closed to it).
    pub(crate) fn apply(&self, cmd: &mut Command) {
        cmd.current_dir("/");
        if let ServerUser::Other { uid, gid, .. } = self {
            cmd.uid(uid.as_raw()).gid(gid.as_raw());
        }
    }

    /// Gives `path` to this user (nothing to do for the current user).
    pub(crate) fn chown(&self, path: &Path) -> Result<()> {
        match self {
            ServerUser::Current => Ok(()),
            ServerUser::Other { uid, gid, .. } => nix::unistd::chown(path, Some(*uid), Some(*gid))
                .map_err(|errno| Error::io("chown to the server user", path, errno.into())),
        }
    }

    /// Checks that this user can reach `dir` (every ancestor must be
    /// traversable) and, if `write`, write it, by trying it as that user.
    /// The error says `needed` is unusable and names the first directory in
    /// the way.
    pub(crate) fn check_access(&self, needed: &Path, dir: &Path, write: bool) -> Result<()> {
        let ServerUser::Other { name, .. } = self else {
            return Ok(());
        };
        let script = if write {
            r#"cd -- "$1" && test -w ."#
        } else {
            r#"cd -- "$1""#
        };
        if self.try_sh(script, dir)? {
            return Ok(());
        }
        let mut blocked = dir.to_path_buf();
        let mut ancestors: Vec<&Path> = dir.ancestors().collect();
        ancestors.reverse();
        for ancestor in ancestors {
            if !self.try_sh(r#"cd -- "$1""#, ancestor)? {
                blocked = ancestor.to_path_buf();
                break;
            }
        }
        Err(Error::NotTraversable {
            user: name.clone(),
            path: needed.to_path_buf(),
            blocked,
        })
    }

    /// Runs `sh -c script sh path` as this user; true if it succeeds.
    fn try_sh(&self, script: &str, path: &Path) -> Result<bool> {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", script, "sh"])
            .arg(path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        self.apply(&mut cmd);
        let status = cmd
            .status()
            .map_err(|e| Error::io("run sh to check access to", path, e))?;
        Ok(status.success())
    }
}

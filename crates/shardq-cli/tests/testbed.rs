//! `shardq testbed` and `shardq demo` as real processes starting real
//! servers: the bed keeps its data next to the configuration file, so two
//! working directories share one bed; the demo tells its story on stdout
//! and sends its log lines (the failing jobs' warnings) to the file it
//! names.
#![allow(clippy::unwrap_used, missing_docs)]

use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// `n` loopback ports that were free a moment ago (all bound at once, so
/// they differ).
fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..n).map(|_| TcpListener::bind("127.0.0.1:0").unwrap()).collect();
    listeners.iter().map(|l| l.local_addr().unwrap().port()).collect()
}

/// A directory the server user can reach (temporary directories are 0700).
fn open_dir(path: &Path) -> PathBuf {
    std::fs::create_dir_all(path).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path.to_path_buf()
}

/// Writes `dir/shards.toml`: a master and `shards` shards on free ports.
fn write_bed_config(dir: &Path, shards: usize) -> PathBuf {
    let ports = free_ports(shards + 1);
    let target = |port: u16| format!("host = \"127.0.0.1\"\nport = {port}\nuser = \"postgres\"\ndbname = \"shardq\"\n");
    let mut text = format!("[master]\n{}", target(ports[0]));
    for (i, port) in ports[1..].iter().enumerate() {
        text.push_str(&format!("[[shards]]\nname = \"shard_{}\"\n{}", i + 1, target(*port)));
    }
    let path = dir.join("shards.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// Runs `shardq --config CONFIG ARGS...` in `cwd`, without RUST_LOG.
fn shardq(cwd: &Path, config: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_shardq"))
        .current_dir(cwd)
        .arg("--config")
        .arg(config)
        .args(args)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Stops the bed of a configuration when the test ends, passed or not.
struct BedDown {
    config: PathBuf,
}

impl Drop for BedDown {
    fn drop(&mut self) {
        let dir = self.config.parent().unwrap().to_path_buf();
        let out = shardq(&dir, &self.config, &["testbed", "down"]);
        if !out.status.success() {
            eprintln!("testbed down failed: {}", text(&out.stderr));
        }
    }
}

#[test]
fn the_bed_lives_next_to_the_config_from_any_directory() {
    let root = tempfile::tempdir().unwrap();
    let root = open_dir(root.path());
    let conf = open_dir(&root.join("conf"));
    let (a, b) = (open_dir(&root.join("a")), open_dir(&root.join("b")));
    let config = write_bed_config(&conf, 1);
    let _down = BedDown { config: config.clone() };

    // From `a` with a relative path, then from `b` with an absolute one.
    let up = shardq(&a, Path::new("../conf/shards.toml"), &["testbed", "up"]);
    assert!(up.status.success(), "{}{}", text(&up.stdout), text(&up.stderr));
    let again = shardq(&b, &config, &["testbed", "up"]);
    assert!(again.status.success(), "{}{}", text(&again.stdout), text(&again.stderr));
    assert!(
        !text(&again.stdout).contains("(created)"),
        "the second `up` finds the first one's databases:\n{}",
        text(&again.stdout)
    );
    let status = shardq(&b, &config, &["testbed", "status"]);
    assert!(status.status.success(), "{}", text(&status.stdout));

    for server in ["master", "shard_1"] {
        let data = conf.join(".shardq/testbed").join(server);
        assert!(data.join("PG_VERSION").is_file(), "{} holds no cluster", data.display());
    }
    for cwd in [&a, &b] {
        assert!(!cwd.join(".shardq").exists(), "a bed was made in {}", cwd.display());
    }
}

#[test]
fn the_demo_prints_its_story_and_sends_log_lines_to_the_file_it_names() {
    let root = tempfile::tempdir().unwrap();
    let root = open_dir(root.path());
    let conf = open_dir(&root.join("conf"));
    let config = write_bed_config(&conf, 2);
    let _down = BedDown { config: config.clone() };

    // 20 accounts x 10 jobs: 10 fail once and are retried, 1 always fails
    // and is discarded: each failure is a WARN log line.
    let out = shardq(
        &root,
        &config,
        &["demo", "--accounts", "20", "--jobs-per-account", "10"],
    );
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{stdout}{stderr}");
    for (name, stream) in [("stdout", &stdout), ("stderr", &stderr)] {
        assert!(
            !stream.lines().any(|l| l.contains("WARN")),
            "a WARN line on {name}:\n{stream}"
        );
    }
    let log = stdout
        .lines()
        .find_map(|l| l.strip_prefix("logs: "))
        .unwrap_or_else(|| panic!("no `logs:` line:\n{stdout}"));
    let log = PathBuf::from(log);
    assert_eq!(log, conf.join(".shardq/demo.log"), "{stdout}");
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(
        logged.lines().any(|l| l.contains("WARN")),
        "the failing jobs' warnings are in {}:\n{logged}",
        log.display()
    );
    assert!(stdout.contains("all 200 jobs finished"), "{stdout}");
    for shard in ["shard_1", "shard_2"] {
        assert!(
            stdout.lines().any(|l| l.starts_with(shard)),
            "no table row for {shard}:\n{stdout}"
        );
    }
    assert!(
        stdout.contains(&format!("shardq --config {} status", config.display())),
        "{stdout}"
    );
    assert!(stdout.contains("http://127.0.0.1:9188"), "{stdout}");
}

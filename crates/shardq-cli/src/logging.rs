//! Where the command's log lines go: stderr, filtered by `RUST_LOG` (default
//! `warn,shardq=info`), or a file (the demo's, so its story on stdout is not
//! buried under log lines).

use std::fs::OpenOptions;
use std::path::Path;
use std::sync::Mutex;

use anyhow::Context;
use tracing_subscriber::EnvFilter;

/// The filter used when `RUST_LOG` is not set.
const DEFAULT_FILTER: &str = "warn,shardq=info";

/// Installs the global subscriber: log lines go to `file` (appended to,
/// its directory created) when given, to stderr otherwise (above any
/// progress bar).
pub fn init(file: Option<&Path>) -> anyhow::Result<()> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match file {
        Some(path) => {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("log file {}: cannot create its directory", path.display()))?;
            }
            let out = OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("log file {}: cannot open", path.display()))?;
            builder.with_ansi(false).with_writer(Mutex::new(out)).init();
        }
        None => builder.with_writer(|| crate::progress::LogWriter).init(),
    }
    Ok(())
}

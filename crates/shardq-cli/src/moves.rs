//! `shardq moves status|resume|abort`, and the part of `accounts move` they
//! share: the `--table TABLE:COLUMN` argument, the mover's options and
//! running a move to its end with a line per step.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use shardq::moves::{AccountTable, Move, MoveOptions, Mover, Step};
use shardq_router::{Config, Router};

use crate::progress;

/// How often a running move's step is read back for the progress lines.
const PROGRESS_EVERY: Duration = Duration::from_millis(100);

/// Arguments of `moves`.
#[derive(clap::Args)]
pub struct MovesArgs {
    #[command(subcommand)]
    command: MovesCommand,
}

#[derive(clap::Subcommand)]
enum MovesCommand {
    /// Moves in progress, then the most recent finished ones.
    Status {
        /// Finished (done or aborted) moves to list after those in progress.
        #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(i64).range(0..=10_000))]
        recent: i64,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Run a move from its last step to the end (after the mover was
    /// stopped or a step failed). It carries the tables it recorded when
    /// it started (`--table` is only for moves recorded before moves kept
    /// their tables).
    Resume {
        /// The move's id (`shardq moves status`).
        id: i64,
        #[command(flatten)]
        options: MoveArgs,
    },
    /// Give a move up before its switch (step started, paused, precopied,
    /// fenced or copied): the copy on the new shard is deleted, the fence
    /// lifted, the account stays where it was.
    Abort {
        /// The move's id (`shardq moves status`).
        id: i64,
    },
}

/// What a move carries and how long it waits: shared by `accounts move`
/// and `moves resume`.
#[derive(clap::Args)]
pub struct MoveArgs {
    /// An account-scoped application table the move carries besides those
    /// the configuration declares (`[[accounts.tables]]`), as TABLE:COLUMN
    /// (`schema.table` or `table` in `public`; COLUMN holds the account id).
    /// Repeat for each table; the move records them, so resuming it needs
    /// none.
    #[arg(long = "table", value_name = "TABLE:COLUMN", value_parser = parse_table)]
    tables: Vec<AccountTable>,
    /// Longest wait for transactions on the old shard that began before the
    /// pause, and again before the write fence.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    writers_wait: Duration,
    /// Longest wait for the account's running jobs to end after the pause,
    /// before its writes are fenced.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    running_wait: Duration,
}

impl MoveArgs {
    /// The mover's options: the configuration's account-scoped tables and
    /// the `--table`s. A `--table` naming a declared table with another
    /// column is an error naming both.
    pub fn options(&self, config: &Config) -> anyhow::Result<MoveOptions> {
        let mut options = MoveOptions {
            writers_wait: self.writers_wait,
            running_wait: self.running_wait,
            ..MoveOptions::for_config(config)
        };
        for t in &self.tables {
            match options.tables.iter().find(|d| d.table == t.table) {
                Some(d) if d.column == t.column => {}
                Some(d) => anyhow::bail!(
                    "--table {}:{}: {} declares table {} with account column {}",
                    t.table,
                    t.column,
                    config.file.display(),
                    d.table,
                    d.column
                ),
                None => options.tables.push(t.clone()),
            }
        }
        Ok(options)
    }
}

/// Parses `TABLE:COLUMN` (split at the last colon).
fn parse_table(s: &str) -> Result<AccountTable, String> {
    match s.rsplit_once(':') {
        Some((table, column)) if !table.is_empty() && !column.is_empty() => Ok(AccountTable {
            table: table.to_string(),
            column: column.to_string(),
        }),
        _ => Err(format!("expected TABLE:COLUMN (e.g. documents:account), got {s:?}")),
    }
}

/// Runs a `moves` subcommand.
pub async fn run(config: &Config, args: MovesArgs) -> anyhow::Result<ExitCode> {
    let router = Arc::new(Router::connect(config).await?);
    match args.command {
        MovesCommand::Status { recent, json } => {
            let moves = Mover::new(router, MoveOptions::default()).list(recent).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&moves)?);
            } else {
                print_moves(&moves);
            }
            Ok(ExitCode::SUCCESS)
        }
        MovesCommand::Resume { id, options } => {
            let options = options.options(config)?;
            let mover = Mover::new(router, options.clone());
            let m = get(&mover, id).await?;
            println!("{}", heading(&m, &mover.tables_of(&m)));
            if matches!(m.step, Step::Done | Step::Aborted) {
                println!("  nothing to do: the move is {}", m.step);
                return Ok(ExitCode::SUCCESS);
            }
            run_to_end(&mover, &options, m).await
        }
        MovesCommand::Abort { id } => {
            let mover = Mover::new(router, MoveOptions::default());
            get(&mover, id).await?;
            let m = mover.abort(id).await?;
            println!(
                "move {}: aborted; account {} stays on shard {}",
                m.id, m.account, m.from
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Move `id`, with "no move has id N" as the whole message when there is none.
async fn get(mover: &Mover, id: i64) -> anyhow::Result<Move> {
    match mover.get(id).await {
        Ok(m) => Ok(m),
        Err(shardq::Error::Move { account, message }) if account.is_empty() => {
            Err(anyhow::anyhow!("{message} (`shardq moves status` lists them)"))
        }
        Err(e) => Err(e.into()),
    }
}

/// The first line printed for a move.
pub fn heading(m: &Move, tables: &[AccountTable]) -> String {
    let tables = if tables.is_empty() {
        "jobs only".to_string()
    } else {
        let names: Vec<String> = tables.iter().map(|t| format!("{}({})", t.table, t.column)).collect();
        format!("jobs and {}", names.join(", "))
    };
    format!(
        "move {}: account {} from {} to {} (epoch {}; {tables})",
        m.id, m.account, m.from, m.to, m.epoch
    )
}

/// The steps a move takes, in order.
const STEPS: [Step; 7] = [
    Step::Started,
    Step::Paused,
    Step::Precopied,
    Step::Fenced,
    Step::Copied,
    Step::Switched,
    Step::Done,
];

/// What reaching `step` means, for the progress line.
fn meaning(step: Step, m: &Move, options: &MoveOptions) -> String {
    match step {
        Step::Started => "recorded".into(),
        Step::Paused => format!(
            "{} no longer claims the account's jobs and captures its changes; waiting for its \
             running jobs (up to {}), then copying its rows and jobs while its writes continue",
            m.from,
            humantime::format_duration(options.running_wait)
        ),
        Step::Precopied => format!(
            "rows and jobs copied to {} (held there); catching up with the writes since, then \
             fencing them",
            m.to
        ),
        Step::Fenced => format!(
            "{} refuses the account's new writes (they wait for the switch: the pause); waiting \
             for its earlier writers (up to {}), then copying the last changes",
            m.from,
            humantime::format_duration(options.writers_wait)
        ),
        Step::Copied => format!("caught up on {}", m.to),
        Step::Switched => format!("placed on {}, epoch {}; its jobs run there", m.to, m.epoch + 1),
        Step::Done => format!("capture stopped, old copy deleted from {}", m.from),
        Step::Aborted => "aborted".into(),
    }
}

/// Runs move `m` to its end with [`Mover::resume`] (which records a failed
/// step's error in the master), printing a line for each step reached.
/// Fails, saying how to go on, when a step fails.
pub async fn run_to_end(mover: &Mover, options: &MoveOptions, m: Move) -> anyhow::Result<ExitCode> {
    let started = Instant::now();
    let mut last = m.step;
    let bar = progress::bar((STEPS.len() - 1) as u64, &format!("move {}: steps", m.id));
    if let Some(at) = STEPS.iter().position(|s| *s == m.step) {
        bar.set_position(at as u64);
    }
    let print_up_to = |last: &mut Step, now: &Move| {
        let from = STEPS.iter().position(|s| s == last);
        let to = STEPS.iter().position(|s| *s == now.step);
        if let (Some(from), Some(to)) = (from, to) {
            for step in &STEPS[from + 1..=to] {
                bar.suspend(|| {
                    println!(
                        "  {:<9} {:>7.2} s  {}",
                        step.as_str(),
                        started.elapsed().as_secs_f64(),
                        meaning(*step, now, options)
                    )
                });
            }
            bar.set_position(to as u64);
            bar.set_message(now.step.as_str().to_owned());
        }
        *last = now.step;
    };
    let resume = mover.resume(m.id);
    tokio::pin!(resume);
    let mut tick = tokio::time::interval(PROGRESS_EVERY);
    let outcome = loop {
        tokio::select! {
            r = &mut resume => break r,
            _ = tick.tick() => {
                if let Ok(now) = mover.get(m.id).await {
                    print_up_to(&mut last, &now);
                }
            }
        }
    };
    let outcome = outcome.inspect(|done| print_up_to(&mut last, done));
    bar.finish_and_clear();
    match outcome {
        Ok(done) => {
            if done.step == Step::Aborted {
                println!("  aborted: account {} stays on shard {}", done.account, done.from);
            } else {
                println!(
                    "moved account {} to {} in {:.2} s",
                    done.account,
                    done.to,
                    started.elapsed().as_secs_f64()
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            let at = mover.get(m.id).await.map(|now| now.step).unwrap_or(last);
            let undo = if at.abortable() {
                format!(", or `shardq moves abort {}` to give it up", m.id)
            } else {
                String::new()
            };
            Err(anyhow::Error::new(e).context(format!(
                "move {} of account {} ({} → {}) stopped after step {at}; run `shardq moves resume {}` \
                 to go on{undo}",
                m.id, m.account, m.from, m.to, m.id
            )))
        }
    }
}

fn print_moves(moves: &[Move]) {
    if moves.is_empty() {
        println!("no moves");
        return;
    }
    println!(
        "{:>6}  {:<24} {:<12} {:<12} {:>5}  {:<9} {:<20}  error",
        "id", "account", "from", "to", "epoch", "step", "updated"
    );
    for m in moves {
        println!(
            "{:>6}  {:<24} {:<12} {:<12} {:>5}  {:<9} {:<20}  {}",
            m.id,
            m.account,
            m.from,
            m.to,
            m.epoch,
            m.step.as_str(),
            m.updated_at.format("%Y-%m-%d %H:%M:%S"),
            m.error.as_deref().unwrap_or("")
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: MoveArgs,
    }

    fn parse(argv: &[&str]) -> Result<MoveArgs, clap::Error> {
        Cli::try_parse_from(std::iter::once("move").chain(argv.iter().copied())).map(|c| c.args)
    }

    fn config(declared: &[(&str, &str)]) -> Config {
        let mut c = Config::from_urls("postgres://h/m", &[("shard_1", "postgres://h/s1")]).unwrap();
        c.account_tables = declared
            .iter()
            .map(|(table, column)| AccountTable {
                table: table.to_string(),
                column: column.to_string(),
            })
            .collect();
        c
    }

    #[test]
    fn tables_come_from_the_config_and_the_flags() {
        let a = parse(&[
            "--table",
            "app.docs:owner",
            "--table",
            "notes:account",
            "--running-wait",
            "5s",
        ])
        .unwrap();
        let o = a
            .options(&config(&[("notes", "account"), ("users", "account")]))
            .unwrap();
        let names: Vec<(&str, &str)> = o.tables.iter().map(|t| (t.table.as_str(), t.column.as_str())).collect();
        assert_eq!(
            names,
            [("notes", "account"), ("users", "account"), ("app.docs", "owner")]
        );
        assert_eq!(
            (o.running_wait, o.writers_wait),
            (Duration::from_secs(5), Duration::from_secs(30))
        );
    }

    #[test]
    fn a_bad_or_conflicting_table_says_what_is_wrong() {
        for bad in ["docs", "docs:", ":account"] {
            let e = parse(&["--table", bad]).err().unwrap().to_string();
            assert!(e.contains("expected TABLE:COLUMN"), "{bad}: {e}");
        }
        let a = parse(&["--table", "notes:owner"]).unwrap();
        let e = a.options(&config(&[("notes", "account")])).unwrap_err().to_string();
        assert!(e.contains("notes:owner") && e.contains("account column account"), "{e}");
    }
}

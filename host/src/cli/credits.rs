//! `genpipe credits`: grant, balance, history and verify, straight on the configured ledger.
//!
//! No plugin is loaded and no recovery runs: a `genpipe serve` may be using the same file, and
//! these commands only add to it (grants) or read it.

use std::io::{self, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand};

use crate::config::{Config, LedgerKind};
use crate::state::ledger::{self, HistoryQuery};

/// Exit code of `verify` when an invariant fails.
const EXIT_VERIFY_FAILED: u8 = 1;
/// Journal entries read at once by `history`.
const PAGE: usize = 500;

/// `genpipe credits ...`
#[derive(Debug, Args)]
pub(super) struct CreditsArgs {
    /// The configuration file whose [ledger] to use (default: the built-in one).
    #[arg(long, short, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: CreditsCommand,
}

#[derive(Debug, Subcommand)]
enum CreditsCommand {
    /// Grants credits to an account, creating it; repeating it with the same --key grants nothing more.
    Grant {
        /// The account.
        account: String,
        /// Credits to add.
        amount: u64,
        /// The grant's idempotency key (default: a new one, printed).
        #[arg(long)]
        key: Option<String>,
    },
    /// Shows an account's balance, held and available credits.
    Balance {
        /// The account.
        account: String,
    },
    /// Lists an account's journal entries, oldest first.
    History {
        /// The account.
        account: String,
        /// Only the entries of this run's hold.
        #[arg(long)]
        run: Option<String>,
    },
    /// Re-folds the whole journal and checks every invariant; exits 1 with a report if one fails.
    Verify,
}

pub(super) async fn credits(args: CreditsArgs) -> Result<ExitCode, String> {
    let config = Config::load(args.config.as_deref()).map_err(|e| e.to_string())?;
    if config.ledger.kind == LedgerKind::Memory {
        return Err(format!(
            "{}: ledger.kind: credits are kept in memory, inside each genpipe process, so there is no ledger to \
             read here; set [ledger] kind = \"sqlite\" (or \"postgres\")",
            config.source
        ));
    }
    let (location, key) = ledger::location(&config.ledger, &config.base_dir);
    let ledger = ledger::open(&config.ledger, &config.base_dir).await.map_err(|e| format!("{}: {key}: {e}", config.source))?;
    let failed = |e: ledger::LedgerError| format!("{e} (ledger '{location}')");
    match args.command {
        CreditsCommand::Grant { account, amount, key } => {
            let key = key.unwrap_or_else(|| format!("cli:{}", uuid::Uuid::now_v7().simple()));
            let credits = ledger.grant(&key, &account, amount).await.map_err(failed)?;
            let (balance, held, available) = (credits.balance, credits.held, credits.available());
            print(|out| {
                writeln!(
                    out,
                    "granted {amount} credits to '{account}' (key {key}): balance {balance}, held {held}, available {available}"
                )
            })?;
        }
        CreditsCommand::Balance { account } => {
            let credits = ledger.balance(&account).await.map_err(failed)?;
            let (balance, held, available) = (credits.balance, credits.held, credits.available());
            print(|out| writeln!(out, "{account}: balance {balance}, held {held}, available {available}"))?;
        }
        CreditsCommand::History { account, run } => {
            ledger.balance(&account).await.map_err(failed)?;
            let header = |out: &mut dyn Write| {
                writeln!(
                    out,
                    "{:>8}  {:<24}  {:<7}  {:>12}  {:<36}  {:<12}  {:<12}  REASON",
                    "ENTRY", "TIME (UTC)", "KIND", "AMOUNT", "RUN", "OP", "STEP"
                )
            };
            let mut more = print(header)?;
            let mut query = HistoryQuery { run, after: 0, limit: PAGE };
            while more {
                let page = ledger.history(&account, &query).await.map_err(failed)?;
                more = print(|out| {
                    for e in &page {
                        let [run, op, step] = [&e.run, &e.op, &e.step].map(|field| field.as_deref().unwrap_or("-"));
                        let time = utc(e.time_ms);
                        writeln!(
                            out,
                            "{:>8}  {time:<24}  {:<7}  {:>12}  {run:<36}  {op:<12}  {step:<12}  {}",
                            e.id, e.kind, e.amount, e.reason
                        )?;
                    }
                    Ok(())
                })? && page.len() == PAGE;
                query.after = page.last().map_or(query.after, |last| last.id);
            }
        }
        CreditsCommand::Verify => {
            let audit = ledger.verify().await.map_err(failed)?;
            print(|out| {
                let status = if audit.is_ok() { "ok".to_string() } else { format!("FAILED, {} problems", audit.problems.len()) };
                writeln!(out, "ledger '{location}': {status}")?;
                writeln!(out, "  journal entries: {}", audit.entries)?;
                writeln!(out, "  accounts: {}", audit.accounts)?;
                writeln!(out, "  holds: {} ({} open)", audit.holds, audit.open_holds)?;
                writeln!(
                    out,
                    "  balances {} + posted {} = granted {} (held {})",
                    audit.balances, audit.posted, audit.granted, audit.held
                )?;
                audit.problems.iter().try_for_each(|problem| writeln!(out, "  - {problem}"))
            })?;
            if !audit.is_ok() {
                return Ok(ExitCode::from(EXIT_VERIFY_FAILED));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Writes `lines` to stdout; `false` once its reader has gone (`| head`), which is not an error.
fn print(lines: impl FnOnce(&mut dyn Write) -> io::Result<()>) -> Result<bool, String> {
    let mut out = io::stdout().lock();
    match lines(&mut out).and_then(|()| out.flush()) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(false),
        Err(e) => Err(format!("writing to stdout failed: {e}")),
    }
}

/// Milliseconds since the Unix epoch as an RFC 3339 UTC time.
fn utc(ms: u64) -> String {
    let (secs, millis) = (ms / 1000, ms % 1000);
    let (days, day_secs) = ((secs / 86_400) as i64, secs % 86_400);
    // Days to a civil date (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let (era, day_of_era) = (z.div_euclid(146_097), z.rem_euclid(146_097));
    let year_of_era = (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let shifted_month = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * shifted_month + 2) / 5 + 1;
    let month = if shifted_month < 10 { shifted_month + 3 } else { shifted_month - 9 };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    let (h, m, s) = (day_secs / 3600, day_secs / 60 % 60, day_secs % 60);
    format!("{year:04}-{month:02}-{day:02}T{h:02}:{m:02}:{s:02}.{millis:03}Z")
}

#[cfg(test)]
mod tests {
    #[test]
    fn utc_times() {
        assert_eq!(super::utc(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(super::utc(1_700_000_000_123), "2023-11-14T22:13:20.123Z");
        assert_eq!(super::utc(951_782_400_000), "2000-02-29T00:00:00.000Z");
    }
}

//! `relaygate compare`: the primary-vs-shadow comparison from a ledger file.

use crate::telemetry::comparison::{render, Comparison};
use crate::telemetry::ledger::LedgerLine;

/// `relaygate compare --ledger FILE`.
#[derive(Debug, clap::Args)]
pub struct CompareArgs {
    /// A usage ledger written with shadows enabled.
    #[arg(long)]
    pub ledger: std::path::PathBuf,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub fn compare(args: CompareArgs) -> Result<std::process::ExitCode, String> {
    let text = std::fs::read_to_string(&args.ledger)
        .map_err(|e| format!("cannot read ledger {}: {e}", args.ledger.display()))?;
    let comparison = Comparison::default();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        if let Ok(line) = serde_json::from_str::<LedgerLine>(line) {
            comparison.add(&line);
        }
    }
    let reports = comparison.report();
    let out = if args.json {
        serde_json::to_string_pretty(&reports).unwrap_or_default() + "\n"
    } else {
        render(&reports)
    };
    super::print_out(&out);
    Ok(std::process::ExitCode::SUCCESS)
}

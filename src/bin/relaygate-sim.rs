//! `relaygate-sim`: the simulated upstream (`relaygate::sim::Sim`) as its own
//! process, for the benchmark (`bench/run.sh`) and the memory test
//! (`tests/memory.rs`), where the upstream must not share the measured
//! process or its core.
//!
//! It prints `relaygate-sim listening on http://ADDR` on stdout and runs until
//! killed. A line `release` on stdin lets streams stalled by `--stall-after`
//! continue; end of stdin is ignored.
#![forbid(unsafe_code)]

use std::io::{BufRead, Write};
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use relaygate::sim::{Faults, Sim};

#[derive(Debug, Parser)]
#[command(about = "The simulated OpenAI-compatible upstream, standalone")]
struct Args {
    /// Listen address (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Name in completion ids and `/v1/models`.
    #[arg(long, default_value = "sim")]
    name: String,
    /// Content chunks per stream (and words per answer).
    #[arg(long, default_value_t = 5)]
    chunks: usize,
    /// Gap between stream chunks (the first event goes at once).
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    chunk_interval: Duration,
    /// Delay before the response headers.
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    header_delay: Duration,
    /// After this many content chunks, hang until `release` arrives on stdin.
    #[arg(long)]
    stall_after: Option<usize>,
    /// Runtime worker threads (default: the CPUs this process may use).
    #[arg(long)]
    threads: Option<usize>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = args.threads {
        runtime.worker_threads(n.max(1));
    }
    let runtime = match runtime.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("relaygate-sim: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(run(args))
}

async fn run(args: Args) -> ExitCode {
    let faults = Faults {
        chunks: args.chunks,
        chunk_interval: args.chunk_interval,
        header_delay: args.header_delay,
        stall_after: args.stall_after,
        ..Faults::default()
    };
    let sim = match Sim::start_on(args.listen, &args.name, faults).await {
        Ok(sim) => sim,
        Err(e) => {
            eprintln!("relaygate-sim: cannot listen on {}: {e}", args.listen);
            return ExitCode::FAILURE;
        }
    };
    println!("relaygate-sim listening on http://{}", sim.addr());
    let _ = std::io::stdout().flush();

    // stdin is read on a plain thread: tokio's stdin is a blocking thread too,
    // and a line at a time is all this needs.
    let (release_tx, mut release_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            match line {
                Ok(l) if l.trim() == "release" => {
                    if release_tx.send(()).is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(_) => return,
            }
        }
    });

    let stop = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            Some(()) = async { term.as_mut()?.recv().await } => {}
        }
    };
    tokio::pin!(stop);
    loop {
        tokio::select! {
            () = &mut stop => return ExitCode::SUCCESS,
            Some(()) = release_rx.recv() => sim.release(),
        }
    }
}

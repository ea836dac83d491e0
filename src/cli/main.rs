//! `roma-byob`: command-line front end of the engine.

mod cpu;
mod demo;
mod exec;
mod json;
mod plot;
mod shell;
mod traffic;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use roma_byob::{Config, Mode, SyscallFilter};

#[derive(Parser)]
#[command(name = "roma-byob", version, about = "Run untrusted binaries, one request per fresh sandboxed process")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Execute one request on a binary: raw protobuf on stdin/stdout, or JSON with --proto.
    Exec(exec::ExecArgs),
    /// Load the sample hello-world UDF in the best sandbox available and measure it.
    Demo(demo::DemoArgs),
    /// Open-loop traffic generator: bursts at a target QPS, latency percentiles, --find-max-qps.
    Traffic(traffic::TrafficArgs),
    /// Interactive prompt (or --commands FILE): load binaries, execute JSON requests
    /// against a proto, show responses, logs and metrics.
    Shell(shell::ShellArgs),
}

/// Engine options shared by the subcommands.
#[derive(Args, Clone, Debug)]
pub struct EngineArgs {
    /// Sandbox mode: minimal, gvisor or gvisor-debug (default: the best available).
    #[arg(long)]
    mode: Option<String>,
    /// Syscall filtering: no, worker-engine or untrusted.
    #[arg(long, default_value = "untrusted")]
    filter: String,
    /// Cores for the engine threads, e.g. 0,1 (default: all).
    #[arg(long, value_delimiter = ',')]
    cores: Vec<usize>,
    /// Path of roma-byob-runner (default: next to this binary).
    #[arg(long)]
    runner: Option<PathBuf>,
    /// Engine threads poll for this many µs before sleeping while a response is due
    /// (Config::busy_poll; 0 = off).
    #[arg(long, default_value_t = 0)]
    busy_poll_us: u64,
    /// With a backlog, engine threads let completions accumulate before waking:
    /// 100 µs per worker slot of the shard, at least 200 µs, at most this many µs
    /// (Config::batch_wait; 0 = off).
    #[arg(long, default_value_t = 1000)]
    batch_wait_us: u64,
    /// Executions a shard must have (queued or running, some queued for a worker)
    /// before waits are batched (Config::batch_min_in_flight).
    #[arg(long, default_value_t = 8)]
    batch_min_in_flight: usize,
    /// Completions that end a batched wait before --batch-wait-us has passed
    /// (Config::batch_want; 64 = the wait's full length under any load seen here)
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..))]
    batch_want: u32,
    /// Let workers run on any core instead of their engine thread's core
    /// (Config::pin_workers = false).
    #[arg(long)]
    no_pin_workers: bool,
    /// Send every request through the engine thread instead of writing it to a
    /// ready worker from the calling thread (Config::hand_over = false).
    #[arg(long)]
    no_hand_over: bool,
    /// Make each worker's channel on the engine thread and send it with the spawn
    /// order, instead of taking the runner's (Config::runner_channels = false).
    #[arg(long)]
    no_runner_channels: bool,
    /// Let the engine thread read every response, instead of Execution::wait
    /// reading a handed-over execution's response itself (Config::caller_reads = false).
    #[arg(long)]
    no_caller_reads: bool,
    /// Read every worker's ready byte on the engine thread, instead of offering
    /// workers spawned on an idle shard before it and letting the claiming caller
    /// take it (Config::lazy_readiness = false).
    #[arg(long)]
    no_lazy_readiness: bool,
    /// Write a request only after its worker's ready byte, instead of binding
    /// queued executions to workers as they are spawned and writing the request at
    /// once (Config::early_dispatch = false).
    #[arg(long)]
    no_early_dispatch: bool,
    /// Execution::wait polls this many µs for the answer before parking, when the
    /// worker runs on another core (Config::wait_spin; 0 = park at once).
    #[arg(long, default_value_t = 100)]
    wait_spin_us: u64,
    /// Cores for the sandbox (runner and workers), e.g. 1 (default: all).
    #[arg(long, value_delimiter = ',')]
    runner_cores: Vec<usize>,
    /// A worker that has not signalled readiness this many ms after its spawn is
    /// killed and counted as a start-up failure (Config::worker_start_timeout).
    #[arg(long, default_value_t = 10_000)]
    worker_start_timeout_ms: u64,
    /// Clean exit reports the sandbox may hold back and send together, at most a
    /// shard's pool less one (Config::exit_report_batch; below 2 = each at once).
    #[arg(long, default_value_t = 4)]
    exit_report_batch: usize,
    /// Longest a held exit report waits, in µs (Config::exit_report_hold).
    #[arg(long, default_value_t = 10_000)]
    exit_report_hold_us: u64,
}

impl EngineArgs {
    /// The mode to use and why, when it was not given.
    pub fn resolve_mode(&self) -> Result<(Mode, String), String> {
        if let Some(m) = &self.mode {
            let mode: Mode = m.parse().map_err(|e: roma_byob::Error| e.to_string())?;
            return Ok((mode, "chosen with --mode".into()));
        }
        let probe = Config { mode: Mode::Gvisor, ..Default::default() };
        match roma_byob::sandbox::gvisor::find_runsc(&probe) {
            Ok(path) => Ok((Mode::Gvisor, format!("the best available: runsc found at {}", path.display()))),
            Err(e) => Ok((Mode::Minimal, format!("gVisor unavailable: {}", e.message()))),
        }
    }

    pub fn config(&self, mode: Mode) -> Result<Config, String> {
        let filter: SyscallFilter = self.filter.parse().map_err(|e: roma_byob::Error| e.to_string())?;
        Ok(Config {
            mode,
            syscall_filter: filter,
            cores: self.cores.clone(),
            runner_cores: self.runner_cores.clone(),
            busy_poll: std::time::Duration::from_micros(self.busy_poll_us),
            batch_wait: std::time::Duration::from_micros(self.batch_wait_us),
            batch_min_in_flight: self.batch_min_in_flight,
            batch_want: self.batch_want as usize,
            pin_workers: !self.no_pin_workers,
            hand_over: !self.no_hand_over,
            runner_channels: !self.no_runner_channels,
            caller_reads: !self.no_caller_reads,
            lazy_readiness: !self.no_lazy_readiness,
            early_dispatch: !self.no_early_dispatch,
            wait_spin: std::time::Duration::from_micros(self.wait_spin_us),
            runner_path: self.runner.clone(),
            worker_start_timeout: std::time::Duration::from_millis(self.worker_start_timeout_ms),
            exit_report_batch: self.exit_report_batch,
            exit_report_hold: std::time::Duration::from_micros(self.exit_report_hold_us),
            ..Default::default()
        })
    }
}

/// The UDF a `--binary` option names (a path or a sample's name, see
/// `roma_byob::samples::resolve`); without one, the sample hello_world.
fn binary_arg(arg: Option<&std::path::Path>) -> PathBuf {
    arg.map_or_else(|| roma_byob::samples::path("hello_world"), roma_byob::samples::resolve)
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Exec(a) => exec::run(a),
        Command::Demo(a) => demo::run(a),
        Command::Shell(a) => shell::run(a),
        Command::Traffic(a) => traffic::run(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("roma-byob: {e}");
            ExitCode::FAILURE
        }
    }
}

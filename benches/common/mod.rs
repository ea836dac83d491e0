//! Shared helpers of the benchmarks: modes to run, engines, sample UDFs, criterion
//! configuration and HDR latency histograms (criterion's statistics are not
//! percentiles, so every latency series is also printed as p50/p90/p99/p99.9).
#![allow(dead_code)] // each bench uses a subset

use std::cell::Cell;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::Once;
use std::time::{Duration, Instant};

use criterion::Criterion;
use hdrhistogram::Histogram;
use roma_byob::{CodeToken, Config, Engine, ExecuteOptions, LoadOptions, Mode};

/// Set to 1 to run every gVisor case (default: only the cheap ones).
pub const GVISOR_ENV: &str = "ROMA_BENCH_GVISOR";

/// A sandbox mode to benchmark, and whether all its cases run or only the cheap ones.
#[derive(Clone, Copy, Debug)]
pub struct ModeCase {
    pub mode: Mode,
    pub full: bool,
}

impl ModeCase {
    pub fn name(&self) -> &'static str {
        self.mode.as_str()
    }
}

/// `minimal` always (every case); `gvisor` when runsc is installed: only the cheap
/// cases unless `ROMA_BENCH_GVISOR=1`. Says so once per benchmark binary.
pub fn modes() -> Vec<ModeCase> {
    static SAID: Once = Once::new();
    let mut v = vec![ModeCase { mode: Mode::Minimal, full: true }];
    let probe = Config { mode: Mode::Gvisor, ..Default::default() };
    match roma_byob::sandbox::gvisor::find_runsc(&probe) {
        Ok(_) => {
            let full = std::env::var(GVISOR_ENV).is_ok_and(|v| v == "1");
            if !full {
                SAID.call_once(|| {
                    eprintln!(
                        "NOTE: gvisor: only the cheap cases run (load, hello_world with 10 workers); \
                         the other gvisor cases are skipped: set {GVISOR_ENV}=1 to run them all"
                    )
                });
            }
            v.push(ModeCase { mode: Mode::Gvisor, full });
        }
        Err(e) => SAID.call_once(|| {
            eprintln!("NOTE: gvisor cases skipped: {} (apt-get install -y runsc)", e.message())
        }),
    }
    v
}

/// Small samples and short measurements: the full `cargo bench` stays within minutes
/// on 2 cores. Command-line options (`--sample-size`, `--measurement-time`) still win.
pub fn criterion() -> Criterion {
    Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
}

/// An engine in `mode`, or `None` (with the reason printed) if it cannot start here.
pub fn engine(mode: Mode) -> Option<Engine> {
    let config = Config {
        mode,
        runner_path: Some(PathBuf::from(env!("CARGO_BIN_EXE_roma-byob-runner"))),
        ..Default::default()
    };
    match Engine::new(config) {
        Ok(e) => Some(e),
        Err(e) => {
            eprintln!("SKIP {} mode: the engine does not start here: {e}", mode.as_str());
            None
        }
    }
}

/// A private copy of a built sample UDF (so that a concurrent rebuild of the samples
/// cannot swap the file mid-benchmark), or `None` (with a message) when it was not
/// built.
pub fn sample(name: &str) -> Option<PathBuf> {
    let p = roma_byob::samples::path(name);
    if !p.is_file() {
        eprintln!("SKIP {name}: sample UDF {} does not exist", p.display());
        return None;
    }
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("bench-udfs");
    let copy = dir.join(name);
    let copied = std::fs::create_dir_all(&dir)
        .and_then(|()| std::fs::copy(&p, &copy))
        .and_then(|_| std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755)));
    match copied {
        Ok(()) => Some(copy),
        Err(e) => {
            eprintln!("note: cannot copy {} ({e}); using it in place", p.display());
            Some(p)
        }
    }
}

/// Generous timeouts: a benchmark measures, it does not enforce deadlines.
pub fn opts() -> ExecuteOptions {
    ExecuteOptions { worker_wait_timeout: Duration::from_secs(30), timeout: Duration::from_secs(60), ..Default::default() }
}

pub fn load(engine: &Engine, path: &PathBuf, workers: usize, shared_memory: Option<usize>) -> Result<CodeToken, String> {
    load_with(engine, path, LoadOptions { workers, shared_memory, ..Default::default() })
}

pub fn load_with(engine: &Engine, path: &PathBuf, options: LoadOptions) -> Result<CodeToken, String> {
    let workers = options.workers;
    engine.load(path, options).map_err(|e| format!("load {} ({workers} workers): {e}", path.display()))
}

/// Time for a freshly loaded (or drained) pool of `workers` to be ready again.
pub fn refill_time(mode: Mode, workers: usize) -> Duration {
    let per_worker = if mode == Mode::Minimal { Duration::from_millis(2) } else { Duration::from_millis(20) };
    (per_worker * workers as u32).clamp(Duration::from_millis(50), Duration::from_secs(4))
}

/// Waits (once per token) for its pool to fill, so that latency cases start warm;
/// done lazily inside a benchmark so that filtered-out cases cost nothing.
pub struct Warmup {
    done: Cell<bool>,
    wait: Duration,
}

impl Warmup {
    pub fn new(mode: Mode, workers: usize) -> Warmup {
        Warmup { done: Cell::new(false), wait: refill_time(mode, workers) }
    }

    pub fn ensure(&self) {
        if !self.done.replace(true) {
            std::thread::sleep(self.wait);
        }
    }
}

/// An HDR histogram of latencies, printed once per case.
pub struct Latency {
    hist: Histogram<u64>,
}

impl Default for Latency {
    fn default() -> Self {
        Latency::new()
    }
}

impl Latency {
    pub fn new() -> Latency {
        // 1 µs .. 1 hour, 3 significant digits; longer values saturate.
        let hist = Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("constant, valid histogram bounds");
        Latency { hist }
    }

    pub fn record(&mut self, d: Duration) {
        self.hist.saturating_record(u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1));
    }

    /// Prints `label: n=…, p50/p90/p99/p99.9/max` in µs (nothing when the case was
    /// filtered out and never ran).
    pub fn print(&self, label: &str) {
        let h = &self.hist;
        if h.is_empty() {
            return;
        }
        println!(
            "{label:<60} latency µs: p50 {:>8}  p90 {:>8}  p99 {:>8}  p99.9 {:>8}  max {:>8}  (n={})",
            h.value_at_quantile(0.50),
            h.value_at_quantile(0.90),
            h.value_at_quantile(0.99),
            h.value_at_quantile(0.999),
            h.max(),
            h.len()
        );
    }
}

/// One execution, blocking; its latency goes into `lat`.
pub fn execute_once<Req, Resp>(engine: &Engine, token: &CodeToken, req: &Req, lat: &mut Latency) -> Result<(Resp, Duration), String>
where
    Req: prost::Message,
    Resp: prost::Message + Default,
{
    let start = Instant::now();
    let r = engine
        .execute::<Req, Resp>(token, req, opts())
        .and_then(|e| e.wait())
        .map_err(|e| e.to_string())?;
    let d = start.elapsed();
    lat.record(d);
    Ok((r.response, d))
}

/// `iters` sequential executions (each waits for the previous): total time.
/// Panics on a failed execution: the measurement would be meaningless.
pub fn sequential<Req, Resp>(engine: &Engine, token: &CodeToken, req: &Req, iters: u64, lat: &mut Latency, what: &str) -> Duration
where
    Req: prost::Message,
    Resp: prost::Message + Default,
{
    let mut total = Duration::ZERO;
    for _ in 0..iters {
        match execute_once::<Req, Resp>(engine, token, req, lat) {
            Ok((_, d)) => total += d,
            Err(e) => panic!("{what}: execution failed: {e}"),
        }
    }
    total
}

/// `n` executions submitted at once (callbacks); waits for all of them. Returns the
/// time from the first submission to the last completion; each execution's latency
/// (submission to completion) goes into `lat`. Panics on a failed execution.
pub fn batch<Req, Resp>(engine: &Engine, token: &CodeToken, req: &Req, n: usize, lat: &mut Latency, what: &str) -> Duration
where
    Req: prost::Message,
    Resp: prost::Message + Default + Send + 'static,
{
    let (tx, rx) = mpsc::channel::<Result<Duration, String>>();
    let start = Instant::now();
    for _ in 0..n {
        let tx = tx.clone();
        let submitted = Instant::now();
        let r = engine.execute_with_callback::<Req, Resp, _>(token, req, opts(), move |r| {
            let _ = tx.send(r.map(|_| submitted.elapsed()).map_err(|e| e.to_string()));
        });
        if let Err(e) = r {
            panic!("{what}: submit failed: {e}");
        }
    }
    drop(tx);
    for _ in 0..n {
        match rx.recv() {
            Ok(Ok(d)) => lat.record(d),
            Ok(Err(e)) => panic!("{what}: execution failed: {e}"),
            Err(_) => panic!("{what}: the engine dropped a callback"),
        }
    }
    start.elapsed()
}

/// Human-readable byte size: 1B, 1KiB, 10MiB.
pub fn bytes_label(n: usize) -> String {
    if n >= 1 << 20 && n % (1 << 20) == 0 {
        format!("{}MiB", n >> 20)
    } else if n >= 1 << 10 && n % (1 << 10) == 0 {
        format!("{}KiB", n >> 10)
    } else {
        format!("{n}B")
    }
}

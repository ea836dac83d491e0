//! `roma-byob traffic`: an open-loop traffic generator. Bursts of executions are
//! scheduled at a target rate on a dedicated scheduler thread (burst k at
//! `start + k * interval`, never waiting for completions); per-invocation and per-burst
//! latencies go into HDR histograms. `--find-max-qps` searches for the highest rate the
//! engine sustains.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Args;
use hdrhistogram::Histogram;
use prost::bytes::{Buf, BufMut};
use prost::encoding::{DecodeContext, WireType};
use roma_byob::{CodeToken, Engine, ExecuteOptions, LoadOptions, Mode, Response};

use crate::cpu::{ticks_us, PerExecution, Snapshot};
use crate::json::{self, ProtoTypes};
use crate::plot::{Anchor, Color, Plot, Text};
use crate::EngineArgs;

/// Error messages printed to stderr per run (the rest are only counted).
const MAX_PRINTED_ERRORS: usize = 5;
/// Step length of `--find-max-qps` when neither --num-queries nor --duration is given.
const DEFAULT_STEP: Duration = Duration::from_secs(3);
/// Run length when neither --num-queries nor --duration is given.
const DEFAULT_DURATION: Duration = Duration::from_secs(15);
/// Largest latency the histograms hold (1 hour, in µs); longer ones saturate.
const MAX_LATENCY_US: u64 = 3_600_000_000;

#[derive(Args, Debug)]
pub struct TrafficArgs {
    #[command(flatten)]
    engine: EngineArgs,
    /// UDF to run: a path, or the name of a sample UDF such as hello_world_static
    /// (default: the sample hello_world).
    #[arg(long)]
    binary: Option<PathBuf>,
    /// Pre-started workers for the code token.
    #[arg(long, default_value_t = 10)]
    workers: usize,
    /// Target executions per second (the start of the search with --find-max-qps).
    #[arg(long, default_value_t = 1000.0)]
    qps: f64,
    /// Executions submitted together in each burst; bursts run at qps / burst-size per second.
    #[arg(long, default_value_t = 1)]
    burst_size: usize,
    /// Total executions to submit (per step with --find-max-qps).
    #[arg(long, conflicts_with = "duration")]
    num_queries: Option<u64>,
    /// How long to generate traffic, e.g. 15s, 500ms, 2m (per step with --find-max-qps;
    /// default 15s, or 3s per step).
    #[arg(long, value_parser = parse_duration)]
    duration: Option<Duration>,
    /// File holding the raw protobuf request (default: an empty message).
    #[arg(long, conflicts_with = "proto")]
    request_file: Option<PathBuf>,
    /// .proto file describing the request (with --request-type and --json).
    #[arg(long, requires = "request_type")]
    proto: Option<PathBuf>,
    /// Full name of the request message, e.g. roma_byob.sample.SampleRequest.
    #[arg(long, requires = "proto")]
    request_type: Option<String>,
    /// The request as JSON (with --proto; default {}).
    #[arg(long, requires = "proto")]
    json: Option<String>,
    /// How long an execution may wait for a ready worker (ExecuteOptions::worker_wait_timeout).
    #[arg(long, value_parser = parse_duration, default_value = "5s")]
    connection_timeout: Duration,
    /// Execution timeout once a worker took the request.
    #[arg(long, value_parser = parse_duration, default_value = "30s")]
    timeout: Duration,
    /// --find-max-qps: a step passes while its late bursts stay under this percentage.
    #[arg(long, default_value_t = 5.0)]
    late_threshold_pct: f64,
    /// --find-max-qps: a step also needs this percentage of the target rate achieved.
    #[arg(long, default_value_t = 95.0)]
    min_throughput_pct: f64,
    /// --find-max-qps: a step also needs its p99 invocation latency at or under this
    /// (e.g. 50ms; default: no latency bound).
    #[arg(long, value_parser = parse_duration)]
    max_p99: Option<Duration>,
    /// Search for the highest QPS with late bursts under --late-threshold-pct, failures
    /// under 1 %, throughput at least --min-throughput-pct of the target (and p99 within
    /// --max-p99 if given).
    #[arg(long)]
    find_max_qps: bool,
    /// --find-max-qps: the most steps to run.
    #[arg(long, default_value_t = 12)]
    max_steps: usize,
    /// Write the report as JSON to this file.
    #[arg(long)]
    output: Option<PathBuf>,
    /// Draw the latency percentile distribution into this file: an SVG document
    /// (`.svg`) or a PNG image (`.png`).
    #[arg(long)]
    plot: Option<PathBuf>,
    /// Shared-memory transport: bytes per worker region (e.g. 67108864, 64M, 1G).
    #[arg(long, value_parser = parse_bytes)]
    shared_memory: Option<usize>,
    /// No progress line on stderr (it is also off when stderr is not a terminal).
    #[arg(long)]
    no_progress: bool,
    /// Run the scheduler thread at normal priority. By default it asks for SCHED_FIFO
    /// priority 1 (it sleeps between bursts), so that bursts leave on time even while
    /// the engine and its workers keep every core busy; without the privilege it stays
    /// at normal priority and says so.
    #[arg(long)]
    no_realtime: bool,
    /// Zygote start: fork workers from a pre-main template of the binary
    /// (minimal mode; dynamically linked glibc UDFs; see LoadOptions::zygote).
    #[arg(long)]
    zygote: bool,
}

/// Parses a duration such as `15s`, `500ms`, `2m`, `1m30s`, `1.5s`, `250us`, `1h`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let s = text.trim();
    if s.is_empty() {
        return Err("empty duration: use e.g. 15s, 500ms or 2m".into());
    }
    let mut rest = s;
    let mut total = 0f64;
    while !rest.is_empty() {
        let num_end = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(rest.len());
        let (num, tail) = rest.split_at(num_end);
        let unit_end = tail.find(|c: char| c.is_ascii_digit() || c == '.').unwrap_or(tail.len());
        let (unit, next) = tail.split_at(unit_end);
        let value: f64 = num.parse().map_err(|_| format!("invalid duration {text:?}: use e.g. 15s, 500ms or 2m"))?;
        let scale = match unit.trim() {
            "h" | "hr" | "hour" | "hours" => 3600.0,
            "m" | "min" | "mins" | "minute" | "minutes" => 60.0,
            "s" | "sec" | "secs" | "second" | "seconds" => 1.0,
            "ms" | "msec" | "millis" => 1e-3,
            "us" | "µs" | "usec" | "micros" => 1e-6,
            "ns" | "nsec" | "nanos" => 1e-9,
            "" if next.is_empty() && rest.len() == s.len() => 1.0, // a bare number: seconds
            other => return Err(format!("invalid duration {text:?}: unknown unit {other:?} (use h, m, s, ms, us, ns)")),
        };
        total += value * scale;
        rest = next;
    }
    Duration::try_from_secs_f64(total).map_err(|e| format!("invalid duration {text:?}: {e}"))
}

/// Parses a byte count: `67108864`, `64K`, `64M`, `1G` (binary multiples; `KiB`/`KB` alike).
pub fn parse_bytes(text: &str) -> Result<usize, String> {
    let s = text.trim();
    let end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(end);
    let value: usize = num.parse().map_err(|_| format!("invalid byte count {text:?}: use e.g. 67108864 or 64M"))?;
    let scale: usize = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        other => return Err(format!("invalid byte count {text:?}: unknown unit {other:?} (use K, M or G)")),
    };
    value.checked_mul(scale).ok_or_else(|| format!("byte count {text:?} is too large"))
}

/// A request already serialised: its bytes are the message's encoding.
struct RawRequest<'a>(&'a [u8]);

impl prost::Message for RawRequest<'_> {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        buf.put_slice(self.0);
    }

    fn merge_field(&mut self, tag: u32, wire_type: WireType, buf: &mut impl Buf, ctx: DecodeContext) -> Result<(), prost::DecodeError> {
        prost::encoding::skip_field(wire_type, tag, buf, ctx)
    }

    fn encoded_len(&self) -> usize {
        self.0.len()
    }

    fn clear(&mut self) {
        self.0 = &[];
    }
}

/// A response whose content is not needed: every field is skipped (so it must be a
/// well-formed protobuf message, as the Roma protocol requires); only its size is kept.
#[derive(Default)]
struct SkippedResponse {
    bytes: usize,
}

impl prost::Message for SkippedResponse {
    fn encode_raw(&self, _buf: &mut impl BufMut) {}

    fn merge_field(&mut self, tag: u32, wire_type: WireType, buf: &mut impl Buf, ctx: DecodeContext) -> Result<(), prost::DecodeError> {
        let before = buf.remaining();
        prost::encoding::skip_field(wire_type, tag, buf, ctx)?;
        self.bytes += before - buf.remaining();
        Ok(())
    }

    fn encoded_len(&self) -> usize {
        0
    }

    fn clear(&mut self) {
        self.bytes = 0;
    }
}

/// How much traffic one run (or one search step) sends.
#[derive(Clone, Copy, Debug)]
enum Limit {
    Queries(u64),
    Duration(Duration),
}

/// Latency summary of one histogram, in µs.
#[derive(Clone, Copy, Debug, Default)]
struct Summary {
    count: u64,
    min: u64,
    p50: u64,
    p90: u64,
    p95: u64,
    p99: u64,
    p999: u64,
    max: u64,
    mean: f64,
}

impl Summary {
    fn of(h: &Histogram<u64>) -> Summary {
        if h.is_empty() {
            return Summary::default();
        }
        Summary {
            count: h.len(),
            min: h.min(),
            p50: h.value_at_quantile(0.50),
            p90: h.value_at_quantile(0.90),
            p95: h.value_at_quantile(0.95),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
            mean: h.mean(),
        }
    }
}

/// Result of one run at one target rate.
struct StepResult {
    target_qps: f64,
    burst_size: usize,
    interval: Duration,
    late_threshold: Duration,
    bursts: u64,
    executions: u64,
    successes: u64,
    failures: u64,
    late_bursts: u64,
    /// The most executions seen waiting for a worker (`Engine::queued_executions`,
    /// read after each burst is submitted).
    peak_queued: u64,
    /// Whether the scheduler thread ran with SCHED_FIFO.
    realtime: bool,
    /// From the first burst's scheduled time to the last completion.
    elapsed: Duration,
    response_bytes: u64,
    invocations: Histogram<u64>,
    burst_latency: Histogram<u64>,
    /// CPU per submitted execution from the first burst to the last completion
    /// (the completion callbacks, which run on the engine threads, included).
    cpu: Option<PerExecution>,
}

impl StepResult {
    fn throughput(&self) -> f64 {
        let s = self.elapsed.as_secs_f64();
        if s > 0.0 {
            self.successes as f64 / s
        } else {
            0.0
        }
    }
    fn failure_pct(&self) -> f64 {
        pct(self.failures, self.executions)
    }
    fn late_pct(&self) -> f64 {
        pct(self.late_bursts, self.bursts)
    }
}

fn pct(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 * 100.0 / whole as f64
    }
}

fn us(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1)
}

fn histogram() -> Result<Histogram<u64>, String> {
    Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).map_err(|e| format!("cannot create a histogram: {e}"))
}

/// What the completion callbacks (on the engine threads) record.
struct Stats {
    invocations: Histogram<u64>,
    bursts: Histogram<u64>,
    last_done: Option<Instant>,
    errors: Vec<String>,
    response_bytes: u64,
}

/// State shared by the scheduler, the completion callbacks and the monitor.
struct Shared {
    stats: Mutex<Stats>,
    submitted: AtomicU64,
    completed: AtomicU64,
    failed: AtomicU64,
    late: AtomicU64,
    bursts_sent: AtomicU64,
    peak_queued: AtomicU64,
    scheduler_done: AtomicBool,
    realtime: AtomicBool,
}

impl Shared {
    fn record(&self, latency: Duration, outcome: Result<usize, String>, burst: &Burst, now: Instant) {
        let burst_done = burst.remaining.fetch_sub(1, Ordering::AcqRel) == 1;
        if let Ok(mut s) = self.stats.lock() {
            match outcome {
                Ok(bytes) => {
                    s.invocations.saturating_record(us(latency));
                    s.response_bytes += bytes as u64;
                }
                Err(e) => {
                    if s.errors.len() < MAX_PRINTED_ERRORS {
                        s.errors.push(e);
                    }
                }
            }
            if burst_done {
                s.bursts.saturating_record(us(now.saturating_duration_since(burst.scheduled)));
            }
            if s.last_done.is_none_or(|t| now > t) {
                s.last_done = Some(now);
            }
        }
        self.completed.fetch_add(1, Ordering::AcqRel);
    }
}

/// One burst: when it was due and how many of its executions are still running.
struct Burst {
    scheduled: Instant,
    remaining: AtomicUsize,
}

/// Everything a run needs that does not change between steps.
struct Runner<'a> {
    engine: &'a Engine,
    token: &'a CodeToken,
    request: &'a [u8],
    options: ExecuteOptions,
    burst_size: usize,
    progress: bool,
    /// Ask for SCHED_FIFO on the scheduler thread.
    realtime: bool,
    /// How long to wait for stragglers once everything was submitted.
    drain_limit: Duration,
}

impl Runner<'_> {
    fn run(&self, qps: f64, limit: Limit, label: &str) -> Result<StepResult, String> {
        let burst_size = self.burst_size;
        let interval = Duration::from_secs_f64(burst_size as f64 / qps);
        let (bursts, executions) = match limit {
            Limit::Queries(n) => (n.div_ceil(burst_size as u64), n),
            Limit::Duration(d) => {
                // The epsilon keeps 3 s at 1500 qps at 4500 executions despite rounding.
                let b = ((d.as_secs_f64() / interval.as_secs_f64() + 1e-6).floor() as u64).max(1);
                (b, b * burst_size as u64)
            }
        };
        let late_threshold = (interval / 10).max(Duration::from_millis(1));
        let shared = Arc::new(Shared {
            stats: Mutex::new(Stats {
                invocations: histogram()?,
                bursts: histogram()?,
                last_done: None,
                errors: Vec::new(),
                response_bytes: 0,
            }),
            submitted: AtomicU64::new(0),
            completed: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            late: AtomicU64::new(0),
            bursts_sent: AtomicU64::new(0),
            peak_queued: AtomicU64::new(0),
            scheduler_done: AtomicBool::new(false),
            realtime: AtomicBool::new(false),
        });
        // A short lead so the first burst is not late because of thread start-up.
        let start = Instant::now() + Duration::from_millis(5);
        let schedule_span = interval.mul_f64(bursts.saturating_sub(1) as f64);
        let mut printed_errors = 0usize;

        let progress = Progress::new(self.progress, label, executions, schedule_span);
        let cpu_before = Snapshot::take(self.engine.sandbox_pid());
        std::thread::scope(|scope| -> Result<(), String> {
            let sched = {
                let shared = Arc::clone(&shared);
                std::thread::Builder::new()
                    .name("traffic-scheduler".into())
                    .spawn_scoped(scope, move || {
                        self.schedule(&shared, start, interval, bursts, executions, late_threshold);
                        shared.scheduler_done.store(true, Ordering::Release);
                    })
                    .map_err(|e| format!("cannot start the scheduler thread: {e}"))?
            };
            let mut drained_since: Option<Instant> = None;
            loop {
                std::thread::sleep(Duration::from_millis(50));
                printed_errors = print_new_errors(&shared, printed_errors);
                progress.update(&shared, start);
                // is_finished: a scheduler that panicked never sets scheduler_done.
                let done = shared.scheduler_done.load(Ordering::Acquire) || sched.is_finished();
                let submitted = shared.submitted.load(Ordering::Acquire);
                let completed = shared.completed.load(Ordering::Acquire);
                if done && completed >= submitted {
                    break;
                }
                if done {
                    let since = *drained_since.get_or_insert_with(Instant::now);
                    if since.elapsed() > self.drain_limit {
                        let missing = submitted.saturating_sub(completed);
                        eprintln!("  {missing} executions did not complete within {:?}; counted as failures", self.drain_limit);
                        shared.failed.fetch_add(missing, Ordering::AcqRel);
                        shared.completed.fetch_add(missing, Ordering::AcqRel);
                        break;
                    }
                }
            }
            if sched.join().is_err() {
                return Err("the scheduler thread panicked".into());
            }
            Ok(())
        })?;
        let cpu_after = Snapshot::take(self.engine.sandbox_pid());
        progress.finish();
        print_new_errors(&shared, printed_errors);

        let stats = shared.stats.lock().map_err(|_| "the statistics lock was poisoned".to_string())?;
        let failures = shared.failed.load(Ordering::Acquire);
        let submitted = shared.submitted.load(Ordering::Acquire);
        let elapsed = stats.last_done.map(|t| t.saturating_duration_since(start)).unwrap_or_default();
        Ok(StepResult {
            target_qps: qps,
            burst_size,
            interval,
            late_threshold,
            bursts: shared.bursts_sent.load(Ordering::Acquire),
            executions: submitted,
            successes: submitted.saturating_sub(failures),
            failures,
            late_bursts: shared.late.load(Ordering::Acquire),
            peak_queued: shared.peak_queued.load(Ordering::Acquire),
            realtime: shared.realtime.load(Ordering::Acquire),
            elapsed,
            response_bytes: stats.response_bytes,
            invocations: stats.invocations.clone(),
            burst_latency: stats.bursts.clone(),
            cpu: cpu_before.per_execution(&cpu_after, submitted),
        })
    }

    /// The scheduler thread: burst k at `start + k * interval`, whatever happened before.
    fn schedule(&self, shared: &Arc<Shared>, start: Instant, interval: Duration, bursts: u64, executions: u64, late_threshold: Duration) {
        let request = RawRequest(self.request);
        if self.realtime {
            shared.realtime.store(set_realtime(), Ordering::Release);
        }
        let mut left = executions;
        for k in 0..bursts {
            let due = start + interval.mul_f64(k as f64);
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            let size = (self.burst_size as u64).min(left) as usize;
            left -= size as u64;
            let burst = Arc::new(Burst { scheduled: due, remaining: AtomicUsize::new(size) });
            for _ in 0..size {
                let sh = Arc::clone(shared);
                let b = Arc::clone(&burst);
                let submitted_at = Instant::now();
                shared.submitted.fetch_add(1, Ordering::AcqRel);
                let callback = move |r: roma_byob::Result<Response<SkippedResponse>>| {
                    let now = Instant::now();
                    let outcome = match r {
                        Ok(resp) => Ok(resp.response.bytes),
                        Err(e) => {
                            sh.failed.fetch_add(1, Ordering::AcqRel);
                            Err(e.to_string())
                        }
                    };
                    sh.record(now.saturating_duration_since(submitted_at), outcome, &b, now);
                };
                if let Err(e) = self.engine.execute_with_callback::<_, SkippedResponse, _>(
                    self.token,
                    &request,
                    self.options.clone(),
                    callback,
                ) {
                    // The callback was dropped without running: record the failure here.
                    shared.failed.fetch_add(1, Ordering::AcqRel);
                    shared.record(Duration::ZERO, Err(format!("submit: {e}")), &burst, Instant::now());
                }
            }
            if Instant::now().saturating_duration_since(due) > late_threshold {
                shared.late.fetch_add(1, Ordering::AcqRel);
            }
            // The backlog is at its highest right after a burst.
            if let Ok(queued) = self.engine.queued_executions(self.token) {
                shared.peak_queued.fetch_max(queued as u64, Ordering::AcqRel);
            }
            shared.bursts_sent.fetch_add(1, Ordering::AcqRel);
        }
    }
}

/// Moves the calling thread to SCHED_FIFO priority 1; false when not permitted.
fn set_realtime() -> bool {
    let param = libc::sched_param { sched_priority: 1 };
    // SAFETY: pid 0 is the calling thread; `param` is a valid sched_param that outlives
    // the call. Only this (mostly sleeping) scheduler thread changes policy.
    unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) == 0 }
}

fn print_new_errors(shared: &Shared, printed: usize) -> usize {
    let Ok(stats) = shared.stats.lock() else { return printed };
    for e in stats.errors.iter().skip(printed) {
        eprintln!("  execution failed: {e}");
    }
    if stats.errors.len() == MAX_PRINTED_ERRORS && printed < MAX_PRINTED_ERRORS {
        eprintln!("  (further errors are only counted)");
    }
    stats.errors.len()
}

/// A one-line progress display on stderr, redrawn in place.
struct Progress {
    enabled: bool,
    label: String,
    total: u64,
    span: Duration,
}

impl Progress {
    fn new(wanted: bool, label: &str, total: u64, span: Duration) -> Progress {
        Progress { enabled: wanted && std::io::stderr().is_terminal(), label: label.to_string(), total, span }
    }

    fn update(&self, shared: &Shared, start: Instant) {
        if !self.enabled {
            return;
        }
        let submitted = shared.submitted.load(Ordering::Relaxed);
        let completed = shared.completed.load(Ordering::Relaxed);
        let failed = shared.failed.load(Ordering::Relaxed);
        let late = shared.late.load(Ordering::Relaxed);
        let frac = if self.total == 0 { 1.0 } else { completed as f64 / self.total as f64 };
        let width = 30usize;
        let filled = ((frac.clamp(0.0, 1.0) * width as f64) as usize).min(width);
        let bar: String = "#".repeat(filled) + &"-".repeat(width - filled);
        let t = Instant::now().saturating_duration_since(start).as_secs_f64();
        let mut err = std::io::stderr().lock();
        let _ = write!(
            err,
            "\r\x1b[2K{}[{bar}] {:>3.0}%  {t:.1}/{:.1} s  sent {submitted}  done {completed}  failed {failed}  late bursts {late}",
            self.label,
            frac * 100.0,
            self.span.as_secs_f64()
        );
        let _ = err.flush();
    }

    fn finish(&self) {
        if self.enabled {
            let mut err = std::io::stderr().lock();
            let _ = write!(err, "\r\x1b[2K");
            let _ = err.flush();
        }
    }
}

/// The outcome of `--find-max-qps`.
struct Search {
    steps: Vec<(StepResult, bool)>,
    best: Option<usize>,
    /// A rate above the best one failed (otherwise the search ran out of steps going up).
    bounded: bool,
}

struct Header {
    mode: Mode,
    binary: PathBuf,
    workers: usize,
    shared_memory: Option<usize>,
}

pub fn run(a: TrafficArgs) -> Result<(), String> {
    if !(a.qps.is_finite() && a.qps > 0.0) {
        return Err(format!("--qps must be a positive number, not {}", a.qps));
    }
    if a.burst_size == 0 {
        return Err("--burst-size must be at least 1".into());
    }
    if a.workers == 0 {
        return Err("--workers must be at least 1".into());
    }
    if a.num_queries == Some(0) {
        return Err("--num-queries must be at least 1".into());
    }
    if a.duration.is_some_and(|d| d.is_zero()) {
        return Err("--duration must be positive".into());
    }
    // Percentages outside these ranges would let every step pass or none.
    if !(a.late_threshold_pct > 0.0 && a.late_threshold_pct <= 100.0) {
        return Err(format!("--late-threshold-pct must be above 0 and at most 100, not {}", a.late_threshold_pct));
    }
    if !(a.min_throughput_pct >= 0.0 && a.min_throughput_pct <= 100.0) {
        return Err(format!("--min-throughput-pct must be from 0 to 100, not {}", a.min_throughput_pct));
    }
    if a.max_steps == 0 {
        return Err("--max-steps must be at least 1".into());
    }
    // Checked before any traffic runs; the format is used at the end.
    let plot = a.plot.as_deref().map(|p| check_plot_path(p).map(|format| (p, format))).transpose()?;
    let (mode, why) = a.engine.resolve_mode()?;
    let binary = crate::binary_arg(a.binary.as_deref());
    let request = build_request(&a)?;

    let engine = Engine::new(a.engine.config(mode)?).map_err(|e| format!("cannot start the engine: {e}"))?;
    let token = engine
        .load(&binary, LoadOptions { workers: a.workers, shared_memory: a.shared_memory, zygote: a.zygote, ..Default::default() })
        .map_err(|e| format!("cannot load {}: {e}", binary.display()))?;
    let options = ExecuteOptions { worker_wait_timeout: a.connection_timeout, timeout: a.timeout, ..Default::default() };

    println!("roma-byob traffic");
    println!("  mode: {} ({why}), syscall filter: {}", mode.as_str(), a.engine.filter);
    println!("  binary: {}", binary.display());
    println!(
        "  workers: {}, request: {} bytes{}",
        a.workers,
        request.len(),
        a.shared_memory.map(|b| format!(", shared memory: {b} bytes per worker")).unwrap_or_default()
    );
    if a.zygote {
        println!("  workers start from a zygote template (--zygote)");
    }

    // One execution first: a binary that cannot answer fails here with its error,
    // not as thousands of failures.
    engine
        .execute_raw(&token, &request, options.clone())
        .and_then(|e| e.wait())
        .map_err(|e| format!("the first execution failed: {e}"))?;
    settle(mode, a.workers);

    let runner = Runner {
        engine: &engine,
        token: &token,
        request: &request,
        options: options.clone(),
        burst_size: a.burst_size,
        progress: !a.no_progress,
        realtime: !a.no_realtime,
        drain_limit: a.connection_timeout + a.timeout + Duration::from_secs(5),
    };
    let header = Header { mode, binary: binary.clone(), workers: a.workers, shared_memory: a.shared_memory };

    let (result, search) = if a.find_max_qps {
        let search = find_max(&runner, &a, mode)?;
        let Some(best) = search.best else {
            engine.shutdown();
            return Err(format!(
                "no rate passed (late bursts < {}%, failures < 1%, throughput >= {}% of target{}); the lowest tried was {:.1} qps",
                a.late_threshold_pct,
                a.min_throughput_pct,
                a.max_p99.map(|m| format!(", p99 <= {} µs", us(m))).unwrap_or_default(),
                search.steps.iter().map(|(s, _)| s.target_qps).fold(f64::INFINITY, f64::min)
            ));
        };
        let mut steps = search.steps;
        let best_result = steps.swap_remove(best).0;
        let bounded = steps.iter().any(|(s, pass)| !pass && s.target_qps > best_result.target_qps);
        let rest = Search { steps, best: None, bounded };
        println!();
        println!("max sustainable rate: {:.0} qps; the best passing step:", best_result.target_qps);
        if !bounded {
            println!(
                "  (no higher rate failed within --max-steps {}: the real maximum may be higher)",
                a.max_steps
            );
        }
        (best_result, Some(rest))
    } else {
        let limit = match (a.num_queries, a.duration) {
            (Some(n), _) => Limit::Queries(n),
            (None, Some(d)) => Limit::Duration(d),
            (None, None) => Limit::Duration(DEFAULT_DURATION),
        };
        (runner.run(a.qps, limit, "")?, None)
    };
    engine.shutdown();

    print_report(&header, &result);
    if let Some(path) = &a.output {
        let json = report_json(&header, &result, search.as_ref(), &a);
        let text = serde_json::to_string_pretty(&json).map_err(|e| format!("cannot render the JSON report: {e}"))?;
        std::fs::write(path, text + "\n").map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        println!("  report written to {}", path.display());
    }
    if let Some((path, format)) = plot {
        let plot = latency_plot(&header, &result);
        let bytes = match format {
            PlotFormat::Svg => plot.to_svg().into_bytes(),
            PlotFormat::Png => plot.to_png()?,
        };
        std::fs::write(path, bytes).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        println!("  latency plot written to {}", path.display());
    }
    Ok(())
}

/// Lets a drained pool refill before measuring: the workers start in the background.
fn settle(mode: Mode, workers: usize) {
    let per_worker = if mode == Mode::Minimal { Duration::from_millis(1) } else { Duration::from_millis(15) };
    let wait = (per_worker * workers.min(1000) as u32).clamp(Duration::from_millis(100), Duration::from_secs(3));
    std::thread::sleep(wait);
}

fn find_max(runner: &Runner<'_>, a: &TrafficArgs, mode: Mode) -> Result<Search, String> {
    let limit = match (a.num_queries, a.duration) {
        (Some(n), _) => Limit::Queries(n),
        (None, Some(d)) => Limit::Duration(d),
        (None, None) => Limit::Duration(DEFAULT_STEP),
    };
    println!(
        "searching for the highest rate with late bursts < {}%, failures < 1%, throughput >= {}% of target{} ({} steps at most, each {})",
        a.late_threshold_pct,
        a.min_throughput_pct,
        a.max_p99.map(|m| format!(", p99 <= {} µs", us(m))).unwrap_or_default(),
        a.max_steps,
        match limit {
            Limit::Queries(n) => format!("{n} executions"),
            Limit::Duration(d) => format!("{:.1} s", d.as_secs_f64()),
        }
    );
    let mut steps: Vec<(StepResult, bool)> = Vec::new();
    let mut best: Option<usize> = None;
    let mut lowest_fail: Option<f64> = None;
    let mut qps = a.qps;
    for step in 1..=a.max_steps {
        let label = format!("step {step} ({qps:.0} qps) ");
        let r = runner.run(qps, limit, &label)?;
        let inv = Summary::of(&r.invocations);
        let pass = r.failure_pct() < 1.0
            && r.late_pct() < a.late_threshold_pct
            && r.throughput() >= r.target_qps * a.min_throughput_pct / 100.0
            && a.max_p99.is_none_or(|m| inv.p99 <= us(m));
        println!(
            "  step {step:>2}: {:>9.1} qps -> {:>9.1}/s  failures {:>5.1}%  late bursts {:>5.1}%  p50 {:>7} µs  p99 {:>8} µs  backlog {:>6}  {}",
            qps,
            r.throughput(),
            r.failure_pct(),
            r.late_pct(),
            inv.p50,
            inv.p99,
            r.peak_queued,
            if pass { "pass" } else { "FAIL" }
        );
        if pass {
            if best.is_none_or(|b| qps > steps[b].0.target_qps) {
                best = Some(steps.len());
            }
        } else {
            lowest_fail = Some(lowest_fail.map_or(qps, |f: f64| f.min(qps)));
        }
        steps.push((r, pass));
        let best_qps = best.map(|b| steps[b].0.target_qps);
        qps = match (best_qps, lowest_fail) {
            (Some(lo), None) => lo * 2.0,
            (None, Some(hi)) => {
                if hi / 2.0 < 1.0 {
                    break;
                }
                hi / 2.0
            }
            (Some(lo), Some(hi)) => {
                if hi <= lo * 1.05 {
                    break;
                }
                ((lo + hi) / 2.0).round()
            }
            (None, None) => break,
        };
        settle(mode, a.workers);
    }
    Ok(Search { steps, best, bounded: lowest_fail.is_some() })
}

fn build_request(a: &TrafficArgs) -> Result<Vec<u8>, String> {
    if let Some(p) = &a.request_file {
        return std::fs::read(p).map_err(|e| format!("cannot read the request file {}: {e}", p.display()));
    }
    if let Some(p) = &a.proto {
        let types = ProtoTypes::compile(p)?;
        let desc = types.message(a.request_type.as_deref().unwrap_or_default())?;
        return json::json_to_bytes(&desc, a.json.as_deref().unwrap_or("{}"));
    }
    Ok(Vec::new())
}

/// The plot's format, from `--plot`'s file name: an SVG document or a PNG image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PlotFormat {
    Svg,
    Png,
}

fn check_plot_path(p: &Path) -> Result<PlotFormat, String> {
    let ext = p.extension().and_then(|e| e.to_str()).map(|e| e.to_ascii_lowercase()).unwrap_or_default();
    match ext.as_str() {
        "svg" => Ok(PlotFormat::Svg),
        "png" => Ok(PlotFormat::Png),
        _ => Err(format!("--plot {}: the file name must end in .svg or .png", p.display())),
    }
}

fn print_report(h: &Header, r: &StepResult) {
    let inv = Summary::of(&r.invocations);
    let burst = Summary::of(&r.burst_latency);
    println!("report");
    println!("  mode: {}   workers: {}   binary: {}", h.mode.as_str(), h.workers, h.binary.display());
    println!(
        "  target: {:.1} executions/s in bursts of {} (a burst every {:.3} ms), {} executions in {} bursts",
        r.target_qps,
        r.burst_size,
        r.interval.as_secs_f64() * 1e3,
        r.executions,
        r.bursts
    );
    println!(
        "  achieved: {:.1} executions/s ({} succeeded in {:.3} s, first burst to last completion)",
        r.throughput(),
        r.successes,
        r.elapsed.as_secs_f64()
    );
    println!("  failures: {} ({:.2}%)", r.failures, r.failure_pct());
    println!(
        "  scheduler thread: {}",
        if r.realtime { "SCHED_FIFO priority 1" } else { "normal priority (SCHED_FIFO not used or not permitted)" }
    );
    println!(
        "  late bursts: {} of {} ({:.2}%; late = submitted more than {:.3} ms after schedule)",
        r.late_bursts,
        r.bursts,
        r.late_pct(),
        r.late_threshold.as_secs_f64() * 1e3
    );
    println!("  backlog: at most {} executions waited for a worker (read after each burst)", r.peak_queued);
    if let Some(c) = r.cpu {
        println!(
            "  CPU per execution: engine threads {:.1} µs, {:.2} wake-ups (schedstat; the completion callbacks included), runner {}, workers {} (10 ms ticks)",
            c.engine_us,
            c.engine_wakeups,
            ticks_us(c.runner_us),
            ticks_us(c.workers_us)
        );
    }
    println!("  latency (µs)        count      min      p50      p90      p95      p99    p99.9      max");
    for (name, s) in [("invocation", inv), ("burst", burst)] {
        println!(
            "    {name:<12} {:>9} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8}",
            s.count, s.min, s.p50, s.p90, s.p95, s.p99, s.p999, s.max
        );
    }
}

fn step_json(r: &StepResult) -> serde_json::Value {
    let inv = Summary::of(&r.invocations);
    let burst = Summary::of(&r.burst_latency);
    serde_json::json!({
        "target_qps": r.target_qps,
        "burst_size": r.burst_size,
        "burst_interval_us": r.interval.as_secs_f64() * 1e6,
        "bursts": r.bursts,
        "executions": r.executions,
        "successes": r.successes,
        "failures": r.failures,
        "failure_pct": r.failure_pct(),
        "late_bursts": r.late_bursts,
        "late_burst_pct": r.late_pct(),
        "late_threshold_us": r.late_threshold.as_secs_f64() * 1e6,
        "peak_queued": r.peak_queued,
        "scheduler_realtime": r.realtime,
        "elapsed_s": r.elapsed.as_secs_f64(),
        "throughput_per_s": r.throughput(),
        "response_bytes": r.response_bytes,
        "count": inv.count,
        "min_us": inv.min,
        "mean_us": inv.mean,
        "p50_us": inv.p50,
        "p90_us": inv.p90,
        "p95_us": inv.p95,
        "p99_us": inv.p99,
        "p999_us": inv.p999,
        "max_us": inv.max,
        "burst_count": burst.count,
        "burst_min_us": burst.min,
        "burst_mean_us": burst.mean,
        "burst_p50_us": burst.p50,
        "burst_p90_us": burst.p90,
        "burst_p95_us": burst.p95,
        "burst_p99_us": burst.p99,
        "burst_p999_us": burst.p999,
        "burst_max_us": burst.max,
        "engine_cpu_us": r.cpu.map(|c| c.engine_us),
        "engine_wakeups": r.cpu.map(|c| c.engine_wakeups),
        "runner_cpu_us": r.cpu.and_then(|c| c.runner_us),
        "workers_cpu_us": r.cpu.and_then(|c| c.workers_us),
    })
}

fn report_json(h: &Header, r: &StepResult, search: Option<&Search>, a: &TrafficArgs) -> serde_json::Value {
    let mut v = step_json(r);
    if let Some(obj) = v.as_object_mut() {
        obj.insert("mode".into(), h.mode.as_str().into());
        obj.insert("binary".into(), h.binary.display().to_string().into());
        obj.insert("workers".into(), h.workers.into());
        obj.insert("shared_memory".into(), h.shared_memory.map_or(serde_json::Value::Null, Into::into));
        obj.insert("zygote".into(), a.zygote.into());
        obj.insert("connection_timeout_ms".into(), (a.connection_timeout.as_millis() as u64).into());
        obj.insert("timeout_ms".into(), (a.timeout.as_millis() as u64).into());
        if let Some(s) = search {
            obj.insert("max_qps".into(), r.target_qps.into());
            obj.insert(
                "search".into(),
                serde_json::json!({
                    "late_threshold_pct": a.late_threshold_pct,
                    "min_throughput_pct": a.min_throughput_pct,
                    "upper_bound_found": s.bounded,
                    "max_p99_us": a.max_p99.map(us),
                    "other_steps": s.steps.iter().map(|(st, pass)| {
                        let mut j = step_json(st);
                        if let Some(o) = j.as_object_mut() {
                            o.insert("pass".into(), (*pass).into());
                        }
                        j
                    }).collect::<Vec<_>>(),
                }),
            );
        }
    }
    v
}

/// A "nice" axis step (1, 2 or 5 times a power of ten) giving about `ticks` ticks.
fn nice_step(max: f64, ticks: f64) -> f64 {
    let raw = (max / ticks).max(f64::MIN_POSITIVE);
    let mag = 10f64.powf(raw.log10().floor());
    let norm = raw / mag;
    let n = if norm <= 1.0 {
        1.0
    } else if norm <= 2.0 {
        2.0
    } else if norm <= 5.0 {
        5.0
    } else {
        10.0
    };
    n * mag
}

/// Percentile plot (x: percentile on a "nines" scale, y: latency) of the invocation and
/// burst latencies.
fn latency_plot(h: &Header, r: &StepResult) -> Plot {
    const W: f64 = 960.0;
    const H: f64 = 540.0;
    const L: f64 = 90.0;
    const R: f64 = 30.0;
    const T: f64 = 70.0;
    const B: f64 = 70.0;
    const GRID: Color = Color(0xdd, 0xdd, 0xdd);
    let pw = W - L - R;
    let ph = H - T - B;
    let count = r.invocations.len().max(r.burst_latency.len());
    // Up to the percentile the data can resolve: 99% for <1000 samples, 99.9% for <10k, ...
    let nines = ((count.max(1) as f64).log10().ceil()).clamp(2.0, 6.0);
    let series: Vec<(&str, Color, &Histogram<u64>)> =
        vec![("invocation", Color(0x1f, 0x77, 0xb4), &r.invocations), ("burst", Color(0xd6, 0x27, 0x28), &r.burst_latency)];
    let ymax_us = series.iter().map(|(_, _, h)| h.max()).max().unwrap_or(0).max(1) as f64;
    let in_ms = ymax_us >= 10_000.0;
    let unit_div = if in_ms { 1000.0 } else { 1.0 };
    let ymax = ymax_us / unit_div;
    let ystep = nice_step(ymax, 6.0);
    let ytop = (ymax / ystep).ceil().max(1.0) * ystep;
    let px = |x: f64| L + x / nines * pw;
    let py = |y: f64| T + ph - (y / ytop) * ph;

    let mut plot = Plot::new(W, H);
    let name = h.binary.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
    plot.text(Text {
        bold: true,
        ..Text::new(
            W / 2.0,
            26.0,
            format!(
                "roma-byob traffic: {name}, {} mode, {} workers, {:.0} qps target, bursts of {}",
                h.mode.as_str(),
                h.workers,
                r.target_qps,
                r.burst_size
            ),
            16.0,
            Anchor::Middle,
        )
    });
    plot.text(Text {
        color: Color(0x44, 0x44, 0x44),
        ..Text::new(
            W / 2.0,
            48.0,
            format!(
                "achieved {:.1}/s, {} executions, {} failures ({:.2}%), late bursts {:.2}%",
                r.throughput(),
                r.executions,
                r.failures,
                r.failure_pct(),
                r.late_pct()
            ),
            13.0,
            Anchor::Middle,
        )
    });
    // Grid and axes.
    let mut y = 0.0;
    while y <= ytop + ystep * 1e-9 {
        let yy = py(y);
        plot.line((L, yy), (L + pw, yy), GRID, 1.0);
        let label = if ystep < 1.0 { format!("{y:.1}") } else { format!("{y:.0}") };
        plot.text(Text::new(L - 8.0, yy + 4.0, label, 13.0, Anchor::End));
        y += ystep;
    }
    let mut ticks: Vec<(f64, String)> = vec![(0.0, "0%".into()), (2f64.log10(), "50%".into())];
    for n in 1..=(nines as u32) {
        let pctl = 100.0 - 100.0 / 10f64.powi(n as i32);
        let label = format!("{pctl:.*}%", (n.saturating_sub(2)) as usize);
        ticks.push((n as f64, label));
    }
    for (x, label) in ticks {
        let xx = px(x);
        plot.line((xx, T), (xx, T + ph), GRID, 1.0);
        plot.text(Text::new(xx, T + ph + 20.0, label, 13.0, Anchor::Middle));
    }
    plot.rect(L, T, pw, ph, Color::BLACK);
    plot.text(Text::new(L + pw / 2.0, H - 20.0, "percentile", 13.0, Anchor::Middle));
    let unit = if in_ms { "ms" } else { "µs" };
    plot.text(Text { vertical: true, ..Text::new(22.0, T + ph / 2.0, format!("latency ({unit})"), 13.0, Anchor::Middle) });
    // Series.
    let mut any = false;
    for (i, (label, color, hist)) in series.iter().enumerate() {
        if hist.is_empty() {
            continue;
        }
        any = true;
        let steps = 400;
        let points = (0..=steps)
            .map(|k| {
                let x = nines * k as f64 / steps as f64;
                let q = 1.0 - 10f64.powf(-x);
                (px(x), py(hist.value_at_quantile(q) as f64 / unit_div))
            })
            .collect();
        plot.polyline(points, *color, 2.0);
        let ly = T + 18.0 + 20.0 * i as f64;
        let lx = L + 16.0;
        plot.line((lx, ly), (lx + 24.0, ly), *color, 3.0);
        let sum = Summary::of(hist);
        let text = format!("{label} latency (n={}, p50 {} µs, p99 {} µs, max {} µs)", sum.count, sum.p50, sum.p99, sum.max);
        plot.text(Text::new(lx + 32.0, ly + 4.0, text, 13.0, Anchor::Start));
    }
    if !any {
        plot.text(Text::new(L + pw / 2.0, T + ph / 2.0, "no successful executions", 18.0, Anchor::Middle));
    }
    plot
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("15s"), Ok(Duration::from_secs(15)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("250us"), Ok(Duration::from_micros(250)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert!(parse_duration("").is_err());
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("s").is_err());
        assert!(parse_duration("1s2").is_err());
    }

    #[test]
    fn byte_counts() {
        assert_eq!(parse_bytes("67108864"), Ok(64 << 20));
        assert_eq!(parse_bytes("64M"), Ok(64 << 20));
        assert_eq!(parse_bytes("64MiB"), Ok(64 << 20));
        assert_eq!(parse_bytes("1g"), Ok(1 << 30));
        assert_eq!(parse_bytes("4K"), Ok(4096));
        assert!(parse_bytes("lots").is_err());
        assert!(parse_bytes("1T").is_err());
    }

    #[test]
    fn raw_messages() {
        use prost::Message;
        let body = [0x08u8, 0x1e];
        assert_eq!(RawRequest(&body).encode_length_delimited_to_vec(), vec![2, 0x08, 0x1e]);
        let resp = SkippedResponse::decode(&b"\x0a\x0dHello, world!"[..]).map(|r| r.bytes);
        assert_eq!(resp, Ok(14));
        assert!(SkippedResponse::decode(&[0xffu8; 11][..]).is_err());
    }

    #[test]
    fn plot_paths() {
        assert_eq!(check_plot_path(Path::new("x.svg")), Ok(PlotFormat::Svg));
        assert_eq!(check_plot_path(Path::new("x.SVG")), Ok(PlotFormat::Svg));
        assert_eq!(check_plot_path(Path::new("x.png")), Ok(PlotFormat::Png));
        assert!(check_plot_path(Path::new("x.gif")).unwrap_err().contains(".svg or .png"));
        assert!(check_plot_path(Path::new("x")).is_err());
    }

    #[test]
    fn nice_steps() {
        assert_eq!(nice_step(1000.0, 5.0), 200.0);
        assert_eq!(nice_step(7.0, 6.0), 2.0);
        assert_eq!(nice_step(45_000.0, 6.0), 10_000.0);
    }
}

//! Heap allocations per execution, per thread of the embedding process: how many
//! `alloc`/`realloc` calls the engine threads (`roma-ring-*`), the calling thread and
//! the others make per execution under load. Allocation was 14 % of the engine
//! threads' user-space samples (BENCHMARKS.md, seventeenth session); this counts it
//! exactly, so a change that removes allocations can show it without timing noise.
//!
//! A counting global allocator wraps the system one. Each thread claims a slot in a
//! fixed table on its first allocation (its tid, from `gettid`) and counts in it;
//! nothing in the counting path allocates. At the end, slots are named from
//! `/proc/self/task/TID/comm`.
//!
//! The load is `demo`'s: `--in-flight` executions queued behind `--workers` workers
//! with `execute_with_callback` callbacks that push into a mutex-guarded
//! vector the calling thread drains every 500 µs. `--warmup` executions first, not
//! counted. Minimal mode, the default `Config` otherwise.
//!
//! `cargo run --release --example engine_allocs -- --binary $UDFS/hello_nolibc
//! [--executions N] [--warmup N] [--workers N] [--in-flight N]
//! [--where N] [--where-thread PREFIX]` (`--where N`: record the call stacks of every
//! Nth allocation, of threads whose name starts with PREFIX, `roma-ring-` by
//! default; the counts are then off by the recording's own allocations)

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use roma_byob::proto::sample::{SampleRequest, SampleResponse};
use roma_byob::{CodeToken, Config, Engine, ExecuteOptions, LoadOptions, Mode};

const SLOTS: usize = 512;

struct Slot {
    tid: AtomicI32,
    allocs: AtomicU64,
    bytes: AtomicU64,
}

#[allow(clippy::declare_interior_mutable_const)]
const EMPTY: Slot = Slot { tid: AtomicI32::new(0), allocs: AtomicU64::new(0), bytes: AtomicU64::new(0) };
static TABLE: [Slot; SLOTS] = [EMPTY; SLOTS];
/// Allocations of threads that found the table full.
static OVERFLOW: AtomicU64 = AtomicU64::new(0);

thread_local! {
    static MINE: Cell<usize> = const { Cell::new(usize::MAX) };
    /// Set while this thread records where an allocation came from (`--where`).
    static RECORDING: Cell<bool> = const { Cell::new(false) };
}

/// `--where`: every Nth allocation of an engine thread has its call stack recorded.
static WHERE_EVERY: AtomicU64 = AtomicU64::new(0);
static WHERE_TICK: AtomicU64 = AtomicU64::new(0);
static WHERE: Mutex<BTreeMap<String, u64>> = Mutex::new(BTreeMap::new());
/// `--where-thread`: the thread-name prefix whose allocations `--where` records.
static WHERE_THREAD: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// Records the caller's stack (the frames in the engine's code) when sampling is
/// on and this thread's name starts with `--where-thread`.
fn maybe_record() {
    let every = WHERE_EVERY.load(Ordering::Relaxed);
    if every == 0 || WHERE_TICK.fetch_add(1, Ordering::Relaxed) % every != 0 {
        return;
    }
    let Ok(false) = RECORDING.try_with(|r| r.replace(true)) else { return };
    let comm = std::fs::read_to_string("/proc/thread-self/comm").unwrap_or_default();
    if WHERE_THREAD.get().is_some_and(|prefix| comm.starts_with(prefix.as_str())) {
        let trace = std::backtrace::Backtrace::force_capture().to_string();
        // Keep the frames that name roma_byob functions, innermost first.
        let frames: Vec<&str> = trace
            .lines()
            .map(str::trim)
            .filter(|l| l.contains("roma_byob::") && !l.starts_with("at "))
            .map(|l| l.split_once(": ").map_or(l, |(_, f)| f))
            .take(6)
            .collect();
        *WHERE.lock().unwrap_or_else(|p| p.into_inner()).entry(frames.join(" < ")).or_insert(0) += 1;
    }
    let _ = RECORDING.try_with(|r| r.set(false));
}

fn count(bytes: usize) {
    // `try_with`: a thread's last frees run while its thread-locals are torn down.
    let slot = MINE
        .try_with(|mine| {
            if mine.get() == usize::MAX {
                // SAFETY: gettid has no preconditions.
                let tid = unsafe { libc::gettid() };
                let claimed = TABLE
                    .iter()
                    .position(|s| s.tid.compare_exchange(0, tid, Ordering::Relaxed, Ordering::Relaxed).is_ok());
                mine.set(claimed.unwrap_or(SLOTS));
            }
            mine.get()
        })
        .unwrap_or(SLOTS);
    match TABLE.get(slot) {
        Some(s) => {
            s.allocs.fetch_add(1, Ordering::Relaxed);
            s.bytes.fetch_add(bytes as u64, Ordering::Relaxed);
        }
        None => {
            OVERFLOW.fetch_add(1, Ordering::Relaxed);
        }
    }
    maybe_record();
}

struct Counting;

// SAFETY: every call forwards to `System` with the caller's arguments unchanged;
// the counting around it neither allocates nor touches the memory.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count(layout.size());
        // SAFETY: forwarded unchanged; the caller upholds `alloc`'s contract.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count(layout.size());
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above; `ptr` came from `System` through this allocator.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count(new_size);
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Allocations and bytes so far, per thread name (threads of one name summed).
fn snapshot() -> BTreeMap<String, (u64, u64)> {
    let mut by_name = BTreeMap::new();
    for s in &TABLE {
        let tid = s.tid.load(Ordering::Relaxed);
        if tid == 0 {
            continue;
        }
        let name = std::fs::read_to_string(format!("/proc/self/task/{tid}/comm"))
            .map(|n| n.trim().to_string())
            .unwrap_or_else(|_| "(exited threads)".to_string());
        // Engine threads keep their index out of the key: they are summed.
        let name = if name.starts_with("roma-ring-") { "roma-ring-*".to_string() } else { name };
        let e = by_name.entry(name).or_insert((0, 0));
        e.0 += s.allocs.load(Ordering::Relaxed);
        e.1 += s.bytes.load(Ordering::Relaxed);
    }
    by_name
}

struct Args {
    binary: String,
    executions: usize,
    warmup: usize,
    workers: usize,
    in_flight: usize,
    where_every: u64,
    where_thread: String,
}

fn parse() -> Result<Args, String> {
    let mut a = Args { binary: String::new(), executions: 20_000, warmup: 2_000, workers: 10, in_flight: 64, where_every: 0, where_thread: "roma-ring-".to_string() };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < argv.len() {
        let value = argv.get(i + 1).ok_or_else(|| format!("{} needs a value", argv[i]))?;
        let number = || value.parse::<usize>().map_err(|_| format!("{} needs a number, got {value:?}", argv[i]));
        match argv[i].as_str() {
            "--binary" => a.binary = value.clone(),
            "--executions" => a.executions = number()?,
            "--warmup" => a.warmup = number()?,
            "--workers" => a.workers = number()?,
            "--in-flight" => a.in_flight = number()?.max(1),
            "--where" => a.where_every = number()? as u64,
            "--where-thread" => a.where_thread = value.clone(),
            other => return Err(format!("unknown argument {other}")),
        }
        i += 2;
    }
    if a.binary.is_empty() {
        return Err("--binary PATH is required".to_string());
    }
    Ok(a)
}

/// Runs `n` executions with up to `in_flight` queued; returns the failures.
fn run(engine: &Engine, token: &CodeToken, n: usize, in_flight: usize) -> Result<usize, String> {
    let options = ExecuteOptions { worker_wait_timeout: Duration::from_secs(60), ..Default::default() };
    let finished: Arc<Mutex<Vec<bool>>> = Arc::new(Mutex::new(Vec::with_capacity(in_flight)));
    let mut batch = Vec::with_capacity(in_flight);
    let (mut submitted, mut done, mut failures) = (0, 0, 0);
    while done < n {
        while submitted < n && submitted - done < in_flight {
            let finished = finished.clone();
            engine
                .execute_with_callback::<_, SampleResponse, _>(token, &SampleRequest::default(), options.clone(), move |r| {
                    finished.lock().unwrap_or_else(|p| p.into_inner()).push(r.is_ok());
                })
                .map_err(|e| e.to_string())?;
            submitted += 1;
        }
        std::thread::sleep(Duration::from_micros(500));
        std::mem::swap(&mut batch, &mut *finished.lock().unwrap_or_else(|p| p.into_inner()));
        for ok in batch.drain(..) {
            failures += usize::from(!ok);
            done += 1;
        }
    }
    Ok(failures)
}

fn main() {
    let a = parse().unwrap_or_else(|e| {
        eprintln!("engine_allocs: {e}");
        std::process::exit(2)
    });
    let engine = Engine::new(Config { mode: Mode::Minimal, ..Default::default() }).unwrap_or_else(|e| {
        eprintln!("engine_allocs: starting the engine: {e}");
        std::process::exit(1)
    });
    let token = engine.load(&a.binary, LoadOptions { workers: a.workers, ..Default::default() }).unwrap_or_else(|e| {
        eprintln!("engine_allocs: loading {}: {e}", a.binary);
        std::process::exit(1)
    });
    let _ = run(&engine, &token, a.warmup, a.in_flight);
    let before = snapshot();
    let _ = WHERE_THREAD.set(a.where_thread.clone());
    WHERE_EVERY.store(a.where_every, Ordering::Relaxed);
    let failures = run(&engine, &token, a.executions, a.in_flight).unwrap_or_else(|e| {
        eprintln!("engine_allocs: {e}");
        std::process::exit(1)
    });
    WHERE_EVERY.store(0, Ordering::Relaxed);
    let after = snapshot();
    engine.shutdown();
    println!("{} executions ({failures} failed), {} in flight, {} workers; allocations per execution:", a.executions, a.in_flight, a.workers);
    for (name, (allocs, bytes)) in &after {
        let (a0, b0) = before.get(name).copied().unwrap_or((0, 0));
        let n = a.executions as f64;
        println!("  {name:<20} {:>8.2} allocations {:>10.0} bytes", (allocs - a0) as f64 / n, (bytes - b0) as f64 / n);
    }
    let mut sites: Vec<(String, u64)> = std::mem::take(&mut *WHERE.lock().unwrap_or_else(|p| p.into_inner())).into_iter().collect();
    sites.sort_by_key(|s| std::cmp::Reverse(s.1));
    if !sites.is_empty() {
        println!(
            "where threads named {}* allocate (1 in {} allocations of all threads sampled; innermost roma_byob frame first):",
            a.where_thread, a.where_every
        );
        for (site, n) in sites.iter().take(25) {
            println!("  {n:>6}  {site}");
        }
    }
    let overflow = OVERFLOW.load(Ordering::Relaxed);
    if overflow > 0 {
        println!("  ({overflow} allocations by threads beyond the table's {SLOTS} slots, not shown)");
    }
}

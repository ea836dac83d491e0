//! `roma-byob demo`: real executions of the sample hello-world UDF, measured.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Args;
use hdrhistogram::Histogram;
use roma_byob::proto::sample::{SampleRequest, SampleResponse};
use roma_byob::{Engine, ExecuteOptions, LoadOptions};

use crate::cpu::{ticks_per_second, ticks_us, Snapshot};
use crate::EngineArgs;

#[derive(Args, Debug)]
pub struct DemoArgs {
    #[command(flatten)]
    engine: EngineArgs,
    /// UDF to run: a path, or the name of a sample UDF such as hello_nolibc (default:
    /// the sample hello_world, C, dynamically linked).
    #[arg(long)]
    binary: Option<PathBuf>,
    /// Workers for the measured code token.
    #[arg(long, default_value_t = 10)]
    workers: usize,
    /// Sequential executions (latency).
    #[arg(long, default_value_t = 1000)]
    sequential: usize,
    /// Pause between sequential executions, in µs, so that every request finds a warm
    /// pool (the slot refills off the request's path).
    #[arg(long, default_value_t = 2000)]
    pace_us: u64,
    /// Executions for the throughput run.
    #[arg(long, default_value_t = 5000)]
    executions: usize,
    /// Executions kept in flight during the throughput run.
    #[arg(long, default_value_t = 64)]
    in_flight: usize,
    /// How often (µs) the submitting thread collects completions and tops up the
    /// executions in flight during the throughput run
    #[arg(long, default_value_t = 500)]
    collect_us: u64,
    /// Zygote start: fork workers from a pre-main template of the binary
    /// (minimal mode; dynamically linked glibc UDFs; see LoadOptions::zygote).
    #[arg(long)]
    zygote: bool,
}

fn us(d: Duration) -> u64 {
    d.as_micros().max(1) as u64
}

fn report(name: &str, h: &Histogram<u64>) {
    println!(
        "  {name:<24} p50 {:>7} µs   p90 {:>7} µs   p99 {:>7} µs   p99.9 {:>7} µs   max {:>7} µs",
        h.value_at_quantile(0.5),
        h.value_at_quantile(0.9),
        h.value_at_quantile(0.99),
        h.value_at_quantile(0.999),
        h.max()
    );
}

/// One execution of the throughput run: its latency, and whether its request was
/// written to its worker before the worker's ready byte (`Config::early_dispatch`).
type LoadResult = Result<(Duration, bool), String>;

pub fn run(a: DemoArgs) -> Result<(), String> {
    let (mode, why) = a.engine.resolve_mode()?;
    let binary = crate::binary_arg(a.binary.as_deref());
    println!("roma-byob demo");
    println!("  mode: {} ({why})", mode.as_str());
    println!("  syscall filter: {}", a.engine.filter);
    println!("  binary: {}", binary.display());
    if a.zygote {
        println!("  workers start from a zygote template (--zygote)");
    }

    let t0 = Instant::now();
    let engine = Engine::new(a.engine.config(mode)?).map_err(|e| e.to_string())?;
    println!("  sandbox start: {:.1} ms", t0.elapsed().as_secs_f64() * 1e3);
    let channels = if engine.runner_makes_channels() {
        "made by the runner, taken with pidfd_getfd"
    } else {
        "made by the engine threads, sent with each spawn order"
    };
    println!("  worker channels: {channels}");
    for w in engine.isolation_warnings() {
        println!("  isolation step not applied in this mode: {w}");
    }
    if let Some(dir) = engine.debug_log_dir() {
        println!("  runsc debug logs: {}", dir.display());
    }
    let opts = ExecuteOptions::default();
    let req = SampleRequest::default();

    // Load with one worker: the call itself, then until the first response.
    let t1 = Instant::now();
    let one = engine.load(&binary, LoadOptions { workers: 1, zygote: a.zygote, ..Default::default() }).map_err(|e| e.to_string())?;
    let load_call = t1.elapsed();
    let first = engine.execute::<_, SampleResponse>(&one, &req, opts.clone()).map_err(|e| e.to_string())?.wait();
    let first_done = t1.elapsed();
    let greeting = first.map_err(|e| e.to_string())?.response.greeting;
    println!("  load (1 worker): {:.3} ms for the call, {:.3} ms until the first response ({greeting:?})",
        load_call.as_secs_f64() * 1e3, first_done.as_secs_f64() * 1e3);
    engine.delete(&one).map_err(|e| e.to_string())?;

    let token = engine.load(&binary, LoadOptions { workers: a.workers, zygote: a.zygote, ..Default::default() }).map_err(|e| e.to_string())?;
    // Warm the pool.
    for _ in 0..a.workers.max(1) * 2 {
        engine.execute::<_, SampleResponse>(&token, &req, opts.clone()).map_err(|e| e.to_string())?.wait().map_err(|e| e.to_string())?;
    }

    let mut seq = Histogram::<u64>::new(3).map_err(|e| e.to_string())?;
    let mut wait = Histogram::<u64>::new(3).map_err(|e| e.to_string())?;
    let mut send = Histogram::<u64>::new(3).map_err(|e| e.to_string())?;
    let mut resp = Histogram::<u64>::new(3).map_err(|e| e.to_string())?;
    // Requests that found no ready worker after the pause, and waited for one first.
    let mut held = 0usize;
    // Responses the calling thread read from the worker itself (Config::caller_reads).
    let mut direct = 0usize;
    let seq_before = Snapshot::take(engine.sandbox_pid());
    for _ in 0..a.sequential {
        // Give the slot time to refill so each request finds a warm worker; where
        // workers start slower than the pace (glibc UDFs in gVisor), wait for one.
        std::thread::sleep(Duration::from_micros(a.pace_us));
        let ready_by = Instant::now() + Duration::from_secs(2);
        if engine.idle_workers(&token).map_err(|e| e.to_string())? == 0 {
            held += 1;
            while engine.idle_workers(&token).map_err(|e| e.to_string())? == 0 && Instant::now() < ready_by {
                std::thread::sleep(Duration::from_micros(50));
            }
        }
        let s = Instant::now();
        let r = engine.execute::<_, SampleResponse>(&token, &req, opts.clone()).map_err(|e| e.to_string())?.wait().map_err(|e| e.to_string())?;
        let _ = seq.record(us(s.elapsed()));
        let _ = wait.record(us(r.metrics.wait_for_worker));
        let _ = send.record(us(r.metrics.send));
        let _ = resp.record(us(r.metrics.response));
        direct += usize::from(r.metrics.read_by_caller);
    }
    println!(
        "sequential, {} executions, {} workers, warm pool ({} µs between executions; {held} waited longer for a ready worker; {direct} responses read by the calling thread):",
        a.sequential, a.workers, a.pace_us
    );
    report("end-to-end latency", &seq);
    report("waiting for a worker", &wait);
    report("sending the request", &send);
    report("waiting for the response", &resp);
    // Everything the engine threads did for these executions, the slots' refills
    // included (the paced loop leaves them nothing else to do).
    if let Some(c) = seq_before.per_execution(&Snapshot::take(engine.sandbox_pid()), a.sequential as u64) {
        println!(
            "  CPU per execution: engine threads {:.1} µs, {:.2} wake-ups (from /proc schedstat and status)",
            c.engine_us, c.engine_wakeups
        );
    }

    // The throughput run queues up to `in_flight` requests behind the pool on
    // purpose. On a slow machine (gVisor's ptrace platform on a VM whose host takes
    // the CPU away: 23 executions/s seen in a CI run instead of ~90) that queue can
    // take longer than the default 5 s to drain; the run measures throughput, so a
    // queued request may wait a minute for its worker before it counts as failed.
    let queued_opts = ExecuteOptions { worker_wait_timeout: Duration::from_secs(60), ..opts.clone() };
    let cpu_before = Snapshot::take(engine.sandbox_pid());
    // Completions land in a queue the submitting thread drains every `collect_us`:
    // a callback that woke this thread per completion would add a futex wake-up
    // (~10 µs of CPU here) to the engine thread's cost of every execution.
    let results: Arc<Mutex<Vec<LoadResult>>> = Arc::new(Mutex::new(Vec::new()));
    let mut written_early = 0usize;
    let mut lat = Histogram::<u64>::new(3).map_err(|e| e.to_string())?;
    let mut failures = 0usize;
    let start = Instant::now();
    let mut submitted = 0usize;
    let mut done = 0usize;
    let mut batch = Vec::new();
    while done < a.executions {
        while submitted < a.executions && submitted - done < a.in_flight {
            let results = results.clone();
            let s = Instant::now();
            engine
                .execute_with_callback::<_, SampleResponse, _>(&token, &req, queued_opts.clone(), move |r| {
                    let r = r.map(|r| (s.elapsed(), r.metrics.written_before_ready)).map_err(|e| e.to_string());
                    results.lock().unwrap_or_else(|p| p.into_inner()).push(r);
                })
                .map_err(|e| e.to_string())?;
            submitted += 1;
        }
        std::thread::sleep(Duration::from_micros(a.collect_us));
        std::mem::swap(&mut batch, &mut *results.lock().unwrap_or_else(|p| p.into_inner()));
        for r in batch.drain(..) {
            match r {
                Ok((d, early)) => {
                    let _ = lat.record(us(d));
                    written_early += usize::from(early);
                }
                Err(e) => {
                    failures += 1;
                    if failures <= 3 {
                        eprintln!("  execution failed: {e}");
                    }
                }
            }
            done += 1;
        }
    }
    let elapsed = start.elapsed();
    println!(
        "throughput, {} executions, {} in flight, {} workers: {:.0} executions/s ({} failed)",
        a.executions,
        a.in_flight,
        a.workers,
        a.executions as f64 / elapsed.as_secs_f64(),
        failures
    );
    println!("  requests written to a worker still starting (Config::early_dispatch): {written_early}");
    report("latency under load", &lat);
    if let Some(c) = cpu_before.per_execution(&Snapshot::take(engine.sandbox_pid()), a.executions as u64) {
        println!(
            "  CPU per execution: engine threads {:.1} µs, {:.2} wake-ups (from /proc schedstat and status)",
            c.engine_us, c.engine_wakeups
        );
        println!(
            "  CPU per execution: runner {}, workers {} (from /proc, {} ticks/s)",
            ticks_us(c.runner_us),
            ticks_us(c.workers_us),
            ticks_per_second()
        );
    }
    engine.shutdown();
    if failures > 0 {
        return Err(format!("{failures} executions failed"));
    }
    Ok(())
}

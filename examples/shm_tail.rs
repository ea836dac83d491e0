//! Where the time of back-to-back large shared-memory requests goes: N sequential
//! 50 MiB `payload_read` requests (the `payload` bench's largest case, 10 workers,
//! 64 MiB regions), each timed in `execute()` (claiming a worker and placing the
//! request in its region) and in total, with `Metrics::wait_for_worker`, and an
//! optional pause between requests, and the calling thread's CPU time and minor faults
//! in `execute()`. Prints the percentiles and which requests took
//! more than twice the median (BENCHMARKS.md, twenty-first session: they were
//! the ones placed in a region whose pages were not allocated yet).
//!
//! `cargo run --release --example shm_tail -- [N] [PAUSE_MS]` (defaults 100, 0).

use std::time::{Duration, Instant};

use roma_byob::proto::sample::{ReadPayloadRequest, ReadPayloadResponse};
use roma_byob::{Config, Engine, ExecuteOptions, LoadOptions};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let n: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(100).max(1);
    let pause = Duration::from_millis(args.next().map(|a| a.parse()).transpose()?.unwrap_or(0));
    let engine = Engine::new(Config::default())?;
    let token = engine.load(
        roma_byob::samples::path("payload_read"),
        LoadOptions { workers: 10, shared_memory: Some(64 << 20), ..Default::default() },
    )?;
    std::thread::sleep(Duration::from_secs(1));
    let req = ReadPayloadRequest { payloads: vec![vec![b'a'; 10 << 20]; 5] };
    let opts = ExecuteOptions { worker_wait_timeout: Duration::from_secs(30), timeout: Duration::from_secs(30), ..Default::default() };
    // (total, in execute(), waiting for a worker), in ms.
    let mut rows: Vec<(f64, f64, f64)> = Vec::with_capacity(n);
    // Per request: the calling thread's CPU time and minor faults in execute().
    let mut cpu: Vec<(f64, i64)> = Vec::with_capacity(n);
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    for _ in 0..n {
        let (cpu0, flt0) = thread_usage();
        let start = Instant::now();
        let exec = engine.execute::<_, ReadPayloadResponse>(&token, &req, opts.clone())?;
        let placed = start.elapsed();
        let (cpu1, flt1) = thread_usage();
        cpu.push((ms(cpu1 - cpu0), flt1 - flt0));
        let r = exec.wait()?;
        if r.response.payload_size != 50 << 20 {
            return Err(format!("payload_size {} != {}", r.response.payload_size, 50 << 20).into());
        }
        rows.push((ms(start.elapsed()), ms(placed), ms(r.metrics.wait_for_worker)));
        std::thread::sleep(pause);
    }
    engine.shutdown();
    let sorted = |f: fn(&(f64, f64, f64)) -> f64| {
        let mut v: Vec<f64> = rows.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        v
    };
    let pct = |v: &[f64], p: f64| v[((v.len() - 1) as f64 * p).round() as usize];
    let (total, placed, waited) = (sorted(|r| r.0), sorted(|r| r.1), sorted(|r| r.2));
    println!("{n} requests of 50 MiB, {} ms apart (ms):", pause.as_millis());
    for (name, v) in [("total", &total), ("in execute()", &placed), ("waiting for a worker", &waited)] {
        println!("  {name:<22} p50 {:7.1}  p90 {:7.1}  p99 {:7.1}  max {:7.1}", pct(v, 0.5), pct(v, 0.9), pct(v, 0.99), v[v.len() - 1]);
    }
    let slow: Vec<String> = rows
        .iter()
        .enumerate()
        .filter(|(_, r)| r.0 > 2.0 * pct(&total, 0.5))
        .map(|(i, r)| format!("#{} {:.0}/{:.0} (cpu {:.0} ms, {} faults)", i + 1, r.0, r.1, cpu[i].0, cpu[i].1))
        .collect();
    println!("  over twice the median (request: total/in execute() ms, the calling thread's CPU and minor faults in execute()): {}", slow.join(" "));
    let median = rows.iter().position(|r| r.0 == pct(&total, 0.5)).unwrap_or(0);
    println!("  the median request: cpu {:.1} ms, {} faults in execute()", cpu[median].0, cpu[median].1);
    Ok(())
}

/// The calling thread's CPU time and minor page faults so far.
fn thread_usage() -> (Duration, i64) {
    // SAFETY: `rusage` is plain data; getrusage fills it for the calling thread.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above; a valid pointer to a live struct.
    unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut ru) };
    let tv = |t: libc::timeval| Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64);
    (tv(ru.ru_utime) + tv(ru.ru_stime), ru.ru_minflt)
}

//! Executions on a warm pool (Roma BYOB's execute benchmarks): hello world (dynamic
//! and static) and the prime sieve, per worker count and mode; hello world also with
//! zygote start (`hello_world+zygote`, minimal mode: `LoadOptions::zygote`).
//!
//! - `execute_latency`: one execution at a time (submit, wait, repeat);
//! - `execute_throughput`: a batch of executions in flight at once, reported as
//!   executions/s.
//!
//! `cargo bench --bench execute -- "/10 workers"` runs the 10-worker cases only.
//! gVisor: hello_world with 10 workers by default; everything with ROMA_BENCH_GVISOR=1.

mod common;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use roma_byob::proto::sample::{SampleRequest, SampleResponse};
use roma_byob::Mode;

use common::{Latency, Warmup};

/// (sample, zygote start)
const UDFS: [(&str, bool); 4] = [("hello_world", false), ("hello_world", true), ("hello_world_static", false), ("prime_sieve", false)];
const WORKERS: [usize; 4] = [1, 10, 50, 100];
/// Primes below the sieve's default bound (100000).
const PRIMES_BELOW_100K: usize = 9592;

/// Executions in flight per throughput iteration.
fn batch_size(mode: Mode) -> usize {
    if mode == Mode::Minimal {
        100
    } else {
        30
    }
}

fn bench_execute(c: &mut Criterion) {
    let req = SampleRequest::default();
    for mc in common::modes() {
        let Some(engine) = common::engine(mc.mode) else { continue };
        for (udf, zygote) in UDFS {
            if zygote && mc.mode != Mode::Minimal {
                continue;
            }
            let Some(path) = common::sample(udf) else { continue };
            for workers in WORKERS {
                let cheap = udf == "hello_world" && workers == 10;
                if !mc.full && !cheap {
                    continue;
                }
                let case = format!("{}/{udf}{}", mc.name(), if zygote { "+zygote" } else { "" });
                let param = format!("{workers} workers");
                let options = roma_byob::LoadOptions { workers, zygote, ..Default::default() };
                let token = match common::load_with(&engine, &path, options) {
                    Ok(t) => t,
                    Err(e) => {
                        eprintln!("SKIP {case}/{param}: {e}");
                        continue;
                    }
                };
                // Check the answer once (also the first, cold, execution).
                let mut cold = Latency::new();
                match common::execute_once::<_, SampleResponse>(&engine, &token, &req, &mut cold) {
                    Ok((r, _)) if udf == "prime_sieve" && r.prime_number.len() != PRIMES_BELOW_100K => {
                        panic!("{case}: {} primes, expected {PRIMES_BELOW_100K}", r.prime_number.len())
                    }
                    Ok((r, _)) if udf != "prime_sieve" && r.greeting != "Hello, world!" => {
                        panic!("{case}: unexpected greeting {:?}", r.greeting)
                    }
                    Ok(_) => {}
                    Err(e) => {
                        eprintln!("SKIP {case}/{param}: the first execution failed: {e}");
                        let _ = engine.delete(&token);
                        continue;
                    }
                }
                let warm = Warmup::new(mc.mode, workers);

                let mut lat = Latency::new();
                let mut group = c.benchmark_group("execute_latency");
                group.bench_function(BenchmarkId::new(&case, &param), |b| {
                    warm.ensure();
                    b.iter_custom(|iters| {
                        common::sequential::<_, SampleResponse>(&engine, &token, &req, iters, &mut lat, &case)
                    })
                });
                group.finish();
                lat.print(&format!("execute_latency/{case}/{param}"));

                let n = batch_size(mc.mode);
                let mut lat = Latency::new();
                let mut group = c.benchmark_group("execute_throughput");
                group.throughput(Throughput::Elements(n as u64));
                group.bench_function(BenchmarkId::new(&case, format!("{param}/{n} in flight")), |b| {
                    warm.ensure();
                    b.iter_custom(|iters| {
                        let mut total = std::time::Duration::ZERO;
                        for _ in 0..iters {
                            total += common::batch::<_, SampleResponse>(&engine, &token, &req, n, &mut lat, &case);
                        }
                        total
                    })
                });
                group.finish();
                lat.print(&format!("execute_throughput/{case}/{param} (latency under load)"));
                let _ = engine.delete(&token);
            }
        }
        engine.shutdown();
    }
}

criterion_group! {
    name = benches;
    config = common::criterion();
    targets = bench_execute
}
criterion_main!(benches);

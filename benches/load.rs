//! Loading a binary with one worker, per mode (Roma BYOB's load benchmarks):
//! `load()` plus the first execution completing (a new code token's time to first
//! response), and the `load()` call alone.
//!
//! `cargo bench --bench load`; gVisor runs here by default (loading is cheap).
//! Each iteration deletes its code token before the next one.

mod common;

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use roma_byob::proto::sample::{SampleRequest, SampleResponse};

use common::Latency;

const UDFS: [&str; 2] = ["hello_world", "hello_world_static"];

fn bench_load(c: &mut Criterion) {
    for mc in common::modes() {
        let Some(engine) = common::engine(mc.mode) else { continue };
        for udf in UDFS {
            let Some(path) = common::sample(udf) else { continue };
            let mut group = c.benchmark_group("load");
            let id = |what: &str| BenchmarkId::new(format!("{}/{udf}", mc.name()), what);

            // load() + the first execution completing.
            let mut lat = Latency::new();
            group.bench_function(id("load + first execution"), |b| {
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        let start = Instant::now();
                        let token = common::load(&engine, &path, 1, None).unwrap_or_else(|e| panic!("{e}"));
                        let r = engine
                            .execute::<_, SampleResponse>(&token, &SampleRequest::default(), common::opts())
                            .and_then(|e| e.wait());
                        let d = start.elapsed();
                        if let Err(e) = r {
                            panic!("{udf}: first execution failed: {e}");
                        }
                        total += d;
                        lat.record(d);
                        let _ = engine.delete(&token);
                    }
                    total
                })
            });
            lat.print(&format!("load/{}/{udf}/load + first execution", mc.name()));

            // The load() call alone (the worker starts in the background). Each
            // iteration then waits, untimed, for the first execution before deleting
            // the token: a tight load/delete loop would only pile up worker start-ups.
            let mut lat = Latency::new();
            group.bench_function(id("load call"), |b| {
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        let start = Instant::now();
                        let token = common::load(&engine, &path, 1, None).unwrap_or_else(|e| panic!("{e}"));
                        let d = start.elapsed();
                        total += d;
                        lat.record(d);
                        let r = engine
                            .execute::<_, SampleResponse>(&token, &SampleRequest::default(), common::opts())
                            .and_then(|e| e.wait());
                        if let Err(e) = r {
                            panic!("{udf}: first execution failed: {e}");
                        }
                        let _ = engine.delete(&token);
                    }
                    total
                })
            });
            lat.print(&format!("load/{}/{udf}/load call", mc.name()));
            group.finish();
        }
        engine.shutdown();
    }
}

criterion_group! {
    name = benches;
    config = common::criterion();
    targets = bench_load
}
criterion_main!(benches);

//! Host API callbacks: executions of `callback_udf` making 0, 1 and 10 host calls
//! (all in flight at once) to a trivial sync host function, per mode: latency of one
//! execution on a warm pool and throughput with a batch in flight. The difference
//! between the 0-call and 1-call latencies is the callback round trip seen from the
//! host (the SDK's round_trip test measures it from inside the UDF).
//!
//! `cargo bench --bench host_api`; gVisor runs the cheap cases unless
//! ROMA_BENCH_GVISOR=1.

mod common;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use roma_byob::proto::sample::{CallbackRequest, CallbackResponse};
use roma_byob::{LoadOptions, Mode};

use common::{Latency, Warmup};

const CALLS: [usize; 3] = [0, 1, 10];
const WORKERS: usize = 10;

fn bench_host_api(c: &mut Criterion) {
    let Some(path) = common::sample("callback_udf") else { return };
    for mc in common::modes() {
        let Some(engine) = common::engine(mc.mode) else { continue };
        engine.register_host_function("bench.Echo", |_ctx, req| Ok(req.to_vec())).expect("register");
        let token = match engine.load(&path, LoadOptions { workers: WORKERS, host_api: true, ..Default::default() }) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("SKIP host_api/{}: {e}", mc.name());
                continue;
            }
        };
        let warm = Warmup::new(mc.mode, WORKERS);
        for calls in CALLS {
            if !mc.full && calls == 0 {
                continue;
            }
            let req = CallbackRequest { functions: vec!["bench.Echo".into(); calls], payload: b"ping".to_vec() };
            let case = format!("{}/{calls} calls", mc.name());
            let mut cold = Latency::new();
            match common::execute_once::<_, CallbackResponse>(&engine, &token, &req, &mut cold) {
                Ok((r, _)) if r.results != vec!["ok:ping".to_string(); calls] => panic!("{case}: {:?}", r.results),
                Ok(_) => {}
                Err(e) => panic!("{case}: {e}"),
            }
            let mut lat = Latency::new();
            let mut group = c.benchmark_group("host_api_latency");
            group.bench_function(BenchmarkId::new(mc.name(), format!("{calls} calls")), |b| {
                warm.ensure();
                b.iter_custom(|iters| common::sequential::<_, CallbackResponse>(&engine, &token, &req, iters, &mut lat, &case))
            });
            group.finish();
            lat.print(&format!("host_api_latency/{case}"));

            let n = if mc.mode == Mode::Minimal { 100 } else { 30 };
            let mut lat = Latency::new();
            let mut group = c.benchmark_group("host_api_throughput");
            group.throughput(Throughput::Elements(n as u64));
            group.bench_function(BenchmarkId::new(mc.name(), format!("{calls} calls/{n} in flight")), |b| {
                warm.ensure();
                b.iter_custom(|iters| {
                    (0..iters)
                        .map(|_| common::batch::<_, CallbackResponse>(&engine, &token, &req, n, &mut lat, &case))
                        .sum()
                })
            });
            group.finish();
            lat.print(&format!("host_api_throughput/{case} (latency under load)"));
        }
        engine.shutdown();
    }
}

criterion_group! {
    name = benches;
    config = common::criterion();
    targets = bench_host_api
}
criterion_main!(benches);

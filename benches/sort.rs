//! Sorting 10k / 100k / 1M items inside the UDF (Roma BYOB's sort_list benchmarks):
//! a CPU-bound UDF with a small request and response.
//!
//! Needs the `sort_list` sample UDF (udfs/c/sort_list.c); skipped with a message when
//! it is not built. Its contract, checked here on the first execution of each size:
//! `SortListRequest{count, seed}`: generate `count` int32 with xorshift32 (state =
//! `seed`, or 2463534242 when 0; per item `x ^= x << 13; x ^= x >> 17; x ^= x << 5`,
//! item = `(int32_t)x`), sort ascending, answer `SortListResponse{count, min, max,
//! checksum}` with checksum = sum over i of `(i + 1) * (uint32)sorted[i]` mod 2^64.
//!
//! gVisor runs only with ROMA_BENCH_GVISOR=1.

mod common;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use roma_byob::proto::sample::{SortListRequest, SortListResponse};

use common::{Latency, Warmup};

const SIZES: [u32; 3] = [10_000, 100_000, 1_000_000];
const WORKERS: usize = 10;
const SEED: u32 = 42;

fn bench_sort(c: &mut Criterion) {
    if !roma_byob::samples::path("sort_list").is_file() {
        eprintln!(
            "SKIP sort benchmarks: the sample UDF sort_list does not exist ({}); \
             it is specified at the top of benches/sort.rs",
            roma_byob::samples::path("sort_list").display()
        );
        return;
    }
    let Some(path) = common::sample("sort_list") else { return };
    for mc in common::modes() {
        if !mc.full {
            eprintln!("SKIP sort benchmarks in {} mode: set {}=1 to run them", mc.name(), common::GVISOR_ENV);
            continue;
        }
        let Some(engine) = common::engine(mc.mode) else { continue };
        let token = match common::load(&engine, &path, WORKERS, None) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("SKIP sort benchmarks in {} mode: {e}", mc.name());
                continue;
            }
        };
        let warm = Warmup::new(mc.mode, WORKERS);
        let mut group = c.benchmark_group("sort_list");
        for n in SIZES {
            let req = SortListRequest { count: n, seed: SEED };
            let want = roma_byob::samples::sort_list_reference(&req);
            let mut lat = Latency::new();
            let case = format!("{}/sort_list", mc.name());
            let param = format!("{n} items");
            match common::execute_once::<_, SortListResponse>(&engine, &token, &req, &mut lat) {
                Ok((got, _)) if got == want => {}
                Ok((got, _)) => {
                    eprintln!("SKIP {case}/{param}: wrong answer {got:?}, expected {want:?}");
                    continue;
                }
                Err(e) => {
                    eprintln!("SKIP {case}/{param}: {e}");
                    continue;
                }
            }
            let mut lat = Latency::new();
            group.throughput(Throughput::Elements(u64::from(n)));
            group.bench_function(BenchmarkId::new(&case, &param), |b| {
                warm.ensure();
                b.iter_custom(|iters| {
                    common::sequential::<_, SortListResponse>(&engine, &token, &req, iters, &mut lat, &case)
                })
            });
            lat.print(&format!("sort_list/{case}/{param}"));
        }
        group.finish();
        let _ = engine.delete(&token);
        engine.shutdown();
    }
}

criterion_group! {
    name = benches;
    config = common::criterion();
    targets = bench_sort
}
criterion_main!(benches);

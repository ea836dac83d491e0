//! Host-call round trip measured from inside a Rust UDF (sdk_round_trip times each
//! `ctx.call_raw` with std::time::Instant), in every available mode. Prints p50/p99:
//!
//!   cargo test --release -p roma-byob-udf --test round_trip -- --nocapture
//!
//! (ROUND_TRIP_CALLS overrides the number of calls, default 2000.)

mod common;

use common::pb::round_trip::*;
use common::*;

fn percentile(sorted: &[u64], p: f64) -> u64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

#[test]
fn host_call_round_trip() {
    let calls: u32 = std::env::var("ROUND_TRIP_CALLS").ok().and_then(|v| v.parse().ok()).unwrap_or(2000);
    for mode in modes() {
        let e = engine(mode);
        e.register_host_function("bench.Echo", |_ctx, req| Ok(req.to_vec())).unwrap();
        for shm in TRANSPORTS {
            let t = load(&e, env!("CARGO_BIN_EXE_sdk_round_trip"), host_api(1, shm));
            let req = RoundTripRequest { function: "bench.Echo".into(), calls, payload: vec![b'x'; 64] };
            let mut options = opts();
            options.timeout = std::time::Duration::from_secs(120);
            let done =
                RoundTripUdfClient::measure_with_options(&e, &t, &req, options).unwrap().wait().unwrap().response;
            assert_eq!(done.errors, 0, "{}", done.first_error);
            assert_eq!(done.nanos.len(), calls as usize);
            let mut v = done.nanos;
            v.sort_unstable();
            let us = |n: u64| n as f64 / 1000.0;
            println!(
                "host call round trip, {mode:?}, {}: {calls} calls, 64-byte payload: p50 {:.1} µs, p99 {:.1} µs, max {:.1} µs",
                if shm.is_some() { "shared-memory transport" } else { "socket transport" },
                us(percentile(&v, 0.50)),
                us(percentile(&v, 0.99)),
                us(*v.last().unwrap()),
            );
        }
    }
}

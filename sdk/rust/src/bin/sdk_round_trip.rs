//! sdk_round_trip: times `calls` sequential host calls (`ctx.call_raw`) from inside
//! the UDF with std::time::Instant and returns every duration
//! (proto/round_trip.proto, rpc `roma_byob.round_trip.RoundTripUdf/Measure`).

// Generated code (build.rs): not every item is used by this binary.
#[allow(dead_code)]
mod round_trip {
    include!(concat!(env!("OUT_DIR"), "/udf/roma_byob.round_trip.rs"));
}

use std::time::Instant;

use roma_byob_udf::Context;
use round_trip::{RoundTripRequest, RoundTripResponse, RoundTripUdfUdf};

struct Measure;

impl RoundTripUdfUdf for Measure {
    fn measure(&self, request: RoundTripRequest, ctx: &mut Context) -> RoundTripResponse {
        let mut out = RoundTripResponse { nanos: Vec::with_capacity(request.calls as usize), ..Default::default() };
        for _ in 0..request.calls {
            let start = Instant::now();
            let result = ctx.call_raw(&request.function, &request.payload);
            out.nanos.push(start.elapsed().as_nanos() as u64);
            if let Err(e) = result {
                if out.errors == 0 {
                    out.first_error = e.to_string();
                }
                out.errors += 1;
            }
        }
        out
    }
}

fn main() {
    round_trip::serve_round_trip_udf_measure(Measure)
}

//! sdk_payload: ReadPayloadRequest{payloads} → ReadPayloadResponse{payload_size: the
//! total length of the payloads}. Large requests, on the socket or the shared-memory
//! transport (the SDK hides which).

// Generated code (build.rs): not every item is used by this binary.
#[allow(dead_code)]
mod proto {
    include!(concat!(env!("OUT_DIR"), "/udf/roma_byob.sample.rs"));
}

use proto::{ReadPayloadRequest, ReadPayloadResponse};
use roma_byob_udf::Context;

fn main() {
    roma_byob_udf::serve(|request: ReadPayloadRequest, _ctx: &mut Context| ReadPayloadResponse {
        payload_size: request.payloads.iter().map(|p| p.len() as u64).sum(),
    })
}

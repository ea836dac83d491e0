//! sdk_hello: the Rust SDK's hello world. SampleRequest → SampleResponse{greeting:
//! "Hello from the Rust SDK!"}, on either transport.

// Generated code (build.rs): not every item is used by this binary.
#[allow(dead_code)]
mod proto {
    include!(concat!(env!("OUT_DIR"), "/udf/roma_byob.sample.rs"));
}

use proto::{SampleRequest, SampleResponse};
use roma_byob_udf::Context;

fn main() {
    roma_byob_udf::serve(|_request: SampleRequest, _ctx: &mut Context| SampleResponse {
        greeting: "Hello from the Rust SDK!".into(),
        ..Default::default()
    })
}

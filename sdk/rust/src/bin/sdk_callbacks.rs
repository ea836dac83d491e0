//! sdk_callbacks: the Rust SDK twin of udfs/c/callback_udf.c.
//! CallbackRequest{functions, payload} → CallbackResponse{results}: calls every listed
//! host function with `payload` (all calls in flight at once), then answers with one
//! result per call, in request order: "ok:<response bytes>" or "error:<error text>".
//! A broken conversation with the host (not an error reply) fails the execution.

// Generated code (build.rs): not every item is used by this binary.
#[allow(dead_code)]
mod proto {
    include!(concat!(env!("OUT_DIR"), "/udf/roma_byob.sample.rs"));
}

use proto::{CallbackRequest, CallbackResponse};
use roma_byob_udf::{Context, HostCallError};

fn handle(request: CallbackRequest, ctx: &mut Context) -> Result<CallbackResponse, HostCallError> {
    let mut calls = Vec::with_capacity(request.functions.len());
    for function in &request.functions {
        calls.push(ctx.start_call_raw(function, &request.payload)?);
    }
    let mut results = Vec::with_capacity(calls.len());
    for id in calls {
        results.push(match ctx.wait_raw(id) {
            Ok(bytes) => format!("ok:{}", String::from_utf8_lossy(&bytes)),
            Err(e @ HostCallError::Protocol(_)) => return Err(e),
            Err(e) => format!("error:{e}"),
        });
    }
    Ok(CallbackResponse { results })
}

fn main() {
    roma_byob_udf::serve_result(handle)
}

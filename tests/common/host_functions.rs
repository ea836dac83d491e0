//! The host functions the Host API tests register (shared with the SDK's tests:
//! `sdk/rust/tests/common` includes this file).

use roma_byob::Engine;

/// `test.Echo` ("pong:" + request), `test.Meta` (the execution's "tenant"
/// metadata), `test.Fail` (an error), `test.Panic` (a panicking handler) and
/// `test.Async` ("async:<request>:<code token>", from an async handler).
pub fn register_test_functions(e: &Engine) {
    e.register_host_function("test.Echo", |_ctx, req| Ok([b"pong:".as_slice(), req].concat())).unwrap();
    e.register_host_function("test.Meta", |ctx, _req| {
        Ok(ctx.metadata.get("tenant").cloned().unwrap_or_default().into_bytes())
    })
    .unwrap();
    e.register_host_function("test.Fail", |_ctx, _req| Err("no such key".to_string())).unwrap();
    e.register_host_function("test.Panic", |_ctx, _req| -> roma_byob::HostResult { panic!("handler bug") }).unwrap();
    e.register_async_host_function("test.Async", |ctx, req| async move {
        Ok(format!("async:{}:{}", String::from_utf8_lossy(&req), ctx.code_token).into_bytes())
    })
    .unwrap();
}

//! roma-byob-build edge cases compile, with both sides generated into one file
//! (proto/codegen_fixture.proto): several rpcs per service, a keyword rpc name
//! (`Type` → `r#type`), types from another package, google.protobuf.Empty (`()`), a
//! service without rpcs.

#[allow(dead_code)]
mod pb {
    pub mod sample {
        include!(concat!(env!("OUT_DIR"), "/both/roma_byob.sample.rs"));
    }
    pub mod fixture {
        include!(concat!(env!("OUT_DIR"), "/both/roma_byob.fixture.rs"));
    }
}

use pb::fixture::*;
use pb::sample::{SampleRequest, SampleResponse};
use roma_byob_udf::Context;

/// Implements one rpc of three: the others keep their default (exit with an error).
struct Hello;

impl MultiUdf for Hello {
    fn hello(&self, request: SampleRequest, _ctx: &mut Context) -> SampleResponse {
        SampleResponse { greeting: format!("bound {}", request.prime_bound), ..Default::default() }
    }
}

struct Host;

impl FixtureHost for Host {
    fn echo(&self, _ctx: &roma_byob::HostCallContext, request: Ping) -> Result<Ping, String> {
        Ok(request)
    }
    fn r#type(&self, _ctx: &roma_byob::HostCallContext, _request: Ping) -> Result<(), String> {
        Err("typed".into())
    }
}

#[test]
fn generated_items_have_the_expected_types() {
    assert_eq!(FIXTURE_HOST_ECHO, "roma_byob.fixture.FixtureHost/Echo");
    assert_eq!(FIXTURE_HOST_TYPE, "roma_byob.fixture.FixtureHost/Type");
    // Function items coerce to the expected signatures (compile-time checks).
    let _: fn(Hello) -> ! = serve_multi_hello;
    let _: fn(Hello) -> ! = serve_multi_type;
    let _: fn(Hello) -> ! = serve_multi_nothing;
    let _: fn(&roma_byob::Engine, Host) -> roma_byob::Result<()> = register_fixture_host;
    let _: fn(&roma_byob::Engine) -> roma_byob::Result<()> = unregister_fixture_host;
    let _: fn(&mut Context, &Ping) -> Result<(), roma_byob_udf::HostCallError> = FixtureHostCaller::r#type;
    let _: fn(&mut Context, &Ping) -> Result<roma_byob_udf::Pending<Ping>, roma_byob_udf::HostCallError> =
        FixtureHostCaller::start_echo;
    let _: fn(&roma_byob::Engine, &roma_byob::CodeToken, &()) -> roma_byob::Result<roma_byob::Execution<()>> =
        MultiClient::nothing;
    let _ = MultiClient::type_with_options;
    let _ = NoRpcClient;
    let _ = NoRpc;
    assert_eq!(Host.echo(&dummy_ctx(), Ping { text: "x".into() }), Ok(Ping { text: "x".into() }));
    assert_eq!(Host.r#type(&dummy_ctx(), Ping::default()), Err("typed".to_string()));
}

fn dummy_ctx() -> roma_byob::HostCallContext {
    roma_byob::HostCallContext {
        code_token: "code-1".parse().unwrap(),
        execution: "exec-0-1".parse().unwrap(),
        metadata: Default::default(),
    }
}

/// The async form owns everything it needs: it outlives the request it was given
/// (a boxed `Send + 'static` future, in every edition).
#[allow(clippy::needless_borrows_for_generic_args)] // the borrow of a local is the point
fn detached(
    engine: &roma_byob::Engine,
    token: &roma_byob::CodeToken,
) -> impl std::future::Future<Output = roma_byob::Result<roma_byob::Response<SampleResponse>>> + Send + 'static {
    let request = SampleRequest::default();
    Multi::hello(engine, token, &request)
}

#[test]
fn the_async_client_is_send_and_static() {
    let _ = detached;
}

//! roma-byob-build end to end: a `KeyValueHost` implementation registered with the
//! generated `register_key_value_host`, the Rust UDF sdk_kv (generated
//! `KeyValueUdfUdf` trait + `KeyValueHostCaller`) called through the generated typed
//! clients, in every available mode and on both transports.

mod common;

use std::collections::HashMap;

use common::pb::kv::*;
use common::*;
use roma_byob::{Engine, HostCallContext, LoadOptions};

const KV: &str = env!("CARGO_BIN_EXE_sdk_kv");

struct Store(HashMap<String, String>);

impl KeyValueHost for Store {
    fn lookup(&self, ctx: &HostCallContext, request: LookupRequest) -> Result<LookupResponse, String> {
        if request.key == "tenant" {
            return Ok(LookupResponse { value: ctx.metadata.get("tenant").cloned().unwrap_or_default() });
        }
        self.0
            .get(&request.key)
            .map(|v| LookupResponse { value: v.clone() })
            .ok_or_else(|| format!("no such key: {}", request.key))
    }
}

fn store() -> Store {
    Store(HashMap::from([("a".to_string(), "1".to_string()), ("b".to_string(), "2".to_string())]))
}

fn entry(key: &str, value: &str, error: &str) -> KvEntry {
    KvEntry { key: key.into(), value: value.into(), error: error.into() }
}

fn request(keys: &[&str]) -> KvRequest {
    KvRequest { keys: keys.iter().map(|k| k.to_string()).collect() }
}

#[test]
fn typed_udf_calls_a_typed_host_service() {
    for mode in modes() {
        let e = engine(mode);
        register_key_value_host(&e, store()).unwrap();
        for shm in TRANSPORTS {
            let t = load(&e, KV, host_api(2, shm));
            // The async spelling: KeyValueUdf::handle(&engine, &token, request).await.
            let mut options = opts();
            options.metadata.insert("tenant".into(), "acme".into());
            let done = futures_executor::block_on(KeyValueUdf::handle_with_options(
                &e,
                &t,
                request(&["b", "a", "missing", "tenant", "a"]),
                options,
            ))
            .unwrap();
            assert_eq!(
                done.response.entries,
                vec![
                    entry("b", "2", ""),
                    entry("a", "1", ""),
                    entry("missing", "", "no such key: missing"),
                    entry("tenant", "acme", ""),
                    entry("a", "1", ""),
                ],
                "{mode:?} shm={shm:?}"
            );
            assert!(done.metrics.response > std::time::Duration::ZERO);
            // The same through the typed client: a pending Execution, `.wait()`ed.
            let req = request(&["a"]);
            let done = KeyValueUdfClient::handle(&e, &t, &req).unwrap().wait().unwrap();
            assert_eq!(done.response.entries, vec![entry("a", "1", "")]);
            // Exactly the spelling, with the request by value, no options.
            let done = futures_executor::block_on(KeyValueUdf::handle(&e, &t, request(&[]))).unwrap();
            assert!(done.response.entries.is_empty());
        }
    }
}

#[test]
fn registration_names_and_unregistration() {
    assert_eq!(KEY_VALUE_HOST_LOOKUP, "roma_byob.kv.KeyValueHost/Lookup");
    let e = engine(roma_byob::Mode::Minimal);
    let t = load(&e, KV, host_api(1, None));
    // Nothing registered: the UDF sees UnknownFunction.
    let done = KeyValueUdfClient::handle(&e, &t, &request(&["a"])).unwrap().wait().unwrap();
    assert_eq!(done.response.entries, vec![entry("a", "", "no host function roma_byob.kv.KeyValueHost/Lookup")]);
    register_key_value_host(&e, store()).unwrap();
    assert!(register_key_value_host(&e, store()).is_err(), "registering twice fails");
    let done = KeyValueUdfClient::handle(&e, &t, &request(&["a"])).unwrap().wait().unwrap();
    assert_eq!(done.response.entries, vec![entry("a", "1", "")], "the first registration stays after the failed one");
    unregister_key_value_host(&e).unwrap();
    let done = KeyValueUdfClient::handle(&e, &t, &request(&["a"])).unwrap().wait().unwrap();
    assert_eq!(done.response.entries[0].error, "no host function roma_byob.kv.KeyValueHost/Lookup");
}

#[test]
fn undecodable_host_requests_get_an_error_reply() {
    let e = engine(roma_byob::Mode::Minimal);
    register_key_value_host(&e, store()).unwrap();
    // sdk_callbacks sends raw bytes: an invalid LookupRequest.
    let t = load(&e, env!("CARGO_BIN_EXE_sdk_callbacks"), host_api(1, None));
    let req =
        common::pb::sample::CallbackRequest { functions: vec![KEY_VALUE_HOST_LOOKUP.into()], payload: vec![0x0a, 50] };
    let done = e.execute::<_, common::pb::sample::CallbackResponse>(&t, &req, opts()).unwrap().wait().unwrap();
    let r = &done.response.results[0];
    assert!(
        r.starts_with(
            "error:roma_byob.kv.KeyValueHost/Lookup: the request does not decode as roma_byob.kv.LookupRequest"
        ),
        "{r}"
    );
}

#[test]
fn an_engine_without_the_opt_in_refuses_calls() {
    let e: Engine = engine(roma_byob::Mode::Minimal);
    register_key_value_host(&e, store()).unwrap();
    let t = load(&e, KV, LoadOptions::default());
    let done = KeyValueUdfClient::handle(&e, &t, &request(&["a"])).unwrap().wait().unwrap();
    assert!(done.response.entries[0].error.starts_with("the host API is not enabled"), "{:?}", done.response);
}

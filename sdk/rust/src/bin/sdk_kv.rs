//! sdk_kv: implements the generated `KeyValueUdfUdf` trait (proto/kv.proto, rpc
//! `roma_byob.kv.KeyValueUdf/Handle`). For each key of the request it calls the host
//! service `roma_byob.kv.KeyValueHost/Lookup` through the generated
//! `KeyValueHostCaller` (all lookups in flight at once) and answers with the values.

// Generated code (build.rs): not every item is used by this binary.
#[allow(dead_code)]
mod kv {
    include!(concat!(env!("OUT_DIR"), "/udf/roma_byob.kv.rs"));
}

use kv::{KeyValueHostCaller, KeyValueUdfUdf, KvEntry, KvRequest, KvResponse, LookupRequest};
use roma_byob_udf::{Context, HostCallError};

struct KeyValue;

impl KeyValueUdfUdf for KeyValue {
    fn handle(&self, request: KvRequest, ctx: &mut Context) -> KvResponse {
        let pending: Vec<_> = request
            .keys
            .iter()
            .map(|key| KeyValueHostCaller::start_lookup(ctx, &LookupRequest { key: key.clone() }))
            .collect();
        let entries = request
            .keys
            .into_iter()
            .zip(pending)
            .map(|(key, call)| match call.and_then(|p| p.wait(ctx)) {
                Ok(found) => KvEntry { key, value: found.value, error: String::new() },
                Err(HostCallError::UnknownFunction { function, .. }) => {
                    KvEntry { key, value: String::new(), error: format!("no host function {function}") }
                }
                Err(e) => KvEntry { key, value: String::new(), error: e.to_string() },
            })
            .collect();
        KvResponse { entries }
    }
}

fn main() {
    kv::serve_key_value_udf_handle(KeyValue)
}

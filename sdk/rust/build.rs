//! Generates the protobuf code of the example UDFs (src/bin) and the integration
//! tests, with roma-byob-build (protox: no system protoc). Nothing happens without
//! the `examples` feature: the SDK library itself needs no generated code.

fn main() {
    #[cfg(feature = "examples")]
    examples::generate();
}

#[cfg(feature = "examples")]
mod examples {
    use std::path::PathBuf;

    pub fn generate() {
        let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR is set by cargo"));
        let protos = ["../../proto/sample.proto", "proto/kv.proto", "proto/round_trip.proto"];
        let includes = ["../../proto", "proto"];
        let hosts = ["roma_byob.kv.KeyValueHost", "roma_byob.fixture.FixtureHost"];
        // UDF side (src/bin): no dependency on the engine crate.
        roma_byob_build::Builder::new()
            .host_client(false)
            .host_services(&hosts[..1])
            .out_dir(out.join("udf"))
            .compile(&protos, &includes)
            .expect("generate the UDF-side code");
        // Host side (tests/): no dependency on the UDF SDK.
        roma_byob_build::Builder::new()
            .udf_trait(false)
            .host_services(&hosts[..1])
            .out_dir(out.join("host"))
            .compile(&protos, &includes)
            .expect("generate the host-side code");
        // Both sides in one file (tests/generated.rs compiles the edge cases).
        roma_byob_build::Builder::new()
            .host_services(&hosts[1..])
            .out_dir(out.join("both"))
            .compile(&["proto/codegen_fixture.proto"], &includes)
            .expect("generate the fixture code");
    }
}

//! `roma-byob-build`: generate typed roma-byob interfaces from `.proto` services, in
//! a build script (protox + prost-build: no system `protoc`).
//!
//! Two kinds of service:
//!
//! - **UDF services** (the default): the host executes a UDF binary with the rpc's
//!   request and gets its response. Generated: a typed host client
//!   (`FooClient::bar(&engine, &token, &req)` → `roma_byob::Execution<Resp>`, and the
//!   async spelling `Foo::bar(&engine, &token, req).await` →
//!   `roma_byob::Result<roma_byob::Response<Resp>>`) and, for the UDF, a trait
//!   `FooUdf` plus `serve_foo_bar(udf)`. The UDF wire protocol carries no method
//!   name, so **one binary serves one rpc**: `serve_foo_bar` serves `Foo/Bar` only.
//! - **Host services** (listed with [`Builder::host_services`]): functions the host
//!   registers and UDFs call during an execution. Generated: a trait `Foo` with
//!   `register_foo(&engine, impl Foo)` (host functions named
//!   `"<package>.Foo/<Rpc>"`), and for the UDF a typed caller
//!   `FooCaller::bar(ctx, &req)` / `FooCaller::start_bar(ctx, &req)`.
//!
//! Host-side items need the `roma-byob` crate, UDF-side items the `roma-byob-udf`
//! crate; switch either side off ([`Builder::host_client`], [`Builder::udf_trait`])
//! so that a UDF crate never depends on the engine and vice versa.
//!
//! ```no_run
//! // build.rs of a UDF crate
//! roma_byob_build::Builder::new()
//!     .host_client(false)
//!     .host_services(&["roma_byob.kv.KeyValueHost"])
//!     .compile(&["proto/kv.proto"], &["proto"])
//!     .unwrap();
//! ```
//!
//! prost writes one file per proto package, `$OUT_DIR/<package>.rs`: the messages
//! and, after them, the generated service items. Include it with
//! `include!(concat!(env!("OUT_DIR"), "/roma_byob.kv.rs"));`.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::io;
use std::path::{Path, PathBuf};

use heck::{ToShoutySnakeCase, ToSnakeCase};
use prost_build::{Comments, Method, Service, ServiceGenerator};
use prost_types::FileDescriptorSet;

/// What to generate. Shared by [`Builder`] and [`Generator`].
#[derive(Clone, Debug)]
struct Options {
    host: bool,
    udf: bool,
    host_services: BTreeSet<String>,
    host_crate: String,
    udf_crate: String,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            host: true,
            udf: true,
            host_services: BTreeSet::new(),
            host_crate: "::roma_byob".into(),
            udf_crate: "::roma_byob_udf".into(),
        }
    }
}

/// Configures and runs the generation (see the crate docs).
#[derive(Clone, Debug)]
pub struct Builder {
    options: Options,
    out_dir: Option<PathBuf>,
    rerun_if_changed: bool,
}

impl Default for Builder {
    fn default() -> Self {
        Builder::new()
    }
}

impl Builder {
    /// Both sides on, no host service, output to `$OUT_DIR`.
    pub fn new() -> Builder {
        Builder { options: Options::default(), out_dir: None, rerun_if_changed: true }
    }

    /// Host-side items: typed clients of UDF services, traits and `register_*`
    /// functions of host services. They use the `roma-byob` crate. Default: on.
    pub fn host_client(mut self, on: bool) -> Self {
        self.options.host = on;
        self
    }

    /// UDF-side items: `*Udf` traits and `serve_*` functions of UDF services, `*Caller`
    /// types of host services. They use the `roma-byob-udf` crate. Default: on.
    pub fn udf_trait(mut self, on: bool) -> Self {
        self.options.udf = on;
        self
    }

    /// Fully qualified names (`package.Service`) of the services the host implements
    /// and UDFs call back. Every other service is a UDF service.
    pub fn host_services<S: AsRef<str>>(mut self, names: &[S]) -> Self {
        self.options.host_services.extend(names.iter().map(|n| n.as_ref().trim_start_matches('.').to_string()));
        self
    }

    /// Path of the engine crate in generated code (default `::roma_byob`).
    pub fn host_crate(mut self, path: &str) -> Self {
        self.options.host_crate = path.to_string();
        self
    }

    /// Path of the UDF SDK crate in generated code (default `::roma_byob_udf`).
    pub fn udf_crate(mut self, path: &str) -> Self {
        self.options.udf_crate = path.to_string();
        self
    }

    /// Where to write `<package>.rs` (default `$OUT_DIR`).
    pub fn out_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.out_dir = Some(dir.into());
        self
    }

    /// Whether [`Builder::compile`] prints `cargo:rerun-if-changed` for its inputs
    /// (default: on, when run by cargo).
    pub fn rerun_if_changed(mut self, on: bool) -> Self {
        self.rerun_if_changed = on;
        self
    }

    /// The service generator alone, for a `prost_build::Config` of your own
    /// (`config.service_generator(Box::new(builder.generator()))`).
    pub fn generator(&self) -> Generator {
        Generator { options: self.options.clone() }
    }

    /// Compiles `protos` (searching imports in `includes`) with protox and writes the
    /// messages and the generated service items.
    pub fn compile(&self, protos: &[impl AsRef<Path>], includes: &[impl AsRef<Path>]) -> io::Result<()> {
        if self.rerun_if_changed && std::env::var_os("CARGO").is_some() && std::env::var_os("OUT_DIR").is_some() {
            for p in protos.iter().map(AsRef::as_ref).chain(includes.iter().map(AsRef::as_ref)) {
                println!("cargo:rerun-if-changed={}", p.display());
            }
        }
        let fds = protox::compile(protos, includes)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
        self.compile_fds(fds)
    }

    /// Generates from an already compiled descriptor set.
    pub fn compile_fds(&self, fds: FileDescriptorSet) -> io::Result<()> {
        self.compile_fds_with_config(prost_build::Config::new(), fds)
    }

    /// As [`Builder::compile_fds`] with a prost-build configuration of your own
    /// (attributes, extern paths, …); its service generator and (unless set)
    /// output directory are replaced.
    pub fn compile_fds_with_config(&self, mut config: prost_build::Config, fds: FileDescriptorSet) -> io::Result<()> {
        self.check(&fds)?;
        if let Some(dir) = &self.out_dir {
            std::fs::create_dir_all(dir)?;
            config.out_dir(dir);
        }
        config.service_generator(Box::new(self.generator()));
        config.compile_fds(fds)
    }

    /// Every listed host service exists; no rpc streams.
    fn check(&self, fds: &FileDescriptorSet) -> io::Result<()> {
        let mut services = BTreeSet::new();
        for file in &fds.file {
            let package = file.package();
            for s in &file.service {
                let full = qualified(package, s.name());
                for m in &s.method {
                    if m.client_streaming() || m.server_streaming() {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidInput,
                            format!(
                                "rpc {full}/{} streams; roma-byob rpcs are unary (one request, one response)",
                                m.name()
                            ),
                        ));
                    }
                }
                services.insert(full);
            }
        }
        if let Some(missing) = self.options.host_services.iter().find(|h| !services.contains(*h)) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("host service {missing} is not defined in the compiled protos (services: {services:?})"),
            ));
        }
        Ok(())
    }
}

fn qualified(package: &str, name: &str) -> String {
    if package.is_empty() {
        name.to_string()
    } else {
        format!("{package}.{name}")
    }
}

/// The `prost_build::ServiceGenerator` behind [`Builder`].
#[derive(Clone, Debug)]
pub struct Generator {
    options: Options,
}

impl ServiceGenerator for Generator {
    fn generate(&mut self, service: Service, buf: &mut String) {
        let full = qualified(&service.package, &service.proto_name);
        let methods: Vec<&Method> =
            service.methods.iter().filter(|m| !m.client_streaming && !m.server_streaming).collect();
        for m in service.methods.iter().filter(|m| m.client_streaming || m.server_streaming) {
            let _ = writeln!(buf, "// roma-byob-build: streaming rpc {full}/{} skipped (rpcs are unary)", m.proto_name);
        }
        let g = Gen { o: &self.options, s: &service, full: &full, methods: &methods };
        if self.options.host_services.contains(&full) {
            g.function_names(buf);
            if self.options.host {
                g.host_service(buf);
            }
            if self.options.udf {
                g.udf_caller(buf);
            }
        } else {
            if self.options.host {
                g.host_client(buf);
            }
            if self.options.udf {
                g.udf_service(buf);
            }
        }
    }
}

/// Strips the raw-identifier prefix prost adds to keywords (`r#type` → `type`).
fn bare(ident: &str) -> &str {
    ident.strip_prefix("r#").unwrap_or(ident)
}

/// ` -> T`, or nothing for `()` (google.protobuf.Empty).
fn returns(ty: &str) -> String {
    if ty == "()" {
        String::new()
    } else {
        format!(" -> {ty}")
    }
}

fn doc(buf: &mut String, comments: &Comments, lines: &[String]) {
    comments.append_with_indent(0, buf);
    if !comments.leading.is_empty() || !comments.trailing.is_empty() {
        buf.push_str("///\n");
    }
    for l in lines {
        if l.is_empty() {
            buf.push_str("///\n");
        } else {
            let _ = writeln!(buf, "/// {l}");
        }
    }
}

struct Gen<'a> {
    o: &'a Options,
    s: &'a Service,
    full: &'a str,
    methods: &'a [&'a Method],
}

impl Gen<'_> {
    fn snake(&self) -> String {
        self.s.name.to_snake_case()
    }

    fn const_name(&self, m: &Method) -> String {
        format!("{}_{}", self.s.name.to_shouty_snake_case(), bare(&m.name).to_shouty_snake_case())
    }

    fn rpc(&self, m: &Method) -> String {
        format!("{}/{}", self.full, m.proto_name)
    }

    /// `pub const SERVICE_METHOD: &str = "pkg.Service/Method";` for host services.
    fn function_names(&self, buf: &mut String) {
        for m in self.methods {
            let _ = writeln!(
                buf,
                "/// Host function name of rpc `{rpc}` (`{svc}` is a host service).\npub const {c}: &str = \"{rpc}\";",
                rpc = self.rpc(m),
                svc = self.s.proto_name,
                c = self.const_name(m),
            );
        }
    }

    fn host_client(&self, buf: &mut String) {
        let h = &self.o.host_crate;
        let name = &self.s.name;
        doc(
            buf,
            &self.s.comments,
            &[
                format!("Typed host-side client of the UDF service `{}` (generated by roma-byob-build).", self.full),
                "Each rpc is served by its own UDF binary: pass the code token of the binary".into(),
                "that serves the rpc. Methods return the pending execution (`.await` it, or".into(),
                format!("`.wait()`, or cancel it with `.token()`); [`{name}`] has the plain async form."),
            ],
        );
        let _ = writeln!(buf, "#[derive(Clone, Copy, Debug, Default)]\npub struct {name}Client;\nimpl {name}Client {{");
        for m in self.methods {
            let (i, out, b) = (&m.input_type, &m.output_type, bare(&m.name));
            doc(buf, &m.comments, &[format!("Executes rpc `{}` on a fresh worker of `token`.", self.rpc(m))]);
            let _ = writeln!(
                buf,
                "pub fn {n}(engine: &{h}::Engine, token: &{h}::CodeToken, request: &{i}) -> {h}::Result<{h}::Execution<{out}>> {{
                    engine.execute::<{i}, {out}>(token, request, ::core::default::Default::default())
                }}",
                n = m.name,
            );
            doc(buf, &Comments::default(), &[format!("[`{name}Client::{n}`] with execution options.", n = m.name)]);
            let _ = writeln!(
                buf,
                "pub fn {b}_with_options(engine: &{h}::Engine, token: &{h}::CodeToken, request: &{i}, options: {h}::ExecuteOptions) -> {h}::Result<{h}::Execution<{out}>> {{
                    engine.execute::<{i}, {out}>(token, request, options)
                }}"
            );
        }
        buf.push_str("}\n");

        doc(
            buf,
            &self.s.comments,
            &[
                format!(
                    "Async host-side client of the UDF service `{}`: `{name}::method(&engine, &token, request).await`",
                    self.full
                ),
                "gives the typed response with its logs and metrics. Each rpc is served by its own".into(),
                "UDF binary: pass the code token of the binary that serves the rpc.".into(),
            ],
        );
        let _ = writeln!(buf, "#[derive(Clone, Copy, Debug, Default)]\npub struct {name};\nimpl {name} {{");
        for m in self.methods {
            let (i, out, b) = (&m.input_type, &m.output_type, bare(&m.name));
            // A boxed future, not `impl Future`: its type captures no lifetime or type
            // parameter in any edition, so it is `'static` whatever `request` borrows.
            let fut = format!(
                "::core::pin::Pin<::std::boxed::Box<dyn ::core::future::Future<Output = {h}::Result<{h}::Response<{out}>>> + ::core::marker::Send + 'static>>"
            );
            doc(
                buf,
                &m.comments,
                &[
                    format!("Executes rpc `{}` on a fresh worker of `token`; `request` by value or", self.rpc(m)),
                    "by reference. The execution is submitted at once; the future waits for it.".into(),
                ],
            );
            let _ = writeln!(
                buf,
                "pub fn {n}(engine: &{h}::Engine, token: &{h}::CodeToken, request: impl ::core::borrow::Borrow<{i}>) -> {fut} {{
                    Self::{b}_with_options(engine, token, request, ::core::default::Default::default())
                }}",
                n = m.name,
            );
            doc(buf, &Comments::default(), &[format!("[`{name}::{n}`] with execution options.", n = m.name)]);
            let _ = writeln!(
                buf,
                "pub fn {b}_with_options(engine: &{h}::Engine, token: &{h}::CodeToken, request: impl ::core::borrow::Borrow<{i}>, options: {h}::ExecuteOptions) -> {fut} {{
                    let execution = engine.execute::<{i}, {out}>(token, ::core::borrow::Borrow::borrow(&request), options);
                    ::std::boxed::Box::pin(async move {{ execution?.await }})
                }}"
            );
        }
        buf.push_str("}\n");
    }

    fn udf_service(&self, buf: &mut String) {
        let u = &self.o.udf_crate;
        let name = &self.s.name;
        doc(
            buf,
            &self.s.comments,
            &[
                format!("UDF side of the service `{}` (generated by roma-byob-build).", self.full),
                String::new(),
                "Implement the rpc this binary serves and call its `serve_*` function from".into(),
                "`main`. The wire protocol carries no method name, so a UDF binary serves exactly".into(),
                "one rpc; the default methods end the UDF with an error (status 1).".into(),
            ],
        );
        let _ = writeln!(buf, "pub trait {name}Udf {{");
        for m in self.methods {
            doc(buf, &m.comments, &[format!("Handles rpc `{}`.", self.rpc(m))]);
            let _ = writeln!(
                buf,
                "fn {n}(&self, request: {i}, ctx: &mut {u}::Context){ret} {{
                    let _ = (request, ctx);
                    {u}::unimplemented_rpc(\"{rpc}\")
                }}",
                n = m.name,
                i = m.input_type,
                ret = returns(&m.output_type),
                rpc = self.rpc(m),
            );
        }
        buf.push_str("}\n");
        for m in self.methods {
            doc(
                buf,
                &Comments::default(),
                &[
                    format!(
                        "Serves rpc `{}` with `udf` and exits: ready byte, request, `udf.{}(…)`,",
                        self.rpc(m),
                        bare(&m.name)
                    ),
                    "response, exit status 0 (see `roma_byob_udf::serve`).".into(),
                ],
            );
            let _ = writeln!(
                buf,
                "pub fn serve_{svc}_{b}(udf: impl {name}Udf) -> ! {{
                    {u}::serve(move |request: {i}, ctx: &mut {u}::Context| udf.{n}(request, ctx))
                }}",
                svc = self.snake(),
                b = bare(&m.name),
                n = m.name,
                i = m.input_type,
            );
        }
    }

    fn host_service(&self, buf: &mut String) {
        let h = &self.o.host_crate;
        let name = &self.s.name;
        let snake = self.snake();
        doc(
            buf,
            &self.s.comments,
            &[
                format!("Host side of the host service `{}` (generated by roma-byob-build): implement", self.full),
                format!("it and register it with [`register_{snake}`]; UDFs loaded with"),
                format!("`LoadOptions::host_api` call it through `{name}Caller`. A returned `Err` text"),
                "(or a panic) reaches the UDF as the call's error.".into(),
            ],
        );
        let _ = writeln!(buf, "pub trait {name}: ::core::marker::Send + ::core::marker::Sync + 'static {{");
        for m in self.methods {
            doc(buf, &m.comments, &[format!("Host function `\"{}\"`.", self.rpc(m))]);
            let _ = writeln!(
                buf,
                "fn {n}(&self, ctx: &{h}::HostCallContext, request: {i}) -> ::core::result::Result<{out}, ::std::string::String>;",
                n = m.name,
                i = m.input_type,
                out = m.output_type,
            );
        }
        buf.push_str("}\n");
        let names: Vec<String> = self.methods.iter().map(|m| format!("`\"{}\"`", self.rpc(m))).collect();
        doc(
            buf,
            &Comments::default(),
            &[
                format!("Registers `service` as the host functions {}.", names.join(", ")),
                "Requests that do not decode get an error reply. On error nothing stays registered.".into(),
            ],
        );
        let _ =
            writeln!(buf, "pub fn register_{snake}(engine: &{h}::Engine, service: impl {name}) -> {h}::Result<()> {{");
        if self.methods.is_empty() {
            buf.push_str("let _ = (engine, service);\n");
        } else {
            buf.push_str(
                "let service = ::std::sync::Arc::new(service);\nlet mut registered: ::std::vec::Vec<&'static str> = ::std::vec::Vec::new();\n",
            );
        }
        for m in self.methods {
            let _ = writeln!(
                buf,
                "{{
                    let service = ::std::sync::Arc::clone(&service);
                    let result = engine.register_host_function({c}, move |ctx: &{h}::HostCallContext, request: &[u8]| {{
                        let request = <{i} as ::prost::Message>::decode(request)
                            .map_err(|e| ::std::format!(\"{{}}: the request does not decode as {ip}: {{}}\", {c}, e))?;
                        service.{n}(ctx, request).map(|response| ::prost::Message::encode_to_vec(&response))
                    }});
                    if let ::core::result::Result::Err(e) = result {{
                        for name in registered {{
                            let _ = engine.unregister_host_function(name);
                        }}
                        return ::core::result::Result::Err(e);
                    }}
                    registered.push({c});
                }}",
                c = self.const_name(m),
                n = m.name,
                i = m.input_type,
                ip = m.input_proto_type.trim_start_matches('.'),
            );
        }
        buf.push_str("::core::result::Result::Ok(())\n}\n");
        doc(buf, &Comments::default(), &[format!("Unregisters the host functions of `{}`.", self.full)]);
        let _ = writeln!(buf, "pub fn unregister_{snake}(engine: &{h}::Engine) -> {h}::Result<()> {{");
        if self.methods.is_empty() {
            buf.push_str("let _ = engine;\n");
        }
        for m in self.methods {
            let _ = writeln!(buf, "engine.unregister_host_function({})?;", self.const_name(m));
        }
        buf.push_str("::core::result::Result::Ok(())\n}\n");
    }

    fn udf_caller(&self, buf: &mut String) {
        let u = &self.o.udf_crate;
        let name = &self.s.name;
        doc(
            buf,
            &self.s.comments,
            &[
                format!("UDF-side caller of the host service `{}` (generated by roma-byob-build).", self.full),
                "Works when the code token was loaded with `LoadOptions::host_api` and the host".into(),
                format!("registered the service (`register_{}`).", self.snake()),
            ],
        );
        let _ = writeln!(buf, "#[derive(Clone, Copy, Debug, Default)]\npub struct {name}Caller;\nimpl {name}Caller {{");
        for m in self.methods {
            let (i, out, b) = (&m.input_type, &m.output_type, bare(&m.name));
            doc(buf, &m.comments, &[format!("Calls host function `\"{}\"` and waits for its reply.", self.rpc(m))]);
            let _ = writeln!(
                buf,
                "pub fn {n}(ctx: &mut {u}::Context, request: &{i}) -> ::core::result::Result<{out}, {u}::HostCallError> {{
                    ctx.call({c}, request)
                }}",
                n = m.name,
                c = self.const_name(m),
            );
            doc(
                buf,
                &Comments::default(),
                &[
                    format!("Starts a call to `\"{}\"` without waiting: start several, then", self.rpc(m)),
                    "`.wait(ctx)` each (the host runs calls in flight concurrently).".into(),
                ],
            );
            let _ = writeln!(
                buf,
                "pub fn start_{b}(ctx: &mut {u}::Context, request: &{i}) -> ::core::result::Result<{u}::Pending<{out}>, {u}::HostCallError> {{
                    ctx.start_call({c}, request).map({u}::Pending::new)
                }}",
                c = self.const_name(m),
            );
        }
        buf.push_str("}\n");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PROTO: &str = r#"
syntax = "proto3";
package demo.v1;

message SampleRequest { int32 n = 1; }
message SampleResponse { string greeting = 1; }
message LookupRequest { string key = 1; }
message LookupResponse { string value = 1; }

// The sample service.
// Second line of its docs.
service SampleService {
  // Says hello.
  rpc Sample(SampleRequest) returns (SampleResponse);
  rpc Type(SampleRequest) returns (SampleResponse);
}

// Lookups the host answers.
service KeyValueHost {
  // Looks a key up.
  rpc Lookup(LookupRequest) returns (LookupResponse);
}

service Empty {}
"#;

    /// Generates `demo.v1.rs` for PROTO with `builder` and returns it.
    fn generate(name: &str, builder: Builder, proto: &str) -> io::Result<String> {
        let dir = std::env::temp_dir().join(format!("roma-byob-build-test-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("demo.proto"), proto)?;
        let result =
            builder.out_dir(dir.join("out")).rerun_if_changed(false).compile(&[dir.join("demo.proto")], &[&dir]);
        let text = result.and_then(|()| std::fs::read_to_string(dir.join("out/demo.v1.rs")));
        let _ = std::fs::remove_dir_all(&dir);
        text
    }

    fn squash(s: &str) -> String {
        s.split_whitespace().collect::<Vec<_>>().join(" ")
    }

    #[test]
    fn both_sides() {
        let code = generate("both", Builder::new().host_services(&["demo.v1.KeyValueHost"]), PROTO).unwrap();
        let flat = squash(&code);
        for item in [
            // UDF service, host side
            "pub struct SampleServiceClient;",
            "pub fn sample( engine: &::roma_byob::Engine, token: &::roma_byob::CodeToken, request: &SampleRequest, ) -> ::roma_byob::Result<::roma_byob::Execution<SampleResponse>>",
            "pub fn sample_with_options(",
            "options: ::roma_byob::ExecuteOptions",
            "pub struct SampleService;",
            "request: impl ::core::borrow::Borrow<SampleRequest>",
            "::roma_byob::Result<::roma_byob::Response<SampleResponse>>",
            "::std::boxed::Box::pin(async move { execution?.await })",
            "::core::pin::Pin< ::std::boxed::Box< dyn ::core::future::Future< Output = ::roma_byob::Result<::roma_byob::Response<SampleResponse>>, > + ::core::marker::Send + 'static, >, >",
            // keyword rpc names
            "pub fn r#type(",
            "pub fn type_with_options(",
            "pub fn serve_sample_service_type(udf: impl SampleServiceUdf) -> !",
            // UDF service, UDF side
            "pub trait SampleServiceUdf {",
            "fn sample( &self, request: SampleRequest, ctx: &mut ::roma_byob_udf::Context, ) -> SampleResponse",
            "::roma_byob_udf::unimplemented_rpc(\"demo.v1.SampleService/Sample\")",
            "pub fn serve_sample_service_sample(udf: impl SampleServiceUdf) -> !",
            // host service
            "pub const KEY_VALUE_HOST_LOOKUP: &str = \"demo.v1.KeyValueHost/Lookup\";",
            "pub trait KeyValueHost: ::core::marker::Send + ::core::marker::Sync + 'static {",
            "fn lookup( &self, ctx: &::roma_byob::HostCallContext, request: LookupRequest, ) -> ::core::result::Result<LookupResponse, ::std::string::String>;",
            "pub fn register_key_value_host( engine: &::roma_byob::Engine, service: impl KeyValueHost, ) -> ::roma_byob::Result<()>",
            "engine .register_host_function( KEY_VALUE_HOST_LOOKUP,",
            "pub fn unregister_key_value_host(",
            "pub struct KeyValueHostCaller;",
            "pub fn lookup( ctx: &mut ::roma_byob_udf::Context, request: &LookupRequest, ) -> ::core::result::Result<LookupResponse, ::roma_byob_udf::HostCallError>",
            "pub fn start_lookup(",
            "::roma_byob_udf::Pending<LookupResponse>",
            // a service with no rpc still generates valid code
            "pub struct EmptyClient;",
            "pub trait EmptyUdf {}",
        ] {
            assert!(flat.contains(&squash(item)), "missing {item:?} in\n{code}");
        }
        // A host service has no client/UDF trait, a UDF service no caller/registration.
        for absent in [
            "KeyValueHostClient",
            "KeyValueHostUdf",
            "SampleServiceCaller",
            "register_sample_service",
            "SAMPLE_SERVICE_SAMPLE",
        ] {
            assert!(!code.contains(absent), "unexpected {absent} in\n{code}");
        }
        // Messages are still there.
        assert!(code.contains("pub struct SampleRequest"));
    }

    #[test]
    fn proto_comments_become_doc_comments() {
        let code = generate("docs", Builder::new().host_services(&["demo.v1.KeyValueHost"]), PROTO).unwrap();
        assert!(
            code.contains("/// The sample service.\n/// Second line of its docs.\n///\n/// Typed host-side client"),
            "{code}"
        );
        assert!(
            code.contains("    /// Says hello.\n    ///\n    /// Executes rpc `demo.v1.SampleService/Sample`"),
            "{code}"
        );
        assert!(code.contains("/// Lookups the host answers.\n///\n/// Host side of the host service"), "{code}");
        assert!(code.contains("    /// Looks a key up.\n    ///\n    /// Calls host function"), "{code}");
    }

    #[test]
    fn one_side_only() {
        let host =
            generate("host", Builder::new().udf_trait(false).host_services(&["demo.v1.KeyValueHost"]), PROTO).unwrap();
        assert!(!host.contains("roma_byob_udf"), "{host}");
        assert!(host.contains("pub struct SampleServiceClient;") && host.contains("pub fn register_key_value_host("));
        let udf =
            generate("udf", Builder::new().host_client(false).host_services(&["demo.v1.KeyValueHost"]), PROTO).unwrap();
        assert!(!udf.contains("::roma_byob::"), "{udf}");
        assert!(udf.contains("pub trait SampleServiceUdf") && udf.contains("pub struct KeyValueHostCaller;"));
        assert!(udf.contains("pub const KEY_VALUE_HOST_LOOKUP"), "function names on both sides");
        let custom = generate("paths", Builder::new().host_crate("crate::engine").udf_crate("sdk"), PROTO).unwrap();
        assert!(custom.contains("crate::engine::Engine") && custom.contains("sdk::Context"), "{custom}");
    }

    #[test]
    fn unknown_host_services_and_streaming_rpcs_are_errors() {
        let e = generate("unknown", Builder::new().host_services(&["demo.v1.Nope"]), PROTO).unwrap_err();
        assert!(e.to_string().contains("host service demo.v1.Nope is not defined"), "{e}");
        let streaming = format!("{PROTO}\nservice S {{ rpc Watch(SampleRequest) returns (stream SampleResponse); }}\n");
        let e = generate("stream", Builder::new(), &streaming).unwrap_err();
        assert!(e.to_string().contains("rpc demo.v1.S/Watch streams"), "{e}");
        let e = generate("syntax", Builder::new(), "syntax = \"proto3\"; message {").unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
    }

    #[test]
    fn leading_dots_in_host_service_names_are_accepted() {
        let code = generate("dots", Builder::new().host_services(&[".demo.v1.KeyValueHost"]), PROTO).unwrap();
        assert!(code.contains("pub struct KeyValueHostCaller;"));
    }
}

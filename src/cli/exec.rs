//! `roma-byob exec`: one request, one fresh worker.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use roma_byob::{Engine, ExecuteOptions, LoadOptions};

use crate::json::{self, ProtoTypes};
use crate::EngineArgs;

#[derive(Args, Debug)]
pub struct ExecArgs {
    #[command(flatten)]
    engine: EngineArgs,
    /// The UDF binary (an ELF executable speaking the Roma BYOB protocol): a path, or
    /// the name of a sample UDF such as hello_nolibc.
    #[arg(long)]
    binary: PathBuf,
    /// Pre-started workers.
    #[arg(long, default_value_t = 1)]
    workers: usize,
    /// Capture the UDF's stdout/stderr and print them on stderr.
    #[arg(long)]
    log: bool,
    /// Zygote start: fork workers from a pre-main template of the binary
    /// (minimal mode; dynamically linked glibc UDFs; see LoadOptions::zygote).
    #[arg(long)]
    zygote: bool,
    /// .proto file describing the request and response (enables JSON).
    #[arg(long, requires_all = ["request_type", "response_type"])]
    proto: Option<PathBuf>,
    /// Full name of the request message, e.g. roma_byob.sample.SampleRequest.
    #[arg(long)]
    request_type: Option<String>,
    /// Full name of the response message.
    #[arg(long)]
    response_type: Option<String>,
    /// The request as JSON (with --proto); read from stdin when absent.
    #[arg(long, requires = "proto")]
    json: Option<String>,
    /// Execution timeout in milliseconds.
    #[arg(long, default_value_t = 30_000)]
    timeout_ms: u64,
}

pub fn run(a: ExecArgs) -> Result<(), String> {
    let (mode, _) = a.engine.resolve_mode()?;
    let types = match &a.proto {
        Some(p) => {
            let t = ProtoTypes::compile(p)?;
            let req = t.message(a.request_type.as_deref().unwrap_or_default())?;
            let resp = t.message(a.response_type.as_deref().unwrap_or_default())?;
            Some((req, resp))
        }
        None => None,
    };
    let request = match (&types, &a.json) {
        (Some((req, _)), Some(j)) => json::json_to_bytes(req, j)?,
        (Some((req, _)), None) => json::json_to_bytes(req, &read_stdin_string()?)?,
        (None, _) => read_stdin_bytes()?,
    };
    let engine = Engine::new(a.engine.config(mode)?).map_err(|e| e.to_string())?;
    let token = engine
        .load(roma_byob::samples::resolve(&a.binary), LoadOptions { workers: a.workers, log_egress: a.log, zygote: a.zygote, ..Default::default() })
        .map_err(|e| e.to_string())?;
    let opts = ExecuteOptions { timeout: Duration::from_millis(a.timeout_ms), ..Default::default() };
    let done = engine.execute_raw(&token, &request, opts).map_err(|e| e.to_string())?.wait().map_err(|e| e.to_string())?;
    if a.log {
        if let Ok(logs) = &done.logs {
            let mut err = std::io::stderr().lock();
            let _ = err.write_all(&logs.stdout);
            let _ = err.write_all(&logs.stderr);
        }
    }
    let mut out = std::io::stdout().lock();
    match &types {
        Some((_, resp)) => {
            let text = json::bytes_to_json(resp, &done.response)?;
            writeln!(out, "{text}").map_err(|e| e.to_string())?;
        }
        None => out.write_all(&done.response).map_err(|e| e.to_string())?,
    }
    out.flush().map_err(|e| e.to_string())
}

fn read_stdin_bytes() -> Result<Vec<u8>, String> {
    let mut v = Vec::new();
    std::io::stdin().read_to_end(&mut v).map_err(|e| format!("reading the request from stdin: {e}"))?;
    Ok(v)
}

fn read_stdin_string() -> Result<String, String> {
    String::from_utf8(read_stdin_bytes()?).map_err(|_| "the JSON request on stdin is not UTF-8".into())
}

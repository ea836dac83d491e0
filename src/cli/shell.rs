//! `roma-byob shell`: an interactive prompt (or a commands file) to load binaries,
//! bind proto types, execute JSON requests and look at responses, logs and metrics.

use std::collections::HashMap;
use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use prost_reflect::MessageDescriptor;
use roma_byob::{CodeToken, Engine, ExecuteOptions, LoadOptions};

use crate::json::{self, ProtoTypes};
use crate::EngineArgs;

#[derive(Args, Debug)]
pub struct ShellArgs {
    #[command(flatten)]
    engine: EngineArgs,
    /// Run the commands in this file (one per line; `#` starts a comment) instead of
    /// prompting. Stops at the first failing command with a non-zero exit code.
    #[arg(long)]
    commands: Option<PathBuf>,
    /// With --commands: go on after a failing command (the exit code still says).
    #[arg(long)]
    keep_going: bool,
}

const HELP: &str = "\
commands:
  load NAME PATH [--workers N] [--log] [--shm BYTES] [--host-api]   load a binary as NAME
  proto FILE                                 compile a .proto file (its messages become usable)
  types NAME REQUEST_TYPE RESPONSE_TYPE      bind request/response message types to NAME
  exec NAME JSON                             execute a JSON request on a fresh worker of NAME
  exec-raw NAME HEX                          execute raw protobuf bytes (hex), print the response hex
  timeout MS                                 execution timeout for later exec commands
  list                                       loaded binaries and their types
  delete NAME                                delete a loaded binary (kills its workers)
  help                                       this text
  quit                                       leave";

struct Loaded {
    token: CodeToken,
    path: PathBuf,
    types: Option<(MessageDescriptor, MessageDescriptor)>,
}

struct Shell {
    engine: Engine,
    protos: Vec<ProtoTypes>,
    loaded: HashMap<String, Loaded>,
    timeout: Duration,
}

/// What a command asks of the loop.
enum Flow {
    Continue,
    Quit,
}

pub fn run(a: ShellArgs) -> Result<(), String> {
    let (mode, why) = a.engine.resolve_mode()?;
    let engine = Engine::new(a.engine.config(mode)?).map_err(|e| e.to_string())?;
    let mut shell = Shell { engine, protos: Vec::new(), loaded: HashMap::new(), timeout: Duration::from_secs(30) };
    match &a.commands {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            let mut failed = 0;
            for (n, line) in text.lines().enumerate() {
                let line = line.trim();
                if line.is_empty() || line.starts_with('#') {
                    continue;
                }
                println!("> {line}");
                match shell.command(line) {
                    Ok(Flow::Continue) => {}
                    Ok(Flow::Quit) => break,
                    Err(e) => {
                        eprintln!("error at line {}: {e}", n + 1);
                        failed += 1;
                        if !a.keep_going {
                            return Err(format!("{}: line {} failed", path.display(), n + 1));
                        }
                    }
                }
            }
            if failed > 0 {
                return Err(format!("{failed} command(s) failed"));
            }
            Ok(())
        }
        None => {
            println!("roma-byob shell, mode {} ({why}). Type `help` for commands.", mode.as_str());
            let stdin = std::io::stdin();
            let mut lines = stdin.lock().lines();
            loop {
                print!("roma> ");
                let _ = std::io::stdout().flush();
                let Some(line) = lines.next() else { break };
                let line = line.map_err(|e| format!("reading stdin: {e}"))?;
                let line = line.trim();
                if line.is_empty() || line.starts_with('#') {
                    continue;
                }
                match shell.command(line) {
                    Ok(Flow::Continue) => {}
                    Ok(Flow::Quit) => break,
                    Err(e) => println!("error: {e}"),
                }
            }
            println!();
            Ok(())
        }
    }
}

/// Splits off the first whitespace-separated word.
fn word(s: &str) -> (&str, &str) {
    let s = s.trim_start();
    match s.find(char::is_whitespace) {
        Some(i) => (&s[..i], s[i..].trim_start()),
        None => (s, ""),
    }
}

fn hex_decode(s: &str) -> Result<Vec<u8>, String> {
    let s: String = s.chars().filter(|c| !c.is_whitespace()).collect();
    if s.len() % 2 != 0 {
        return Err("odd number of hex digits".into());
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).map_err(|_| format!("bad hex byte {:?}", &s[i..i + 2])))
        .collect()
}

fn hex_encode(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl Shell {
    fn message(&self, name: &str) -> Result<MessageDescriptor, String> {
        for p in &self.protos {
            if let Ok(m) = p.message(name) {
                return Ok(m);
            }
        }
        Err(format!("message type {name:?} is not in any loaded proto file (use `proto FILE` first)"))
    }

    fn loaded(&self, name: &str) -> Result<&Loaded, String> {
        self.loaded.get(name).ok_or_else(|| format!("nothing is loaded as {name:?} (see `list`)"))
    }

    fn options(&self) -> ExecuteOptions {
        ExecuteOptions { timeout: self.timeout, ..Default::default() }
    }

    fn command(&mut self, line: &str) -> Result<Flow, String> {
        let (cmd, rest) = word(line);
        match cmd {
            "help" => println!("{HELP}"),
            "quit" | "exit" => return Ok(Flow::Quit),
            "load" => {
                let (name, rest) = word(rest);
                let (path, mut rest) = word(rest);
                if name.is_empty() || path.is_empty() {
                    return Err("usage: load NAME PATH [--workers N] [--log] [--shm BYTES] [--host-api]".into());
                }
                if self.loaded.contains_key(name) {
                    return Err(format!("{name:?} is already loaded; delete it first"));
                }
                let mut opts = LoadOptions::default();
                while !rest.is_empty() {
                    let (flag, r) = word(rest);
                    rest = r;
                    match flag {
                        "--log" => opts.log_egress = true,
                        "--host-api" => opts.host_api = true,
                        "--workers" | "--shm" => {
                            let (v, r) = word(rest);
                            rest = r;
                            let n: usize = v.parse().map_err(|_| format!("{flag} needs a number, got {v:?}"))?;
                            if flag == "--workers" {
                                opts.workers = n;
                            } else {
                                opts.shared_memory = Some(n);
                            }
                        }
                        other => return Err(format!("unknown load option {other:?}")),
                    }
                }
                let token = self.engine.load(path, opts).map_err(|e| e.to_string())?;
                println!("loaded {name} as {token}");
                self.loaded.insert(name.to_string(), Loaded { token, path: PathBuf::from(path), types: None });
            }
            "proto" => {
                let file = rest.trim();
                if file.is_empty() {
                    return Err("usage: proto FILE".into());
                }
                let types = ProtoTypes::compile(std::path::Path::new(file))?;
                println!("compiled {file}: {}", types.message_names().join(", "));
                self.protos.push(types);
            }
            "types" => {
                let (name, rest) = word(rest);
                let (req, rest) = word(rest);
                let (resp, _) = word(rest);
                if resp.is_empty() {
                    return Err("usage: types NAME REQUEST_TYPE RESPONSE_TYPE".into());
                }
                let pair = (self.message(req)?, self.message(resp)?);
                let entry = self.loaded.get_mut(name).ok_or_else(|| format!("nothing is loaded as {name:?}"))?;
                entry.types = Some(pair);
                println!("{name}: {req} -> {resp}");
            }
            "exec" => {
                let (name, json_text) = word(rest);
                let entry = self.loaded(name)?;
                let (req, resp) = entry
                    .types
                    .clone()
                    .ok_or_else(|| format!("no types bound to {name:?}: use `types {name} REQUEST_TYPE RESPONSE_TYPE`"))?;
                let json_text = if json_text.is_empty() { "{}" } else { json_text };
                let bytes = json::json_to_bytes(&req, json_text)?;
                let done = self
                    .engine
                    .execute_raw(&entry.token, &bytes, self.options())
                    .map_err(|e| e.to_string())?
                    .wait()
                    .map_err(|e| e.to_string())?;
                println!("{}", json::bytes_to_json(&resp, &done.response)?);
                print_extras(&done);
            }
            "exec-raw" => {
                let (name, hex) = word(rest);
                let entry = self.loaded(name)?;
                let bytes = hex_decode(hex)?;
                let done = self
                    .engine
                    .execute_raw(&entry.token, &bytes, self.options())
                    .map_err(|e| e.to_string())?
                    .wait()
                    .map_err(|e| e.to_string())?;
                println!("{}", hex_encode(&done.response));
                print_extras(&done);
            }
            "timeout" => {
                let ms: u64 = rest.trim().parse().map_err(|_| "usage: timeout MS".to_string())?;
                self.timeout = Duration::from_millis(ms);
                println!("execution timeout {ms} ms");
            }
            "list" => {
                let mut names: Vec<&String> = self.loaded.keys().collect();
                names.sort();
                for n in names {
                    let l = &self.loaded[n];
                    let types = l
                        .types
                        .as_ref()
                        .map(|(a, b)| format!("{} -> {}", a.full_name(), b.full_name()))
                        .unwrap_or_else(|| "(no types)".into());
                    println!("{n}\t{}\t{}\t{types}", l.token, l.path.display());
                }
            }
            "delete" => {
                let name = rest.trim();
                let entry = self.loaded.remove(name).ok_or_else(|| format!("nothing is loaded as {name:?}"))?;
                self.engine.delete(&entry.token).map_err(|e| e.to_string())?;
                println!("deleted {name}");
            }
            other => return Err(format!("unknown command {other:?} (try `help`)")),
        }
        Ok(Flow::Continue)
    }
}

fn print_extras(done: &roma_byob::Response<Vec<u8>>) {
    if let Ok(logs) = &done.logs {
        if !logs.stdout.is_empty() {
            println!("stdout: {:?}", String::from_utf8_lossy(&logs.stdout));
        }
        if !logs.stderr.is_empty() {
            println!("stderr: {:?}", String::from_utf8_lossy(&logs.stderr));
        }
    }
    let m = &done.metrics;
    println!(
        "metrics: wait {} µs, send {} µs, response {} µs, idle workers left {}",
        m.wait_for_worker.as_micros(),
        m.send.as_micros(),
        m.response.as_micros(),
        m.idle_workers_left
    );
}

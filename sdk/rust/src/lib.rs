//! Write roma-byob UDFs in Rust.
//!
//! A UDF is a program the engine runs once per request, in a sandbox. This crate
//! speaks its wire protocol (the Roma BYOB protocol plus roma-byob's opt-in
//! extensions) so that a UDF is one function:
//!
//! ```no_run
//! # #[derive(Clone, PartialEq, prost::Message)] struct SampleRequest {}
//! # #[derive(Clone, PartialEq, prost::Message)] struct SampleResponse { #[prost(string, tag = "1")] greeting: String }
//! fn main() {
//!     roma_byob_udf::serve(|_request: SampleRequest, _ctx: &mut roma_byob_udf::Context| SampleResponse {
//!         greeting: "Hello from the Rust SDK!".into(),
//!     })
//! }
//! ```
//!
//! [`serve`] (and [`serve_result`], [`serve_raw`]):
//! 1. takes the socket from `argv[1]` and, when the code token was loaded with
//!    `LoadOptions::shared_memory`, maps the region from `argv[2]`;
//! 2. writes the one-byte "ready" signal;
//! 3. reads the request: a `varint(len)` + protobuf frame on the socket, or the
//!    doorbell byte and then the request bytes in the region;
//! 4. calls the handler, which may call host functions through its [`Context`]
//!    (`LoadOptions::host_api`);
//! 5. writes the response (a frame, or the region + its length + a `0x00` doorbell
//!    byte) and exits with status 0.
//!
//! Any failure (bad argv, malformed request, host gone, response too large for the
//! region, or the `Err` of a [`serve_result`] handler) is written to stderr and the
//! process exits with status 1 without a response; the execution then fails with
//! `Unavailable("… exited with status 1")`.
//!
//! The SDK only uses `read`, `write`, `fcntl`, `fstat`, `mmap`, `madvise` and `exit`, so it runs
//! under the engine's `untrusted` seccomp filter; it spawns no thread and opens no
//! file. Normal `fn main` works: in the sandbox fds 0-2 are open, so std's start-up
//! does not need `/dev/null`.

#![warn(clippy::undocumented_unsafe_blocks)]

mod channel;
mod shm;
mod wire;

use std::fmt;
use std::io::Write;
use std::marker::PhantomData;
use std::os::fd::{FromRawFd, OwnedFd};

use prost::Message;

use channel::Channel;
use shm::Region;
use wire::{Body, MessageBody, MessageRef};

/// Per-execution state handed to the handler: request facts and host calls.
///
/// Host calls are only possible while the handler runs (between reading the
/// request and writing the response), and only when the code token was loaded with
/// `LoadOptions::host_api` (otherwise every call fails with
/// [`HostCallError::Failed`] saying so).
pub struct Context {
    chan: Channel,
    request_len: usize,
    shm_size: Option<usize>,
    next_id: u64,
    /// Started calls whose reply was not yet handed out.
    in_flight: Vec<u64>,
    /// Replies read while waiting for another call.
    arrived: Vec<(u64, Reply)>,
}

type Reply = Result<Vec<u8>, HostCallError>;

/// Identifies one host call in flight (see [`Context::start_call`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CallId(u64);

impl CallId {
    /// The `call_id` sent on the wire.
    pub fn get(self) -> u64 {
        self.0
    }
}

impl fmt::Display for CallId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "call {}", self.0)
    }
}

/// A typed host call in flight: [`Pending::wait`] decodes its reply as `R`.
/// Generated callers (roma-byob-build) return these.
#[must_use = "a host call's reply is only seen through wait()"]
#[derive(Debug)]
pub struct Pending<R> {
    id: CallId,
    _reply: PhantomData<fn() -> R>,
}

impl<R: Message + Default> Pending<R> {
    /// Wraps a call started with [`Context::start_call`] whose reply is an `R`.
    pub fn new(id: CallId) -> Self {
        Pending { id, _reply: PhantomData }
    }

    pub fn id(&self) -> CallId {
        self.id
    }

    /// Waits for this call's reply (buffering replies of other calls).
    pub fn wait(self, ctx: &mut Context) -> Result<R, HostCallError> {
        ctx.wait(self.id)
    }
}

/// Why a host call failed.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum HostCallError {
    /// No host function of that name is registered. `message` is the host's text
    /// (`unknown host function "<name>"`).
    UnknownFunction { function: String, message: String },
    /// The host function returned an error or panicked, or the engine refused the
    /// call (e.g. the code token was not loaded with `LoadOptions::host_api`): the
    /// host's text.
    Failed(String),
    /// The conversation broke: the host closed the connection, sent a malformed
    /// reply or a reply to no call in flight, the reply does not decode as the
    /// expected message, or the call id is not in flight.
    Protocol(String),
}

impl HostCallError {
    /// The error text, as the host sent it for `UnknownFunction` and `Failed`.
    pub fn message(&self) -> &str {
        match self {
            HostCallError::UnknownFunction { message, .. } => message,
            HostCallError::Failed(m) | HostCallError::Protocol(m) => m,
        }
    }

    fn from_host(error: String) -> HostCallError {
        // Text of src/host_api.rs: format!("unknown host function {function:?}").
        if let Some(quoted) = error.strip_prefix("unknown host function ") {
            let function = quoted.strip_prefix('"').and_then(|q| q.strip_suffix('"')).unwrap_or(quoted).to_string();
            return HostCallError::UnknownFunction { function, message: error };
        }
        HostCallError::Failed(error)
    }
}

impl fmt::Display for HostCallError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostCallError::UnknownFunction { message, .. } => f.write_str(message),
            HostCallError::Failed(m) => f.write_str(m),
            HostCallError::Protocol(m) => write!(f, "host call protocol error: {m}"),
        }
    }
}

impl std::error::Error for HostCallError {}

impl Context {
    fn new(chan: Channel, request_len: usize, shm_size: Option<usize>) -> Context {
        Context { chan, request_len, shm_size, next_id: 1, in_flight: Vec::new(), arrived: Vec::new() }
    }

    /// Size of the serialized request in bytes.
    pub fn request_len(&self) -> usize {
        self.request_len
    }

    /// Whether this execution uses the shared-memory transport.
    pub fn shared_memory(&self) -> bool {
        self.shm_size.is_some()
    }

    /// Size of the shared-memory region (header included), when there is one.
    pub fn shared_memory_size(&self) -> Option<usize> {
        self.shm_size
    }

    /// Number of calls started and not yet waited for.
    pub fn calls_in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Calls host function `function` with a message and waits for its reply.
    pub fn call<R: Message + Default>(&mut self, function: &str, request: &impl Message) -> Result<R, HostCallError> {
        let id = self.start_call(function, request)?;
        self.wait(id)
    }

    /// Calls host function `function` with raw bytes and waits for its reply.
    pub fn call_raw(&mut self, function: &str, request: &[u8]) -> Result<Vec<u8>, HostCallError> {
        let id = self.start_call_raw(function, request)?;
        self.wait_raw(id)
    }

    /// Sends a call without waiting: start several, then [`Context::wait`] for each
    /// (in any order). The host runs calls in flight concurrently.
    pub fn start_call(&mut self, function: &str, request: &impl Message) -> Result<CallId, HostCallError> {
        self.send_call(function, &MessageRef(request))
    }

    /// [`Context::start_call`] with raw bytes.
    pub fn start_call_raw(&mut self, function: &str, request: &[u8]) -> Result<CallId, HostCallError> {
        self.send_call(function, request)
    }

    fn send_call(&mut self, function: &str, request: &(impl Body + ?Sized)) -> Result<CallId, HostCallError> {
        let id = self.next_id;
        self.next_id += 1;
        let frame = wire::host_call_frame(id, function, request);
        self.chan
            .write_all(&frame)
            .map_err(|e| HostCallError::Protocol(format!("cannot send the call to {function:?}: {e}")))?;
        self.in_flight.push(id);
        Ok(CallId(id))
    }

    /// Waits for the reply of call `id` and decodes it as `R`.
    pub fn wait<R: Message + Default>(&mut self, id: CallId) -> Result<R, HostCallError> {
        let bytes = self.wait_raw(id)?;
        R::decode(bytes.as_slice()).map_err(|e| {
            HostCallError::Protocol(format!("the reply to {id} does not decode as {}: {e}", std::any::type_name::<R>()))
        })
    }

    /// Waits for the reply of call `id`; replies to other calls that arrive first
    /// are kept for their own `wait`.
    pub fn wait_raw(&mut self, id: CallId) -> Result<Vec<u8>, HostCallError> {
        if !self.in_flight.contains(&id.0) {
            return Err(HostCallError::Protocol(format!(
                "{id} is not in flight (never started, or already waited for)"
            )));
        }
        if let Some(pos) = self.arrived.iter().position(|(i, _)| *i == id.0) {
            let (_, reply) = self.arrived.remove(pos);
            self.in_flight.retain(|i| *i != id.0);
            return reply;
        }
        loop {
            let (got, reply) = self.read_reply()?;
            if got == id.0 {
                self.in_flight.retain(|i| *i != id.0);
                return reply;
            }
            self.arrived.push((got, reply));
        }
    }

    /// Waits for whichever call in flight answers first (or one already received).
    pub fn wait_any_raw(&mut self) -> Result<(CallId, Result<Vec<u8>, HostCallError>), HostCallError> {
        let (id, reply) = if self.arrived.is_empty() {
            if self.in_flight.is_empty() {
                return Err(HostCallError::Protocol("no host call is in flight".into()));
            }
            self.read_reply()?
        } else {
            self.arrived.remove(0)
        };
        self.in_flight.retain(|i| *i != id);
        Ok((CallId(id), reply))
    }

    /// Reads the next reply; checks it answers a call in flight whose reply has not
    /// arrived yet.
    fn read_reply(&mut self) -> Result<(u64, Reply), HostCallError> {
        let bytes =
            self.chan.read_frame().map_err(|e| HostCallError::Protocol(format!("cannot read a host reply: {e}")))?;
        let reply = wire::HostReply::decode(bytes.as_slice())
            .map_err(|e| HostCallError::Protocol(format!("malformed host reply: {e}")))?;
        let id = reply.call_id;
        if !self.in_flight.contains(&id) || self.arrived.iter().any(|(i, _)| *i == id) {
            return Err(HostCallError::Protocol(format!("the host replied to call {id}, which is not in flight")));
        }
        let result =
            if reply.error.is_empty() { Ok(reply.response) } else { Err(HostCallError::from_host(reply.error)) };
        Ok((id, result))
    }
}

/// How a session ended without a response.
#[derive(Debug)]
enum Failure {
    /// The SDK could not speak the protocol (argv, I/O, malformed bytes, …).
    Protocol(String),
    /// The handler of [`serve_result`] returned `Err`.
    Handler(String),
}

impl From<String> for Failure {
    fn from(s: String) -> Failure {
        Failure::Protocol(s)
    }
}

/// Runs one session on the given socket (and region): ready byte, request,
/// handler, response.
fn run<B: Body>(
    socket: OwnedFd,
    shm: Option<OwnedFd>,
    handler: impl FnOnce(&[u8], &mut Context) -> Result<B, Failure>,
) -> Result<(), Failure> {
    let mut region = shm.map(Region::map).transpose()?;
    let mut chan = Channel::new(socket);
    chan.write_all(b"R").map_err(|e| format!("cannot send the ready byte: {e}"))?;
    let owned;
    let request: &[u8] = match &region {
        Some(r) => {
            chan.read_byte().map_err(|e| format!("cannot read the request doorbell: {e}"))?;
            r.request()?
        }
        None => {
            owned = chan.read_frame().map_err(|e| format!("cannot read the request: {e}"))?;
            &owned
        }
    };
    let request_len = request.len();
    let mut ctx = Context::new(chan, request_len, region.as_ref().map(Region::len));
    let body = handler(request, &mut ctx)?;
    match region.as_mut() {
        Some(r) => {
            r.write_response(request_len, &body)?;
            ctx.chan.write_all(&[0]).map_err(|e| format!("cannot ring the response doorbell: {e}"))?;
        }
        None => {
            ctx.chan.write_all(&wire::frame(&body)).map_err(|e| format!("cannot write the response: {e}"))?;
        }
    }
    Ok(())
}

/// Parses `argv[index]` as an open file descriptor number.
fn fd_arg(args: &[std::ffi::OsString], index: usize, what: &str) -> Result<Option<OwnedFd>, String> {
    let Some(arg) = args.get(index) else { return Ok(None) };
    let fd: i32 = arg
        .to_str()
        .and_then(|s| s.parse().ok())
        .filter(|fd| *fd >= 0)
        .ok_or_else(|| format!("argv[{index}] = {arg:?} is not a {what} file descriptor number"))?;
    // SAFETY: F_GETFD only queries the descriptor table; any number is acceptable.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(format!("argv[{index}] = {fd} is not an open file descriptor (the {what})"));
    }
    // SAFETY: the host hands this descriptor to the UDF; it is open (checked above)
    // and nothing else in the process owns it: we take it exactly once.
    Ok(Some(unsafe { OwnedFd::from_raw_fd(fd) }))
}

fn run_from_args<B: Body>(handler: impl FnOnce(&[u8], &mut Context) -> Result<B, Failure>) -> Result<(), Failure> {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let usage = || {
        let name = args.first().map(|a| a.to_string_lossy().into_owned()).unwrap_or_else(|| "udf".into());
        format!("usage: {name} <socket fd> [<shared-memory fd>] (a roma-byob UDF: run it through the engine)")
    };
    let socket = fd_arg(&args, 1, "socket")?.ok_or_else(usage)?;
    let shm = fd_arg(&args, 2, "shared-memory region")?;
    run(socket, shm, handler)
}

fn exit_with(result: Result<(), Failure>) -> ! {
    let code = match result {
        Ok(()) => 0,
        Err(Failure::Protocol(m)) => {
            let _ = writeln!(std::io::stderr(), "roma-byob-udf: {m}");
            1
        }
        Err(Failure::Handler(m)) => {
            let _ = writeln!(std::io::stderr(), "{m}");
            1
        }
    };
    let _ = std::io::stdout().flush();
    std::process::exit(code)
}

fn decode_request<Req: Message + Default>(bytes: &[u8]) -> Result<Req, Failure> {
    Req::decode(bytes)
        .map_err(|e| Failure::Protocol(format!("the request does not decode as {}: {e}", std::any::type_name::<Req>())))
}

/// Serves one request with a typed handler, then exits (status 0 once the response
/// is written, 1 on any failure).
pub fn serve<Req, Resp, F>(handler: F) -> !
where
    Req: Message + Default,
    Resp: Message,
    F: FnOnce(Req, &mut Context) -> Resp,
{
    exit_with(run_from_args(|bytes, ctx| {
        let request = decode_request::<Req>(bytes)?;
        Ok(MessageBody(handler(request, ctx)))
    }))
}

/// As [`serve`], for a fallible handler: on `Err(e)` the UDF writes `e` to stderr
/// and exits with status 1 without a response (the execution fails with
/// `Unavailable`; load the code token for logging to see the text).
pub fn serve_result<Req, Resp, E, F>(handler: F) -> !
where
    Req: Message + Default,
    Resp: Message,
    E: fmt::Display,
    F: FnOnce(Req, &mut Context) -> Result<Resp, E>,
{
    exit_with(run_from_args(|bytes, ctx| {
        let request = decode_request::<Req>(bytes)?;
        handler(request, ctx).map(MessageBody).map_err(|e| Failure::Handler(e.to_string()))
    }))
}

/// Serves one request with raw bytes: the serialized request in, the serialized
/// response out. On the shared-memory transport `request` points into the region
/// (no copy).
pub fn serve_raw<F>(handler: F) -> !
where
    F: FnOnce(&[u8], &mut Context) -> Vec<u8>,
{
    exit_with(run_from_args(|bytes, ctx| Ok(handler(bytes, ctx))))
}

/// Ends the UDF without a response because it does not implement `rpc` (used by
/// the default methods of generated UDF traits): writes the reason to stderr and
/// exits with status 1.
pub fn unimplemented_rpc(rpc: &str) -> ! {
    exit_with(Err(Failure::Handler(format!("this UDF does not implement rpc {rpc}"))))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;
    use std::thread::JoinHandle;

    #[derive(Clone, PartialEq, prost::Message)]
    struct Echo {
        #[prost(string, tag = "1")]
        text: String,
    }

    /// The host end of a session: reads and writes what the engine would.
    struct Host(UnixStream);

    impl Host {
        fn byte(&mut self) -> u8 {
            let mut b = [0u8];
            self.0.read_exact(&mut b).unwrap();
            b[0]
        }
        fn varint(&mut self) -> u64 {
            let (mut v, mut i) = (0, 0);
            loop {
                match wire::varint_step(&mut v, i, self.byte()).unwrap() {
                    Some(v) => return v,
                    None => i += 1,
                }
            }
        }
        fn frame_body(&mut self, len: u64) -> Vec<u8> {
            let mut body = vec![0u8; len as usize];
            self.0.read_exact(&mut body).unwrap();
            body
        }
        /// Next host call (asserts the marker).
        fn call(&mut self) -> wire::HostCall {
            assert_eq!(self.varint(), wire::CALL_MARKER);
            let len = self.varint();
            wire::HostCall::decode(self.frame_body(len).as_slice()).unwrap()
        }
        fn reply(&mut self, call_id: u64, result: Result<&[u8], &str>) {
            let reply = match result {
                Ok(r) => wire::HostReply { call_id, response: r.to_vec(), error: String::new() },
                Err(e) => wire::HostReply { call_id, response: Vec::new(), error: e.to_string() },
            };
            self.0.write_all(&reply.encode_length_delimited_to_vec()).unwrap();
        }
    }

    /// Runs a session on a thread (the UDF side) and returns the host end.
    fn start<B: Body + 'static>(
        shm: Option<OwnedFd>,
        handler: impl FnOnce(&[u8], &mut Context) -> Result<B, Failure> + Send + 'static,
    ) -> (Host, JoinHandle<Result<(), Failure>>) {
        let (udf, host) = UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || run(OwnedFd::from(udf), shm, handler));
        (Host(host), t)
    }

    #[test]
    fn socket_transport_ready_request_response() {
        let (mut host, t) = start(None, |req, ctx| {
            assert!(!ctx.shared_memory());
            assert_eq!(ctx.request_len(), req.len());
            Ok(req.iter().rev().copied().collect::<Vec<u8>>())
        });
        assert_eq!(host.byte(), b'R', "ready byte first");
        host.0.write_all(&wire::frame(b"abc".as_slice())).unwrap();
        let len = host.varint();
        assert_eq!(host.frame_body(len), b"cba");
        t.join().unwrap().unwrap();
        let mut rest = Vec::new();
        host.0.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty(), "nothing after the response: {rest:?}");
    }

    #[test]
    fn large_requests_and_typed_messages() {
        let big = "x".repeat(3 << 20);
        let expected = big.len();
        let (mut host, t) = start(None, move |req, _ctx| {
            let msg = Echo::decode(req).map_err(|e| Failure::Protocol(e.to_string()))?;
            Ok(MessageBody(Echo { text: msg.text.len().to_string() }))
        });
        assert_eq!(host.byte(), b'R');
        let writer = {
            let mut w = host.0.try_clone().unwrap();
            std::thread::spawn(move || w.write_all(&Echo { text: big }.encode_length_delimited_to_vec()).unwrap())
        };
        let len = host.varint();
        assert_eq!(Echo::decode(host.frame_body(len).as_slice()).unwrap().text, expected.to_string());
        writer.join().unwrap();
        t.join().unwrap().unwrap();
    }

    #[test]
    fn host_calls_in_flight_replies_in_any_order() {
        let (mut host, t) = start(None, |_req, ctx| {
            let a = ctx.start_call_raw("t.A", b"1").unwrap();
            let b = ctx.start_call("t.B", &Echo { text: "2".into() }).unwrap();
            let c = ctx.start_call_raw("t.Missing", b"").unwrap();
            let d = ctx.start_call_raw("t.Fail", b"").unwrap();
            assert_eq!(ctx.calls_in_flight(), 4);
            // Waited in order although the host answers d, c, b, a.
            assert_eq!(ctx.wait_raw(a).unwrap(), b"one");
            let echoed: Echo = ctx.wait(b).unwrap();
            assert_eq!(echoed.text, "two");
            match ctx.wait_raw(c).unwrap_err() {
                HostCallError::UnknownFunction { function, message } => {
                    assert_eq!(function, "t.Missing");
                    assert_eq!(message, "unknown host function \"t.Missing\"");
                }
                other => panic!("{other:?}"),
            }
            let fail = ctx.wait_raw(d).unwrap_err();
            assert_eq!(fail, HostCallError::Failed("no such key".into()));
            assert_eq!(fail.to_string(), "no such key");
            // Waiting twice, or for a call never started, is a protocol error.
            assert!(matches!(ctx.wait_raw(a), Err(HostCallError::Protocol(_))));
            assert!(matches!(ctx.wait_raw(CallId(99)), Err(HostCallError::Protocol(_))));
            assert_eq!(ctx.calls_in_flight(), 0);
            // A blocking call after the others.
            let r: Echo = ctx.call("t.B", &Echo { text: "3".into() }).unwrap();
            Ok(r.text.into_bytes())
        });
        assert_eq!(host.byte(), b'R');
        host.0.write_all(&wire::frame(b"".as_slice())).unwrap();
        let calls: Vec<wire::HostCall> = (0..4).map(|_| host.call()).collect();
        let names: Vec<&str> = calls.iter().map(|c| c.function.as_str()).collect();
        assert_eq!(names, ["t.A", "t.B", "t.Missing", "t.Fail"]);
        let ids: Vec<u64> = calls.iter().map(|c| c.call_id).collect();
        assert_eq!(ids, [1, 2, 3, 4]);
        assert_eq!(calls[0].request, b"1");
        assert_eq!(Echo::decode(calls[1].request.as_slice()).unwrap().text, "2");
        host.reply(4, Err("no such key"));
        host.reply(3, Err("unknown host function \"t.Missing\""));
        host.reply(2, Ok(&Echo { text: "two".into() }.encode_to_vec()));
        host.reply(1, Ok(b"one"));
        let last = host.call();
        assert_eq!(last.call_id, 5);
        let text = Echo::decode(last.request.as_slice()).unwrap().text;
        host.reply(5, Ok(&Echo { text: format!("{text}!") }.encode_to_vec()));
        let len = host.varint();
        assert_eq!(host.frame_body(len), b"3!");
        t.join().unwrap().unwrap();
    }

    #[test]
    fn wait_any_returns_replies_as_they_come() {
        let (mut host, t) = start(None, |_req, ctx| {
            let a = ctx.start_call_raw("t.A", b"").unwrap();
            let b = ctx.start_call_raw("t.B", b"").unwrap();
            let (first, r1) = ctx.wait_any_raw().unwrap();
            let (second, r2) = ctx.wait_any_raw().unwrap();
            assert_eq!((first, second), (b, a));
            assert_eq!((r1.unwrap(), r2.unwrap()), (b"b".to_vec(), b"a".to_vec()));
            assert!(ctx.wait_any_raw().is_err(), "nothing in flight");
            Ok(Vec::new())
        });
        host.byte();
        host.0.write_all(&[0]).unwrap();
        host.call();
        host.call();
        host.reply(2, Ok(b"b"));
        host.reply(1, Ok(b"a"));
        assert_eq!(host.varint(), 0);
        t.join().unwrap().unwrap();
    }

    #[test]
    fn host_errors_are_protocol_errors() {
        // A reply to a call that is not in flight, an undecodable reply, a closed socket.
        let (mut host, t) = start(None, |_req, ctx| {
            let a = ctx.start_call_raw("t.A", b"").unwrap();
            let e1 = ctx.wait_raw(a).unwrap_err();
            let b = ctx.start_call_raw("t.B", b"").unwrap();
            let e2 = ctx.wait::<Echo>(b).unwrap_err();
            let c = ctx.start_call_raw("t.C", b"").unwrap();
            let e3 = ctx.wait_raw(c).unwrap_err();
            Ok(format!("{e1}|{e2}|{e3}").into_bytes())
        });
        host.byte();
        host.0.write_all(&[0]).unwrap();
        host.call();
        host.reply(77, Ok(b"x"));
        host.call();
        host.reply(2, Ok(&[0xff, 0xff]));
        host.call();
        host.0.shutdown(std::net::Shutdown::Write).unwrap();
        let len = host.varint();
        let text = String::from_utf8(host.frame_body(len)).unwrap();
        let parts: Vec<&str> = text.split('|').collect();
        assert!(parts[0].contains("call 77, which is not in flight"), "{text}");
        assert!(parts[1].contains("does not decode as"), "{text}");
        assert!(parts[2].contains("closed the connection"), "{text}");
        assert!(parts.iter().all(|p| p.starts_with("host call protocol error: ")), "{text}");
        t.join().unwrap().unwrap();
    }

    #[test]
    fn a_host_that_goes_away_fails_the_session() {
        let (mut host, t) = start(None, |_req, _ctx| Ok(Vec::new()));
        host.byte();
        drop(host);
        match t.join().unwrap() {
            Err(Failure::Protocol(m)) => assert!(m.contains("cannot read the request"), "{m}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn handler_failures_are_reported() {
        let (mut host, t) = start::<Vec<u8>>(None, |_req, _ctx| Err(Failure::Handler("bad input".into())));
        host.byte();
        host.0.write_all(&[0]).unwrap();
        assert!(matches!(t.join().unwrap(), Err(Failure::Handler(m)) if m == "bad input"));
        let mut rest = Vec::new();
        host.0.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty(), "no response");
    }

    /// The host side of a region (as src/ipc/shm.rs lays it out).
    struct HostRegion {
        fd: OwnedFd,
        ptr: *mut u8,
        len: usize,
    }

    impl HostRegion {
        fn new(len: usize, magic: u32) -> HostRegion {
            // SAFETY: static NUL-terminated name; returns a fresh fd or -1.
            let raw = unsafe { libc::memfd_create(c"sdk-test".as_ptr(), libc::MFD_CLOEXEC) };
            assert!(raw >= 0);
            // SAFETY: a fresh descriptor we own.
            let fd = unsafe { OwnedFd::from_raw_fd(raw) };
            // SAFETY: resizing our own memfd.
            assert_eq!(unsafe { libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) }, 0);
            // SAFETY: maps `len` bytes of our memfd; checked below.
            let ptr = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED,
                    fd.as_raw_fd(),
                    0,
                )
            };
            assert_ne!(ptr, libc::MAP_FAILED);
            let r = HostRegion { fd, ptr: ptr.cast(), len };
            r.put(16, &magic.to_le_bytes());
            r.put(20, &1u32.to_le_bytes());
            r.put(8, &u64::MAX.to_le_bytes());
            r
        }
        fn put(&self, off: usize, bytes: &[u8]) {
            assert!(off + bytes.len() <= self.len);
            // SAFETY: in bounds (asserted); the UDF side reads only after the doorbell.
            unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.ptr.add(off), bytes.len()) };
        }
        fn get(&self, off: usize, len: usize) -> Vec<u8> {
            assert!(off + len <= self.len);
            let mut out = vec![0u8; len];
            // SAFETY: in bounds (asserted); the UDF is done writing (doorbell received).
            unsafe { std::ptr::copy_nonoverlapping(self.ptr.add(off), out.as_mut_ptr(), len) };
            out
        }
        fn request(&self, body: &[u8]) {
            self.put(64, body);
            self.put(0, &(body.len() as u64).to_le_bytes());
        }
        fn response(&self, request_len: usize) -> Vec<u8> {
            let m = u64::from_le_bytes(self.get(8, 8).try_into().unwrap());
            self.get(shm::response_offset(request_len), m as usize)
        }
        fn udf_fd(&self) -> OwnedFd {
            self.fd.try_clone().unwrap()
        }
    }

    impl Drop for HostRegion {
        fn drop(&mut self) {
            // SAFETY: unmapping the mapping made in `new`.
            unsafe { libc::munmap(self.ptr.cast(), self.len) };
        }
    }

    #[test]
    fn shared_memory_transport_with_a_host_call() {
        let region = HostRegion::new(1 << 16, shm::MAGIC);
        let (mut host, t) = start(Some(region.udf_fd()), |req, ctx| {
            assert!(ctx.shared_memory());
            assert_eq!(ctx.shared_memory_size(), Some(1 << 16));
            assert_eq!(ctx.request_len(), 70);
            let echoed = ctx.call_raw("t.Echo", &req[..3]).unwrap();
            Ok(MessageBody(Echo { text: String::from_utf8(echoed).unwrap() }))
        });
        assert_eq!(host.byte(), b'R');
        region.request(&[b'z'; 70]);
        host.0.write_all(&[0]).unwrap();
        let call = host.call();
        assert_eq!(call.request, b"zzz");
        host.reply(call.call_id, Ok(b"pong"));
        assert_eq!(host.byte(), 0, "response doorbell");
        assert_eq!(Echo::decode(region.response(70).as_slice()).unwrap().text, "pong");
        // The response sits at 64 + round_up(70, 64) = 192.
        assert_eq!(shm::response_offset(70), 192);
        t.join().unwrap().unwrap();
    }

    #[test]
    fn shared_memory_response_too_large() {
        let region = HostRegion::new(4096, shm::MAGIC);
        let (mut host, t) = start(Some(region.udf_fd()), |_req, _ctx| Ok(vec![1u8; 4096]));
        host.byte();
        region.request(b"abc");
        host.0.write_all(&[0]).unwrap();
        match t.join().unwrap() {
            Err(Failure::Protocol(m)) => assert!(m.contains("does not fit"), "{m}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(u64::from_le_bytes(region.get(8, 8).try_into().unwrap()), u64::MAX, "no length published");
    }

    #[test]
    fn shared_memory_with_a_bad_header_or_length() {
        let bad = HostRegion::new(4096, 0x1234);
        let (_host, t) = start(Some(bad.udf_fd()), |_req, _ctx| Ok(Vec::new()));
        assert!(matches!(t.join().unwrap(), Err(Failure::Protocol(m)) if m.contains("magic")));

        let region = HostRegion::new(4096, shm::MAGIC);
        let (mut host, t) = start(Some(region.udf_fd()), |_req, _ctx| Ok(Vec::new()));
        host.byte();
        region.put(0, &(5000u64).to_le_bytes());
        host.0.write_all(&[0]).unwrap();
        assert!(matches!(t.join().unwrap(), Err(Failure::Protocol(m)) if m.contains("exceeds the region")));
    }

    #[test]
    fn argv_parsing() {
        let args: Vec<std::ffi::OsString> = ["udf", "x", "-1", "999999"].iter().map(Into::into).collect();
        assert!(fd_arg(&args, 1, "socket").unwrap_err().contains("not a socket file descriptor number"));
        assert!(fd_arg(&args, 2, "socket").is_err());
        assert!(fd_arg(&args, 3, "socket").unwrap_err().contains("not an open file descriptor"));
        assert!(fd_arg(&args, 4, "socket").unwrap().is_none());
        let (a, _b) = UnixStream::pair().unwrap();
        let fd = OwnedFd::from(a);
        let n = fd.as_raw_fd();
        std::mem::forget(fd); // fd_arg takes ownership of the number.
        let args: Vec<std::ffi::OsString> = vec!["udf".into(), n.to_string().into()];
        let taken = fd_arg(&args, 1, "socket").unwrap().unwrap();
        assert_eq!(taken.as_raw_fd(), n);
    }

    #[test]
    fn host_error_classification() {
        assert_eq!(
            HostCallError::from_host("unknown host function \"a.B/C\"".into()),
            HostCallError::UnknownFunction {
                function: "a.B/C".into(),
                message: "unknown host function \"a.B/C\"".into()
            }
        );
        assert_eq!(HostCallError::from_host("boom".into()), HostCallError::Failed("boom".into()));
        assert_eq!(HostCallError::Protocol("x".into()).message(), "x");
    }
}

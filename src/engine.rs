//! The public engine: loads binaries, routes executions to the shard that has a
//! ready worker, cancels, deletes and shuts down.

use std::collections::HashMap;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Instant;

use futures_channel::oneshot;

use crate::completion::{self, DirectRead, Execution, RawResult, Response, Sink};
use crate::ipc::shm::{Region, Reuse, ShmPool};
use crate::ring::{self, Claim, Cmd, ExecRequest, Offer, ShardConfig, ShardHandle, ShardSlots, SupervisorEvent, TokenEntry};
use crate::sandbox::launch::Launcher;
use crate::host_api::{HostApi, HostCallContext, HostFuture, HostResult};
use crate::supervisor::Supervisor;
use crate::{CodeToken, Config, Error, ExecuteOptions, ExecutionToken, LoadOptions, Mode, Result, SyscallFilter};

/// The engine. Cheap to share behind an `Arc`; every method takes `&self` and may
/// be called from any thread. Dropping it (or [`Engine::shutdown`]) completes every
/// pending execution with an error and stops the sandbox.
pub struct Engine {
    config: Config,
    shards: Vec<ShardHandle>,
    /// The core of each shard's engine thread.
    shard_cores: Vec<usize>,
    tokens: RwLock<HashMap<u64, Arc<TokenEntry>>>,
    next_code: AtomicU64,
    next_exec: AtomicU64,
    rr: AtomicUsize,
    supervisor: Option<std::thread::JoinHandle<()>>,
    host_api: Arc<HostApi>,
    events: std::sync::mpsc::Sender<SupervisorEvent>,
    sandbox_pid: Arc<AtomicU32>,
    debug_log_dir: Option<std::path::PathBuf>,
    warnings: Vec<String>,
    shm_pool: Arc<ShmPool>,
    /// Whether the runner made the workers' channels when the engine started.
    runner_channels: bool,
}

/// Execution metadata key that injects a fault (tests only; see
/// [`Engine::inject_engine_panic`]).
#[cfg(feature = "fault-injection")]
#[doc(hidden)]
pub const FAULT_KEY: &str = "roma-byob-fault";

impl Engine {
    /// Starts the sandbox (the runner) and one io_uring thread per configured core.
    pub fn new(config: Config) -> Result<Engine> {
        let cores = if config.cores.is_empty() { ring::allowed_cores() } else { config.cores.clone() };
        if cores.is_empty() {
            return Err(Error::InvalidArgument("Config::cores lists no core".into()));
        }
        let online = ring::allowed_cores();
        if let Some(bad) = cores.iter().chain(&config.runner_cores).find(|c| !online.contains(c)) {
            return Err(Error::InvalidArgument(format!(
                "core {bad} is not available to this process (allowed: {online:?})"
            )));
        }
        let mut launcher = Launcher::new(&config, cores.len())?;
        let launched = match launcher.launch() {
            Ok(l) => l,
            Err(e) => {
                launcher.cleanup();
                return Err(e);
            }
        };
        for w in &launched.warnings {
            tracing::warn!(mode = config.mode.as_str(), "isolation step not applied: {w}");
        }
        let debug_log_dir = launcher.debug_log_dir().map(|p| p.to_path_buf());
        tracing::info!(
            mode = config.mode.as_str(),
            filter = config.syscall_filter.as_str(),
            cores = ?cores,
            "roma-byob engine started"
        );
        let host_api = match HostApi::new(config.host_api_threads) {
            Ok(h) => Arc::new(h),
            Err(e) => {
                let mut sandbox = launched.sandbox;
                launcher.destroy(&mut sandbox);
                launcher.cleanup();
                return Err(e);
            }
        };
        let (events, events_rx) = std::sync::mpsc::channel();
        // Reusing wiped regions is safe only where a worker cannot pass its region's
        // fd to another process (no sockets): see src/ipc/shm.rs.
        let reuse = if config.syscall_filter == SyscallFilter::Untrusted { Reuse::Wiped } else { Reuse::Never };
        let shm_pool = Arc::new(ShmPool::new(reuse));
        let mut shards = Vec::with_capacity(cores.len());
        let mut sandbox = launched.sandbox;
        let runner = launched.runner;
        let runner_channels = runner.is_some();
        for (index, (core, ctl)) in cores.iter().zip(launched.controls).enumerate() {
            let shard_config = ShardConfig {
                index,
                core: Some(*core),
                sqpoll_idle: config.sqpoll_idle,
                busy_poll: config.busy_poll,
                worker_start_timeout: config.worker_start_timeout,
                lazy_readiness: config.lazy_readiness,
                early_dispatch: config.early_dispatch,
                exit_report_batch: config.exit_report_batch,
                exit_report_hold: config.exit_report_hold,
                batch_wait: config.batch_wait,
                batch_min_in_flight: config.batch_min_in_flight.max(1),
                batch_want: config.batch_want.max(1),
                max_response_bytes: config.max_response_bytes,
                host_api: host_api.clone(),
                shm_pool: shm_pool.clone(),
            };
            match ShardHandle::start(shard_config, ctl, runner.clone(), events.clone()) {
                Ok(s) => shards.push(s),
                Err(e) => {
                    for s in &mut shards {
                        s.shutdown_and_join();
                    }
                    launcher.destroy(&mut sandbox);
                    launcher.cleanup();
                    return Err(e);
                }
            }
        }
        let sandbox_pid = Arc::new(AtomicU32::new(sandbox.pid()));
        let supervisor = Supervisor {
            launcher,
            sandbox,
            shards: shards.iter().map(|s| s.shared.clone()).collect(),
            events: events_rx,
            sandbox_pid: sandbox_pid.clone(),
        };
        let supervisor = std::thread::Builder::new()
            .name("roma-supervisor".into())
            .spawn(move || supervisor.run())
            .map_err(|e| Error::io("spawn the supervisor thread", e))?;
        Ok(Engine {
            config,
            shards,
            shard_cores: cores,
            tokens: RwLock::new(HashMap::new()),
            next_code: AtomicU64::new(1),
            next_exec: AtomicU64::new(1),
            rr: AtomicUsize::new(0),
            supervisor: Some(supervisor),
            host_api,
            events,
            sandbox_pid,
            debug_log_dir,
            warnings: launched.warnings,
            shm_pool,
            runner_channels,
        })
    }

    /// Pid (on the host) of the sandbox's top process: the runner in `minimal`
    /// mode, `runsc run` in the gVisor modes. Changes when the sandbox is restarted.
    pub fn sandbox_pid(&self) -> u32 {
        self.sandbox_pid.load(Ordering::Acquire)
    }

    /// Where `gvisor-debug` mode writes runsc's `--debug --strace` logs (kept after
    /// shutdown).
    pub fn debug_log_dir(&self) -> Option<&Path> {
        self.debug_log_dir.as_deref()
    }

    /// The sandbox mode this engine runs in.
    pub fn mode(&self) -> Mode {
        self.config.mode
    }

    /// The configuration the engine was built with.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Whether the runner makes the workers' channels and the engine threads take
    /// them from it (`Config::runner_channels`: asked for, minimal mode, and
    /// `pidfd_getfd` allowed on the runner), as of the engine's start.
    pub fn runner_makes_channels(&self) -> bool {
        self.runner_channels
    }

    /// Worker processes started and not yet reported exited, over all engine
    /// threads: idle and busy workers, and those that answered and have not exited
    /// yet, and those whose clean exit report the sandbox holds back
    /// (`Config::exit_report_batch`, at most a shard's pool less one, for at most
    /// `Config::exit_report_hold`). A worker still running when its execution's
    /// timeout passes is killed, so this stays near the pools' size whatever the UDF
    /// does.
    pub fn live_workers(&self) -> usize {
        self.shards.iter().map(|s| s.shared.live_workers.load(Ordering::Relaxed)).sum()
    }

    /// Workers of `token` that are ready and idle right now, over all engine threads
    /// (a snapshot: callers and engine threads take them concurrently). With
    /// `Config::lazy_readiness` this counts workers offered before their ready byte
    /// arrived: a request that takes one of those waits for the byte on the engine
    /// thread instead of being handed over.
    pub fn idle_workers(&self, token: &CodeToken) -> Result<usize> {
        let entry = self.token(token)?;
        Ok(entry.per_shard.iter().map(|s| s.idle.load(Ordering::Relaxed)).sum())
    }

    /// Executions of `token` waiting for a worker, over all engine threads: a
    /// snapshot, as each engine thread last stored its queue's length, plus most
    /// executions routed to a thread that has not taken them yet (an engine thread
    /// storing its length may hide those for a moment). A server can
    /// shed load on it rather than let a backlog wait up to
    /// `ExecuteOptions::worker_wait_timeout`.
    pub fn queued_executions(&self, token: &CodeToken) -> Result<usize> {
        let entry = self.token(token)?;
        Ok(entry.per_shard.iter().map(|s| s.queued.load(Ordering::Relaxed)).sum())
    }

    /// Isolation steps the sandbox reported it could not apply (also logged).
    pub fn isolation_warnings(&self) -> &[String] {
        &self.warnings
    }

    /// Loads the binary at `path` and starts `options.workers` workers for it.
    pub fn load(&self, path: impl AsRef<Path>, options: LoadOptions) -> Result<CodeToken> {
        let path = path.as_ref();
        check_workers(options.workers)?;
        let mut file = std::fs::File::open(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => Error::NotFound(format!("binary {} does not exist", path.display())),
            std::io::ErrorKind::PermissionDenied => {
                Error::FailedPrecondition(format!("binary {} is not readable: {e}", path.display()))
            }
            _ => Error::io(&format!("open {}", path.display()), e),
        })?;
        let meta = file.metadata().map_err(|e| Error::io("stat binary", e))?;
        if !meta.is_file() {
            return Err(Error::InvalidArgument(format!("{} is not a regular file", path.display())));
        }
        if meta.permissions().mode() & 0o111 == 0 {
            return Err(Error::InvalidArgument(format!(
                "{} is not executable (mode {:o}); chmod +x it",
                path.display(),
                meta.permissions().mode() & 0o7777
            )));
        }
        let mut bytes = Vec::with_capacity(meta.len() as usize);
        file.read_to_end(&mut bytes).map_err(|e| Error::io("read binary", e))?;
        self.load_bytes(&bytes, &path.display().to_string(), options)
    }

    /// Loads a binary given as bytes (an ELF executable).
    pub fn load_blob(&self, binary: &[u8], options: LoadOptions) -> Result<CodeToken> {
        check_workers(options.workers)?;
        self.load_bytes(binary, "blob", options)
    }

    /// A new code token for the same binary as `token`, with `workers` workers whose
    /// stdout/stderr are captured. It stays valid after `token` is deleted.
    pub fn load_for_logging(&self, token: &CodeToken, workers: usize) -> Result<CodeToken> {
        check_workers(workers)?;
        let entry = self.token(token)?;
        let options =
            LoadOptions { workers, log_egress: true, shared_memory: entry.shm, host_api: entry.host_api, zygote: entry.zygote };
        Ok(self.register(entry.binary.clone(), &options))
    }

    /// Deletes a code token: its workers are killed and every pending execution of it
    /// fails with `Cancelled`.
    pub fn delete(&self, token: &CodeToken) -> Result<()> {
        let removed = self.tokens.write().map_err(|_| poisoned())?.remove(&token.0);
        let entry = removed.ok_or_else(|| Error::NotFound(format!("code token {token} is not loaded")))?;
        for (i, s) in self.shards.iter().enumerate() {
            if entry.per_shard[i].slots > 0 {
                s.shared.push(Cmd::Delete(token.0));
            }
        }
        Ok(())
    }

    /// Executes `request` on a fresh worker of `token`; the returned future yields the
    /// decoded response (or an error), exactly once.
    pub fn execute<Req, Resp>(&self, token: &CodeToken, request: &Req, options: ExecuteOptions) -> Result<Execution<Resp>>
    where
        Req: prost::Message,
        Resp: prost::Message + Default,
    {
        let (tx, rx) = oneshot::channel();
        let (id, direct) = self.submit_message(token, request, options, Sink::channel(tx))?;
        let spin = self.spin_for(&id);
        Ok(Execution::new(id, rx, completion::decode_message::<Resp>, spin, direct))
    }

    /// As [`Engine::execute`], for a request already serialised (raw protobuf bytes,
    /// no length prefix); the response comes back as raw bytes.
    pub fn execute_raw(&self, token: &CodeToken, request: &[u8], options: ExecuteOptions) -> Result<Execution<Vec<u8>>> {
        let frame = || {
            let mut frame = Vec::with_capacity(request.len() + 10);
            prost::encoding::encode_varint(request.len() as u64, &mut frame);
            frame.extend_from_slice(request);
            frame
        };
        let place = |region: &Region| region.put_request(request).map(|()| request.len());
        let (tx, rx) = oneshot::channel();
        let (id, direct) = self.submit(token, || request.len(), place, frame, options, Sink::channel(tx))?;
        let spin = self.spin_for(&id);
        Ok(Execution::new(id, rx, completion::decode_raw, spin, direct))
    }

    /// Callback form of [`Engine::execute`]: `callback` runs exactly once, on an
    /// engine thread, with the result. Keep it short and non-blocking. (If the
    /// engine thread of the execution's shard has failed, a bug, it runs on the
    /// calling thread with an `Internal` error, before this returns.)
    pub fn execute_with_callback<Req, Resp, F>(
        &self,
        token: &CodeToken,
        request: &Req,
        options: ExecuteOptions,
        callback: F,
    ) -> Result<ExecutionToken>
    where
        Req: prost::Message,
        Resp: prost::Message + Default,
        F: FnOnce(Result<Response<Resp>>) + Send + 'static,
    {
        let sink = Sink::callback(Box::new(move |raw: RawResult| {
            callback(completion::finish(raw, completion::decode_message::<Resp>))
        }));
        self.submit_message(token, request, options, sink).map(|(id, _)| id)
    }

    /// Registers a host function UDFs may call (code tokens loaded with
    /// `LoadOptions::host_api`). It runs on the host API thread pool with the call's
    /// context and the serialized request, and returns the serialized response or an
    /// error text that the UDF receives. A panic becomes an error reply.
    pub fn register_host_function<F>(&self, name: impl Into<String>, function: F) -> Result<()>
    where
        F: Fn(&HostCallContext, &[u8]) -> HostResult + Send + Sync + 'static,
    {
        self.host_api.register_sync(name.into(), Arc::new(function))
    }

    /// Registers an async host function: the returned future runs on the host API
    /// thread pool (any runtime-agnostic future).
    pub fn register_async_host_function<F, Fut>(&self, name: impl Into<String>, function: F) -> Result<()>
    where
        F: Fn(HostCallContext, Vec<u8>) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = HostResult> + Send + 'static,
    {
        self.host_api.register_async(name.into(), Arc::new(move |ctx, req| Box::pin(function(ctx, req)) as HostFuture))
    }

    /// Removes a host function; later calls to it get an "unknown host function"
    /// error reply.
    pub fn unregister_host_function(&self, name: &str) -> Result<()> {
        self.host_api.unregister(name)
    }

    /// Makes the engine thread of `shard` (an index into `Config::cores`) panic, as a
    /// bug would: for tests of what the engine does then. Built only with the
    /// `fault-injection` feature (so is the execution metadata key [`FAULT_KEY`]:
    /// `"panic-in-execute"` makes the engine thread panic while it handles that
    /// execution).
    #[cfg(feature = "fault-injection")]
    #[doc(hidden)]
    pub fn inject_engine_panic(&self, shard: usize) {
        if let Some(s) = self.shards.get(shard) {
            s.shared.push(Cmd::InjectPanic);
        }
    }

    /// Cancels an execution: its worker is killed and it completes with `Cancelled`.
    /// Cancelling a finished execution does nothing.
    pub fn cancel(&self, token: &ExecutionToken) -> Result<()> {
        let shard = self
            .shards
            .get(token.shard as usize)
            .ok_or_else(|| Error::NotFound(format!("execution token {token} does not belong to this engine")))?;
        shard.shared.push(Cmd::Cancel(token.id));
        Ok(())
    }

    /// Stops the engine: every pending execution completes with `Unavailable`, the
    /// runner and all workers are killed and reaped. Also done on drop.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        for s in &mut self.shards {
            s.shutdown_and_join();
        }
        let _ = self.events.send(SupervisorEvent::Shutdown);
        if let Some(t) = self.supervisor.take() {
            if t.join().is_err() {
                tracing::error!("the supervisor thread panicked");
            }
        }
        self.shm_pool.shutdown();
    }

    /// `Config::wait_spin` if the execution's shard (and so, with pinned workers,
    /// its worker) runs on another core than the calling thread, else zero.
    fn spin_for(&self, exec: &ExecutionToken) -> std::time::Duration {
        let core = self.shard_cores.get(exec.shard as usize).copied();
        if core != Some(current_cpu()) {
            self.config.wait_spin
        } else {
            std::time::Duration::ZERO
        }
    }

    fn token(&self, token: &CodeToken) -> Result<Arc<TokenEntry>> {
        self.tokens
            .read()
            .map_err(|_| poisoned())?
            .get(&token.0)
            .cloned()
            .ok_or_else(|| Error::NotFound(format!("code token {token} is not loaded (never loaded, or deleted)")))
    }

    fn load_bytes(&self, bytes: &[u8], what: &str, options: LoadOptions) -> Result<CodeToken> {
        if bytes.len() < 4 || &bytes[..4] != b"\x7fELF" {
            return Err(Error::InvalidArgument(format!(
                "{what} is not an ELF executable (UDFs must be compiled binaries; scripts are not supported)"
            )));
        }
        if self.shards.iter().any(|s| s.is_runner_dead()) {
            return Err(Error::Unavailable("the sandbox could not be restarted; create a new engine".into()));
        }
        if let Some(size) = options.shared_memory {
            if size < crate::ipc::shm::HEADER + 64 {
                return Err(Error::InvalidArgument(format!(
                    "shared_memory region of {size} bytes is too small (at least {} bytes)",
                    crate::ipc::shm::HEADER + 64
                )));
            }
        }
        if options.zygote {
            if self.config.mode != Mode::Minimal {
                return Err(Error::InvalidArgument(format!(
                    "zygote start is available in minimal mode only (this engine runs in {:?} mode: its runsc does not let the runner reap the forked workers); load {what} without it",
                    self.config.mode
                )));
            }
            crate::sandbox::zygote_elf::check(bytes)
                .map_err(|why| Error::InvalidArgument(format!("{what} cannot be started from a zygote: {why}")))?;
        }
        let binary = Arc::new(sealed_memfd(bytes)?);
        Ok(self.register(binary, &options))
    }

    fn register(&self, binary: Arc<OwnedFd>, options: &LoadOptions) -> CodeToken {
        let workers = options.workers;
        let id = self.next_code.fetch_add(1, Ordering::Relaxed);
        // Slots go round-robin over the shards, skipping any whose thread failed (a
        // bug): the token keeps its worker count as long as one shard runs.
        let n = self.shards.len();
        let live: Vec<usize> = (0..n).filter(|&i| !self.shards[i].shared.has_failed()).collect();
        let live = if live.is_empty() { (0..n).collect() } else { live };
        let start = (id as usize) % live.len();
        let mut slots = vec![0usize; n];
        for k in 0..workers {
            slots[live[(start + k) % live.len()]] += 1;
        }
        let per_shard: Vec<ShardSlots> =
            slots.into_iter().map(|slots| ShardSlots { slots, idle: AtomicUsize::new(0), queued: AtomicUsize::new(0), ready: Default::default() }).collect();
        let entry = Arc::new(TokenEntry {
            id,
            binary,
            log: options.log_egress,
            host_api: options.host_api,
            shm: options.shared_memory,
            zygote: options.zygote,
            direct: self.config.caller_reads
                && self.config.hand_over
                && !options.log_egress
                && !options.host_api
                && options.shared_memory.is_none(),
            per_shard,
        });
        match self.tokens.write() {
            Ok(mut t) => t.insert(id, entry.clone()),
            Err(p) => p.into_inner().insert(id, entry.clone()),
        };
        for (i, s) in self.shards.iter().enumerate() {
            if entry.per_shard[i].slots > 0 {
                s.shared.push(Cmd::Load(entry.clone()));
            }
        }
        CodeToken(id)
    }

    fn submit_message<Req: prost::Message>(
        &self,
        token: &CodeToken,
        request: &Req,
        options: ExecuteOptions,
        sink: Sink,
    ) -> Result<(ExecutionToken, Option<Box<DirectRead>>)> {
        let place = |region: &Region| region.encode_request(request);
        let frame = || request.encode_length_delimited_to_vec();
        self.submit(token, || request.encoded_len(), place, frame, options, sink)
    }

    /// Routes one request whose body is `body_len()` bytes (computed only for
    /// shared-memory tokens, which check it against their region). When a ready
    /// worker can be claimed (see `ring::ReadyWorkers`), this thread hands the
    /// request over itself (`Config::hand_over`): on the shared-memory transport
    /// `place` writes it straight into the worker's region (serialised once, no
    /// other copy) and the doorbell follows; otherwise `frame` builds the
    /// length-delimited frame, written to the worker's socket here or, with no
    /// worker to claim, by the shard when one is free. A handed-over execution of a
    /// `direct` token that a caller waits for on a channel comes back with what that
    /// caller needs to read the response itself (`ring::direct`).
    fn submit(
        &self,
        token: &CodeToken,
        body_len: impl FnOnce() -> usize,
        place: impl FnOnce(&Region) -> std::result::Result<usize, String>,
        frame: impl FnOnce() -> Vec<u8>,
        options: ExecuteOptions,
        sink: Sink,
    ) -> Result<(ExecutionToken, Option<Box<DirectRead>>)> {
        let submitted = Instant::now();
        let entry = self.token(token)?;
        let n = self.shards.len();
        let start = self.rr.fetch_add(1, Ordering::Relaxed);
        // Round-robin, the shard on this thread's own core first: a handed-over
        // request then wakes a worker on this core, which runs as soon as the caller
        // parks, instead of an idle vCPU, which costs tens of µs to wake in a VM
        // (measured: sequential p50 ~20-40 % lower than preferring another core
        // and polling there, BENCHMARKS.md).
        let cpu = current_cpu();
        let cores = &self.shard_cores;
        let shards = &self.shards;
        // A shard whose thread failed (a bug; see `ShardShared::close`) gets no work.
        let rotation = move || (0..n).map(move |k| (start + k) % n).filter(move |&i| !shards[i].shared.has_failed());
        let order = move || rotation().filter(move |&i| cores[i] == cpu).chain(rotation().filter(move |&i| cores[i] != cpu));
        // A claimed worker leaves the shard's idle count at once (the shard stores the
        // exact count when it next acts on the pool): routing below then never picks a
        // shard for a worker a caller has taken, which workers offered before their
        // ready byte (`Config::lazy_readiness`) make likely right after a load.
        let claim_one = || {
            order().find_map(|i| {
                let offer = entry.per_shard[i].ready.claim()?;
                let _ = entry.per_shard[i].idle.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
                Some((i, offer))
            })
        };
        let hand_over = self.config.hand_over;
        let mut claimed: Option<(usize, Offer, Claim)> = None;
        let mut frame_built: Option<Arc<Vec<u8>>> = None;
        let mut frame = Some(frame);
        if let Some(size) = entry.shm {
            let body_len = body_len();
            if !crate::ipc::shm::fits(size, body_len) {
                return Err(Error::InvalidArgument(format!(
                    "request of {body_len} bytes does not fit code token {token}'s shared-memory region of {size} bytes; load it with a larger LoadOptions::shared_memory"
                )));
            }
            if let Some((shard, offer)) = claim_one() {
                let at = Instant::now();
                let readiness = claim_readiness(&offer);
                if readiness == ring::Readiness::NotYet {
                    let frame = frame.take().map(|f| f()).unwrap_or_default();
                    return Ok(self.submit_not_ready(token.0, (shard, &offer), frame, options, sink, submitted));
                }
                let Some(region) = offer.region.clone() else {
                    return Err(Error::Internal("a shared-memory worker offered without its region".into()));
                };
                match place(region.region()) {
                    Ok(len) => {
                        region.note_used(crate::ipc::shm::HEADER + len);
                        let (key, gen) = (offer.key, offer.gen);
                        let claim =
                            Claim { key, gen, region: Some(region), len, frame: None, at, handed: hand_over, readiness };
                        claimed = Some((shard, offer, claim));
                    }
                    Err(why) => {
                        // The worker is still ready: offer it again.
                        entry.per_shard[shard].ready.publish(offer);
                        entry.per_shard[shard].idle.fetch_add(1, Ordering::Relaxed);
                        return Err(Error::ResourceExhausted(format!("cannot place the request in shared memory: {why}")));
                    }
                }
            }
        } else {
            let frame = Arc::new(frame.take().map(|f| f()).unwrap_or_default());
            if hand_over && frame.len() <= self.config.hand_over_max_bytes {
                if let Some((shard, offer)) = claim_one() {
                    let readiness = claim_readiness(&offer);
                    if readiness == ring::Readiness::NotYet {
                        let frame = Arc::try_unwrap(frame).unwrap_or_else(|f| f.as_ref().clone());
                        return Ok(self.submit_not_ready(token.0, (shard, &offer), frame, options, sink, submitted));
                    }
                    let (key, gen, at) = (offer.key, offer.gen, Instant::now());
                    let claim =
                        Claim { key, gen, region: None, len: 0, frame: Some(frame.clone()), at, handed: true, readiness };
                    claimed = Some((shard, offer, claim));
                }
            }
            frame_built = Some(frame);
        }
        let id = self.next_exec.fetch_add(1, Ordering::Relaxed);
        let metadata = Arc::new(options.metadata);
        if let Some((shard, offer, claim)) = claimed {
            let handed = claim.handed;
            let (key, gen, at) = (claim.key, claim.gen, claim.at);
            let deadline = ring::deadline_after(at, options.timeout);
            let shared = &self.shards[shard].shared;
            let direct = (handed && !offer.armed && sink.is_channel()).then(|| {
                Box::new(DirectRead {
                    exec: id,
                    handoff: Arc::default(),
                    fd: offer.fd.clone(),
                    shard: shared.clone(),
                    max_response_bytes: self.config.max_response_bytes,
                    deadline,
                    submitted,
                    claimed: at,
                    idle_left: entry.per_shard[shard].idle.load(Ordering::Relaxed),
                })
            });
            let req = ExecRequest {
                id,
                token: token.0,
                metadata,
                frame: Vec::new(),
                worker_wait_timeout: options.worker_wait_timeout,
                timeout: options.timeout,
                sink,
                submitted,
                handoff: direct.as_ref().map(|d| d.handoff.clone()),
                claim: Some(claim),
            };
            let token = ExecutionToken { shard: shard as u32, id };
            if !handed || (!offer.armed && direct.is_none()) {
                // The shard writes the request, or (a callback on a worker without a
                // receive posted) must post the receive.
                shared.push(Cmd::Execute(req));
                if !handed {
                    return Ok((token, None));
                }
            } else {
                // Queued before the first byte can reach the worker, so the shard
                // knows the execution before it can see the answer; woken only if its
                // own timer would come after the execution's deadline.
                shared.push_lazy(Cmd::Execute(req), deadline);
            }
            static DOORBELL: [u8; 1] = [0];
            let bytes: &[u8] = match &frame_built {
                Some(frame) => frame,
                None => &DOORBELL,
            };
            let (written, error) = send_nonblocking(&offer.fd, bytes);
            let short = written < bytes.len();
            // Our references go first, so that the shard can take the frame back
            // without a copy to finish the write.
            drop(offer);
            drop(frame_built);
            if short {
                shared.push(Cmd::HandOverShort { exec: id, key, gen, written, error });
            }
            return Ok((token, direct));
        }
        let frame = match frame_built {
            Some(f) => Arc::try_unwrap(f).unwrap_or_else(|f| f.as_ref().clone()),
            None => frame.take().map(|f| f()).unwrap_or_default(),
        };
        let ready = order().find(|&i| entry.per_shard[i].idle.load(Ordering::Relaxed) > 0);
        // With no idle worker, the shard with the fewest executions queued per slot
        // (the first in `order` on a tie) queues it: each shard then serves its
        // queue oldest first and none offers freed workers to newer requests while
        // another's backlog waits.
        let queued = |i: usize| entry.per_shard[i].queued.load(Ordering::Relaxed);
        let least_queued = || {
            order().filter(|&i| entry.per_shard[i].slots > 0).reduce(|best, i| {
                let (b, c) = (&entry.per_shard[best], &entry.per_shard[i]);
                if queued(i) * b.slots < queued(best) * c.slots { i } else { best }
            })
        };
        // With every shard of the token failed, the execution goes to one of them,
        // which completes it with `Internal` at once.
        let shard = match ready {
            Some(i) => i,
            None => {
                let shard = least_queued().unwrap_or_else(|| {
                    (0..n).map(|k| (start + k) % n).find(|&i| entry.per_shard[i].slots > 0).unwrap_or(0)
                });
                entry.per_shard[shard].queued.fetch_add(1, Ordering::Relaxed);
                shard
            }
        };
        self.shards[shard].shared.push(Cmd::Execute(ExecRequest {
            id,
            token: token.0,
            metadata,
            frame,
            worker_wait_timeout: options.worker_wait_timeout,
            timeout: options.timeout,
            sink,
            submitted: Instant::now(),
            handoff: None,
            claim: None,
        }));
        Ok((ExecutionToken { shard: shard as u32, id }, None))
    }

    /// A caller claimed an unconfirmed worker whose ready byte was not there yet
    /// (see `Offer::unconfirmed`): nothing was written to it. The shard gets the
    /// execution with the request, waits for that worker's ready byte (or runs it
    /// on one that is ready first) and writes the request itself.
    fn submit_not_ready(
        &self,
        token: u64,
        (shard, offer): (usize, &Offer),
        frame: Vec<u8>,
        options: ExecuteOptions,
        sink: Sink,
        submitted: Instant,
    ) -> (ExecutionToken, Option<Box<DirectRead>>) {
        let id = self.next_exec.fetch_add(1, Ordering::Relaxed);
        let claim = Claim {
            key: offer.key,
            gen: offer.gen,
            region: None,
            len: 0,
            frame: None,
            at: Instant::now(),
            handed: false,
            readiness: ring::Readiness::NotYet,
        };
        self.shards[shard].shared.push(Cmd::Execute(ExecRequest {
            id,
            token,
            metadata: Arc::new(options.metadata),
            frame,
            worker_wait_timeout: options.worker_wait_timeout,
            timeout: options.timeout,
            sink,
            submitted,
            handoff: None,
            claim: Some(claim),
        }));
        (ExecutionToken { shard: shard as u32, id }, None)
    }
}

/// Who read a claimed worker's ready byte: the shard before it offered the
/// worker, or (an unconfirmed offer, see `Offer::unconfirmed`) this caller, now;
/// `NotYet` if the byte is not there yet.
fn claim_readiness(offer: &Offer) -> ring::Readiness {
    if !offer.unconfirmed {
        ring::Readiness::Shard
    } else if ring::take_ready_byte(&offer.fd) {
        ring::Readiness::Caller
    } else {
        ring::Readiness::NotYet
    }
}

/// The CPU the calling thread runs on (`usize::MAX` if unknown).
fn current_cpu() -> usize {
    // SAFETY: sched_getcpu takes no arguments (a vDSO call).
    let cpu = unsafe { libc::sched_getcpu() };
    usize::try_from(cpu).unwrap_or(usize::MAX)
}

/// One non-blocking `send` of `bytes` (retried on EINTR): how many were written,
/// and the errno if it failed (EAGAIN is no failure: the shard writes the rest).
fn send_nonblocking(fd: &OwnedFd, bytes: &[u8]) -> (usize, Option<i32>) {
    loop {
        // SAFETY: sending from a live slice on a socket we hold open.
        let n = unsafe {
            libc::send(fd.as_raw_fd(), bytes.as_ptr().cast(), bytes.len(), libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT)
        };
        if n >= 0 {
            return (n as usize, None);
        }
        match std::io::Error::last_os_error().raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EAGAIN) => return (0, None),
            e => return (0, Some(e.unwrap_or(libc::EIO))),
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.stop();
    }
}

fn check_workers(workers: usize) -> Result<()> {
    if workers == 0 {
        return Err(Error::InvalidArgument("workers must be at least 1".into()));
    }
    Ok(())
}

fn poisoned() -> Error {
    Error::Internal("engine state lock poisoned by a panic".into())
}

/// Copies the binary into a sealed memfd: later changes to the file on disk cannot
/// change what a code token runs.
fn sealed_memfd(bytes: &[u8]) -> Result<OwnedFd> {
    // SAFETY: valid NUL-terminated name; returns a fresh fd.
    let fd = unsafe { libc::memfd_create(c"roma-byob-udf".as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if fd < 0 {
        return Err(Error::io("memfd_create", std::io::Error::last_os_error()));
    }
    // SAFETY: fresh fd owned by us.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let file = std::fs::File::from(fd);
    use std::io::Write;
    (&file).write_all(bytes).map_err(|e| Error::io("write memfd", e))?;
    let seals = libc::F_SEAL_SEAL | libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_WRITE;
    // SAFETY: fcntl on our own fd.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) } < 0 {
        return Err(Error::io("seal memfd", std::io::Error::last_os_error()));
    }
    // Reopen read-only and drop the writable fd: exec refuses files open for writing.
    let path = format!("/proc/self/fd/{}", file.as_raw_fd());
    let ro = std::fs::File::open(&path).map_err(|e| Error::io("reopen memfd read-only", e))?;
    Ok(ro.into())
}

//! One control connection of the runner, on a thread of its own: it reads the
//! engine shard's orders (load, spawn, kill, unload, make channels), spawns
//! workers (directly or forked from a zygote template) and sends its reports.

use super::*;

/// A loaded binary.
struct Binary {
    fd: OwnedFd,
    /// Workers are forked from a template (`Load::zygote`), started at the first
    /// spawn.
    zygote: bool,
    template: Option<Zygote>,
}

/// One control connection: its orders, binaries and spawner.
pub(super) struct ConnThread {
    idx: usize,
    shared: Arc<Shared>,
    settings: Arc<Settings>,
    decoder: frame::Decoder,
    fds: std::collections::VecDeque<OwnedFd>,
    binaries: HashMap<u64, Binary>,
    spawner: Spawner,
    /// Why this connection starts no worker (its seccomp gate is missing).
    refuse: Option<String>,
    /// Channels this thread made (`MakeChannels`), by channel id, as (host end,
    /// worker end), until a spawn uses them or the host says it never will
    /// (`ChannelsTaken::unused`). A spawn moves the host end to its worker's record.
    made: HashMap<u64, (OwnedFd, OwnedFd)>,
    next_channel: u64,
    /// A channel report waits in `ConnOut::deferred` until this time at the latest.
    deferred_due: Option<std::time::Instant>,
}

impl ConnThread {
    pub(super) fn new(idx: usize, shared: Arc<Shared>, settings: Arc<Settings>) -> ConnThread {
        let slots = if settings.share_files {
            match FdSlots::reserve(settings.devnull.as_raw_fd()) {
                Ok(slots) => Some(slots),
                Err(e) => {
                    eprintln!("roma-byob-runner: cannot reserve fd slots ({e}); workers start with a copy of the whole fd table");
                    None
                }
            }
        } else {
            None
        };
        let spawner = Spawner::new(settings.extra_clone_flags, slots);
        ConnThread {
            idx,
            shared,
            settings,
            decoder: frame::Decoder::default(),
            fds: Default::default(),
            binaries: HashMap::new(),
            spawner,
            refuse: None,
            made: HashMap::new(),
            next_channel: 1,
            deferred_due: None,
        }
    }

    pub(super) fn run(mut self) {
        if let Some(&core) = self.settings.conn_cores.get(self.idx) {
            // This connection's engine thread runs on `core`: keeping the spawns and
            // the workers there too makes every wake-up between them core-local and
            // spares the kernel's migration of each new process at exec.
            // SAFETY: cpu_set_t is plain data; CPU_SET stays within it.
            unsafe {
                let mut set: libc::cpu_set_t = std::mem::zeroed();
                libc::CPU_SET(core, &mut set);
                if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
                    eprintln!("roma-byob-runner: cannot pin connection {} to core {core}: {}", self.idx, io::Error::last_os_error());
                }
            }
        }
        // Spawns run on this thread until exec, and workers inherit its nice value: at
        // WORKER_NICE a waking engine thread preempts a worker's start-up on a shared
        // core instead of waiting out its time slice (seen as ~1 ms p90 latency with
        // glibc workers pinned next to the engine thread).
        // SAFETY: setpriority on the calling thread (who = 0).
        if unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, WORKER_NICE) } != 0 {
            eprintln!("roma-byob-runner: cannot lower the priority of connection {}: {}", self.idx, io::Error::last_os_error());
        }
        // Minimal mode: SCHED_BATCH as well (same nice-10 weight, so the same CPU
        // share under load). The kernel preempts on wake-up only for SCHED_NORMAL
        // tasks, so this thread, woken by a spawn order, and the workers it starts
        // (which inherit the policy) no longer preempt the engine thread on their
        // core: they run when it sleeps. Measured (BENCHMARKS.md, fourteenth
        // session): the engine threads' involuntary context switches fell from 0.2
        // to 0.004 per sequential execution, their CPU by ~3 µs per execution.
        // gVisor schedules its tasks itself (and refuses anything but SCHED_NORMAL).
        if self.settings.batch_policy {
            let param = libc::sched_param { sched_priority: 0 };
            // SAFETY: sched_setscheduler on the calling thread with a valid param.
            if unsafe { libc::sched_setscheduler(0, libc::SCHED_BATCH, &param) } != 0 {
                eprintln!("roma-byob-runner: cannot set SCHED_BATCH on connection {}: {}", self.idx, io::Error::last_os_error());
            }
        }
        // Last: the gate refuses the two calls above to anything without the key.
        // Without it no worker may start (fail closed: each spawn order is answered
        // with the reason).
        if let Some(prog) = &self.settings.gate {
            if let Err(e) = prog.install() {
                eprintln!("roma-byob-runner: connection {}: cannot install the seccomp gate: {e}", self.idx);
                self.refuse = Some(format!("the runner could not install its seccomp gate: {e}"));
            }
        }
        let fd = self.shared.conns[self.idx].as_raw_fd();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let mut fds = Vec::new();
            // Minimal mode: read what is there, and wait in poll, not in recvmsg: a
            // thread blocked in recvmsg is woken (for nothing) each time the engine
            // reads one of this connection's reports, at the engine thread's
            // expense (measured, BENCHMARKS.md).
            let flags = if self.settings.poll_wait { libc::MSG_DONTWAIT } else { 0 };
            let n = match fdpass::recv_with_fds_flags(fd, &mut buf, &mut fds, flags) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && self.settings.poll_wait => {
                    let timeout = self.deferred_due.map(|due| due.saturating_duration_since(std::time::Instant::now()));
                    match fdpass::wait_readable_for(fd, timeout) {
                        Ok(true) => {}
                        Ok(false) => {
                            // A deferred channel report's time: sent now, unless a
                            // batch of exit reports took it along already.
                            self.deferred_due = None;
                            if !self.shared.send_frames(self.idx, &[]) {
                                break;
                            }
                        }
                        Err(e) => {
                            eprintln!("roma-byob-runner: control socket {}: poll: {e}", self.idx);
                            break;
                        }
                    }
                    continue;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.raw_os_error() == Some(libc::ECONNRESET) => 0,
                Err(e) => {
                    eprintln!("roma-byob-runner: control socket {}: {e}", self.idx);
                    0
                }
            };
            self.fds.extend(fds);
            if n == 0 || !self.take(&buf[..n]) {
                break;
            }
        }
        self.close();
    }

    /// Handles the complete frames among `bytes`; false on a protocol error.
    fn take(&mut self, bytes: &[u8]) -> bool {
        self.decoder.extend(bytes);
        loop {
            let msg = match self.decoder.next_frame(1 << 20) {
                Ok(Some(body)) => HostToRunner::decode(body),
                Ok(None) => return true,
                Err(e) => {
                    eprintln!("roma-byob-runner: control protocol error: {e}");
                    return false;
                }
            };
            match msg {
                Ok(HostToRunner { msg: Some(m) }) => match self.handle(m) {
                    Ok(()) => {}
                    // The engine side closed while this thread answered it (shutdown):
                    // nothing to report.
                    Err(Stop::Closed) => return false,
                    Err(Stop::Protocol(e)) => {
                        eprintln!("roma-byob-runner: control protocol error: {e}");
                        return false;
                    }
                },
                Ok(HostToRunner { msg: None }) | Err(_) => {
                    eprintln!("roma-byob-runner: undecodable control message");
                    return false;
                }
            }
        }
    }

    /// The engine side is gone (or broke the protocol): kill this connection's
    /// workers; the main thread reaps them.
    fn close(&mut self) {
        self.shared.close(self.idx);
        let tables = lock(&self.shared.tables);
        for (pid, w) in &tables.pids {
            if w.conn == self.idx {
                kill_worker(*pid);
            }
        }
        drop(tables);
        self.binaries.clear();
        self.fds.clear();
        self.made.clear();
    }

    /// One worker of a zygote binary: forked by its template, restarted once if it
    /// had gone before it took the order (a failed clone in a live template is just
    /// reported).
    ///
    /// A template that dies after taking the order (end of file on the reply) may
    /// have cloned a child that already holds `channel`, unknown to the reaper's
    /// tables: a second child on the same channel would share it. So that spawn
    /// fails; the engine closes its end, which ends such a child, and the next
    /// spawn starts a new template.
    fn zygote_spawn(
        &mut self,
        code_id: u64,
        channel: RawFd,
        logs: Option<(RawFd, RawFd)>,
        shm: Option<RawFd>,
    ) -> Result<libc::pid_t, String> {
        let forked = self.template_for(code_id, shm.is_some())?.fork(channel, logs, shm);
        use io::ErrorKind::{BrokenPipe, ConnectionReset, UnexpectedEof};
        match forked {
            // Not delivered (EPIPE), or left unread when it died (ECONNRESET: the
            // kernel's report of a closed socket with data still queued to it).
            Err(e) if matches!(e.kind(), BrokenPipe | ConnectionReset) => {
                eprintln!("roma-byob-runner: zygote of code {code_id}: {e}; starting a new template");
                self.drop_template(code_id);
                self.template_for(code_id, shm.is_some())?.fork(channel, logs, shm).map_err(|e| e.to_string())
            }
            Err(e) if e.kind() == UnexpectedEof => {
                self.drop_template(code_id);
                Err(format!("{e} after taking the spawn order (not retried on the same channel)"))
            }
            other => other.map_err(|e| e.to_string()),
        }
    }

    /// `code_id`'s running template, started first if there is none (or the one
    /// there was started for the other shared-memory setting).
    fn template_for(&mut self, code_id: u64, shm: bool) -> Result<&Zygote, String> {
        let bin = self.binaries.get(&code_id).ok_or_else(|| format!("unknown code id {code_id}"))?;
        if bin.template.as_ref().is_some_and(|t| t.shm() != shm) {
            self.drop_template(code_id);
        }
        if self.binaries.get(&code_id).is_some_and(|b| b.template.is_none()) {
            let t = self.start_template(code_id, shm)?;
            if let Some(b) = self.binaries.get_mut(&code_id) {
                b.template = Some(t);
            }
        }
        self.binaries.get(&code_id).and_then(|b| b.template.as_ref()).ok_or_else(|| format!("unknown code id {code_id}"))
    }

    fn drop_template(&mut self, code_id: u64) {
        if let Some(t) = self.binaries.get_mut(&code_id).and_then(|b| b.template.take()) {
            self.retire(code_id, t);
        }
    }

    /// Execs a template of `code_id`, registers it for the reaper, then sends it
    /// its set-up.
    fn start_template(&mut self, code_id: u64, shm: bool) -> Result<Zygote, String> {
        let bin = self.binaries.get(&code_id).ok_or_else(|| format!("unknown code id {code_id}"))?;
        let settings = &self.settings;
        let tables = &self.shared.tables;
        let t = Zygote::start(
            &mut self.spawner,
            bin.fd.as_raw_fd(),
            settings.devnull.as_raw_fd(),
            settings.rlimit_as,
            shm,
            |pid| {
                lock(tables).early.remove(&pid);
            },
        )
        .map_err(|e| format!("zygote template: {e}"))?;
        {
            let mut tables = lock(&self.shared.tables);
            if let Some(status) = tables.early.remove(&t.pid()) {
                return Err(format!("the zygote template exited at once (wait status {status:#x})"));
            }
            let template = Worker {
                conn: self.idx,
                worker_id: 0,
                code_id,
                awaited: false,
                host_end: None,
                template: true,
                exit_batch: 0,
                exit_hold: std::time::Duration::ZERO,
            };
            tables.pids.insert(t.pid(), template);
        }
        let setup = zygote::Setup {
            key: gate::key(),
            clone_flags: settings.extra_clone_flags as u64,
            log_fsize: settings.rlimit_fsize.rlim_cur,
        };
        if let Err(e) = t.send_setup(&setup) {
            self.retire(code_id, t);
            return Err(e.to_string());
        }
        Ok(t)
    }

    /// Stops `code_id`'s template: it exits on its control socket's end of file;
    /// killed too, in case it is stuck, unless the reaper has collected it already
    /// (then its pid may be another process's by now).
    fn retire(&self, code_id: u64, t: Zygote) {
        let tables = lock(&self.shared.tables);
        if tables.pids.get(&t.pid()).is_some_and(|w| w.template && w.conn == self.idx && w.code_id == code_id) {
            kill_worker(t.pid());
        }
    }

    fn handle(&mut self, msg: host_to_runner::Msg) -> Result<(), Stop> {
        match msg {
            host_to_runner::Msg::Load(load) => {
                let mut fd = self.fds.pop_front().ok_or("Load without its binary fd")?;
                if self.settings.copy_binaries {
                    fd = copy_to_memfd(&fd).map_err(|e| format!("copy binary into the sandbox: {e}"))?;
                }
                if self.settings.share_files {
                    // Kept for the code token's life: out of the numbers every spawn copies.
                    fd = move_up(fd, CHANNEL_FD_FLOOR);
                }
                let binary = Binary { fd, zygote: load.zygote, template: None };
                if let Some(old) = self.binaries.insert(load.code_id, binary) {
                    self.spawner.forget_binary();
                    if let Some(t) = old.template {
                        self.retire(load.code_id, t);
                    }
                }
            }
            host_to_runner::Msg::Unload(unload) => {
                if self.binaries.remove(&unload.code_id).is_some() {
                    self.spawner.forget_binary();
                }
                let tables = lock(&self.shared.tables);
                for (pid, w) in &tables.pids {
                    if w.conn == self.idx && w.code_id == unload.code_id {
                        kill_worker(*pid);
                    }
                }
            }
            host_to_runner::Msg::Kill(kill) => {
                let tables = lock(&self.shared.tables);
                if let Some(pid) = tables.by_worker.get(&(self.idx, kill.worker_id)) {
                    kill_worker(*pid);
                }
            }
            host_to_runner::Msg::MakeChannels(make) => {
                let mut report = Channels::default();
                for _ in 0..make.count.min(MAX_CHANNELS_PER_ORDER) {
                    match make_channel(self.settings.share_files) {
                        Ok((host, worker)) => {
                            let id = self.next_channel;
                            self.next_channel += 1;
                            report.channels.push(Channel { id, fd: host.as_raw_fd() });
                            self.made.insert(id, (host, worker));
                        }
                        Err(e) => {
                            report.error = format!("socketpair: {e}");
                            break;
                        }
                    }
                }
                let bytes = frame::encode(&RunnerToHost { msg: Some(runner_to_host::Msg::Channels(report)) });
                // Deferred only where this thread waits with a deadline (`poll_wait`).
                let open = if make.defer_us > 0 && self.settings.poll_wait {
                    let due = std::time::Instant::now() + std::time::Duration::from_micros(make.defer_us.into());
                    self.deferred_due = Some(self.deferred_due.map_or(due, |d| d.min(due)));
                    self.shared.defer_frames(self.idx, &bytes)
                } else {
                    self.deferred_due = None;
                    self.shared.send_frames(self.idx, &bytes)
                };
                if !open {
                    return Err(Stop::Closed);
                }
            }
            host_to_runner::Msg::ChannelsTaken(taken) => {
                // Only channels this thread made are closed, whatever the host says.
                // The host ends it took stay open here until their workers are
                // reaped (`Worker::host_end`).
                for id in taken.unused {
                    self.made.remove(&id);
                }
            }
            host_to_runner::Msg::Spawn(sp) => {
                let (host_end, channel) = if sp.channel != 0 {
                    let (host, worker) =
                        self.made.remove(&sp.channel).ok_or_else(|| format!("Spawn names unknown channel {}", sp.channel))?;
                    (Some(host), worker)
                } else {
                    (None, self.fds.pop_front().ok_or("Spawn without its channel fd")?)
                };
                let logs = if sp.log {
                    let out = self.fds.pop_front().ok_or("Spawn without its stdout fd")?;
                    let err = self.fds.pop_front().ok_or("Spawn without its stderr fd")?;
                    Some((out, err))
                } else {
                    None
                };
                let shm = if sp.shm { Some(self.fds.pop_front().ok_or("Spawn without its shared-memory fd")?) } else { None };
                let result = match self.binaries.get(&sp.code_id) {
                    _ if self.refuse.is_some() => Err(self.refuse.clone().unwrap_or_default()),
                    None => Err(format!("unknown code id {}", sp.code_id)),
                    Some(bin) if bin.zygote => {
                        let logs = logs.as_ref().map(|(o, e)| (o.as_raw_fd(), e.as_raw_fd()));
                        self.zygote_spawn(sp.code_id, channel.as_raw_fd(), logs, shm.as_ref().map(|f| f.as_raw_fd()))
                    }
                    Some(bin) => {
                        let settings = &self.settings;
                        let null = settings.devnull.as_raw_fd();
                        let plan = SpawnPlan {
                            binary: bin.fd.as_raw_fd(),
                            channel: channel.as_raw_fd(),
                            stdin: null,
                            stdout: logs.as_ref().map_or(null, |l| l.0.as_raw_fd()),
                            stderr: logs.as_ref().map_or(null, |l| l.1.as_raw_fd()),
                            rlimit_as: settings.rlimit_as,
                            rlimit_fsize: logs.as_ref().map(|_| settings.rlimit_fsize),
                            shm: shm.as_ref().map(|f| f.as_raw_fd()),
                            template: None,
                        };
                        let tables = &self.shared.tables;
                        self.spawner
                            .spawn(&plan, |pid| {
                                lock(tables).early.remove(&pid);
                            })
                            .map_err(|e| e.to_string())
                    }
                };
                drop(channel);
                drop(logs);
                drop(shm);
                match result {
                    Ok(pid) => {
                        let early = {
                            let mut tables = lock(&self.shared.tables);
                            match tables.early.remove(&pid) {
                                Some(status) => Some(status),
                                None => {
                                    let awaited = sp.log || sp.shm;
                                    tables.awaited += usize::from(awaited);
                                    tables.pids.insert(
                                        pid,
                                        Worker {
                                            conn: self.idx,
                                            worker_id: sp.worker_id,
                                            code_id: sp.code_id,
                                            awaited,
                                            host_end,
                                            template: false,
                                            exit_batch: sp.exit_batch,
                                            exit_hold: std::time::Duration::from_micros(sp.exit_hold_us.into()),
                                        },
                                    );
                                    tables.by_worker.insert((self.idx, sp.worker_id), pid);
                                    None
                                }
                            }
                        };
                        if let Some(status) = early {
                            let mut bytes = Vec::new();
                            Shared::exited(sp.worker_id, status, &mut bytes);
                            self.shared.send_frames(self.idx, &bytes);
                        }
                    }
                    Err(error) => {
                        let msg = runner_to_host::Msg::SpawnFailed(SpawnFailed { worker_id: sp.worker_id, error });
                        if !self.shared.send(self.idx, msg) {
                            return Err(Stop::Closed);
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

/// Why a connection thread stops reading its control connection.
enum Stop {
    /// The engine side is gone (a send failed): a normal shutdown.
    Closed,
    /// The engine broke the protocol.
    Protocol(String),
}

impl From<String> for Stop {
    fn from(why: String) -> Self {
        Stop::Protocol(why)
    }
}

impl From<&str> for Stop {
    fn from(why: &str) -> Self {
        Stop::Protocol(why.to_string())
    }
}

/// Most channels one `MakeChannels` order makes (the host asks for 8 at a time).
const MAX_CHANNELS_PER_ORDER: u32 = 256;

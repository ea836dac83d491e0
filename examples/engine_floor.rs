//! The floor of the engine threads' CPU per execution on this machine: what a bare
//! io_uring host thread spends per execution doing only what this design cannot do
//! without (take a fresh worker's channel, wait for its ready byte, send the request,
//! read the response, close the channel, order the refill spawn) while fresh worker
//! processes start and end on its core. `roma-byob demo` prints the engine threads'
//! CPU per execution under load to set beside it.
//!
//! One host thread per allowed core, pinned, its io_uring built on the thread as the
//! engine builds its own (SINGLE_ISSUER | DEFER_TASKRUN | TASKRUN_FLAG). Each has a
//! spawner thread on the same core (the stand-in for the engine's runner process; its
//! CPU is reported apart): per order it reads from an eventfd, it makes a socketpair,
//! `posix_spawn`s the UDF with the child end as fd 3 and argv [binary, "3"], and hands
//! the host ends over in a mutex-guarded list plus one eventfd write per batch.
//! Workers inherit the spawner's pinning unless `--workers-anywhere`.
//!
//! Two options bring the floor closer to the engine's design:
//! - `--namespaces`: workers start as the runner starts them
//!   (`clone(CLONE_VM | CLONE_VFORK | CLONE_NEWUSER | CLONE_NEWPID | CLONE_NEWUTS)`
//!   and exec; without the runner's capability drop, no_new_privs and seccomp);
//! - `--runner-process`: each spawner is a process of its own, forked per host
//!   thread, as the runner is: it keeps each host end until it reaps that worker and
//!   reports the ends' numbers on a pipe, and the host takes them with `pidfd_getfd`.
//! - `--early`: as the engine's `Config::early_dispatch`, a queued execution's
//!   request goes to a worker as soon as its channel arrives, before its ready
//!   byte, and one receive takes the ready byte with the response.
//!
//! Two options test what a wait or a ready byte costs (BENCHMARKS.md, nineteenth
//! session):
//! - `--poll-ready`: a new worker's ready byte is polled for (`PollAdd`), not
//!   read; the response's receive takes it. Avoids waking the worker when the
//!   byte is consumed; measured no cheaper for the host thread.
//! - `--timed-wait`: every `io_uring_enter` wait carries a 1 s timeout, as the
//!   engine's waits carry the next timer's. A far timeout costs nothing measurable;
//!   a near one (`--batch-wait-us`, the engine's `batch_wait`) ends waits on timer
//!   interrupts, which cost tens of µs each in this VM.
//!
//! With `--namespaces` at 12,000-15,000 workers/s, a run started right after another
//! sometimes fails at once: clone returns ENOSPC (seen here; the likely cause, not
//! checked, is the previous run's namespaces still being freed, which the kernel
//! does asynchronously). A pause of some seconds between runs avoids it.
//!
//! Per execution the host thread's ring runs a 1-byte `Recv` for the ready byte, the
//! request `Send` with the response `Recv` (one submission; recvs that wait use
//! IORING_RECVSEND_POLL_FIRST) and a `Close` of the channel, all riding on the waits'
//! `io_uring_enter`; the eventfd `Read` of new channels is shared by a batch, and so
//! is the order write, a plain write(2): an io_uring `Write` to an eventfd goes to an
//! io-wq worker thread (~40 µs more per execution here). The `Close` op and close(2)
//! measured the same here (14.9 µs per execution both); the op saves a syscall.
//!
//! Closed loop: each host thread keeps Q executions queued or running until N have
//! been started over all threads. Figures cover the whole run, pool filling included:
//! each host thread's CPU (`/proc/thread-self/schedstat`) and wake-ups (voluntary
//! context switches, `/proc/thread-self/status`) from its ring's creation to its last
//! execution; the spawners' CPU likewise; the workers' CPU from
//! getrusage(RUSAGE_CHILDREN) (spawners reap with waitpid(WNOHANG), the end waits up
//! to 2 s for every child, then kills those left). SIGCHLD is blocked in every thread
//! (workers start with an empty mask): else a worker's exit, while its spawner has
//! every signal blocked in posix_spawn, wakes another thread of this process to
//! discard the signal. Failures: executions without a whole, exact response frame (no
//! ready byte, a send error, EOF or error first, bytes past the frame), plus workers
//! that die before their ready byte while no execution is queued.
//!
//! `cargo run --release --example engine_floor -- --binary UDF [--executions N]
//! [--pool P] [--in-flight Q] [--batch-wait-us U] [--workers-anywhere]
//! [--namespaces] [--runner-process] [--early] [--poll-ready] [--timed-wait]` (defaults
//! 60000, 5, 32, 0; U > 0 waits as the engine does under load: for 64 completions, or
//! U µs once one is there). No timeouts: the UDF must send its ready byte, and exit
//! after answering or on EOF.

use std::ffi::{c_char, CString};
use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use io_uring::{opcode, squeue, types};

/// IORING_RECVSEND_POLL_FIRST: nothing is due yet, arm the poll without a first try.
const POLL_FIRST: u16 = 1 << 0;
/// The empty request: a varint-delimited frame of length 0.
static REQUEST: [u8; 1] = [0];
const BUF: usize = 64;
/// An order count that tells the spawner to stop.
const STOP: u64 = 1 << 40;
// user_data: the kind in the top byte, the worker slot in the low 32 bits.
const K_NEW: u64 = 1; // the eventfd Read: new channels from the spawner
const K_READY: u64 = 2;
const K_SEND: u64 = 3;
const K_RESP: u64 = 4;
const K_CLOSE: u64 = 5;

struct Config {
    binary: CString,
    executions: usize,
    pool: usize,
    in_flight: usize,
    batch_wait_us: u32,
    workers_anywhere: bool,
    early: bool,
    poll_ready: bool,
    timed_wait: bool,
    namespaces: bool,
    runner_process: bool,
    cores: Vec<usize>,
}

static CONFIG: OnceLock<Config> = OnceLock::new();
/// Executions started over all host threads (may pass N: whoever sees N stops).
static STARTED: AtomicUsize = AtomicUsize::new(0);

fn cfg() -> &'static Config {
    CONFIG.get().expect("set at the start of main")
}

fn take_budget() -> bool {
    STARTED.fetch_add(1, Ordering::Relaxed) < cfg().executions
}

fn all_started() -> bool {
    STARTED.load(Ordering::Relaxed) >= cfg().executions
}

trait OrExit<T> {
    fn or_exit(self, what: &str) -> T;
}

impl<T, E: std::fmt::Display> OrExit<T> for Result<T, E> {
    fn or_exit(self, what: &str) -> T {
        self.unwrap_or_else(|e| exit_with(&format!("{what}: {e}")))
    }
}

fn exit_with(msg: &str) -> ! {
    eprintln!("engine_floor: {msg}");
    std::process::exit(1)
}

fn main() {
    let config = parse_args().unwrap_or_else(|msg| {
        eprintln!("{msg}\nusage: engine_floor --binary UDF [--executions N] [--pool P] [--in-flight Q] [--batch-wait-us U] [--workers-anywhere] [--namespaces] [--runner-process] [--early] [--poll-ready] [--timed-wait]");
        std::process::exit(2)
    });
    let (n, c) = (config.executions, CONFIG.get_or_init(|| config));
    block_sigchld();
    println!(
        "engine_floor: {n} executions, {} workers and {} in flight per host thread, host threads on cores {:?}",
        c.pool, c.in_flight, c.cores
    );
    let wait = match c.batch_wait_us {
        0 => "submit_and_wait(1)".to_string(),
        us => format!("64 completions or {us} µs after the first (min_wait)"),
    };
    let workers = ["on their host thread's core", "on any core"][usize::from(c.workers_anywhere)];
    let start_how = ["posix_spawn", "clone in new user, PID and UTS namespaces (the engine's recipe)"][usize::from(c.namespaces)];
    println!("  wait: {wait}; workers {workers}, started by {start_how}");
    if c.runner_process {
        println!("  spawners: one process per host thread (fds taken with pidfd_getfd), as the engine's runner");
    }
    if c.early {
        println!("  requests: a queued one is written to a worker as its channel arrives, before its ready byte");
    }
    let start = Instant::now();
    let threads: Vec<_> = (c.cores.iter()).map(|&core| std::thread::spawn(move || host(core))).collect();
    let reports: Vec<Report> = (threads.into_iter()).map(|t| t.join().unwrap_or_else(|_| exit_with("a host thread panicked"))).collect();
    let wall = start.elapsed().as_secs_f64();
    let sum = |f: fn(&Report) -> u64| reports.iter().map(f).sum::<u64>() as f64 / n as f64;
    let failures = reports.iter().map(|r| r.failures).sum::<u64>();
    println!(
        "{:.0} executions/s, host threads: {:.1} µs CPU per execution, {:.2} wake-ups per execution; spawners: {:.1} µs; failures: {failures}",
        n as f64 / wall,
        sum(|r| r.cpu_ns) / 1e3,
        sum(|r| r.wakeups),
        sum(|r| r.spawner_cpu_ns) / 1e3,
    );
    if !reap(Duration::from_secs(2)) {
        let killed = kill_children();
        reap(Duration::from_secs(2));
        exit_with(&format!("{killed} workers still running 2 s after the end, killed"));
    }
    // SAFETY: getrusage writes into the rusage it is given.
    let workers_us = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru);
        let us = |t: libc::timeval| t.tv_sec as f64 * 1e6 + t.tv_usec as f64;
        us(ru.ru_utime) + us(ru.ru_stime)
    };
    let workers_us = workers_us / n as f64;
    // With --runner-process the spawner processes are our children too.
    let whose = if c.runner_process { "workers and spawner processes" } else { "workers" };
    println!("  {whose}: {workers_us:.1} µs CPU per execution (getrusage RUSAGE_CHILDREN)");
    if failures > 0 {
        std::process::exit(1);
    }
}

fn parse_args() -> Result<Config, String> {
    let mut cfg = Config {
        binary: CString::default(),
        executions: 60_000,
        pool: 5,
        in_flight: 32,
        batch_wait_us: 0,
        workers_anywhere: false,
        early: false,
        poll_ready: false,
        timed_wait: false,
        namespaces: false,
        runner_process: false,
        cores: roma_byob::ring::current_thread_affinity(),
    };
    let mut binary = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut number = |min: usize| {
            let v = args.next().and_then(|v| v.parse::<usize>().ok());
            v.filter(|&v| v >= min).ok_or(format!("{arg} needs a number >= {min}"))
        };
        match arg.as_str() {
            "--binary" => binary = Some(args.next().ok_or("--binary needs a path")?),
            "--executions" => cfg.executions = number(1)?,
            "--pool" => cfg.pool = number(1)?,
            "--in-flight" => cfg.in_flight = number(1)?,
            "--batch-wait-us" => cfg.batch_wait_us = number(0)?.min(u32::MAX as usize) as u32,
            "--workers-anywhere" => cfg.workers_anywhere = true,
            "--early" => cfg.early = true,
            "--poll-ready" => cfg.poll_ready = true,
            "--timed-wait" => cfg.timed_wait = true,
            "--namespaces" => cfg.namespaces = true,
            "--runner-process" => cfg.runner_process = true,
            other => return Err(format!("unknown argument {other}")),
        }
    }
    let binary = binary.ok_or("--binary is required")?;
    match std::fs::metadata(&binary) {
        Ok(meta) if meta.is_file() => {}
        Ok(_) => return Err(format!("--binary {binary} is not a file")),
        Err(e) => return Err(format!("cannot use --binary {binary}: {e}")),
    }
    cfg.binary = CString::new(binary).map_err(|_| "--binary contains a NUL byte")?;
    if cfg.cores.is_empty() {
        return Err("no allowed core".into());
    }
    Ok(cfg)
}

/// What a host thread shares with its spawner.
struct Link {
    channels: Mutex<Vec<RawFd>>,
    to_host: RawFd,
    to_spawner: RawFd,
    /// `--runner-process`: the spawner process's pidfd; `to_host` is then the read
    /// end of a pipe carrying the numbers of the host ends in the spawner.
    pidfd: Option<RawFd>,
}

struct Report {
    cpu_ns: u64,
    wakeups: u64,
    spawner_cpu_ns: u64,
    failures: u64,
}

/// One host thread and its spawner, on `core`.
fn host(core: usize) -> Report {
    pin(&[core]);
    let to_spawner = eventfd();
    let (to_host, process) = if cfg().runner_process {
        let (r, pid, pidfd) = fork_spawner(core, to_spawner);
        (r, Some((pid, pidfd)))
    } else {
        (eventfd(), None)
    };
    let link = Arc::new(Link { channels: Mutex::default(), to_host, to_spawner, pidfd: process.map(|(_, pidfd)| pidfd) });
    let spawner = process.is_none().then(|| {
        let link = link.clone();
        std::thread::spawn(move || spawner(core, &link))
    });
    let mut builder = io_uring::IoUring::builder();
    builder.setup_single_issuer().setup_defer_taskrun().setup_taskrun_flag();
    let ring = match builder.build(256) {
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            println!("  note: no DEFER_TASKRUN on this kernel, using a plain io_uring");
            io_uring::IoUring::builder().build(256)
        }
        r => r,
    };
    let (cpu0, wake0) = (thread_cpu_ns(), voluntary_switches());
    let mut h = Host {
        ring: ring.or_exit("cannot create an io_uring"),
        link: link.clone(),
        slots: Vec::new(),
        free: Vec::new(),
        idle: Vec::new(),
        queued: 0,
        running: 0,
        pending_spawns: 0,
        orders: 0,
        // Leaked: the last Read of it is still in the kernel when the ring is dropped.
        new_buf: Box::leak(Box::new([0; 64])),
        failures: 0,
    };
    h.run();
    let (cpu1, wake1) = (thread_cpu_ns(), voluntary_switches());
    // Idle workers read EOF and exit.
    for s in h.slots.iter().filter(|s| s.fd >= 0) {
        // SAFETY: an idle worker's channel, owned here; no operation uses it any more.
        unsafe { libc::close(s.fd) };
    }
    let spawner_cpu_ns = match (spawner, process) {
        (Some(t), _) => {
            notify(link.to_spawner, STOP);
            t.join().unwrap_or_else(|_| exit_with("a spawner panicked"))
        }
        (None, Some((pid, pidfd))) => {
            let cpu = process_cpu_ns(pid);
            notify(link.to_spawner, STOP);
            // SAFETY: waits for our own child; the pidfd is ours.
            unsafe {
                libc::waitpid(pid, std::ptr::null_mut(), 0);
                libc::close(pidfd);
            }
            cpu
        }
        (None, None) => 0,
    };
    // SAFETY: both eventfds are this thread's, and their last users are gone.
    unsafe {
        libc::close(to_host);
        libc::close(to_spawner);
    }
    Report { cpu_ns: cpu1 - cpu0, wakeups: wake1 - wake0, spawner_cpu_ns, failures: h.failures }
}

struct Slot {
    fd: RawFd,
    buf: Box<[u8; BUF]>,
    inflight: u32,
    failed: bool,
    received: usize,
    /// The response frame's length (varint header included), once the header is in.
    frame: Option<usize>,
    /// Bytes before the frame: 1 while the ready byte comes first (`--early`,
    /// `--poll-ready`).
    base: usize,
    /// `--poll-ready`: the ready byte is still in the socket.
    unread_ready: bool,
}

impl Slot {
    fn complete(&self) -> bool {
        self.frame.is_some_and(|f| self.received >= self.base + f)
    }
}

struct Host {
    ring: io_uring::IoUring,
    link: Arc<Link>,
    slots: Vec<Slot>,
    free: Vec<usize>,
    idle: Vec<usize>,
    /// Executions waiting for a ready worker; executions on a worker.
    queued: usize,
    running: usize,
    /// Spawns ordered whose ready byte has not come yet; orders not written yet.
    pending_spawns: usize,
    orders: u64,
    new_buf: &'static mut [u32; 64],
    failures: u64,
}

impl Host {
    fn run(&mut self) {
        self.post_new_read();
        self.order(cfg().pool);
        for _ in 0..cfg().in_flight {
            self.queued += usize::from(take_budget());
        }
        let mut cqes = Vec::new();
        loop {
            // The batch's orders in one write.
            if self.orders > 0 {
                notify(self.link.to_spawner, std::mem::take(&mut self.orders));
            }
            if all_started() && self.queued + self.running + self.pending_spawns == 0 {
                // The last Close ops.
                self.ring.submit().or_exit("io_uring submit");
                return;
            }
            self.wait();
            cqes.extend(self.ring.completion().map(|c| (c.user_data(), c.result())));
            for (data, res) in cqes.drain(..) {
                self.handle(data >> 56, (data & 0xffff_ffff) as usize, res);
            }
        }
    }

    fn wait(&mut self) {
        let waited = match cfg().batch_wait_us {
            0 if cfg().timed_wait => {
                let ts = types::Timespec::new().sec(1);
                self.ring.submitter().submit_with_args(1, &types::SubmitArgs::new().timespec(&ts))
            }
            0 => self.ring.submit_and_wait(1),
            us => {
                let ts = types::Timespec::new().nsec(100_000_000);
                let args = types::SubmitArgs::new().timespec(&ts).min_wait_usec(us);
                self.ring.submitter().submit_with_args(64, &args)
            }
        };
        let Err(e) = waited else { return };
        if !matches!(e.raw_os_error(), Some(libc::EINTR | libc::ETIME | libc::EBUSY)) {
            exit_with(&format!("io_uring wait: {e}"));
        }
    }

    fn handle(&mut self, kind: u64, slot: usize, res: i32) {
        if res < 0 && (kind == K_NEW || kind == K_CLOSE) {
            exit_with(&format!("io_uring op {kind}: {}", io::Error::from_raw_os_error(-res)));
        }
        match kind {
            K_NEW => {
                let fds = match self.link.pidfd {
                    None => std::mem::take(&mut *self.link.channels.lock().or_exit("channels")),
                    Some(pidfd) => {
                        // End of file: the spawner process is gone (it said why on stderr).
                        let n = usize::try_from(res).unwrap_or(0);
                        if n == 0 {
                            exit_with("the spawner process exited before the end of the run");
                        }
                        let numbers = self.new_buf[..n / 4].to_vec();
                        numbers.into_iter().map(|remote| take_fd(pidfd, remote)).collect()
                    }
                };
                for fd in fds {
                    self.add_worker(fd);
                }
                self.post_new_read();
            }
            // A poll's events: readable, and the peer not gone.
            K_READY if cfg().poll_ready => self.ready(slot, res > 0 && res as i16 & (libc::POLLIN | libc::POLLHUP) == libc::POLLIN),
            K_READY => self.ready(slot, res == 1),
            K_SEND => {
                self.slots[slot].inflight -= 1;
                self.slots[slot].failed |= res != 1;
                self.maybe_finish(slot);
            }
            K_RESP => self.response(slot, res),
            _ => {}
        }
    }

    fn add_worker(&mut self, fd: RawFd) {
        let slot = self.free.pop().unwrap_or_else(|| {
            let buf = Box::new([0; BUF]);
            let s = Slot { fd, buf, inflight: 0, failed: false, received: 0, frame: None, base: 0, unread_ready: false };
            self.slots.push(s);
            self.slots.len() - 1
        });
        if cfg().early && self.queued > 0 {
            self.slots[slot].fd = fd;
            self.pending_spawns -= 1;
            self.queued -= 1;
            self.dispatch(slot, 1);
            return;
        }
        let s = &mut self.slots[slot];
        (s.fd, s.inflight, s.unread_ready) = (fd, 1, cfg().poll_ready);
        let sqe = if cfg().poll_ready {
            opcode::PollAdd::new(types::Fd(fd), libc::POLLIN as u32).build()
        } else {
            opcode::Recv::new(types::Fd(fd), s.buf.as_mut_ptr(), 1).ioprio(POLL_FIRST).build()
        };
        self.push(sqe.user_data(K_READY << 56 | slot as u64));
    }

    fn ready(&mut self, slot: usize, ok: bool) {
        self.slots[slot].inflight -= 1;
        self.pending_spawns -= 1;
        if !ok {
            // Gone before it was ready: fails a queued execution, if any.
            self.release(slot);
            if self.queued > 0 {
                self.queued -= 1;
                self.finish(false);
            } else {
                self.failures += 1;
                self.refill();
            }
        } else if self.queued > 0 {
            self.queued -= 1;
            self.dispatch(slot, usize::from(self.slots[slot].unread_ready));
        } else {
            self.idle.push(slot);
        }
    }

    fn dispatch(&mut self, slot: usize, base: usize) {
        self.running += 1;
        let s = &mut self.slots[slot];
        (s.failed, s.received, s.frame, s.base) = (false, 0, None, base);
        s.inflight += 1;
        let send = opcode::Send::new(types::Fd(s.fd), REQUEST.as_ptr(), 1);
        let send = send.flags(libc::MSG_NOSIGNAL).build();
        self.push(send.user_data(K_SEND << 56 | slot as u64));
        self.post_resp_recv(slot, POLL_FIRST);
    }

    /// Reads more of the response: after what came so far while the header is
    /// incomplete, else over the buffer's start (only the byte count matters then).
    fn post_resp_recv(&mut self, slot: usize, ioprio: u16) {
        let s = &mut self.slots[slot];
        let at = if s.frame.is_none() { s.received } else { 0 };
        s.inflight += 1;
        let recv = opcode::Recv::new(types::Fd(s.fd), s.buf[at..].as_mut_ptr(), (BUF - at) as u32);
        let recv = recv.ioprio(ioprio).build();
        self.push(recv.user_data(K_RESP << 56 | slot as u64));
    }

    fn response(&mut self, slot: usize, res: i32) {
        let s = &mut self.slots[slot];
        s.inflight -= 1;
        if res <= 0 {
            s.failed = true; // EOF or error before the whole frame
        } else {
            s.received += res as usize;
            if s.frame.is_none() {
                s.frame = frame_len(&s.buf[s.base.min(s.received)..s.received]);
                // A varint header is at most 10 bytes.
                s.failed |= s.frame.is_none() && s.received >= s.base + 10;
            }
            if !s.failed && !s.complete() {
                self.post_resp_recv(slot, 0);
            }
        }
        self.maybe_finish(slot);
    }

    /// Ends an execution once its worker has answered (or failed) and no operation on
    /// its channel is left.
    fn maybe_finish(&mut self, slot: usize) {
        let s = &self.slots[slot];
        if s.inflight == 0 && (s.failed || s.complete()) {
            let ok = !s.failed && s.frame == Some(s.received - s.base);
            self.running -= 1;
            self.release(slot);
            self.finish(ok);
        }
    }

    /// One execution done: keeps Q in flight while executions are left to start.
    fn finish(&mut self, ok: bool) {
        self.failures += u64::from(!ok);
        if take_budget() {
            match self.idle.pop() {
                Some(worker) => self.dispatch(worker, usize::from(self.slots[worker].unread_ready)),
                None => self.queued += 1,
            }
        }
        self.refill();
    }

    /// Orders a worker's replacement while any execution may still need it.
    fn refill(&mut self) {
        if self.queued > 0 || !all_started() {
            self.order(1);
        }
    }

    fn order(&mut self, n: usize) {
        self.orders += n as u64;
        self.pending_spawns += n;
    }

    fn release(&mut self, slot: usize) {
        let fd = std::mem::replace(&mut self.slots[slot].fd, -1);
        self.free.push(slot);
        let close = opcode::Close::new(types::Fd(fd)).build();
        self.push(close.user_data(K_CLOSE << 56));
    }

    fn post_new_read(&mut self) {
        let ptr = self.new_buf.as_mut_ptr().cast();
        let len = if self.link.pidfd.is_some() { 256 } else { 8 };
        let read = opcode::Read::new(types::Fd(self.link.to_host), ptr, len);
        self.push(read.build().user_data(K_NEW << 56));
    }

    fn push(&mut self, sqe: squeue::Entry) {
        // SAFETY: every buffer an entry points at outlives its operation: slot
        // buffers are boxed (they stay put when `slots` grows) and a slot is reused
        // only once its operations have completed (`inflight`; the run ends with none
        // on a slot); REQUEST is static; the eventfd counter is leaked.
        while unsafe { self.ring.submission().push(&sqe) }.is_err() {
            self.ring.submit().or_exit("io_uring submit");
        }
    }
}

/// The frame's total length (varint header + body), if the header is complete.
fn frame_len(bytes: &[u8]) -> Option<usize> {
    let mut len = 0usize;
    for (i, &b) in bytes.iter().take(10).enumerate() {
        len |= usize::from(b & 0x7f).checked_shl(7 * i as u32).unwrap_or(0);
        if b & 0x80 == 0 {
            return Some(len.saturating_add(i + 1));
        }
    }
    None
}

/// Starts workers on its host thread's orders, pinned to `core` (children inherit
/// the pinning) unless `--workers-anywhere`. Returns its CPU time in ns.
fn spawner(core: usize, link: &Link) -> u64 {
    spawn_loop(core, link.to_spawner, |fds| {
        link.channels.lock().or_exit("channels").extend(fds.iter().map(|&(fd, _)| fd));
        notify(link.to_host, 1);
        reap(Duration::ZERO);
    })
}

/// The spawner's loop: per batch of orders, starts the workers and hands
/// `deliver` their host ends and pids; returns the loop's CPU.
fn spawn_loop(core: usize, to_spawner: RawFd, mut deliver: impl FnMut(&[(RawFd, i32)])) -> u64 {
    pin(&[core]);
    let cpu0 = thread_cpu_ns();
    let argv = [cfg().binary.as_ptr().cast_mut(), c"3".as_ptr().cast_mut(), std::ptr::null_mut()];
    let envp: [*mut c_char; 1] = [std::ptr::null_mut()];
    // SAFETY: posix_spawnattr_t and sigset_t are plain data (safe to move), set up by
    // their init functions before use; the empty mask undoes the SIGCHLD block for
    // the workers.
    let attr = unsafe {
        let mut attr: libc::posix_spawnattr_t = std::mem::zeroed();
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        libc::posix_spawnattr_init(&mut attr);
        libc::posix_spawnattr_setsigmask(&mut attr, &empty);
        libc::posix_spawnattr_setflags(&mut attr, libc::POSIX_SPAWN_SETSIGMASK as libc::c_short);
        attr
    };
    loop {
        let mut orders = 0u64;
        // SAFETY: reads at most 8 bytes into `orders`.
        match unsafe { libc::read(to_spawner, (&mut orders as *mut u64).cast(), 8) } {
            8 if orders >= STOP => break,
            8 => {}
            _ if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted => continue,
            _ => exit_with(&format!("spawner read: {}", io::Error::last_os_error())),
        }
        if cfg().workers_anywhere {
            pin(&cfg().cores);
        }
        let what = format!("cannot start {:?}", cfg().binary);
        let fds: Vec<(RawFd, i32)> = (0..orders).map(|_| spawn_worker(&argv, &envp, &attr).or_exit(&what)).collect();
        if cfg().workers_anywhere {
            pin(&[core]);
        }
        deliver(&fds);
    }
    thread_cpu_ns() - cpu0
}

/// Starts one worker with the child end of a new socketpair as fd 3; returns the host end.
fn spawn_worker(argv: &[*mut c_char; 3], envp: &[*mut c_char; 1], attr: &libc::posix_spawnattr_t) -> io::Result<(RawFd, i32)> {
    let mut sv = [0; 2];
    let flags = libc::SOCK_STREAM | libc::SOCK_CLOEXEC;
    // SAFETY: socketpair writes two fds into `sv`.
    if unsafe { libc::socketpair(libc::AF_UNIX, flags, 0, sv.as_mut_ptr()) } < 0 {
        return Err(io::Error::last_os_error());
    }
    if cfg().namespaces {
        let pid = clone_worker(argv, envp, sv[1]);
        // SAFETY: closing the child end, which the (exec'd or failed) child no longer shares.
        unsafe { libc::close(sv[1]) };
        return match pid {
            Ok(pid) => Ok((sv[0], pid)),
            Err(e) => {
                // SAFETY: closing our own end of a pair we made.
                unsafe { libc::close(sv[0]) };
                Err(e)
            }
        };
    }
    let mut pid = 0;
    // SAFETY: the file actions are initialised before use and destroyed after; argv
    // and envp are null-terminated arrays of NUL-terminated strings that outlive the
    // call; `attr` is initialised. dup2 onto fd 3 clears close-on-exec there only.
    let rc = unsafe {
        let mut fa: libc::posix_spawn_file_actions_t = std::mem::zeroed();
        libc::posix_spawn_file_actions_init(&mut fa);
        let mut rc = libc::posix_spawn_file_actions_adddup2(&mut fa, sv[1], 3);
        if rc == 0 {
            rc = libc::posix_spawn(&mut pid, argv[0], &fa, attr, argv.as_ptr(), envp.as_ptr());
        }
        libc::posix_spawn_file_actions_destroy(&mut fa);
        libc::close(sv[1]);
        if rc != 0 {
            libc::close(sv[0]);
        }
        rc
    };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    Ok((sv[0], pid))
}

/// What the cloned child needs: it runs on the spawner's memory (CLONE_VM) until
/// its exec, so it only reads this.
struct CloneArgs {
    argv: *const *mut c_char,
    envp: *const *mut c_char,
    channel: RawFd,
}

extern "C" fn clone_child(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` is the CloneArgs the parent keeps alive while it is suspended
    // (CLONE_VFORK); only async-signal-safe calls follow, then exec or _exit.
    unsafe {
        let a = &*(arg as *const CloneArgs);
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
        if libc::dup2(a.channel, 3) == 3 {
            libc::execve(*a.argv, a.argv.cast(), a.envp.cast());
        }
        libc::_exit(127)
    }
}

/// Starts one worker as the engine's runner does (`src/udf_runner/spawn.rs`):
/// clone(CLONE_VM | CLONE_VFORK | CLONE_NEWUSER | CLONE_NEWPID | CLONE_NEWUTS), then
/// exec, without the runner's other steps (capabilities, seccomp, no_new_privs).
fn clone_worker(argv: &[*mut c_char; 3], envp: &[*mut c_char; 1], channel: RawFd) -> io::Result<i32> {
    const STACK: usize = 64 * 1024;
    let mut stack = vec![0u8; STACK];
    let args = CloneArgs { argv: argv.as_ptr(), envp: envp.as_ptr(), channel };
    let flags = libc::CLONE_VM | libc::CLONE_VFORK | libc::CLONE_NEWUSER | libc::CLONE_NEWPID | libc::CLONE_NEWUTS | libc::SIGCHLD;
    // SAFETY: the stack is ours and outlives the child's use of it (CLONE_VFORK
    // suspends this thread until the child execs or exits); the stack grows down
    // from its 16-byte-aligned top; `args` lives until clone returns.
    let pid = unsafe {
        let top = stack.as_mut_ptr().add(STACK) as usize & !15;
        libc::clone(clone_child, top as *mut libc::c_void, flags, &args as *const CloneArgs as *mut libc::c_void)
    };
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(pid)
}

/// `--runner-process`: forks this host thread's spawner as a process of its own
/// (the engine's runner is one) pinned to `core`. It keeps each worker's host end
/// until it reaps the worker (as the runner does) and writes the ends' numbers to a
/// pipe; the host takes them with pidfd_getfd. Returns the pipe's read end, the
/// spawner's pid and a pidfd of it.
fn fork_spawner(core: usize, to_spawner: RawFd) -> (RawFd, i32, RawFd) {
    let mut pipe = [0; 2];
    // SAFETY: pipe2 writes two fds into `pipe`.
    if unsafe { libc::pipe2(pipe.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        exit_with(&format!("pipe2: {}", io::Error::last_os_error()));
    }
    // SAFETY: the child only runs the spawner's loop (socketpair, posix_spawn or
    // clone, waitpid, close, read, write and allocation, which glibc makes safe
    // after fork) and then _exit, never returning into this process's threads.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        exit_with(&format!("fork: {}", io::Error::last_os_error()));
    }
    if pid == 0 {
        let mut held: std::collections::HashMap<i32, RawFd> = std::collections::HashMap::new();
        let write_end = pipe[1];
        spawn_loop(core, to_spawner, |fds| {
            let numbers: Vec<u32> = fds.iter().map(|&(fd, _)| fd as u32).collect();
            held.extend(fds.iter().map(|&(fd, pid)| (pid, fd)));
            let bytes = numbers.len() * 4;
            // SAFETY: writes the `bytes` bytes of `numbers` (at most PIPE_BUF: atomic).
            if unsafe { libc::write(write_end, numbers.as_ptr().cast(), bytes) } != bytes as isize {
                exit_with(&format!("pipe write: {}", io::Error::last_os_error()));
            }
            // Reaped workers: their host ends are closed here (the host has its own).
            loop {
                // SAFETY: waitpid with a null status pointer stores nothing.
                let r = unsafe { libc::waitpid(-1, std::ptr::null_mut(), libc::WNOHANG) };
                if r <= 0 {
                    break;
                }
                if let Some(fd) = held.remove(&r) {
                    // SAFETY: a host end this process made and no longer needs.
                    unsafe { libc::close(fd) };
                }
            }
        });
        for fd in held.into_values() {
            // SAFETY: as above.
            unsafe { libc::close(fd) };
        }
        if !reap(Duration::from_secs(2)) {
            kill_children();
            reap(Duration::from_secs(2));
        }
        // SAFETY: ends the forked child without running the parent's exit handlers.
        unsafe { libc::_exit(0) };
    }
    // SAFETY: closing the write end, which only the child uses; pidfd_open takes no pointers.
    let pidfd = unsafe {
        libc::close(pipe[1]);
        libc::syscall(libc::SYS_pidfd_open, pid, 0) as RawFd
    };
    if pidfd < 0 {
        exit_with(&format!("pidfd_open: {}", io::Error::last_os_error()));
    }
    (pipe[0], pid, pidfd)
}

/// Takes the spawner's fd `remote` into this process (as the engine takes the runner's).
fn take_fd(pidfd: RawFd, remote: u32) -> RawFd {
    // SAFETY: pidfd_getfd with a valid pidfd and no flags returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd, remote, 0) } as RawFd;
    if fd < 0 {
        exit_with(&format!("pidfd_getfd: {}", io::Error::last_os_error()));
    }
    fd
}

/// A process's CPU so far (its main thread's schedstat, ns).
fn process_cpu_ns(pid: i32) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/schedstat")).unwrap_or_default();
    text.split_whitespace().next().and_then(|v| v.parse().ok()).unwrap_or(0)
}

/// Reaps exited children, waiting up to `wait` for the others; false if some are left.
fn reap(wait: Duration) -> bool {
    let end = Instant::now() + wait;
    loop {
        // SAFETY: waitpid with a null status pointer stores nothing.
        match unsafe { libc::waitpid(-1, std::ptr::null_mut(), libc::WNOHANG) } {
            0 if Instant::now() >= end => return false,
            0 => std::thread::sleep(Duration::from_millis(1)),
            r if r < 0 && io::Error::last_os_error().kind() != io::ErrorKind::Interrupted => {
                return true; // ECHILD: none left
            }
            _ => {}
        }
    }
}

/// Kills the children still running (a UDF that does not exit), so none outlives us.
fn kill_children() -> usize {
    let me = std::process::id().to_string();
    let mut killed = 0;
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // After the command's closing parenthesis: state, then the parent's pid.
        let ppid = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(1));
        let pid = entry.file_name().to_string_lossy().parse::<i32>();
        if let (Some(ppid), Ok(pid)) = (ppid, pid) {
            if ppid == me {
                // SAFETY: kill takes no pointers; an unreaped child keeps its pid.
                unsafe { libc::kill(pid, libc::SIGKILL) };
                killed += 1;
            }
        }
    }
    killed
}

/// Blocks SIGCHLD in this thread and the threads it starts.
fn block_sigchld() {
    // SAFETY: sigset_t is plain data, filled by sigemptyset/sigaddset; the call
    // only changes this thread's mask.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGCHLD);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
}

fn eventfd() -> RawFd {
    // SAFETY: eventfd takes no pointers.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
    if fd < 0 {
        exit_with(&format!("eventfd: {}", io::Error::last_os_error()));
    }
    fd
}

fn notify(fd: RawFd, n: u64) {
    // SAFETY: writes the 8 bytes of `n`.
    if unsafe { libc::write(fd, (&n as *const u64).cast(), 8) } != 8 {
        exit_with(&format!("eventfd write: {}", io::Error::last_os_error()));
    }
}

fn thread_cpu_ns() -> u64 {
    let text = std::fs::read_to_string("/proc/thread-self/schedstat").or_exit("schedstat");
    let first = text.split_whitespace().next().and_then(|v| v.parse().ok());
    first.unwrap_or_else(|| exit_with("cannot parse /proc/thread-self/schedstat"))
}

fn voluntary_switches() -> u64 {
    let text = std::fs::read_to_string("/proc/thread-self/status").or_exit("status");
    let line = text.lines().find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"));
    let n = line.and_then(|v| v.trim().parse().ok());
    n.unwrap_or_else(|| exit_with("cannot parse /proc/thread-self/status"))
}

fn pin(cores: &[usize]) {
    // SAFETY: cpu_set_t is plain data; CPU_SET writes within it; sched_setaffinity
    // reads it for the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for &core in cores {
            libc::CPU_SET(core, &mut set);
        }
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

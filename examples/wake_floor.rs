//! The floor of one engine wake-up on this machine: the CPU a thread spends to sleep
//! until a byte arrives on a socket, wake, take the byte and answer with one byte.
//! That is the least an engine thread can spend per event it waits for, whatever
//! else it does; `roma-byob demo` prints the engine threads' CPU per execution to set
//! beside it (BENCHMARKS.md, ninth session).
//!
//! Two threads play ping-pong over two socketpairs. The measured thread waits for a
//! byte, then sends one back; the peer sends a byte and waits for the answer. The
//! measured thread's CPU comes from its own `/proc/thread-self/schedstat` (exact).
//! Ways to wait, one run each:
//!
//! 1. `read`: a blocking `read(2)`; the answer is a `write(2)`.
//! 2. `uring`: an io_uring with SINGLE_ISSUER | DEFER_TASKRUN (the engine's ring):
//!    one `Recv` submitted and waited for in one `io_uring_enter`, then one `Send`
//!    submitted with the next `Recv` (the answer rides on the next wait's enter).
//! 3. `spin`: the measured thread polls a non-blocking socket without sleeping (what
//!    busy-polling would cost: all of the thread's time).
//!
//! Each way runs twice: peer on the other core, and peer on the same core.
//!
//! `cargo run --release --example wake_floor [-- --rounds N]` (default 20000).

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::time::Instant;

fn main() {
    let mut rounds = 20_000usize;
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < args.len() {
        match args[i].as_str() {
            "--rounds" => {
                rounds = args.get(i + 1).and_then(|v| v.parse().ok()).unwrap_or_else(|| {
                    eprintln!("--rounds needs a positive number");
                    std::process::exit(2)
                });
                i += 2;
            }
            other => {
                eprintln!("unknown argument {other}; usage: wake_floor [--rounds N]");
                std::process::exit(2);
            }
        }
    }
    let cores = roma_byob::ring::current_thread_affinity();
    println!("wake_floor: {rounds} round trips per run, cores {cores:?}");
    println!("CPU of the measured thread per wake-up (wait + take 1 byte + answer 1 byte), wall time per round trip:");
    for way in [Way::Read, Way::Uring, Way::Spin] {
        for same_core in [false, true] {
            if !same_core && cores.len() < 2 {
                continue;
            }
            if same_core && way == Way::Spin {
                // A spinning thread and its peer on one core only take turns by
                // preemption: not a meaningful figure.
                continue;
            }
            let peer_core = if same_core { cores[0] } else { cores[1] };
            match run(way, rounds, cores[0], peer_core) {
                Ok((cpu_ns, wall_ns)) => println!(
                    "  {:<6} peer on {:<10} {:>7.2} µs CPU per wake-up   {:>7.2} µs per round trip",
                    way.name(),
                    if same_core { "same core" } else { "other core" },
                    cpu_ns as f64 / 1e3 / rounds as f64,
                    wall_ns as f64 / 1e3 / rounds as f64
                ),
                Err(e) => println!("  {:<6} failed: {e}", way.name()),
            }
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Way {
    Read,
    Uring,
    Spin,
}

impl Way {
    fn name(self) -> &'static str {
        match self {
            Way::Read => "read",
            Way::Uring => "uring",
            Way::Spin => "spin",
        }
    }
}

/// One run: returns the measured thread's CPU and the wall time, in ns.
fn run(way: Way, rounds: usize, core: usize, peer_core: usize) -> io::Result<(u64, u64)> {
    let (ping_a, ping_b) = roma_byob::ipc::fdpass::stream_pair()?;
    let (pong_a, pong_b) = roma_byob::ipc::fdpass::stream_pair()?;
    if way == Way::Spin {
        set_nonblocking(ping_b.as_raw_fd())?;
    }
    let measured = std::thread::spawn(move || -> io::Result<u64> {
        pin(core);
        let start = thread_cpu_ns()?;
        match way {
            Way::Read => wait_read(ping_b.as_raw_fd(), pong_a.as_raw_fd(), rounds)?,
            Way::Uring => wait_uring(ping_b.as_raw_fd(), pong_a.as_raw_fd(), rounds)?,
            Way::Spin => wait_spin(ping_b.as_raw_fd(), pong_a.as_raw_fd(), rounds)?,
        }
        Ok(thread_cpu_ns()? - start)
    });
    pin(peer_core);
    // Let the measured thread reach its first wait.
    std::thread::sleep(std::time::Duration::from_millis(20));
    let start = Instant::now();
    let mut byte = [0u8; 1];
    for _ in 0..rounds {
        write_all(ping_a.as_raw_fd(), b"p")?;
        read_exact(pong_b.as_raw_fd(), &mut byte)?;
    }
    let wall = start.elapsed().as_nanos() as u64;
    let cpu = measured.join().map_err(|_| io::Error::other("measured thread panicked"))??;
    Ok((cpu, wall))
}

fn wait_read(from: RawFd, to: RawFd, rounds: usize) -> io::Result<()> {
    let mut byte = [0u8; 1];
    for _ in 0..rounds {
        read_exact(from, &mut byte)?;
        write_all(to, b"q")?;
    }
    Ok(())
}

fn wait_spin(from: RawFd, to: RawFd, rounds: usize) -> io::Result<()> {
    let mut byte = [0u8; 1];
    let mut done = 0;
    while done < rounds {
        // SAFETY: `byte` is a valid 1-byte buffer for the duration of the call.
        let n = unsafe { libc::read(from, byte.as_mut_ptr().cast(), 1) };
        if n == 1 {
            write_all(to, b"q")?;
            done += 1;
        } else if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::WouldBlock {
                return Err(e);
            }
            std::hint::spin_loop();
        } else {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "peer closed"));
        }
    }
    Ok(())
}

fn wait_uring(from: RawFd, to: RawFd, rounds: usize) -> io::Result<()> {
    use io_uring::{opcode, types};
    let mut builder = io_uring::IoUring::builder();
    builder.setup_single_issuer().setup_defer_taskrun().setup_taskrun_flag();
    let mut ring = builder.build(64)?;
    let mut rx = [0u8; 1];
    let tx = [b'q'; 1];
    const RECV: u64 = 1;
    const SEND: u64 = 2;
    let recv = opcode::Recv::new(types::Fd(from), rx.as_mut_ptr(), 1).build().user_data(RECV);
    // SAFETY: `rx` outlives every submitted Recv (the loop ends only after its last
    // completion, and the ring is dropped before `rx`).
    unsafe { ring.submission().push(&recv) }.map_err(|_| io::Error::other("submission queue full"))?;
    let mut received = 0;
    while received < rounds {
        ring.submit_and_wait(1)?;
        let completions: Vec<(u64, i32)> = ring.completion().map(|c: io_uring::cqueue::Entry| (c.user_data(), c.result())).collect();
        for (data, result) in completions {
            if result < 0 {
                return Err(io::Error::from_raw_os_error(-result));
            }
            if data == RECV {
                received += 1;
                let send = opcode::Send::new(types::Fd(to), tx.as_ptr(), 1).build().user_data(SEND);
                // SAFETY: `tx` and `rx` outlive the ring's operations (see above).
                unsafe {
                    ring.submission()
                        .push(&send)
                        .map_err(|_| io::Error::other("submission queue full"))?;
                    if received < rounds {
                        ring.submission()
                            .push(&recv)
                            .map_err(|_| io::Error::other("submission queue full"))?;
                    }
                }
            }
        }
    }
    // The last answer is still to be submitted.
    ring.submit_and_wait(1)?;
    Ok(())
}

fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl on an fd this function's caller owns; no memory is passed.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    // SAFETY: as above.
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn read_exact(fd: RawFd, buf: &mut [u8]) -> io::Result<()> {
    // SAFETY: `buf` is valid for `buf.len()` bytes for the duration of the call.
    let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
    match n {
        n if n == buf.len() as isize => Ok(()),
        n if n < 0 => Err(io::Error::last_os_error()),
        _ => Err(io::Error::new(io::ErrorKind::UnexpectedEof, "short read")),
    }
}

fn write_all(fd: RawFd, buf: &[u8]) -> io::Result<()> {
    // SAFETY: `buf` is valid for `buf.len()` bytes for the duration of the call.
    let n = unsafe { libc::write(fd, buf.as_ptr().cast(), buf.len()) };
    match n {
        n if n == buf.len() as isize => Ok(()),
        n if n < 0 => Err(io::Error::last_os_error()),
        _ => Err(io::Error::other("short write")),
    }
}

fn thread_cpu_ns() -> io::Result<u64> {
    let text = std::fs::read_to_string("/proc/thread-self/schedstat")?;
    text.split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| io::Error::other("cannot parse /proc/thread-self/schedstat"))
}

fn pin(core: usize) {
    // SAFETY: cpu_set_t is plain data; CPU_SET writes within it; sched_setaffinity
    // reads it for the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(core, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}


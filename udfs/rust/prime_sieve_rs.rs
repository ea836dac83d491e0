//! prime_sieve_rs: the Rust twin of udfs/c/prime_sieve.c.
//! SampleRequest{prime_bound} -> SampleResponse{prime_number: every prime below
//! prime_bound}, packed. prime_bound 0 (absent) means 100000; a negative bound
//! yields no primes. Only std; protobuf decoded/encoded by hand.
//!
//! Wire protocol (Roma BYOB): argv[1] is the socket fd; write one ready byte, read
//! one varint-length-delimited request, write one varint-length-delimited response,
//! exit 0.
//!
//! `#![no_main]`: the C-ABI `main` below is called directly by the C runtime,
//! skipping std's start-up code. That code checks that fds 0-2 are open with poll(2)
//! and, when one is closed, tries to open /dev/null, aborting if it cannot - which
//! is the case in the sandbox (no /dev). It also installs SIGPIPE/stack-overflow
//! handlers. Without it the UDF needs fewer syscalls and works whatever the host
//! does with fds 0-2. std (including std::env::args) works normally.

#![no_main]

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::FromRawFd;
use std::process::exit;

const DEFAULT_PRIME_BOUND: i32 = 100_000;

fn die(msg: &str) -> ! {
    let _ = writeln!(io::stderr(), "prime_sieve_rs: {msg}");
    exit(1)
}

/// Takes ownership of the socket whose fd number is argv[1].
fn channel() -> File {
    let fd: i32 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .filter(|fd| *fd >= 0)
        .unwrap_or_else(|| die("usage: prime_sieve_rs <socket fd>"));
    // SAFETY: the host hands this fd over to us; nothing else in the process uses it.
    unsafe { File::from_raw_fd(fd) }
}

fn invalid(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.to_string())
}

/// Reads one varint (at most 10 bytes) from the stream, one byte at a time.
fn read_varint_stream(r: &mut impl Read) -> io::Result<u64> {
    let mut value = 0u64;
    for i in 0..10 {
        let mut b = [0u8; 1];
        r.read_exact(&mut b)?;
        value |= u64::from(b[0] & 0x7f) << (7 * i);
        if b[0] & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err(invalid("varint longer than 10 bytes"))
}

fn read_request(r: &mut impl Read) -> io::Result<Vec<u8>> {
    let len = usize::try_from(read_varint_stream(r)?).map_err(|_| invalid("request too large"))?;
    let mut buf = Vec::new();
    buf.try_reserve_exact(len)
        .map_err(|_| io::Error::new(io::ErrorKind::OutOfMemory, "request too large"))?;
    buf.resize(len, 0);
    r.read_exact(&mut buf)?;
    Ok(buf)
}

/// Decodes one varint from `buf` at `*pos`.
fn read_varint(buf: &[u8], pos: &mut usize) -> io::Result<u64> {
    let mut value = 0u64;
    for i in 0..10 {
        let b = *buf.get(*pos).ok_or_else(|| invalid("truncated varint"))?;
        *pos += 1;
        value |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err(invalid("varint longer than 10 bytes"))
}

fn skip(buf: &[u8], pos: &mut usize, n: u64) -> io::Result<()> {
    let rest = (buf.len() - *pos) as u64;
    if n > rest {
        return Err(invalid("truncated field"));
    }
    *pos += n as usize;
    Ok(())
}

/// Skips the value of a field with wire type `wire_type` (and number `number`, for
/// groups), `*pos` being just after its tag.
fn skip_value(
    buf: &[u8],
    pos: &mut usize,
    number: u64,
    wire_type: u64,
    depth: u32,
) -> io::Result<()> {
    match wire_type {
        0 => read_varint(buf, pos).map(drop),
        1 => skip(buf, pos, 8),
        2 => {
            let len = read_varint(buf, pos)?;
            skip(buf, pos, len)
        }
        3 => {
            if depth >= 100 {
                return Err(invalid("groups nested too deeply"));
            }
            loop {
                let tag = read_varint(buf, pos)?;
                let (num, wt) = (tag >> 3, tag & 7);
                if wt == 4 {
                    return if num == number {
                        Ok(())
                    } else {
                        Err(invalid("mismatched end group"))
                    };
                }
                skip_value(buf, pos, num, wt, depth + 1)?;
            }
        }
        5 => skip(buf, pos, 4),
        _ => Err(invalid("invalid wire type")),
    }
}

/// SampleRequest: int32 prime_bound = 1 (the last occurrence wins).
fn parse_prime_bound(buf: &[u8]) -> io::Result<i32> {
    let mut bound = 0i32;
    let mut pos = 0;
    while pos < buf.len() {
        let tag = read_varint(buf, &mut pos)?;
        let (number, wire_type) = (tag >> 3, tag & 7);
        if number == 0 {
            return Err(invalid("field number 0"));
        }
        if number == 1 && wire_type == 0 {
            bound = read_varint(buf, &mut pos)? as i32;
        } else {
            skip_value(buf, &mut pos, number, wire_type, 0)?;
        }
    }
    Ok(bound)
}

fn primes_below(bound: i32) -> Vec<i32> {
    let n = usize::try_from(bound).unwrap_or(0);
    let mut composite = vec![false; n];
    // At most n/2 + 1 primes lie below n: one allocation, never regrown.
    let mut primes = Vec::with_capacity(n / 2 + 1);
    for i in 2..n {
        if composite[i] {
            continue;
        }
        primes.push(i as i32);
        if let Some(start) = i.checked_mul(i) {
            for j in (start..n).step_by(i) {
                composite[j] = true;
            }
        }
    }
    primes
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn write_response(w: &mut impl Write, msg: &[u8]) -> io::Result<()> {
    let mut frame = Vec::with_capacity(msg.len() + 10);
    put_varint(&mut frame, msg.len() as u64);
    frame.extend_from_slice(msg);
    w.write_all(&frame)
}

#[unsafe(no_mangle)]
pub extern "C" fn main(_argc: i32, _argv: *const *const u8) -> i32 {
    let mut fd = channel();
    fd.write_all(b"R")
        .unwrap_or_else(|e| die(&format!("cannot send the ready byte: {e}")));
    let request =
        read_request(&mut fd).unwrap_or_else(|e| die(&format!("cannot read the request: {e}")));
    let mut bound = parse_prime_bound(&request)
        .unwrap_or_else(|e| die(&format!("malformed SampleRequest: {e}")));
    drop(request);
    if bound == 0 {
        bound = DEFAULT_PRIME_BOUND;
    }
    let primes = primes_below(bound);

    // SampleResponse.prime_number = 2, packed (absent when empty).
    let mut packed = Vec::with_capacity(primes.len() * 5);
    for p in &primes {
        put_varint(&mut packed, *p as i64 as u64);
    }
    let mut response = Vec::with_capacity(packed.len() + 16);
    if !packed.is_empty() {
        put_varint(&mut response, (2 << 3) | 2);
        put_varint(&mut response, packed.len() as u64);
        response.extend_from_slice(&packed);
    }
    write_response(&mut fd, &response)
        .unwrap_or_else(|e| die(&format!("cannot write the response: {e}")));
    0
}

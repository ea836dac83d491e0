//! hello_world_rs: the Rust twin of udfs/c/hello_world.c. Answers any request with
//! SampleResponse{greeting: "Hello, world!"}. Only std; protobuf encoded by hand.
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

fn die(msg: &str) -> ! {
    let _ = writeln!(io::stderr(), "hello_world_rs: {msg}");
    exit(1)
}

/// Takes ownership of the socket whose fd number is argv[1].
fn channel() -> File {
    let fd: i32 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .filter(|fd| *fd >= 0)
        .unwrap_or_else(|| die("usage: hello_world_rs <socket fd>"));
    // SAFETY: the host hands this fd over to us; nothing else in the process uses it.
    unsafe { File::from_raw_fd(fd) }
}

/// Reads one varint (at most 10 bytes) one byte at a time.
fn read_varint(r: &mut impl Read) -> io::Result<u64> {
    let mut value = 0u64;
    for i in 0..10 {
        let mut b = [0u8; 1];
        r.read_exact(&mut b)?;
        value |= u64::from(b[0] & 0x7f) << (7 * i);
        if b[0] & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err(io::Error::new(
        io::ErrorKind::InvalidData,
        "varint longer than 10 bytes",
    ))
}

fn read_request(r: &mut impl Read) -> io::Result<Vec<u8>> {
    let len = usize::try_from(read_varint(r)?)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "request too large"))?;
    let mut buf = Vec::new();
    buf.try_reserve_exact(len)
        .map_err(|_| io::Error::new(io::ErrorKind::OutOfMemory, "request too large"))?;
    buf.resize(len, 0);
    r.read_exact(&mut buf)?;
    Ok(buf)
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
    // SampleRequest: nothing in it is needed.
    let _request =
        read_request(&mut fd).unwrap_or_else(|e| die(&format!("cannot read the request: {e}")));

    let greeting = b"Hello, world!";
    let mut response = Vec::new();
    put_varint(&mut response, (1 << 3) | 2); // SampleResponse.greeting, length-delimited
    put_varint(&mut response, greeting.len() as u64);
    response.extend_from_slice(greeting);
    write_response(&mut fd, &response)
        .unwrap_or_else(|e| die(&format!("cannot write the response: {e}")));
    0
}

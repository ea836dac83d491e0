//! The socket shared with the host: buffered frame reads, whole-buffer writes.
//!
//! Reading ahead is safe: after the request, the host only sends what the UDF asked
//! for (host replies), so bytes read past one frame always belong to the next one.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::OwnedFd;

use crate::wire;

const CHUNK: usize = 16 * 1024;

pub(crate) struct Channel {
    file: File,
    buf: Box<[u8]>,
    pos: usize,
    end: usize,
}

impl Channel {
    pub(crate) fn new(fd: OwnedFd) -> Channel {
        Channel { file: File::from(fd), buf: vec![0u8; CHUNK].into_boxed_slice(), pos: 0, end: 0 }
    }

    /// Writes all of `bytes` (loops over short writes and EINTR).
    pub(crate) fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.file.write_all(bytes)
    }

    /// Reads more bytes into the (empty) buffer.
    fn fill(&mut self) -> io::Result<()> {
        debug_assert_eq!(self.pos, self.end);
        self.pos = 0;
        self.end = 0;
        loop {
            match self.file.read(&mut self.buf) {
                Ok(0) => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the host closed the connection")),
                Ok(n) => {
                    self.end = n;
                    return Ok(());
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }

    pub(crate) fn read_byte(&mut self) -> io::Result<u8> {
        if self.pos == self.end {
            self.fill()?;
        }
        let b = self.buf[self.pos];
        self.pos += 1;
        Ok(b)
    }

    pub(crate) fn read_varint(&mut self) -> io::Result<u64> {
        let mut value = 0;
        let mut i = 0;
        loop {
            let b = self.read_byte()?;
            match wire::varint_step(&mut value, i, b) {
                Ok(Some(v)) => return Ok(v),
                Ok(None) => i += 1,
                Err(why) => return Err(io::Error::new(io::ErrorKind::InvalidData, why)),
            }
        }
    }

    /// Fills `out` from the buffer, then straight from the socket.
    pub(crate) fn read_exact(&mut self, out: &mut [u8]) -> io::Result<()> {
        let buffered = (self.end - self.pos).min(out.len());
        out[..buffered].copy_from_slice(&self.buf[self.pos..self.pos + buffered]);
        self.pos += buffered;
        let rest = &mut out[buffered..];
        if rest.is_empty() {
            return Ok(());
        }
        self.file.read_exact(rest).map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                io::Error::new(io::ErrorKind::UnexpectedEof, "the host closed the connection inside a frame")
            } else {
                e
            }
        })
    }

    /// Reads one frame (`varint(len)` + `len` bytes) into a buffer of exactly that size.
    pub(crate) fn read_frame(&mut self) -> io::Result<Vec<u8>> {
        let len = self.read_varint()?;
        let len = usize::try_from(len)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, format!("frame of {len} bytes")))?;
        let mut body = Vec::new();
        body.try_reserve_exact(len).map_err(|_| {
            io::Error::new(io::ErrorKind::OutOfMemory, format!("cannot allocate a frame of {len} bytes"))
        })?;
        body.resize(len, 0);
        self.read_exact(&mut body)?;
        Ok(body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    fn pair() -> (Channel, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        (Channel::new(OwnedFd::from(a)), b)
    }

    #[test]
    fn frames_split_across_many_writes() {
        let (mut ch, mut host) = pair();
        let body: Vec<u8> = (0..200_000u32).map(|i| i as u8).collect();
        let mut bytes = wire::frame(&body);
        bytes.extend_from_slice(&wire::frame(b"second".as_slice()));
        let writer = std::thread::spawn(move || {
            // Byte by byte for the header, then in odd-sized pieces.
            for b in &bytes[..4] {
                host.write_all(&[*b]).unwrap();
            }
            for piece in bytes[4..].chunks(7_777) {
                host.write_all(piece).unwrap();
            }
            host
        });
        assert_eq!(ch.read_frame().unwrap(), body);
        assert_eq!(ch.read_frame().unwrap(), b"second");
        drop(writer.join().unwrap());
        let eof = ch.read_frame().unwrap_err();
        assert_eq!(eof.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn empty_frames_and_truncated_frames() {
        let (mut ch, mut host) = pair();
        host.write_all(&[0, 5, b'a', b'b']).unwrap();
        drop(host);
        assert_eq!(ch.read_frame().unwrap(), Vec::<u8>::new());
        assert_eq!(ch.read_frame().unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn invalid_varints_are_errors() {
        let (mut ch, mut host) = pair();
        host.write_all(&[0xff; 11]).unwrap();
        assert_eq!(ch.read_frame().unwrap_err().kind(), io::ErrorKind::InvalidData);
    }

    #[test]
    fn absurd_lengths_fail_to_allocate_instead_of_aborting() {
        let (mut ch, mut host) = pair();
        let mut header = Vec::new();
        wire::put_varint(&mut header, (isize::MAX as u64) + 1);
        host.write_all(&header).unwrap();
        assert_eq!(ch.read_frame().unwrap_err().kind(), io::ErrorKind::OutOfMemory);
    }
}

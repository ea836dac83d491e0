//! Shared-memory transport (opt-in per load): each worker gets a fresh memfd region.
//! Layout (little-endian):
//!
//! | offset | size | who writes | meaning |
//! |---|---|---|---|
//! | 0 | 8 | host | request length `n` |
//! | 8 | 8 | UDF | response length (`u64::MAX` until written) |
//! | 16 | 4 | host | magic `0x4d534252` ("RBSM") |
//! | 20 | 4 | host | layout version (1) |
//! | 64 | n | host | request bytes (a serialized protobuf, no length prefix) |
//! | [`response_offset`]`(n)` | m | UDF | response bytes |
//!
//! The host writes the request and sends one doorbell byte on the socket; the UDF
//! writes the response, its length, then one doorbell byte back. A region is never
//! reused: a fresh memfd per worker, so no byte of one request is visible to the
//! next worker.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;

pub const HEADER: usize = 64;
pub const MAGIC: u32 = 0x4d53_4252;
pub const VERSION: u32 = 1;
pub const NO_RESPONSE: u64 = u64::MAX;
/// Requests at least this large are placed with `pwrite` rather than `memcpy`.
const PWRITE_THRESHOLD: usize = 256 * 1024;

/// Where the UDF writes its response for a request of `request_len` bytes.
pub fn response_offset(request_len: usize) -> usize {
    HEADER + request_len.div_ceil(64) * 64
}

/// Largest request that fits a region of `size` bytes (leaving room for a response).
pub fn fits(size: usize, request_len: usize) -> bool {
    response_offset(request_len) <= size
}

/// A host-side mapping of one worker's region.
pub struct Region {
    fd: OwnedFd,
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is owned by this value and only accessed through &mut self
// (or &self reads) on the shard thread that owns the worker.
unsafe impl Send for Region {}

impl Region {
    /// Creates a fresh zeroed region of `len` bytes (tmpfs pages are allocated on
    /// first touch).
    pub fn create(len: usize) -> io::Result<Region> {
        // SAFETY: static NUL-terminated name; returns a fresh fd.
        let raw = unsafe { libc::memfd_create(c"roma-byob-shm".as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fresh fd owned by us.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: resizing our own memfd.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // The UDF gets this fd: it must not be able to shrink the region under the
        // host's mapping (the host would fault with SIGBUS) or grow it.
        let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
        // SAFETY: fcntl on our own fd.
        if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, seals) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: mapping `len` bytes of our memfd; checked for MAP_FAILED below.
        let ptr = unsafe {
            libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, fd.as_raw_fd(), 0)
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(ptr.cast::<u8>()).ok_or_else(|| io::Error::other("mmap returned null"))?;
        let region = Region { fd, ptr, len };
        region.write_u32(16, MAGIC);
        region.write_u32(20, VERSION);
        region.write_u64(8, NO_RESPONSE);
        Ok(region)
    }

    pub fn fd(&self) -> &OwnedFd {
        &self.fd
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn write_u64(&self, off: usize, v: u64) {
        debug_assert!(off + 8 <= self.len);
        // SAFETY: within the mapping (off + 8 <= len, header offsets are constants),
        // 8-byte aligned; volatile because another process reads it.
        unsafe { std::ptr::write_volatile(self.ptr.as_ptr().add(off).cast::<u64>(), v.to_le()) }
    }

    fn write_u32(&self, off: usize, v: u32) {
        // SAFETY: as write_u64, 4-byte aligned.
        unsafe { std::ptr::write_volatile(self.ptr.as_ptr().add(off).cast::<u32>(), v.to_le()) }
    }

    fn read_u64(&self, off: usize) -> u64 {
        // SAFETY: as write_u64.
        u64::from_le(unsafe { std::ptr::read_volatile(self.ptr.as_ptr().add(off).cast::<u64>()) })
    }

    /// Places a request; the caller then rings the doorbell.
    pub fn put_request(&mut self, body: &[u8]) -> Result<(), String> {
        if !fits(self.len, body.len()) {
            return Err(format!(
                "request of {} bytes does not fit the shared-memory region of {} bytes",
                body.len(),
                self.len
            ));
        }
        if body.len() >= PWRITE_THRESHOLD {
            // Large: let the kernel allocate the tmpfs pages while it copies (one
            // pwrite) instead of taking a page fault per 4 KiB through the mapping.
            use std::os::unix::fs::FileExt;
            let file = std::mem::ManuallyDrop::new(
                // SAFETY: borrows our fd for the call; ManuallyDrop keeps it open.
                unsafe { std::fs::File::from_raw_fd(self.fd.as_raw_fd()) },
            );
            file.write_all_at(body, HEADER as u64).map_err(|e| format!("writing the request into shared memory: {e}"))?;
        } else {
            // SAFETY: HEADER + body.len() <= len (checked by `fits`); the UDF only
            // reads this range until it rings the doorbell.
            unsafe { std::ptr::copy_nonoverlapping(body.as_ptr(), self.ptr.as_ptr().add(HEADER), body.len()) };
        }
        self.write_u64(8, NO_RESPONSE);
        self.write_u64(0, body.len() as u64);
        std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
        Ok(())
    }

    /// Copies out the response after the UDF rang the doorbell.
    pub fn take_response(&self, request_len: usize, max: usize) -> Result<Vec<u8>, String> {
        std::sync::atomic::fence(std::sync::atomic::Ordering::Acquire);
        let len = self.read_u64(8);
        if len == NO_RESPONSE {
            return Err("the UDF rang the doorbell without writing a response length".into());
        }
        let off = response_offset(request_len);
        let room = self.len.saturating_sub(off) as u64;
        if len > room || len > max as u64 {
            return Err(format!("response length {len} exceeds the region ({room} bytes free) or max_response_bytes {max}"));
        }
        let len = len as usize;
        if len >= PWRITE_THRESHOLD {
            use std::os::unix::fs::FileExt;
            let file = std::mem::ManuallyDrop::new(
                // SAFETY: borrows our fd for the call; ManuallyDrop keeps it open.
                unsafe { std::fs::File::from_raw_fd(self.fd.as_raw_fd()) },
            );
            // Zeroed by calloc's fresh mapping (no extra pass over the memory).
            let mut out = vec![0u8; len];
            file.read_exact_at(&mut out, off as u64).map_err(|e| format!("reading the response from shared memory: {e}"))?;
            return Ok(out);
        }
        let mut out = vec![0u8; len];
        // SAFETY: off + len <= self.len (checked above); the UDF is done writing.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.as_ptr().add(off), out.as_mut_ptr(), len) };
        Ok(out)
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the mapping created in `create`.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_and_response_round_trip_through_the_region() {
        let mut r = Region::create(1 << 16).unwrap();
        r.put_request(b"hello").unwrap();
        assert!(r.take_response(5, 1 << 20).is_err(), "no response written yet");
        // Play the UDF: write the response at its offset and its length.
        let off = response_offset(5);
        // SAFETY: off + 5 is inside the 64 KiB mapping.
        unsafe { std::ptr::copy_nonoverlapping(b"world".as_ptr(), r.ptr.as_ptr().add(off), 5) };
        r.write_u64(8, 5);
        assert_eq!(r.take_response(5, 1 << 20).unwrap(), b"world");
        r.write_u64(8, 1 << 40);
        assert!(r.take_response(5, 1 << 20).is_err(), "oversized length rejected");
        assert!(r.put_request(&vec![0u8; 1 << 16]).is_err(), "request too large");
    }
}

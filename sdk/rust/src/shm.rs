//! The UDF side of the shared-memory transport (src/ipc/shm.rs on the host side).
//! The region is a memfd passed as argv[2], laid out (little-endian) as:
//!
//! | offset | size | who writes | meaning |
//! |---|---|---|---|
//! | 0 | 8 | host | request length `n` |
//! | 8 | 8 | UDF | response length (`u64::MAX` until written) |
//! | 16 | 4 | host | magic `0x4d534252` ("RBSM") |
//! | 20 | 4 | host | layout version (1) |
//! | 24 | 8 | host | `prepared`: bytes from offset 0 the host already allocated (0 = none) |
//! | 64 | n | host | request bytes (no length prefix) |
//! | 64 + round_up(n, 64) | m | UDF | response bytes |

use std::os::fd::{AsRawFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{fence, Ordering};

use crate::wire::Body;

pub(crate) const HEADER: usize = 64;
pub(crate) const MAGIC: u32 = 0x4d53_4252;
pub(crate) const VERSION: u32 = 1;
const PREPARED_AT: usize = 24;
/// Smaller prepared areas are left to page faults.
const PREFAULT_MIN: usize = 64 * 1024;

/// Where the response goes for a request of `request_len` bytes.
pub(crate) fn response_offset(request_len: usize) -> usize {
    HEADER.saturating_add(request_len.div_ceil(64).saturating_mul(64))
}

/// The mapped region. Unmapped on drop.
pub(crate) struct Region {
    ptr: NonNull<u8>,
    len: usize,
    _fd: OwnedFd,
}

impl Region {
    pub(crate) fn map(fd: OwnedFd) -> Result<Region, String> {
        // SAFETY: an all-zero `stat` is a valid value (plain integers) for fstat to fill.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: `fd` is an open descriptor we own; `st` is a valid out-pointer.
        if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
            return Err(format!("cannot stat the shared-memory fd: {}", std::io::Error::last_os_error()));
        }
        let len = usize::try_from(st.st_size).unwrap_or(0);
        if len < HEADER {
            return Err(format!("the shared-memory region has {len} bytes, less than its {HEADER}-byte header"));
        }
        // SAFETY: maps `len` bytes (the file's size) of our fd; the result is checked
        // for MAP_FAILED before use.
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
        if ptr == libc::MAP_FAILED {
            return Err(format!("cannot map the shared-memory region: {}", std::io::Error::last_os_error()));
        }
        let ptr = NonNull::new(ptr.cast::<u8>()).ok_or("mmap returned a null mapping")?;
        let region = Region { ptr, len, _fd: fd };
        let (magic, version) = (region.read_u32(16), region.read_u32(20));
        if magic != MAGIC {
            return Err(format!("the shared-memory region has magic {magic:#x}, expected {MAGIC:#x}"));
        }
        if version != VERSION {
            return Err(format!("shared-memory layout version {version} is not supported (this SDK speaks {VERSION})"));
        }
        region.prefault();
        Ok(region)
    }

    /// Maps the part of the region the host prepared (sized by what this code
    /// token's executions used lately) with one call, before the ready byte: reading
    /// the request and writing the response then take no page faults. Best effort
    /// (`MADV_POPULATE_WRITE` is Linux 5.14+).
    fn prefault(&self) {
        let prepared = usize::try_from(self.read_u64(PREPARED_AT)).unwrap_or(usize::MAX).min(self.len) & !4095;
        if prepared >= PREFAULT_MIN {
            // SAFETY: [ptr, ptr + prepared) lies inside our mapping (prepared <= len);
            // MADV_POPULATE_WRITE only faults pages in, it changes no contents.
            unsafe { libc::madvise(self.ptr.as_ptr().cast(), prepared, libc::MADV_POPULATE_WRITE) };
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    fn read_u32(&self, off: usize) -> u32 {
        debug_assert!(off + 4 <= HEADER && off % 4 == 0);
        // SAFETY: off + 4 <= HEADER <= len and the mapping is page-aligned, so the
        // read is in bounds and aligned; volatile because another process writes it.
        u32::from_le(unsafe { std::ptr::read_volatile(self.ptr.as_ptr().add(off).cast::<u32>()) })
    }

    fn read_u64(&self, off: usize) -> u64 {
        debug_assert!(off + 8 <= HEADER && off % 8 == 0);
        // SAFETY: as read_u32, 8-byte aligned.
        u64::from_le(unsafe { std::ptr::read_volatile(self.ptr.as_ptr().add(off).cast::<u64>()) })
    }

    /// The request, once the host rang the doorbell.
    pub(crate) fn request(&self) -> Result<&[u8], String> {
        fence(Ordering::Acquire);
        let n = self.read_u64(0);
        let room = (self.len - HEADER) as u64;
        if n > room {
            return Err(format!("the shared-memory request length {n} exceeds the region ({room} bytes)"));
        }
        // SAFETY: HEADER + n <= len (checked above). The host wrote these bytes before
        // ringing the doorbell and does not touch them until the UDF answers, so
        // nothing mutates them while this borrow of `self` lives.
        Ok(unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().add(HEADER), n as usize) })
    }

    /// Bytes free for a response to a request of `request_len` bytes.
    pub(crate) fn response_room(&self, request_len: usize) -> usize {
        self.len.saturating_sub(response_offset(request_len))
    }

    /// Encodes the response into the region and publishes its length; the caller
    /// then rings the doorbell.
    pub(crate) fn write_response(&mut self, request_len: usize, body: &(impl Body + ?Sized)) -> Result<(), String> {
        let off = response_offset(request_len);
        let m = body.body_len();
        let room = self.response_room(request_len);
        if m > room {
            return Err(format!(
                "the response of {m} bytes does not fit the shared-memory region ({room} bytes free after a {request_len}-byte request); load the code token with a larger LoadOptions::shared_memory"
            ));
        }
        // SAFETY: off + m <= len (checked above). `&mut self` guarantees no borrow of
        // the request (which lies entirely below `off`) is alive, and the host reads
        // this area only after the doorbell.
        let area = unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr().add(off), m) };
        body.encode_into(area);
        fence(Ordering::Release);
        // SAFETY: offset 8 is in the header (in bounds, 8-byte aligned); volatile
        // because the host reads it.
        unsafe { std::ptr::write_volatile(self.ptr.as_ptr().add(8).cast::<u64>(), (m as u64).to_le()) };
        Ok(())
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping created in `map`; no borrow of it
        // outlives `self`.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

//! Shared-memory transport (opt-in per load): each worker gets its own memfd region.
//! Layout (little-endian):
//!
//! | offset | size | who writes | meaning |
//! |---|---|---|---|
//! | 0 | 8 | host | request length `n` |
//! | 8 | 8 | UDF | response length (`u64::MAX` until written) |
//! | 16 | 4 | host | magic `0x4d534252` ("RBSM") |
//! | 20 | 4 | host | layout version (1) |
//! | 24 | 8 | host | `prepared`: bytes from offset 0 that are already allocated (a hint: a UDF may pre-fault them before its ready byte; 0 = none) |
//! | 64 | n | host | request bytes (a serialized protobuf, no length prefix) |
//! | [`response_offset`]`(n)` | m | UDF | response bytes |
//!
//! The host writes the request and sends one doorbell byte on the socket; the UDF
//! writes the response, its length, then one doorbell byte back.
//!
//! **Nothing passes between workers.** A region is used by one worker only. When that
//! worker has been reaped (and with it its PID namespace: nothing that could map the
//! region is left), the region goes back to a [`ShmPool`], whose cleaner thread
//! **wipes** it — every allocated page below the pool's size hint is zeroed, every
//! page above it is released (`FALLOC_FL_PUNCH_HOLE`) — before another worker may get
//! it. Reusing wiped memory instead of fresh pages is what makes large payloads fast:
//! a fresh tmpfs page costs an allocation, a clear and a fault (in a VM, often a trip
//! to the hypervisor too), a wiped one costs a `memset` done off the request path,
//! and both the host's and (with `prepared`) the UDF's page tables are set up before
//! the request arrives. A worker that was not reaped (the sandbox died, the engine
//! shut down) gives its region back to the kernel instead.
//!
//! Reuse relies on the reaped worker having kept no way into its region. At the
//! `untrusted` filter level a worker cannot create a socket, so it cannot hand the
//! memfd to another process; at the weaker levels two workers can reach each other
//! (abstract Unix sockets in `minimal` mode) and one could keep another's region
//! open past its exit, so there a pool never reuses a region.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::mem::{ManuallyDrop, MaybeUninit};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{fence, AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use prost::bytes::buf::UninitSlice;
use prost::bytes::{Buf, BufMut, Bytes};

pub const HEADER: usize = 64;
pub const MAGIC: u32 = 0x4d53_4252;
pub const VERSION: u32 = 1;
pub const NO_RESPONSE: u64 = u64::MAX;
/// Offset of the `prepared` header field.
pub const PREPARED_AT: usize = 24;
/// Copies at least this large into or out of memory the host has not mapped yet go
/// through `pwrite`/`pread`: the kernel then allocates tmpfs pages without clearing
/// them first and without a page fault per 4 KiB.
const SYSCALL_COPY_THRESHOLD: usize = 256 * 1024;
const PAGE: usize = 4096;
/// Wiped regions kept ready per region size (beyond the ones workers hold), at
/// first.
const MAX_SPARES: usize = 4;
/// The most wiped regions kept per size: each time a worker of that size gets a
/// fresh region because the ones given back are still being wiped, one more
/// spare is kept, up to this. A fresh region makes its first large request
/// several times slower (its pages are allocated then), and with 4 spares
/// back-to-back 50 MiB requests kept outrunning the cleaner, which freed regions
/// once it had caught up: 9 fresh regions after the first 10 in 100 requests.
const MAX_SPARES_GROWN: usize = 12;
/// Writes at least this large go straight from the message into the region; smaller
/// ones (tags, lengths, short fields) are gathered first.
const DIRECT_WRITE: usize = 512;

/// Where the UDF writes its response for a request of `request_len` bytes.
pub fn response_offset(request_len: usize) -> usize {
    HEADER + request_len.div_ceil(64) * 64
}

/// Largest request that fits a region of `size` bytes (leaving room for a response).
pub fn fits(size: usize, request_len: usize) -> bool {
    response_offset(request_len) <= size
}

fn too_large(request_len: usize, size: usize) -> String {
    format!("request of {request_len} bytes does not fit the shared-memory region of {size} bytes")
}

/// A host-side mapping of one region.
pub struct Region {
    fd: OwnedFd,
    ptr: NonNull<u8>,
    len: usize,
    /// `[0, prepared)` is allocated and mapped by the host (set by [`Region::wipe`]).
    prepared: usize,
}

// SAFETY: the mapping is owned by this value. It is only touched through raw pointers
// (never through references), by the thread that holds the region at that step of
// the protocol: a caller writes a request only while it holds the worker's claim,
// the shard thread reads the response only after the UDF's doorbell, the cleaner
// wipes it only once no worker and no other owner is left (`&mut self`).
unsafe impl Send for Region {}
// SAFETY: as above; every `&self` method touches the mapping only through raw
// pointers or syscalls, and the protocol orders the host's own accesses.
unsafe impl Sync for Region {}

impl Region {
    /// Creates a fresh zeroed region of `len` bytes (tmpfs pages are allocated on
    /// first touch).
    pub fn create(len: usize) -> io::Result<Region> {
        if len < HEADER {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "a region needs at least its 64-byte header"));
        }
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
        let region = Region { fd, ptr, len, prepared: 0 };
        region.write_header(0);
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

    /// Bytes from offset 0 that are allocated, zeroed by the last wipe and mapped by
    /// the host (0 for a fresh region).
    pub fn prepared(&self) -> usize {
        self.prepared
    }

    fn write_header(&self, prepared: usize) {
        self.write_u64(0, 0);
        self.write_u64(8, NO_RESPONSE);
        self.write_u32(16, MAGIC);
        self.write_u32(20, VERSION);
        self.write_u64(PREPARED_AT, prepared as u64);
    }

    fn write_u64(&self, off: usize, v: u64) {
        assert!(off % 8 == 0 && off + 8 <= HEADER);
        // SAFETY: inside the header (checked), which is inside the mapping (len >=
        // HEADER), 8-byte aligned; volatile because another process reads it.
        unsafe { std::ptr::write_volatile(self.ptr.as_ptr().add(off).cast::<u64>(), v.to_le()) }
    }

    fn write_u32(&self, off: usize, v: u32) {
        assert!(off % 4 == 0 && off + 4 <= HEADER);
        // SAFETY: as write_u64, 4-byte aligned.
        unsafe { std::ptr::write_volatile(self.ptr.as_ptr().add(off).cast::<u32>(), v.to_le()) }
    }

    fn read_u64(&self, off: usize) -> u64 {
        assert!(off % 8 == 0 && off + 8 <= HEADER);
        // SAFETY: as write_u64.
        u64::from_le(unsafe { std::ptr::read_volatile(self.ptr.as_ptr().add(off).cast::<u64>()) })
    }

    fn check_range(&self, off: usize, len: usize) -> io::Result<()> {
        match off.checked_add(len) {
            Some(end) if end <= self.len => Ok(()),
            _ => Err(io::Error::new(io::ErrorKind::InvalidInput, "range outside the shared-memory region")),
        }
    }

    /// Copies `src` into the region at `off`.
    fn write_at(&self, off: usize, src: &[u8]) -> io::Result<()> {
        self.check_range(off, src.len())?;
        if src.len() >= SYSCALL_COPY_THRESHOLD && off + src.len() > self.prepared {
            return pwrite_all(&self.fd, src, off);
        }
        // SAFETY: [off, off + len) is inside the mapping (checked above); `src` is
        // host memory, so the ranges do not overlap. Raw writes: the UDF may touch
        // the same bytes concurrently, which only changes what the UDF itself reads.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), self.ptr.as_ptr().add(off), src.len()) };
        Ok(())
    }

    /// Copies `len` bytes at `off` out of the region.
    fn read_at(&self, off: usize, len: usize) -> io::Result<Vec<u8>> {
        self.check_range(off, len)?;
        let mut out = Vec::with_capacity(len);
        if len >= SYSCALL_COPY_THRESHOLD && off + len > self.prepared {
            pread_exact(&self.fd, out.spare_capacity_mut(), off)?;
        } else {
            // SAFETY: [off, off + len) is inside the mapping (checked above) and `out`
            // has room for `len` bytes; raw reads: never a reference into memory the
            // UDF may still write.
            unsafe { std::ptr::copy_nonoverlapping(self.ptr.as_ptr().add(off), out.as_mut_ptr(), len) };
        }
        // SAFETY: all `len` bytes were written just above.
        unsafe { out.set_len(len) };
        Ok(out)
    }

    /// Publishes a request of `len` bytes placed at [`HEADER`]; the caller then rings
    /// the doorbell.
    fn publish_request(&self, len: usize) {
        self.write_u64(8, NO_RESPONSE);
        self.write_u64(0, len as u64);
        fence(Ordering::Release);
    }

    /// Places a serialized request; the caller then rings the doorbell.
    pub fn put_request(&self, body: &[u8]) -> Result<(), String> {
        if !fits(self.len, body.len()) {
            return Err(too_large(body.len(), self.len));
        }
        self.write_at(HEADER, body).map_err(|e| format!("writing the request into shared memory: {e}"))?;
        self.publish_request(body.len());
        Ok(())
    }

    /// Serializes `message` straight into the region (no intermediate buffer);
    /// returns its length. The caller then rings the doorbell.
    pub fn encode_request<M: prost::Message>(&self, message: &M) -> Result<usize, String> {
        let len = message.encoded_len();
        if !fits(self.len, len) {
            return Err(too_large(len, self.len));
        }
        let mut writer = RegionWriter::new(self, HEADER, len);
        message.encode(&mut writer).map_err(|e| format!("encoding the request into shared memory: {e}"))?;
        let written = writer.finish().map_err(|e| format!("writing the request into shared memory: {e}"))?;
        if written != len {
            return Err(format!("the request encoded to {written} bytes, not the {len} it announced"));
        }
        self.publish_request(len);
        Ok(len)
    }

    /// Copies a placed request of `len` bytes back out (when its worker was lost
    /// before it could take it).
    pub fn copy_request(&self, len: usize) -> io::Result<Vec<u8>> {
        self.read_at(HEADER, len)
    }

    /// Where the response lies after the UDF rang the doorbell: `(offset, length)`,
    /// checked against the region and `max`.
    pub fn response_range(&self, request_len: usize, max: usize) -> Result<(usize, usize), String> {
        fence(Ordering::Acquire);
        let len = self.read_u64(8);
        if len == NO_RESPONSE {
            return Err("the UDF rang the doorbell without writing a response length".into());
        }
        let off = response_offset(request_len);
        let room = self.len.saturating_sub(off) as u64;
        if len > room || len > max as u64 {
            return Err(format!("response length {len} exceeds the region ({room} bytes free) or max_response_bytes {max}"));
        }
        Ok((off, len as usize))
    }

    /// Copies `len` bytes at `off` out of the region (a response, see
    /// [`Region::response_range`]).
    pub fn copy_out(&self, off: usize, len: usize) -> Result<Vec<u8>, String> {
        self.read_at(off, len).map_err(|e| format!("reading the response from shared memory: {e}"))
    }

    /// Copies out the response after the UDF rang the doorbell.
    pub fn take_response(&self, request_len: usize, max: usize) -> Result<Vec<u8>, String> {
        let (off, len) = self.response_range(request_len, max)?;
        self.copy_out(off, len)
    }

    /// Makes the region as good as new for the next worker: every allocated page
    /// below `keep` (rounded up to a page) is zeroed, every page above it is released,
    /// `[0, keep)` is allocated and mapped, and the header is reset. Only called
    /// once no worker can reach the region any more.
    pub fn wipe(&mut self, keep: usize) -> io::Result<()> {
        let keep = keep.min(self.len).next_multiple_of(PAGE).min(self.len);
        let fd = self.fd.as_raw_fd();
        // Holes below `keep`, to allocate once the wipe is done.
        let mut holes = Vec::new();
        let mut off = 0usize;
        while off < self.len {
            // SAFETY: lseek on our own fd.
            let data = unsafe { libc::lseek(fd, off as libc::off_t, libc::SEEK_DATA) };
            if data < 0 {
                let e = io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::ENXIO) {
                    break; // no data after `off`
                }
                return Err(e);
            }
            // SAFETY: as above.
            let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
            if hole < 0 {
                return Err(io::Error::last_os_error());
            }
            let (data, hole) = (data as usize, (hole as usize).min(self.len));
            if hole <= data {
                break;
            }
            if off < data.min(keep) {
                holes.push((off, data.min(keep)));
            }
            let zero_end = hole.min(keep);
            if data < zero_end {
                // SAFETY: [data, zero_end) is inside the mapping (zero_end <= keep <=
                // len) and nothing else maps the region any more.
                unsafe { std::ptr::write_bytes(self.ptr.as_ptr().add(data), 0, zero_end - data) };
            }
            let punch = data.max(keep);
            if punch < hole {
                // SAFETY: fallocate on our own fd; the range is inside the file.
                let rc = unsafe {
                    libc::fallocate(
                        fd,
                        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                        punch as libc::off_t,
                        (hole - punch) as libc::off_t,
                    )
                };
                if rc < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            off = hole;
        }
        if off < keep {
            holes.push((off, keep));
        }
        // Allocate and map what the next request is likely to use here rather than
        // in its page faults (what was allocated is mapped already: the zeroing
        // touched it). Best effort: older kernels lack MADV_POPULATE_WRITE.
        let mut prepared = keep;
        for (start, end) in holes {
            // SAFETY: [start, end) is inside our mapping (end <= keep <= len) and
            // page-aligned (tmpfs holes are whole pages; keep is rounded up).
            if unsafe { libc::madvise(self.ptr.as_ptr().add(start).cast(), end - start, libc::MADV_POPULATE_WRITE) } != 0 {
                prepared = prepared.min(start);
            }
        }
        self.prepared = prepared;
        self.write_header(prepared);
        Ok(())
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the mapping created in `create`.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

fn pwrite_all(fd: &OwnedFd, src: &[u8], off: usize) -> io::Result<()> {
    full_transfer(src.len(), io::ErrorKind::WriteZero, |done| {
        // SAFETY: writing from the live slice's unwritten tail to our own fd.
        unsafe { libc::pwrite(fd.as_raw_fd(), src[done..].as_ptr().cast(), src.len() - done, (off + done) as libc::off_t) }
    })
}

fn pread_exact(fd: &OwnedFd, dst: &mut [MaybeUninit<u8>], off: usize) -> io::Result<()> {
    let len = dst.len();
    full_transfer(len, io::ErrorKind::UnexpectedEof, |done| {
        // SAFETY: the kernel writes at most `len - done` bytes into the live tail of `dst`.
        unsafe { libc::pread(fd.as_raw_fd(), dst[done..].as_mut_ptr().cast(), len - done, (off + done) as libc::off_t) }
    })
}

/// Repeats `op(bytes done so far)` (a pread/pwrite returning a count or -1) until
/// `total` bytes moved; EINTR retries, a zero count fails with `on_zero`.
fn full_transfer(total: usize, on_zero: io::ErrorKind, mut op: impl FnMut(usize) -> isize) -> io::Result<()> {
    let mut done = 0;
    while done < total {
        let n = op(done);
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(on_zero.into());
        }
        done += n as usize;
    }
    Ok(())
}

/// A [`BufMut`] writing into a region at a fixed range: prost encodes a request
/// straight into shared memory. Large writes (the bytes of big fields) go directly
/// into the region; small ones are gathered in a private buffer first. Nothing ever
/// holds a reference into the shared mapping.
struct RegionWriter<'a> {
    region: &'a Region,
    start: usize,
    /// Region offset of the first byte not yet written to the region.
    pos: usize,
    end: usize,
    stage: [MaybeUninit<u8>; DIRECT_WRITE],
    staged: usize,
    error: Option<io::Error>,
}

impl<'a> RegionWriter<'a> {
    fn new(region: &'a Region, start: usize, len: usize) -> RegionWriter<'a> {
        RegionWriter { region, start, pos: start, end: start + len, stage: [MaybeUninit::uninit(); DIRECT_WRITE], staged: 0, error: None }
    }

    fn flush(&mut self) {
        if self.staged == 0 {
            return;
        }
        // SAFETY: the first `staged` bytes of `stage` were initialised (by put_slice
        // or by the caller of chunk_mut before advance_mut).
        let bytes = unsafe { std::slice::from_raw_parts(self.stage.as_ptr().cast::<u8>(), self.staged) };
        if let Err(e) = self.region.write_at(self.pos, bytes) {
            self.error.get_or_insert(e);
        }
        self.pos += self.staged;
        self.staged = 0;
    }

    /// Writes what is still gathered; returns the number of bytes written.
    fn finish(mut self) -> io::Result<usize> {
        self.flush();
        match self.error.take() {
            Some(e) => Err(e),
            None => Ok(self.pos - self.start),
        }
    }
}

// SAFETY: `chunk_mut` hands out private staging memory (never the shared mapping),
// `advance_mut` only accounts for bytes the caller initialised in it, and
// `remaining_mut` never exceeds the room left in the region's range.
unsafe impl BufMut for RegionWriter<'_> {
    fn remaining_mut(&self) -> usize {
        self.end - self.pos - self.staged
    }

    unsafe fn advance_mut(&mut self, cnt: usize) {
        assert!(cnt <= DIRECT_WRITE - self.staged && cnt <= self.remaining_mut(), "advance_mut past the chunk");
        self.staged += cnt;
    }

    fn chunk_mut(&mut self) -> &mut UninitSlice {
        if self.staged == DIRECT_WRITE {
            self.flush();
        }
        let room = (DIRECT_WRITE - self.staged).min(self.end - self.pos - self.staged);
        UninitSlice::uninit(&mut self.stage[self.staged..self.staged + room])
    }

    fn put_slice(&mut self, src: &[u8]) {
        if src.len() > self.remaining_mut() {
            // A message writing more than its `encoded_len`: fail the request (in
            // `finish`) rather than panic while the caller holds a claimed worker.
            self.error.get_or_insert_with(|| io::Error::other("the message wrote more than its encoded_len"));
            return;
        }
        if src.len() >= DIRECT_WRITE {
            self.flush();
            if let Err(e) = self.region.write_at(self.pos, src) {
                self.error.get_or_insert(e);
            }
            self.pos += src.len();
            return;
        }
        if src.len() > DIRECT_WRITE - self.staged {
            self.flush();
        }
        for (d, s) in self.stage[self.staged..self.staged + src.len()].iter_mut().zip(src) {
            d.write(*s);
        }
        self.staged += src.len();
    }

    fn put<T: Buf>(&mut self, mut src: T)
    where
        Self: Sized,
    {
        while src.has_remaining() {
            let chunk = src.chunk();
            let n = chunk.len();
            self.put_slice(chunk);
            src.advance(n);
        }
    }
}

/// A worker's region, shared by the shard thread that owns the worker and a caller
/// that claimed the worker to write its request. When the last owner drops it, the
/// region goes back to its pool to be wiped — only if the worker was reaped.
pub struct WorkerRegion {
    region: ManuallyDrop<Region>,
    pool: Arc<PoolShared>,
    reaped: AtomicBool,
    used: AtomicUsize,
}

impl WorkerRegion {
    pub fn region(&self) -> &Region {
        &self.region
    }

    /// The runner reaped the worker: nothing can map the region any more, so it may
    /// be wiped and reused.
    pub fn mark_reaped(&self) {
        self.reaped.store(true, Ordering::Release);
    }

    pub fn is_reaped(&self) -> bool {
        self.reaped.load(Ordering::Acquire)
    }

    /// Records that the first `bytes` of the region were used (sizes the pool's
    /// wipes and pre-faulting).
    pub fn note_used(&self, bytes: usize) {
        self.used.fetch_max(bytes.min(self.region.len), Ordering::Relaxed);
    }

    /// `len` bytes at `off` (a response) shared rather than copied, once the worker
    /// was reaped: from then on nothing writes the region until this view and every
    /// other owner are gone (only then is it wiped). `None` before that, or for a
    /// range outside the region.
    pub fn view(self: &Arc<Self>, off: usize, len: usize) -> Option<Bytes> {
        if !self.is_reaped() || self.region.check_range(off, len).is_err() {
            return None;
        }
        Some(Bytes::from_owner(RegionView { owner: self.clone(), off, len }))
    }
}

/// Bytes of a reaped worker's region (see [`WorkerRegion::view`]).
struct RegionView {
    owner: Arc<WorkerRegion>,
    off: usize,
    len: usize,
}

impl AsRef<[u8]> for RegionView {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: [off, off + len) is inside the mapping (checked in `view`), which
        // lives as long as `owner`. The worker was reaped, so no process writes the
        // region any more, and the host does not either: no caller can claim a
        // reaped worker and the cleaner only wipes the region after the last owner,
        // this view included, is gone. The bytes are immutable while it exists.
        unsafe { std::slice::from_raw_parts(self.owner.region.ptr.as_ptr().add(self.off), self.len) }
    }
}

impl Drop for WorkerRegion {
    fn drop(&mut self) {
        // SAFETY: `region` is taken exactly once, here, and never used afterwards.
        let region = unsafe { ManuallyDrop::take(&mut self.region) };
        if self.reaped.load(Ordering::Acquire) {
            self.pool.recycle(region, self.used.load(Ordering::Relaxed));
        }
    }
}

/// Regions waiting to be wiped and wiped regions ready for new workers, per region
/// size; one cleaner thread (started on first use) does the wiping.
pub struct ShmPool {
    shared: Arc<PoolShared>,
}

/// Whether regions are reused (wiped) or every worker gets a fresh one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reuse {
    Wiped,
    Never,
}

struct PoolShared {
    reuse: Reuse,
    state: Mutex<PoolState>,
    wake: Condvar,
    cleaner: Mutex<Option<std::thread::JoinHandle<()>>>,
}

#[derive(Default)]
struct PoolState {
    /// Wiped regions per size, oldest first (taken in that order, so that every
    /// spare keeps rotating).
    clean: HashMap<usize, VecDeque<Region>>,
    /// Regions to wipe whose used part the host had mapped already: cheap (a
    /// `memset`), so done first.
    dirty: VecDeque<(Region, usize)>,
    /// Regions to wipe that used memory the host never mapped (e.g. a fresh region
    /// given a large request): mapping it costs about a microsecond per page here,
    /// so these wait behind the cheap ones rather than starve the pool.
    dirty_costly: VecDeque<(Region, usize)>,
    /// Per region size: recent high-water mark of the bytes executions used.
    hints: HashMap<usize, usize>,
    /// Per region size: wiped regions kept (`MAX_SPARES`, raised by shortages).
    spare_caps: HashMap<usize, usize>,
    stopped: bool,
}

impl ShmPool {
    pub fn new(reuse: Reuse) -> ShmPool {
        ShmPool {
            shared: Arc::new(PoolShared {
                reuse,
                state: Mutex::new(PoolState::default()),
                wake: Condvar::new(),
                cleaner: Mutex::new(None),
            }),
        }
    }

    /// A region of `size` bytes for a new worker: a wiped one if there is one, else a
    /// fresh one.
    pub fn take(&self, size: usize) -> io::Result<Arc<WorkerRegion>> {
        let reused = self.shared.lock().take_clean(size);
        let region = match reused {
            Some(r) => r,
            None => Region::create(size)?,
        };
        Ok(Arc::new(WorkerRegion {
            region: ManuallyDrop::new(region),
            pool: self.shared.clone(),
            reaped: AtomicBool::new(false),
            used: AtomicUsize::new(0),
        }))
    }

    /// Wiped regions ready for new workers (all sizes).
    pub fn spares(&self) -> usize {
        self.shared.lock().clean.values().map(VecDeque::len).sum()
    }

    /// Stops the cleaner and frees every pooled region; regions given back later are
    /// freed at once.
    pub fn shutdown(&self) {
        let dropped = {
            let mut s = self.shared.lock();
            s.stopped = true;
            (std::mem::take(&mut s.dirty), std::mem::take(&mut s.dirty_costly), std::mem::take(&mut s.clean))
        };
        self.shared.wake.notify_all();
        drop(dropped);
        let handle = match self.shared.cleaner.lock() {
            Ok(mut h) => h.take(),
            Err(p) => p.into_inner().take(),
        };
        if let Some(h) = handle {
            if h.join().is_err() {
                tracing::error!("the shared-memory cleaner thread panicked");
            }
        }
    }
}

impl Drop for ShmPool {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl PoolState {
    /// A wiped region of `size` bytes, if there is one. If there is none while
    /// regions of that size wait to be wiped (the cleaner lags behind the
    /// workers), one more wiped region of that size is kept from now on.
    fn take_clean(&mut self, size: usize) -> Option<Region> {
        let reused = self.clean.get_mut(&size).and_then(VecDeque::pop_front);
        if reused.is_none() && self.dirty.iter().chain(&self.dirty_costly).any(|(r, _)| r.len() == size) {
            let cap = self.spare_caps.entry(size).or_insert(MAX_SPARES);
            *cap = (*cap + 1).min(MAX_SPARES_GROWN);
        }
        reused
    }

    /// Keeps a just-wiped region as a spare, unless its size has all the spares
    /// it keeps (then it is freed).
    fn keep_wiped(&mut self, region: Region) {
        let cap = self.spare_caps.get(&region.len()).copied().unwrap_or(MAX_SPARES);
        let spares = self.clean.entry(region.len()).or_default();
        if spares.len() < cap {
            spares.push_back(region);
        }
    }
}

impl PoolShared {
    fn lock(&self) -> MutexGuard<'_, PoolState> {
        match self.state.lock() {
            Ok(s) => s,
            Err(p) => p.into_inner(),
        }
    }

    fn recycle(self: &Arc<Self>, region: Region, used: usize) {
        if self.reuse == Reuse::Never {
            return; // `region` is freed on return
        }
        {
            let mut s = self.lock();
            if s.stopped {
                return; // `region` is freed on return
            }
            if used <= region.prepared {
                s.dirty.push_back((region, used));
            } else {
                s.dirty_costly.push_back((region, used));
            }
        }
        self.ensure_cleaner();
        self.wake.notify_one();
    }

    fn ensure_cleaner(self: &Arc<Self>) {
        let mut slot = match self.cleaner.lock() {
            Ok(h) => h,
            Err(p) => p.into_inner(),
        };
        if slot.is_some() {
            return;
        }
        let shared = self.clone();
        match std::thread::Builder::new().name("roma-shm-wipe".into()).spawn(move || shared.clean_loop()) {
            Ok(h) => *slot = Some(h),
            Err(e) => {
                // Without a cleaner nothing is reused: free what waits.
                tracing::error!(error = %e, "cannot start the shared-memory cleaner; regions are not reused");
                drop(slot);
                let dropped = {
                    let mut s = self.lock();
                    (std::mem::take(&mut s.dirty), std::mem::take(&mut s.dirty_costly))
                };
                drop(dropped);
            }
        }
    }

    fn clean_loop(self: Arc<Self>) {
        loop {
            let (mut region, keep) = {
                let mut s = self.lock();
                loop {
                    if s.stopped {
                        return;
                    }
                    if let Some((region, used)) = s.dirty.pop_front().or_else(|| s.dirty_costly.pop_front()) {
                        let hint = s.hints.entry(region.len()).or_insert(0);
                        *hint = used.max(*hint - *hint / 8);
                        let keep = *hint;
                        break (region, keep);
                    }
                    s = match self.wake.wait(s) {
                        Ok(s) => s,
                        Err(p) => p.into_inner(),
                    };
                }
            };
            if let Err(e) = region.wipe(keep) {
                // Never reuse a region that may not be clean.
                tracing::warn!(error = %e, "cannot wipe a shared-memory region; it is freed instead");
                continue;
            }
            let mut s = self.lock();
            if s.stopped {
                return;
            }
            s.keep_wiped(region);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Plays the UDF: writes `body` as the response of a request of `request_len`.
    fn respond(r: &Region, request_len: usize, body: &[u8]) {
        let off = response_offset(request_len);
        assert!(off + body.len() <= r.len);
        // SAFETY: [off, off + len) is inside the mapping (asserted).
        unsafe { std::ptr::copy_nonoverlapping(body.as_ptr(), r.ptr.as_ptr().add(off), body.len()) };
        r.write_u64(8, body.len() as u64);
    }

    fn bytes(r: &Region, off: usize, len: usize) -> Vec<u8> {
        r.read_at(off, len).unwrap()
    }

    fn allocated(r: &Region) -> usize {
        // SAFETY: `stat` is plain data; all zeroes is a valid value.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: fstat on our own fd into a live struct.
        assert_eq!(unsafe { libc::fstat(r.fd.as_raw_fd(), &mut st) }, 0);
        st.st_blocks as usize * 512
    }

    #[test]
    fn request_and_response_round_trip_through_the_region() {
        let r = Region::create(1 << 16).unwrap();
        r.put_request(b"hello").unwrap();
        assert_eq!(r.read_u64(0), 5);
        assert_eq!(bytes(&r, HEADER, 5), b"hello");
        assert!(r.take_response(5, 1 << 20).is_err(), "no response written yet");
        respond(&r, 5, b"world");
        assert_eq!(r.take_response(5, 1 << 20).unwrap(), b"world");
        r.write_u64(8, 1 << 40);
        assert!(r.take_response(5, 1 << 20).is_err(), "oversized length rejected");
        assert!(r.put_request(&vec![0u8; 1 << 16]).is_err(), "request too large");
    }

    #[test]
    fn large_copies_round_trip_with_and_without_the_mapping() {
        let mut r = Region::create(4 << 20).unwrap();
        let body: Vec<u8> = (0..(1 << 20) + 3).map(|i| (i * 7 % 251) as u8).collect();
        // Fresh region: through pwrite/pread.
        r.put_request(&body).unwrap();
        assert_eq!(r.copy_request(body.len()).unwrap(), body);
        respond(&r, body.len(), &body[..300_000]);
        assert_eq!(r.take_response(body.len(), 4 << 20).unwrap(), &body[..300_000]);
        // Wiped and prepared: through the mapping.
        r.wipe(4 << 20).unwrap();
        assert_eq!(r.prepared(), 4 << 20);
        r.put_request(&body).unwrap();
        assert_eq!(r.copy_request(body.len()).unwrap(), body);
    }

    #[test]
    fn messages_encode_straight_into_the_region() {
        use crate::proto::sample::{ReadPayloadRequest, SampleRequest};
        use prost::Message;
        for prepared in [false, true] {
            let mut r = Region::create(8 << 20).unwrap();
            if prepared {
                r.wipe(8 << 20).unwrap();
            }
            let msg = ReadPayloadRequest {
                payloads: vec![vec![1u8; 3], vec![2u8; 600], vec![3u8; 1 << 20], Vec::new(), vec![4u8; 300 << 10]],
            };
            let len = r.encode_request(&msg).unwrap();
            assert_eq!(len, msg.encoded_len());
            assert_eq!(r.read_u64(0), len as u64);
            assert_eq!(r.read_u64(8), NO_RESPONSE);
            assert_eq!(bytes(&r, HEADER, len), msg.encode_to_vec(), "prepared={prepared}");
            // An empty message is a request of 0 bytes.
            assert_eq!(r.encode_request(&SampleRequest::default()).unwrap(), 0);
            assert_eq!(r.read_u64(0), 0);
        }
        let small = Region::create(4096).unwrap();
        let err = small.encode_request(&ReadPayloadRequest { payloads: vec![vec![0u8; 8192]] }).unwrap_err();
        assert!(err.contains("does not fit"), "{err}");
    }

    #[test]
    fn wiping_zeroes_what_is_kept_and_releases_the_rest() {
        let size = 2 << 20;
        let mut r = Region::create(size).unwrap();
        // A UDF scribbled over everything, header included.
        // SAFETY: the whole mapping is ours.
        unsafe { std::ptr::write_bytes(r.ptr.as_ptr(), 0xAB, size) };
        assert!(allocated(&r) >= size);
        r.wipe(100_000).unwrap();
        let keep = 100_000usize.next_multiple_of(PAGE);
        assert_eq!(r.prepared(), keep);
        let all = bytes(&r, 0, size);
        assert_eq!(&all[16..20], &MAGIC.to_le_bytes());
        assert_eq!(r.read_u64(0), 0);
        assert_eq!(r.read_u64(8), NO_RESPONSE);
        assert_eq!(r.read_u64(PREPARED_AT), keep as u64);
        assert!(all[HEADER..].iter().all(|&b| b == 0), "every byte after the header reads zero");
        assert!(allocated(&r) <= keep + PAGE, "pages above the kept size were released: {}", allocated(&r));
        // Wiping again with nothing kept releases everything but the header page.
        r.wipe(0).unwrap();
        assert_eq!(r.prepared(), 0);
        assert!(allocated(&r) <= PAGE);
        assert_eq!(r.read_u64(8), NO_RESPONSE);
    }

    #[test]
    fn the_pool_reuses_only_regions_of_reaped_workers_and_only_wiped() {
        let pool = ShmPool::new(Reuse::Wiped);
        let size = 1 << 20;
        let wait_for_spares = |n: usize| {
            let start = std::time::Instant::now();
            while pool.spares() < n {
                assert!(start.elapsed() < std::time::Duration::from_secs(10), "the cleaner did not wipe the region");
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        };
        // Not reaped (e.g. the sandbox died): freed, never reused.
        let w = pool.take(size).unwrap();
        w.region().put_request(b"secret").unwrap();
        drop(w);
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert_eq!(pool.spares(), 0);
        // Reaped: wiped and handed to the next worker.
        let w = pool.take(size).unwrap();
        let fd = w.region().fd().as_raw_fd();
        w.region().put_request(&vec![0x5A; 300 << 10]).unwrap();
        respond(w.region(), 300 << 10, b"response bytes");
        w.note_used(response_offset(300 << 10) + 14);
        w.mark_reaped();
        drop(w);
        wait_for_spares(1);
        let next = pool.take(size).unwrap();
        assert_eq!(next.region().fd().as_raw_fd(), fd, "the same memfd, reused");
        assert!(next.region().prepared() >= response_offset(300 << 10) + 14);
        assert_eq!(next.region().read_u64(0), 0);
        assert!(bytes(next.region(), HEADER, size - HEADER).iter().all(|&b| b == 0), "nothing survives the wipe");
        // Another size gets a region of its own.
        assert_eq!(pool.take(size * 2).unwrap().region().len(), size * 2);
        pool.shutdown();
        next.mark_reaped();
        drop(next);
        assert_eq!(pool.spares(), 0, "after shutdown regions are freed");
    }

    #[test]
    fn a_cleaner_that_lags_behind_the_workers_gets_more_spares() {
        let size = 1 << 16;
        let mut s = PoolState::default();
        let spares = |s: &PoolState| s.clean.get(&size).map_or(0, VecDeque::len);
        // No region waits to be wiped: a fresh one is simply the pool growing.
        assert!(s.take_clean(size).is_none());
        for _ in 0..MAX_SPARES + 2 {
            s.keep_wiped(Region::create(size).unwrap());
        }
        assert_eq!(spares(&s), MAX_SPARES, "beyond the cap a wiped region is freed");
        // Every spare taken while one waits to be wiped: a shortage per take.
        s.dirty.push_back((Region::create(size).unwrap(), 0));
        for _ in 0..MAX_SPARES {
            assert!(s.take_clean(size).is_some());
        }
        assert!(s.take_clean(size).is_none());
        assert!(s.take_clean(size).is_none());
        assert!(s.take_clean(size * 2).is_none(), "another size's shortage is its own");
        for _ in 0..MAX_SPARES + 4 {
            s.keep_wiped(Region::create(size).unwrap());
        }
        assert_eq!(spares(&s), MAX_SPARES + 2, "two shortages: two more spares kept");
        for _ in 0..2 * MAX_SPARES_GROWN {
            s.take_clean(size);
        }
        for _ in 0..2 * MAX_SPARES_GROWN {
            s.keep_wiped(Region::create(size).unwrap());
        }
        assert_eq!(spares(&s), MAX_SPARES_GROWN, "never more than MAX_SPARES_GROWN");
    }

    #[test]
    fn a_pool_that_never_reuses_frees_every_region() {
        let pool = ShmPool::new(Reuse::Never);
        let w = pool.take(1 << 20).unwrap();
        w.mark_reaped();
        drop(w);
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert_eq!(pool.spares(), 0);
        assert!(pool.shared.cleaner.lock().unwrap().is_none(), "no cleaner thread was needed");
    }
}

//! Workers' lifecycle on the shard: filling slots with spawns, dispatching requests
//! to them, closing their channels and freeing their records.

use super::*;

impl Reactor {
    pub(super) fn fill_slots(&mut self, token: u64) {
        loop {
            let Some(t) = self.tokens.get(&token) else { return };
            if t.live >= t.slots || self.runner_dead {
                return;
            }
            if let Some(at) = t.respawn_at {
                if at > Instant::now() {
                    return;
                }
            }
            match self.spawn_worker(token) {
                Ok(true) => {}
                Ok(false) => {
                    // No channel in stock: the slot is filled when channels arrive.
                    if !self.awaiting_channels.contains(&token) {
                        self.awaiting_channels.push(token);
                    }
                    return;
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot prepare a worker");
                    self.note_failure(token, &format!("cannot prepare a worker: {e}"));
                    return;
                }
            }
        }
    }

    /// Starts one worker for `token`; false when it must wait for channels from
    /// the runner (none in stock; more were asked for).
    pub(super) fn spawn_worker(&mut self, token: u64) -> std::io::Result<bool> {
        let Some(t) = self.tokens.get(&token) else { return Ok(true) };
        let (log, shm_size) = (t.entry.log, t.entry.shm);
        // All but one of the shard's slots may wait for a held exit report: one
        // worker stays offered meanwhile, and a request beyond it wakes the shard,
        // which refills at once.
        let exit_batch = self.config.exit_report_batch.min(t.slots.saturating_sub(1));
        let exit_batch = if exit_batch >= 2 && !log && shm_size.is_none() { exit_batch as u32 } else { 0 };
        // The channel first, so that an empty stock costs nothing more. With a runner
        // pidfd it comes from the runner's stock (see `on_channels`); otherwise it is
        // made here and its worker end goes first with the order.
        let mut fds = Vec::new();
        let (channel, host_end) = if self.runner.is_some() {
            if self.channel_stock.len() <= CHANNEL_LOW_WATER {
                self.request_channels(false);
            }
            match self.channel_stock.pop() {
                Some((id, host)) => (id, host),
                None => {
                    self.request_channels(true);
                    return Ok(false);
                }
            }
        } else {
            let (host, runner_end) = fdpass::stream_pair()?;
            fds.push(runner_end);
            (0, host)
        };
        let (logs, shm) = match self.worker_extras(log, shm_size, &mut fds) {
            Ok(got) => got,
            Err(e) => {
                if channel != 0 {
                    // Unused: back into the stock.
                    self.channel_stock.push((channel, host_end));
                }
                return Err(e);
            }
        };
        let Some(t) = self.tokens.get_mut(&token) else { return Ok(true) };
        t.live += 1;
        let worker_id = self.next_worker_id;
        self.next_worker_id += 1;
        let shm_on = shm.is_some();
        let exit_hold_us = u32::try_from(self.config.exit_report_hold.as_micros()).unwrap_or(u32::MAX);
        let spawn = Spawn { code_id: token, worker_id, log, shm: shm_on, channel, exit_batch, exit_hold_us };
        self.ctl_out.push(host_to_runner::Msg::Spawn(spawn), fds);
        let gen = self.next_gen;
        self.next_gen = self.next_gen.wrapping_add(1) & 0xff_ffff;
        let conn = WorkerConn {
            worker_id,
            token,
            gen,
            fd: Some(Arc::new(host_end)),
            state: WState::Spawning,
            // Taken from `spare_bufs` when the shard first reads from it: a worker
            // whose caller reads the response never needs one.
            buf: Vec::new(),
            filled: 0,
            body_buf: None,
            body_filled: 0,
            replies: VecDeque::new(),
            reply_inflight: None,
            calls_outstanding: 0,
            inflight: 0,
            armed: false,
            exec: None,
            exited: None,
            logs,
            shm,
            failure: None,
            killed_from: None,
            runner_copy: channel != 0,
            unconfirmed: false,
            ready_pending: false,
        };
        let key = match self.free.pop() {
            Some(k) => {
                self.workers[k as usize] = Some(conn);
                k
            }
            None => {
                self.workers.push(Some(conn));
                (self.workers.len() - 1) as u32
            }
        };
        self.by_worker_id.insert(worker_id, key);
        self.shared.live_workers.fetch_add(1, Ordering::Relaxed);
        let start_by = crate::ring::deadline_after(Instant::now(), self.config.worker_start_timeout);
        self.timers.push(start_by, self.config.worker_start_timeout, Timer::StartBy(key, gen));
        let lazy = self.config.lazy_readiness
            && self.execs.is_empty()
            && self.tokens.get(&token).is_some_and(|t| {
                t.entry.direct && t.queue.is_empty() && t.lazy_paused_until.is_none_or(|u| u <= Instant::now())
            });
        // Under load: the oldest queued execution goes to this worker now (see
        // `Config::early_dispatch`).
        let early = if lazy || shm_on || !self.config.early_dispatch {
            None
        } else {
            let index = self.config.index;
            self.tokens.get_mut(&token).and_then(|t| t.pop_queued(index, &mut self.queued))
        };
        if lazy {
            self.offer_unconfirmed(key);
        } else if let Some(exec_id) = early {
            if let Some(w) = self.worker(key) {
                w.ready_pending = true;
            }
            // The ready byte and the response come on one receive.
            self.post_worker_recv(key, RECV_CHUNK, true);
            self.dispatch(exec_id, key);
        } else {
            self.post_worker_recv(key, 1, true);
        }
        Ok(true)
    }

    /// Offers a just-spawned worker before its ready byte arrives (see
    /// `Config::lazy_readiness`): no shard wake-up for the byte.
    pub(super) fn offer_unconfirmed(&mut self, key: u32) {
        let index = self.config.index;
        let Some(w) = self.worker(key) else { return };
        w.state = WState::Idle;
        w.unconfirmed = true;
        let (token, gen, fd) = (w.token, w.gen, w.fd.clone());
        let Some(t) = self.tokens.get_mut(&token) else { return };
        t.idle.push_back(key);
        t.entry.per_shard[index].idle.store(t.idle.len(), Ordering::Relaxed);
        if let Some(fd) = fd {
            t.entry.per_shard[index].ready.publish(Offer { key, gen, fd, region: None, armed: false, unconfirmed: true });
        }
    }

    /// Waits for the ready byte of unconfirmed worker `key`, taken out of the
    /// offers (by the shard, or by a caller that found the byte not there yet):
    /// it is a starting worker again, with a receive posted for the byte.
    pub(super) fn await_ready_byte(&mut self, key: u32) {
        let index = self.config.index;
        let Some(w) = self.worker(key) else { return };
        w.state = WState::Spawning;
        w.unconfirmed = false;
        let (token, gen) = (w.token, w.gen);
        if let Some(t) = self.tokens.get_mut(&token) {
            t.idle.retain(|k| *k != key);
            t.entry.per_shard[index].idle.store(t.idle.len(), Ordering::Relaxed);
        }
        self.post_worker_recv(key, 1, true);
        // Its spawn's start deadline may have passed while it was offered.
        let start_by = crate::ring::deadline_after(Instant::now(), self.config.worker_start_timeout);
        self.timers.push(start_by, self.config.worker_start_timeout, Timer::StartBy(key, gen));
    }

    /// What follows a worker's channel in its spawn order, pushed onto `fds`: the
    /// log memfds (a logging token) and the shared-memory region (`shm_size`).
    pub(super) fn worker_extras(
        &self,
        log: bool,
        shm_size: Option<usize>,
        fds: &mut Vec<OwnedFd>,
    ) -> std::io::Result<(Option<LogFds>, Option<ShmSlot>)> {
        let logs = if log { Some((memfd(c"roma-stdout")?, memfd(c"roma-stderr")?)) } else { None };
        if let Some((out, err)) = &logs {
            fds.push(out.try_clone()?);
            fds.push(err.try_clone()?);
        }
        let shm = match shm_size {
            Some(size) => {
                let region = self.config.shm_pool.take(size)?;
                fds.push(region.region().fd().try_clone()?);
                Some((region, 0))
            }
            None => None,
        };
        Ok((logs, shm))
    }

    pub(super) fn worker(&mut self, key: u32) -> Option<&mut WorkerConn> {
        self.workers.get_mut(key as usize).and_then(|w| w.as_mut())
    }

    /// Reads up to `len` more bytes from a worker. `expect_wait`: nothing is due
    /// yet (the ready byte of a new worker, the answer to a request not sent yet),
    /// so the kernel arms the poll at once instead of first trying a read that
    /// would fail (IORING_RECVSEND_POLL_FIRST).
    pub(super) fn post_worker_recv(&mut self, key: u32, len: usize, expect_wait: bool) {
        let unbuffered = self.workers.get(key as usize).and_then(|w| w.as_ref()).is_some_and(|w| w.buf.capacity() == 0);
        let spare = if unbuffered { self.spare_bufs.pop() } else { None };
        let Some(w) = self.worker(key) else { return };
        if unbuffered {
            w.buf = spare.unwrap_or_else(|| Vec::with_capacity(RECV_CHUNK));
        }
        let Some(fd) = w.fd.as_ref().map(|f| f.as_raw_fd()) else { return };
        if w.buf.len() < w.filled + len {
            w.buf.resize(w.filled + len, 0);
        }
        // SAFETY: the range [filled, filled+len) is inside `buf`, which is not resized
        // while this recv is in flight (inflight > 0 blocks every resize path).
        let ptr = unsafe { w.buf.as_mut_ptr().add(w.filled) };
        w.inflight += 1;
        w.armed = true;
        let ioprio = if expect_wait { RECVSEND_POLL_FIRST } else { 0 };
        let sqe = opcode::Recv::new(types::Fd(fd), ptr, len as u32).ioprio(ioprio).build().user_data(ud(K_W_RECV, key, w.gen));
        self.push_sqe(sqe);
    }

    pub(super) fn post_worker_send(&mut self, key: u32, exec_id: u64) {
        let Some(exec) = self.execs.get(&exec_id) else { return };
        let ptr = exec.frame[exec.written..].as_ptr();
        let len = (exec.frame.len() - exec.written) as u32;
        self.post_send(key, K_W_SEND, ptr, len);
    }

    /// Queues a send of `len` bytes at `ptr` on worker `key`'s channel, in flight
    /// until its completion (`kind`: the request or a host reply). The bytes must
    /// stay alive and unmoved until that completion is reaped (see `flush_sqes`).
    pub(super) fn post_send(&mut self, key: u32, kind: u64, ptr: *const u8, len: u32) {
        let Some(w) = self.worker(key) else { return };
        let Some(fd) = w.fd.as_ref().map(|f| f.as_raw_fd()) else { return };
        w.inflight += 1;
        let sqe = opcode::Send::new(types::Fd(fd), ptr, len).flags(libc::MSG_NOSIGNAL).build().user_data(ud(kind, key, w.gen));
        self.push_sqe(sqe);
    }

    pub(super) fn dispatch(&mut self, exec_id: u64, key: u32) {
        let now = Instant::now();
        let Some(w) = self.worker(key) else { return };
        w.state = WState::Busy;
        w.exec = Some(exec_id);
        let (token, gen, armed, starting) = (w.token, w.gen, w.armed, w.ready_pending);
        let fd = w.fd.clone();
        let (idle_left, entry) = match self.tokens.get(&token) {
            Some(t) => (t.idle.len(), Some(t.entry.clone())),
            None => (0, None),
        };
        if let Some(entry) = entry {
            entry.per_shard[self.config.index].idle.store(idle_left, Ordering::Relaxed);
        }
        let Some(exec) = self.execs.get_mut(&exec_id) else { return };
        exec.worker = Some(key);
        exec.idle_left = idle_left;
        if starting {
            // Its clock starts at the worker's ready byte (`ready_seen`).
            exec.written_before_ready = true;
        } else {
            // A handed-over execution's clock started when the caller claimed the
            // worker (the shard may learn of it later).
            let claimed_at = exec.handed.or(exec.placed.map(|(_, at)| at));
            exec.dispatched = Some(claimed_at.unwrap_or(now));
            let deadline = crate::ring::deadline_after(exec.dispatched.unwrap_or(now), exec.timeout);
            self.timers.push(deadline, exec.timeout, Timer::Deadline(exec_id, key, gen));
        }
        match exec.handoff.as_mut() {
            // The caller may read the answer: nothing is posted until the shard takes
            // the execution over.
            Some((_, handoff_fd)) => *handoff_fd = fd,
            None => {
                exec.engine_reads = true;
                if !armed {
                    // An idle worker of a `direct` token has no receive posted.
                    self.post_worker_recv(key, RECV_CHUNK, true);
                }
            }
        }
        let Some(exec) = self.execs.get_mut(&exec_id) else { return };
        if let Some(at) = exec.handed {
            // The caller writes the request (or rings the doorbell) itself.
            exec.sent = Some(at);
            exec.written = exec.handed_frame.as_ref().map_or(0, |f| f.len());
            if let Some((len, _)) = exec.placed {
                if let Some((_, req_len)) = self.worker(key).and_then(|w| w.shm.as_mut()) {
                    *req_len = len;
                }
            }
            return;
        }
        let placed = match self.workers.get_mut(key as usize).and_then(|w| w.as_mut()).and_then(|w| w.shm.as_mut()) {
            None => None,
            Some((region, req_len)) => match exec.placed {
                Some((len, _)) => {
                    *req_len = len;
                    Some(Ok(()))
                }
                None => {
                    let body = match frame::parse_header(&exec.frame) {
                        Header::Complete { offset, .. } => &exec.frame[offset..],
                        _ => &exec.frame[..0],
                    };
                    *req_len = body.len();
                    region.note_used(crate::ipc::shm::HEADER + body.len());
                    Some(region.region().put_request(body))
                }
            },
        };
        match placed {
            None => self.post_worker_send(key, exec_id),
            Some(Ok(())) => self.post_doorbell(key),
            Some(Err(why)) => {
                self.kill_worker(key);
                self.complete(exec_id, Err(Error::InvalidArgument(why)));
            }
        }
    }

    /// Shared-memory transport: one byte on the socket says the request is in place.
    pub(super) fn post_doorbell(&mut self, key: u32) {
        static DOORBELL: [u8; 1] = [0];
        let Some(w) = self.worker(key) else { return };
        let Some(fd) = w.fd.as_ref().map(|f| f.as_raw_fd()) else { return };
        w.inflight += 1;
        let sqe = opcode::Send::new(types::Fd(fd), DOORBELL.as_ptr(), 1)
            .flags(libc::MSG_NOSIGNAL)
            .build()
            .user_data(ud(K_W_SEND, key, w.gen));
        self.push_sqe(sqe);
    }

    /// The caller that was handed `exec_id` on worker (`key`, `gen`) wrote only
    /// `written` bytes: finish the write here, or (the write failed) fail the
    /// execution through the worker's exit report.
    pub(super) fn on_hand_over_short(&mut self, exec_id: u64, key: u32, gen: u32, written: usize, error: Option<i32>) {
        let on_worker = self.worker(key).is_some_and(|w| w.gen == gen && w.state == WState::Busy && w.exec == Some(exec_id));
        if !on_worker {
            return;
        }
        if let Some(errno) = error {
            if let Some(w) = self.worker(key) {
                w.failure = Some(format!("request write failed: {}", std::io::Error::from_raw_os_error(errno)));
            }
            self.kill_worker(key);
            return;
        }
        let shm = self.worker(key).is_some_and(|w| w.shm.is_some());
        let Some(exec) = self.execs.get_mut(&exec_id) else { return };
        exec.sent = None;
        if shm {
            self.post_doorbell(key);
            return;
        }
        let frame = exec.handed_frame.take().map(|f| Arc::try_unwrap(f).unwrap_or_else(|f| f.as_ref().clone()));
        exec.frame = frame.unwrap_or_default();
        exec.written = written.min(exec.frame.len());
        self.post_worker_send(key, exec_id);
    }

    pub(super) fn kill_worker(&mut self, key: u32) {
        let Some(w) = self.worker(key) else { return };
        let worker_id = w.worker_id;
        if w.exited.is_none() && !self.runner_dead {
            self.ctl_out.push(host_to_runner::Msg::Kill(Kill { worker_id }), Vec::new());
        }
        self.close_channel(key);
    }

    /// Stops using the channel (pending ops finish with an error or EOF) and frees
    /// the worker's slot: the slot starts a fresh worker right away.
    pub(super) fn close_channel(&mut self, key: u32) {
        let Some(w) = self.worker(key) else { return };
        let release = w.state != WState::Finished;
        w.state = WState::Finished;
        let token = w.token;
        // Pending ops complete promptly, and a live worker reads EOF: with a
        // runner-made channel, closing our fd alone would not tell it (the runner
        // holds a copy of this end until the worker is reaped,
        // `udf_runner::Worker::host_end`). Otherwise the close says it.
        if (w.runner_copy && w.exited.is_none()) || w.inflight > 0 {
            if let Some(fd) = w.fd.as_ref() {
                // SAFETY: shutting down a socket we own.
                unsafe { libc::shutdown(fd.as_raw_fd(), libc::SHUT_RDWR) };
            }
        }
        if release {
            self.remove_idle(key);
            if let Some(t) = self.tokens.get_mut(&token) {
                t.live = t.live.saturating_sub(1);
            }
            // Refilled at the top of the next loop round, after a caller this round
            // completed has had the core (see `yield_to_woken_waiter`).
            if !self.refills.contains(&token) {
                self.refills.push(token);
            }
        }
        self.maybe_free(key);
    }

    pub(super) fn maybe_free(&mut self, key: u32) {
        let Some(w) = self.worker(key) else { return };
        if w.state == WState::Finished && w.inflight == 0 && w.exited.is_some() {
            let worker_id = w.worker_id;
            if let Some(fd) = w.fd.take() {
                self.close_shared(fd);
            }
            if let Some(w) = self.workers[key as usize].take() {
                self.keep_spare(w.buf);
            }
            self.by_worker_id.remove(&worker_id);
            self.free.push(key);
            self.shared.live_workers.fetch_sub(1, Ordering::Relaxed);
        } else if w.state == WState::Finished && w.inflight == 0 {
            // Close the socket now (batched into the next submit); keep the record for
            // the exit report.
            if let Some(fd) = w.fd.take() {
                self.close_shared(fd);
            }
        }
    }

    /// Keeps a freed worker's receive buffer for the next worker the shard reads
    /// from (no allocation, no free per worker), unless enough are kept or it grew
    /// large. Only buffers no operation in the kernel points into come here. It
    /// keeps a receive chunk's length, old bytes and all: nothing reads a worker's
    /// buffer past what its own receives filled (`WorkerConn::filled`), and the
    /// next receive then needs no zeroing of the chunk first (a 4 KiB `memset` per
    /// receive posted, 2 % of the engine threads' user time under load).
    pub(super) fn keep_spare(&mut self, mut buf: Vec<u8>) {
        if (RECV_CHUNK..=4 * RECV_CHUNK).contains(&buf.capacity()) && self.spare_bufs.len() < SPARE_BUFS {
            if buf.len() >= RECV_CHUNK {
                buf.truncate(RECV_CHUNK);
            } else {
                buf.resize(RECV_CHUNK, 0);
            }
            self.spare_bufs.push(buf);
        }
    }

    /// Closes a worker's channel through the ring, unless a caller still holds it
    /// (then the caller's drop closes it).
    pub(super) fn close_shared(&mut self, fd: Arc<OwnedFd>) {
        if let Ok(fd) = Arc::try_unwrap(fd) {
            self.close_async(fd);
        }
    }

    /// Closes an fd through the ring: no syscall of its own.
    pub(super) fn close_async(&mut self, fd: OwnedFd) {
        use std::os::fd::IntoRawFd;
        // No completion unless it fails: a successful close completes inside the
        // submit, and its completion would make the next wait return at once (one
        // more loop round and `io_uring_enter`). Not counted in `in_kernel`: it
        // holds no buffer (see `counts_in_kernel`).
        let sqe = opcode::Close::new(types::Fd(fd.into_raw_fd()))
            .build()
            .flags(squeue::Flags::SKIP_SUCCESS)
            .user_data(ud(K_CLOSE, 0, 0));
        self.push_sqe(sqe);
    }

    pub(super) fn remove_idle(&mut self, key: u32) {
        let Some(w) = self.worker(key) else { return };
        let token = w.token;
        let gen = w.gen;
        if let Some(t) = self.tokens.get_mut(&token) {
            t.idle.retain(|k| *k != key);
            t.entry.per_shard[self.config.index].idle.store(t.idle.len(), Ordering::Relaxed);
            // Whether or not a caller claimed it meanwhile: its execution, when it
            // arrives, finds the worker gone (see `execute`).
            t.entry.per_shard[self.config.index].ready.withdraw(key, gen);
        }
    }

    /// A worker of `token` failed to start: respawns back off, and the oldest
    /// queued execution fails with `why`.
    pub(super) fn note_failure(&mut self, token: u64, why: &str) {
        self.back_off(token);
        let index = self.config.index;
        let victim = self.tokens.get_mut(&token).and_then(|t| t.pop_queued(index, &mut self.queued));
        if let Some(id) = victim {
            self.complete(id, Err(Error::Unavailable(why.to_string())));
        }
    }

    /// Counts a failed start of a worker of `token`: its slots are refilled only
    /// after a back-off that doubles with each failure in a row.
    pub(super) fn back_off(&mut self, token: u64) {
        let Some(t) = self.tokens.get_mut(&token) else { return };
        t.failures += 1;
        let backoff = Duration::from_millis(5u64 << t.failures.min(8)).min(MAX_BACKOFF);
        let at = Instant::now() + backoff;
        t.respawn_at = Some(at);
        self.timers.push(at, backoff, Timer::Respawn(token));
    }
}

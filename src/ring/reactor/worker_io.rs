//! A worker channel's I/O: the request write, the ready byte, the response's
//! receives and its parsing into a response or a host call.

use super::*;

impl Reactor {
    pub(super) fn on_worker_send(&mut self, key: u32, res: i32) {
        let Some(w) = self.worker(key) else { return };
        let Some(exec_id) = w.exec else { return };
        if w.state != WState::Busy {
            return;
        }
        if res < 0 {
            w.failure = Some(format!("request write failed: {}", std::io::Error::from_raw_os_error(-res)));
            return;
        }
        let (shm, starting) = (w.shm.is_some(), w.ready_pending);
        let Some(exec) = self.execs.get_mut(&exec_id) else { return };
        if shm {
            exec.sent = Some(Instant::now());
            exec.frame = Vec::new();
            return;
        }
        exec.written += res as usize;
        if exec.written < exec.frame.len() {
            self.post_worker_send(key, exec_id);
        } else {
            exec.sent = Some(Instant::now());
            if !starting {
                // Kept until the ready byte otherwise (see `requeue_unstarted`).
                exec.frame = Vec::new();
            }
        }
    }

    pub(super) fn on_worker_recv(&mut self, key: u32, res: i32) {
        let max = self.config.max_response_bytes;
        let Some(w) = self.worker(key) else { return };
        let state = w.state;
        if res <= 0 {
            let (w_exited, w_gen) = (w.exited, w.gen);
            if res < 0 && w.failure.is_none() && state == WState::Busy {
                w.failure = Some(format!("channel error: {}", std::io::Error::from_raw_os_error(-res)));
            } else if res == 0 && w.failure.is_none() && state == WState::Busy {
                w.failure = Some("the UDF closed its channel".into());
            }
            // EOF or error: the exit report from the runner completes the story.
            if state == WState::Idle {
                self.remove_idle(key);
            }
            if state != WState::Finished && w_exited.is_none() {
                // Unless the worker keeps running without its channel: see ExitBy.
                // A clean exit's report may be held back up to `exit_report_hold`.
                let grace = EXIT_GRACE + self.config.exit_report_hold;
                self.timers.push(Instant::now() + grace, grace, Timer::ExitBy(key, w_gen));
            }
            // The state (Spawning/Idle/Busy) stays for on_worker_exit to judge; if
            // the exit report came first, judge now.
            if let Some(status) = self.worker(key).and_then(|w| w.exited) {
                if state == WState::Busy {
                    self.on_worker_exit(key, status, None);
                }
            }
            return;
        }
        let n = res as usize;
        match state {
            WState::Spawning => {
                w.filled = 0;
                self.on_ready(key);
            }
            WState::Idle => {
                // Bytes before any request: a protocol violation.
                let token = w.token;
                tracing::warn!(token, "a UDF wrote before receiving its request; worker killed");
                self.kill_worker(key);
            }
            WState::Busy => {
                if w.body_buf.is_some() {
                    // Straight into the response buffer.
                    w.body_filled += n;
                    if w.body_filled < w.body_buf.as_ref().map_or(0, |b| b.len()) {
                        self.post_body_recv(key);
                    } else if let Some(body) = w.body_buf.take() {
                        self.on_response(key, ResponseBody::Buf(body));
                    }
                    return;
                }
                w.filled += n;
                if w.ready_pending {
                    // Its ready byte first (early dispatch), maybe with more behind.
                    w.ready_pending = false;
                    w.buf.copy_within(1..w.filled, 0);
                    w.filled -= 1;
                    let more = w.filled > 0;
                    self.ready_seen(key);
                    if !more {
                        self.post_worker_recv(key, RECV_CHUNK, false);
                        return;
                    }
                }
                self.parse_busy(key, max);
            }
            WState::Finished => {}
        }
    }

    /// The shard read worker `key`'s ready byte: it runs the oldest queued
    /// execution of its code token, or joins the idle pool and is offered.
    pub(super) fn on_ready(&mut self, key: u32) {
        let Some(w) = self.worker(key) else { return };
        w.state = WState::Idle;
        w.unconfirmed = false;
        let token = w.token;
        let (gen, fd, region) = (w.gen, w.fd.clone(), w.shm.as_ref().map(|(r, _)| r.clone()));
        // An idle worker gets its response receive now, so the answer wakes the
        // shard once, except for a `direct` token on a shard with nothing in
        // flight: there the next request is likely one a caller waits for, and
        // that caller reads the answer itself (see `direct`).
        let in_flight = !self.execs.is_empty();
        let Some(t) = self.tokens.get_mut(&token) else { return };
        let arm = !t.entry.direct || in_flight;
        t.failures = 0;
        t.respawn_at = None;
        if let Some(exec_id) = t.pop_queued(self.config.index, &mut self.queued) {
            self.post_worker_recv(key, RECV_CHUNK, true);
            self.dispatch(exec_id, key);
            return;
        }
        t.idle.push_back(key);
        t.entry.per_shard[self.config.index].idle.store(t.idle.len(), Ordering::Relaxed);
        if let Some(fd) = fd {
            t.entry.per_shard[self.config.index].ready.publish(Offer { key, gen, fd, region, armed: arm, unconfirmed: false });
        }
        if arm {
            self.post_worker_recv(key, RECV_CHUNK, true);
        }
    }

    /// The ready byte of worker `key`, bound to its execution while it started
    /// (`Config::early_dispatch`), came in: it has started, and the execution's
    /// timeout starts now, as for a request written after the byte.
    pub(super) fn ready_seen(&mut self, key: u32) {
        self.started(key);
        let Some(w) = self.worker(key) else { return };
        let (gen, exec) = (w.gen, w.exec);
        let Some(id) = exec else { return };
        let Some(e) = self.execs.get_mut(&id) else { return };
        let now = Instant::now();
        e.dispatched = Some(now);
        if e.sent.is_some() {
            // Written whole: no longer needed (see `requeue_unstarted`).
            e.frame = Vec::new();
        }
        self.timers.push(crate::ring::deadline_after(now, e.timeout), e.timeout, Timer::Deadline(id, key, gen));
    }

    /// Parses what a busy worker sent: host calls (any number) and then the response
    /// frame, or on the shared-memory transport the doorbell byte.
    pub(super) fn parse_busy(&mut self, key: u32, max: usize) {
        loop {
            let Some(w) = self.worker(key) else { return };
            if w.shm.is_some() && w.filled > 0 && w.buf[0] == 0 {
                if w.filled > 1 {
                    self.garbage(key, "bytes after the shared-memory doorbell".into());
                    return;
                }
                let taken = w.shm.as_ref().map(|(region, req_len)| {
                    let (off, len) = region.region().response_range(*req_len, max)?;
                    region.note_used(off + len);
                    if len >= SHARE_RESPONSE_MIN {
                        Ok(ResponseBody::InRegion(off, len))
                    } else {
                        region.region().copy_out(off, len).map(ResponseBody::Buf)
                    }
                });
                match taken {
                    Some(Ok(body)) => self.on_response(key, body),
                    Some(Err(why)) => self.garbage(key, why),
                    None => {}
                }
                return;
            }
            let Some((offset, len)) = self.header_at(key, 0, "invalid varint length prefix") else { return };
            if len == CALL_MARKER {
                let Some((o2, l2)) = self.header_at(key, offset, "invalid varint length of a host call") else { return };
                let Some(w) = self.worker(key) else { return };
                if l2 > max as u64 {
                    self.garbage(key, format!("host call of {l2} bytes exceeds max_response_bytes {max}"));
                    return;
                }
                let total = offset + o2 + l2 as usize;
                if w.filled < total {
                    let missing = total - w.filled;
                    self.post_worker_recv(key, missing, false);
                    return;
                }
                let call = HostCall::decode(&w.buf[offset + o2..total]);
                w.buf.drain(..total);
                w.filled -= total;
                if w.buf.len() < RECV_CHUNK {
                    w.buf.resize(RECV_CHUNK, 0);
                }
                match call {
                    Ok(call) => self.on_host_call(key, call),
                    Err(e) => {
                        self.garbage(key, format!("undecodable host call: {e}"));
                        return;
                    }
                }
                continue;
            }
            let Some(w) = self.worker(key) else { return };
            if w.shm.is_some() {
                self.garbage(key, "a response frame on the socket with the shared-memory transport".into());
                return;
            }
            if len > max as u64 {
                self.garbage(key, format!("declared length {len} exceeds max_response_bytes {max}"));
                return;
            }
            let total = offset + len as usize;
            if w.filled > total {
                let extra = w.filled - total;
                self.garbage(key, format!("{extra} bytes after the response frame"));
            } else if w.filled == total {
                // Copied out at its size (at most a receive chunk): the chunk buffer
                // stays with the worker and goes back to `spare_bufs` with it.
                let body = w.buf[offset..total].to_vec();
                w.filled = 0;
                self.on_response(key, ResponseBody::Buf(body));
            } else {
                // Read the rest straight into a buffer of the announced size: no copy
                // of the body beyond the first chunk.
                let mut body = vec![0u8; len as usize];
                let have = w.filled - offset;
                body[..have].copy_from_slice(&w.buf[offset..w.filled]);
                w.body_filled = have;
                w.body_buf = Some(body);
                self.post_body_recv(key);
            }
            return;
        }
    }

    /// The varint length prefix at `at` in worker `key`'s received bytes, as (its
    /// size, the length it declares). None when it is not all there yet (a receive
    /// is posted for more) or is not a valid varint (the worker fails with
    /// `invalid`).
    fn header_at(&mut self, key: u32, at: usize, invalid: &str) -> Option<(usize, u64)> {
        let w = self.worker(key)?;
        match frame::parse_header(&w.buf[at..w.filled]) {
            Header::Incomplete => {
                self.post_worker_recv(key, RECV_CHUNK, false);
                None
            }
            Header::Invalid => {
                self.garbage(key, invalid.to_string());
                None
            }
            Header::Complete { offset, len } => Some((offset, len)),
        }
    }

    pub(super) fn post_body_recv(&mut self, key: u32) {
        let Some(w) = self.worker(key) else { return };
        let Some(fd) = w.fd.as_ref().map(|f| f.as_raw_fd()) else { return };
        let Some(body) = w.body_buf.as_mut() else { return };
        let remaining = body.len() - w.body_filled;
        // SAFETY: [body_filled, len) lies inside `body`, which is neither resized nor
        // dropped while this recv is in flight (inflight > 0 keeps the worker).
        let ptr = unsafe { body.as_mut_ptr().add(w.body_filled) };
        w.inflight += 1;
        w.armed = true;
        let sqe = opcode::Recv::new(types::Fd(fd), ptr, remaining.min(u32::MAX as usize) as u32)
            .build()
            .user_data(ud(K_W_RECV, key, w.gen));
        self.push_sqe(sqe);
    }
}

//! Completions from the ring: the command eventfd, the runner connection (its
//! messages and the worker exits it reports).

use super::*;

impl Reactor {
    pub(super) fn handle_cqe(&mut self, user_data: u64, res: i32, flags: u32) {
        let kind = user_data >> 56;
        let key = (user_data & 0xffff_ffff) as u32;
        let gen = ((user_data >> 32) & 0xff_ffff) as u32;
        match kind {
            K_EVENTFD => self.post_eventfd_read(),
            K_CTL_RECV => {
                // A multishot receive stays armed while its completions say `MORE`.
                let armed = cqueue::more(flags);
                if !armed {
                    self.ctl_inflight -= 1;
                }
                self.on_ctl_recv(res, cqueue::buffer_select(flags), armed);
            }
            K_CTL_SEND => {
                self.ctl_inflight -= 1;
                match self.ctl_out.on_complete(res, self.ctl.as_raw_fd(), ud(K_CTL_SEND, 0, 0)) {
                    Ok(Some(sqe)) if !self.runner_dead => {
                        self.ctl_inflight += 1;
                        self.push_sqe(sqe);
                    }
                    Ok(_) => {}
                    Err(e) => self.runner_gone(&format!("cannot send to the sandbox runner: {e}")),
                }
                while let Some(fd) = self.ctl_out.pop_sent_fd() {
                    self.close_async(fd);
                }
            }
            K_W_RECV | K_W_SEND | K_W_REPLY => {
                let valid = matches!(self.worker(key), Some(w) if w.gen == gen);
                if !valid {
                    return;
                }
                if self.worker(key).is_some_and(|w| w.state == WState::Idle) {
                    // A caller may have handed this worker a request: know it first.
                    self.drain_commands();
                }
                if let Some(w) = self.worker(key) {
                    w.inflight -= 1;
                    if kind == K_W_RECV {
                        w.armed = false;
                    }
                }
                match kind {
                    K_W_RECV => self.on_worker_recv(key, res),
                    K_W_SEND => self.on_worker_send(key, res),
                    _ => self.on_reply_sent(key, res),
                }
                self.maybe_free(key);
            }
            K_CLOSE if res < 0 => {
                tracing::warn!(error = %std::io::Error::from_raw_os_error(-res), "closing a descriptor through the ring failed");
            }
            _ => {}
        }
    }

    pub(super) fn post_eventfd_read(&mut self) {
        let ptr: *mut u64 = &mut *self.event_buf;
        let sqe = opcode::Read::new(types::Fd(self.shared.eventfd.as_raw_fd()), ptr.cast(), 8)
            .build()
            .user_data(ud(K_EVENTFD, 0, 0));
        self.push_sqe(sqe);
    }

    /// Posts the receive on the runner connection: one multishot receive into the
    /// provided-buffer ring, which stays armed across messages (no new receive and
    /// no new poll per report: about one per execution), or a single receive into
    /// `ctl_buf` without a ring.
    pub(super) fn post_ctl_recv(&mut self) {
        let fd = types::Fd(self.ctl.as_raw_fd());
        let sqe = match &self.ctl_bufs {
            Some(bufs) => opcode::RecvMulti::new(fd, bufs.bgid()).build(),
            None => opcode::Recv::new(fd, self.ctl_buf.as_mut_ptr(), self.ctl_buf.len() as u32).build(),
        };
        self.ctl_inflight += 1;
        self.push_sqe(sqe.user_data(ud(K_CTL_RECV, 0, 0)));
    }

    /// A completion of the control receive: `res` bytes in provided buffer `bid`
    /// (or in `ctl_buf`); `armed`: the multishot receive goes on (otherwise it is
    /// posted again, unless the runner is gone).
    pub(super) fn on_ctl_recv(&mut self, res: i32, bid: Option<u16>, armed: bool) {
        if res > 0 && !self.runner_dead {
            let n = res as usize;
            match (&self.ctl_bufs, bid) {
                (Some(bufs), Some(bid)) => self.ctl_decoder.extend(bufs.get(bid, n)),
                (None, _) => self.ctl_decoder.extend(&self.ctl_buf[..n.min(self.ctl_buf.len())]),
                (Some(_), None) => {
                    // Never from the kernel: bytes it did not say where it put.
                    self.runner_gone("a runner report arrived without its receive buffer");
                    return;
                }
            }
        }
        if let (Some(bufs), Some(bid)) = (self.ctl_bufs.as_mut(), bid) {
            bufs.recycle(bid);
        }
        if self.runner_dead {
            return;
        }
        if res <= 0 {
            // ENOBUFS: every provided buffer was in use (they are given back as
            // each completion is handled); the multishot receive ended.
            if res == -libc::EINTR || res == -libc::EAGAIN || res == -libc::ENOBUFS {
                if !armed {
                    self.post_ctl_recv();
                }
                return;
            }
            self.runner_gone("the sandbox runner exited");
            return;
        }
        let mut msgs = std::mem::take(&mut self.msg_buf);
        loop {
            match self.ctl_decoder.next_frame(1 << 20) {
                Ok(Some(body)) => match RunnerToHost::decode(body) {
                    Ok(RunnerToHost { msg: Some(m) }) => msgs.push(m),
                    _ => {
                        self.runner_gone("the sandbox runner sent an undecodable control message");
                        return;
                    }
                },
                Ok(None) => break,
                Err(e) => {
                    self.runner_gone(&format!("control protocol error from the runner: {e}"));
                    return;
                }
            }
        }
        self.note_idle_exits(&msgs);
        for m in msgs.drain(..) {
            self.on_runner_msg(m);
        }
        self.msg_buf = msgs;
        if !armed && !self.runner_dead {
            self.post_ctl_recv();
        }
    }

    /// Records the exits among `msgs` of workers that are idle to the shard, then
    /// drains the commands once: a caller may have handed such a worker a request.
    /// The exits are recorded first, so that what those commands do (typically: the
    /// caller read the response, the slot is released) knows each worker is gone:
    /// no `shutdown` to tell it end-of-file, no `Kill` order, and its record is freed
    /// at once (then nothing is left for `on_worker_exit`). All of a batch's exits
    /// (`Config::exit_report_batch`) are recorded before that one drain.
    pub(super) fn note_idle_exits(&mut self, msgs: &[runner_to_host::Msg]) {
        let mut any = false;
        for msg in msgs {
            if let runner_to_host::Msg::Exited(e) = msg {
                any |= self.note_exit(e.worker_id, e.wait_status);
            }
        }
        if any {
            self.drain_commands();
        }
    }

    /// Worker `worker_id` was reaped: its shared-memory region may be wiped and
    /// reused (its PID namespace is gone too). If it is idle to the shard, its exit
    /// is recorded and true returned: the commands must be drained next (see
    /// `note_idle_exits`, which calls this for every exit a report carries, before
    /// `on_runner_msg` handles it).
    pub(super) fn note_exit(&mut self, worker_id: u64, status: i32) -> bool {
        let Some(&key) = self.by_worker_id.get(&worker_id) else { return false };
        let Some(w) = self.worker(key) else { return false };
        if let Some((region, _)) = w.shm.as_ref() {
            region.mark_reaped();
        }
        if w.state != WState::Idle {
            return false;
        }
        w.exited = Some(status);
        true
    }

    pub(super) fn on_runner_msg(&mut self, msg: runner_to_host::Msg) {
        match msg {
            runner_to_host::Msg::Exited(e) => {
                let Some(&key) = self.by_worker_id.get(&e.worker_id) else { return };
                // `note_idle_exits` recorded this exit (and marked a shared-memory
                // region reaped) before its drain. Idle still: a caller may have
                // claimed it since; know that first.
                if self.worker(key).is_some_and(|w| w.state == WState::Idle) {
                    self.drain_commands();
                }
                if self.by_worker_id.get(&e.worker_id) == Some(&key) {
                    self.on_worker_exit(key, e.wait_status, None);
                }
            }
            runner_to_host::Msg::SpawnFailed(f) => {
                if let Some(&key) = self.by_worker_id.get(&f.worker_id) {
                    self.on_worker_exit(key, 0, Some(f.error));
                }
            }
            runner_to_host::Msg::Channels(channels) => self.on_channels(channels),
            runner_to_host::Msg::Started(_) | runner_to_host::Msg::StartFailed(_) => {}
        }
    }

    pub(super) fn on_worker_exit(&mut self, key: u32, status: i32, spawn_error: Option<String>) {
        let Some(w) = self.worker(key) else { return };
        w.exited = Some(status);
        if w.state == WState::Busy && w.inflight > 0 && spawn_error.is_none() {
            // The exit report overtook the channel's last completion (response or
            // EOF): that completion finishes the execution.
            return;
        }
        if w.state == WState::Busy && spawn_error.is_none() {
            if let Some(id) = w.exec {
                if self.exit_before_read(id, key) {
                    return;
                }
            }
        }
        let Some(w) = self.worker(key) else { return };
        let (state, token, exec, failure) = (w.state, w.token, w.exec, w.failure.take());
        // Bound to its execution while starting and gone before its ready byte.
        let unstarted = w.ready_pending;
        // Killed at the grace (which left it Finished): judged as what it was then.
        let state = match w.killed_from {
            Some(from @ (WState::Spawning | WState::Idle)) => from,
            _ => state,
        };
        // Our kill at the grace ended it, not a cause of its own.
        let lingered = w.killed_from.is_some() && libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGKILL;
        // Built only where it is reported (not for a worker that answered and exited).
        let how = || match &spawn_error {
            Some(e) => format!("could not be started: {e}"),
            None => describe_status(status),
        };
        let killed_lingering = || format!("a worker of code-{token} {}; it was killed", lingered_before_request());
        match state {
            WState::Busy | WState::Finished if unstarted && exec.is_some() => {
                // A failed start (back-off), which costs the execution bound to the
                // worker (early dispatch), not another queued one.
                let why = if lingered {
                    killed_lingering()
                } else {
                    let detail = failure.map(|f| format!(" ({f})")).unwrap_or_default();
                    format!("a worker of code-{token} exited before signalling readiness{detail}: it {}", how())
                };
                self.back_off(token);
                if let Some(id) = exec {
                    self.complete(id, Err(Error::Unavailable(why)));
                }
                self.close_channel(key);
            }
            WState::Spawning | WState::Idle if lingered => {
                self.note_failure(token, &killed_lingering());
                self.close_channel(key);
            }
            WState::Spawning => {
                self.note_failure(token, &format!("a worker of code-{token} exited before signalling readiness: it {}", how()));
                self.close_channel(key);
            }
            WState::Idle => {
                // Offered unconfirmed: did it ever write its ready byte?
                let started = self.worker(key).is_some_and(|w| {
                    !w.unconfirmed || w.fd.as_ref().is_some_and(|fd| crate::ring::take_ready_byte(fd))
                });
                let why = if started {
                    format!("an idle worker of code-{token} exited: it {}", how())
                } else {
                    format!("a worker of code-{token} exited before signalling readiness: it {}", how())
                };
                self.note_failure(token, &why);
                self.close_channel(key);
            }
            WState::Busy | WState::Finished => {
                if let Some(id) = exec {
                    let has_response = self.execs.get(&id).is_some_and(|e| e.response.is_some());
                    if has_response {
                        self.finish_with_logs(id, key);
                    } else {
                        let detail = failure.map(|f| format!(" ({f})")).unwrap_or_default();
                        let why = if lingered {
                            format!(
                                "the UDF closed its channel before sending a complete response{detail} and had not exited {} ms later; it was killed",
                                EXIT_GRACE.as_millis()
                            )
                        } else {
                            format!("the UDF {} before sending a complete response{detail}", how())
                        };
                        self.complete(id, Err(Error::Unavailable(why)));
                    }
                }
                self.close_channel(key);
            }
        }
        self.maybe_free(key);
    }
}

//! Commands from callers (`Cmd`): load, execute, cancel, delete, reconnect.

use super::*;

impl Reactor {
    pub(super) fn handle_cmd(&mut self, cmd: Cmd) {
        match cmd {
            Cmd::Load(entry) => self.load(entry),
            Cmd::Execute(req) => self.execute(req),
            Cmd::Cancel(id) => self.cancel(id),
            Cmd::Delete(token) => self.delete(token),
            Cmd::HostReply { exec, worker_id, call_id, result } => self.on_host_reply(exec, worker_id, call_id, result),
            Cmd::HandOverShort { exec, key, gen, written, error } => self.on_hand_over_short(exec, key, gen, written, error),
            Cmd::TakeOver { exec } => self.on_take_over(exec),
            Cmd::CallerDone { exec, fd } => self.on_caller_done(exec, fd),
            Cmd::RunnerDown { epoch } => {
                if epoch == self.epoch {
                    self.runner_gone("the sandbox died");
                }
            }
            Cmd::Reconnect { epoch, ctl, runner } => self.pending_reconnect = Some((epoch, ctl, runner)),
            Cmd::RunnerFatal(why) => {
                self.runner_fatal = Some(why.clone());
                self.runner_dead = true;
                self.shared.runner_dead.store(true, Ordering::Release);
                self.fail_everything(&why);
            }
            Cmd::Shutdown => self.shutting_down = true,
            #[cfg(feature = "fault-injection")]
            Cmd::InjectPanic => panic!("injected by Engine::inject_engine_panic"),
        }
    }

    pub(super) fn load(&mut self, entry: Arc<TokenEntry>) {
        let slots = entry.per_shard[self.config.index].slots;
        self.slots += slots;
        let id = entry.id;
        if !self.runner_dead {
            self.send_load(&entry);
        }
        self.tokens.insert(
            id,
            TokenState {
                entry,
                slots,
                live: 0,
                idle: VecDeque::new(),
                queue: VecDeque::new(),
                noted: 0,
                failures: 0,
                respawn_at: None,
                lazy_paused_until: None,
            },
        );
        self.fill_slots(id);
    }

    pub(super) fn send_load(&mut self, entry: &TokenEntry) {
        match entry.binary.try_clone() {
            Ok(fd) => self.ctl_out.push(host_to_runner::Msg::Load(Load { code_id: entry.id, zygote: entry.zygote }), vec![fd]),
            Err(e) => tracing::error!(error = %e, "cannot duplicate a binary fd"),
        }
    }

    /// Starts over with a restarted sandbox: every token is loaded again and its
    /// slots filled; queued executions are served as workers become ready.
    pub(super) fn reconnect(&mut self, epoch: u64, ctl: OwnedFd, runner: Option<Arc<OwnedFd>>) {
        if self.runner_fatal.is_some() {
            return;
        }
        self.ctl = ctl;
        self.epoch = epoch;
        self.ctl_out = CtlOut::default();
        self.ctl_decoder = frame::Decoder::default();
        self.runner_dead = false;
        self.post_ctl_recv();
        // Channels of the old runner lead nowhere; the new one makes a first batch
        // (queued on the fresh control queue, before the loads and spawns below).
        self.runner = runner;
        self.channel_stock.clear();
        self.channels_requested = None;
        self.request_channels(true);
        let entries: Vec<Arc<TokenEntry>> = self.tokens.values().map(|t| t.entry.clone()).collect();
        for entry in entries {
            self.send_load(&entry);
            if let Some(t) = self.tokens.get_mut(&entry.id) {
                t.failures = 0;
                t.respawn_at = None;
            }
            self.fill_slots(entry.id);
        }
        tracing::info!(shard = self.config.index, epoch, "reconnected to the restarted sandbox");
    }

    pub(super) fn execute(&mut self, req: ExecRequest) {
        let ExecRequest { id, token, metadata, mut frame, worker_wait_timeout, timeout, sink, submitted, handoff, claim } = req;
        // Tests only: a bug that strikes while this thread holds the execution's sink
        // outside any table.
        #[cfg(feature = "fault-injection")]
        if metadata.get(crate::engine::FAULT_KEY).map(String::as_str) == Some("panic-in-execute") {
            panic!("injected while handling execution {id}");
        }
        if let Some(why) = &self.runner_fatal {
            answer_unqueued(sink, handoff.as_deref(), Err(Error::Unavailable(why.clone())));
            return;
        }
        if !self.tokens.contains_key(&token) {
            answer_unqueued(sink, handoff.as_deref(), Err(Error::NotFound(format!("code token code-{token} was deleted"))));
            return;
        }
        // An unconfirmed worker whose ready byte the caller did not find: the request
        // was not written; wait for the byte, and run the execution like any other.
        let claim = match claim {
            Some(c) if c.readiness == Readiness::NotYet => {
                let offered = self
                    .worker(c.key)
                    .is_some_and(|w| w.gen == c.gen && w.state == WState::Idle && w.unconfirmed && w.exec.is_none());
                if offered {
                    self.await_ready_byte(c.key);
                }
                if let Some(t) = self.tokens.get_mut(&token) {
                    t.lazy_paused_until = Some(Instant::now() + LAZY_PAUSE);
                }
                None
            }
            other => other,
        };
        let mut placed = None;
        let mut claimed_key = None;
        let mut handed = None;
        let mut handed_frame = None;
        if let Some(claim) = claim {
            let still_ready =
                self.worker(claim.key).is_some_and(|w| w.gen == claim.gen && w.state == WState::Idle && w.exec.is_none());
            if still_ready {
                if claim.readiness == Readiness::Caller {
                    self.started(claim.key);
                }
                claimed_key = Some(claim.key);
                placed = claim.region.as_ref().map(|_| (claim.len, claim.at));
                handed = claim.handed.then_some(claim.at);
                handed_frame = claim.frame;
            } else if claim.handed {
                // The worker was lost after the caller claimed it. The caller may have
                // written the request already, and the worker may have read it: never
                // run it a second time.
                answer_unqueued(
                    sink,
                    handoff.as_deref(),
                    Err(Error::Unavailable(
                        "the worker this request was handed to was lost before it answered (it crashed, was killed, or the sandbox died)".into(),
                    )),
                );
                return;
            } else {
                // A shared-memory claim the shard was to ring the doorbell for: the
                // worker never got the request. Take it back out of the region (a
                // worker still dying could scribble on it first; it is a worker of the
                // same code token, which could do no worse to the request it was meant
                // to get) and wait for another worker.
                let recovered = match &claim.region {
                    Some(region) => region.region().copy_request(claim.len),
                    None => Err(std::io::Error::other("no shared-memory region")),
                };
                match recovered {
                    Ok(body) => {
                        frame = Vec::with_capacity(body.len() + 10);
                        prost::encoding::encode_varint(body.len() as u64, &mut frame);
                        frame.extend_from_slice(&body);
                    }
                    Err(e) => {
                        sink.complete(Err(Error::Unavailable(format!(
                            "the worker claimed for this request was lost and the request cannot be recovered: {e}"
                        ))));
                        return;
                    }
                }
            }
        }
        let deadline = crate::ring::deadline_after(submitted, worker_wait_timeout);
        self.execs.insert(
            id,
            ExecState {
                token,
                frame,
                written: 0,
                sink: Some(sink),
                submitted,
                worker_wait_deadline: deadline,
                timeout,
                dispatched: None,
                sent: None,
                worker: None,
                idle_left: 0,
                metadata,
                response: None,
                placed,
                handed,
                handed_frame,
                handoff: handoff.map(|h| (h, None)),
                engine_reads: false,
                written_before_ready: false,
            },
        );
        if let Some(key) = claimed_key {
            // Out of the shard's pool (the caller already took it out of the offer).
            if let Some(t) = self.tokens.get_mut(&token) {
                t.idle.retain(|k| *k != key);
            }
            self.dispatch(id, key);
            return;
        }
        let key = self.take_idle(token);
        if let Some(t) = self.tokens.get_mut(&token) {
            if key.is_none() {
                t.queue.push_back(id);
            }
            // Also when a worker took it: the caller counted it as queued.
            t.note_queue(self.config.index, &mut self.queued);
        }
        match key {
            Some(key) => self.dispatch(id, key),
            None => self.timers.push(deadline, worker_wait_timeout, Timer::WorkerWait(id)),
        }
    }

    /// Takes a ready worker of `token` for the shard's own use: the longest-ready one
    /// no caller has claimed (a claimed one's execution is on its way here). With
    /// none whose ready byte was read, the oldest unconfirmed one is taken back
    /// and its byte taken here; if it is not there yet, the worker gets a receive
    /// for it and `None` is returned (the execution queues for it).
    pub(super) fn take_idle(&mut self, token: u64) -> Option<u32> {
        let index = self.config.index;
        let t = self.tokens.get_mut(&token)?;
        let ready = &t.entry.per_shard[index].ready;
        let mut i = 0;
        while let Some(&key) = t.idle.get(i) {
            let Some(w) = self.workers.get(key as usize).and_then(|w| w.as_ref()) else {
                t.idle.remove(i);
                continue;
            };
            if w.unconfirmed {
                // Left in place unless no confirmed worker is found.
                i += 1;
                continue;
            }
            t.idle.remove(i);
            if ready.withdraw(key, w.gen) {
                return Some(key);
            }
        }
        // The oldest unconfirmed worker no caller has claimed (a claimed one leaves
        // the pool: its execution settles it).
        let taken = loop {
            let &key = t.idle.front()?;
            t.idle.pop_front();
            let Some(w) = self.workers.get(key as usize).and_then(|w| w.as_ref()) else { continue };
            if ready.withdraw(key, w.gen) {
                break (key, w.fd.clone());
            }
        };
        let (key, fd) = taken;
        if fd.is_some_and(|fd| crate::ring::take_ready_byte(&fd)) {
            self.started(key);
            return Some(key);
        }
        self.await_ready_byte(key);
        None
    }

    /// Unconfirmed worker `key`'s ready byte was taken (by a caller or, without
    /// the ring, by the shard): it has started.
    pub(super) fn started(&mut self, key: u32) {
        let Some(w) = self.worker(key) else { return };
        w.unconfirmed = false;
        let token = w.token;
        if let Some(t) = self.tokens.get_mut(&token) {
            t.failures = 0;
            t.respawn_at = None;
        }
    }

    pub(super) fn cancel(&mut self, id: u64) {
        let Some(exec) = self.execs.get(&id) else { return };
        let (token, worker) = (exec.token, exec.worker);
        match worker {
            None => {
                if let Some(t) = self.tokens.get_mut(&token) {
                    t.unqueue(id, self.config.index, &mut self.queued);
                }
            }
            Some(key) => self.kill_worker(key),
        }
        self.complete(id, Err(Error::Cancelled(format!("execution exec-{}-{id} was cancelled", self.config.index))));
    }

    pub(super) fn delete(&mut self, token: u64) {
        let Some(state) = self.tokens.remove(&token) else { return };
        self.slots = self.slots.saturating_sub(state.slots);
        self.queued = self.queued.saturating_sub(state.noted);
        let msg = format!("code token code-{token} was deleted while the execution was pending");
        for id in state.queue {
            self.complete(id, Err(Error::Cancelled(msg.clone())));
        }
        let busy: Vec<u64> = self.execs.iter().filter(|(_, e)| e.token == token).map(|(id, _)| *id).collect();
        for id in busy {
            self.complete(id, Err(Error::Cancelled(msg.clone())));
        }
        if !self.runner_dead {
            self.ctl_out.push(host_to_runner::Msg::Unload(Unload { code_id: token }), Vec::new());
        }
        state.entry.per_shard[self.config.index].idle.store(0, Ordering::Relaxed);
        state.entry.per_shard[self.config.index].ready.clear();
    }
}

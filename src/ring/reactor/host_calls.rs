//! Host API calls from a UDF: running them and writing their replies back, in
//! order, on the worker channel.

use super::*;

impl Reactor {
    /// A host call arrived: run it on the host API pool; the reply comes back as a
    /// command.
    pub(super) fn on_host_call(&mut self, key: u32, call: HostCall) {
        let Some(w) = self.worker(key) else { return };
        // Bound what one UDF can make the host hold: calls running plus replies
        // not yet written.
        w.calls_outstanding += 1;
        if w.calls_outstanding > MAX_CALLS_IN_FLIGHT {
            self.fail_worker(
                key,
                format!("the UDF had more than {MAX_CALLS_IN_FLIGHT} host calls in flight (replies not read); worker killed"),
            );
            return;
        }
        let (worker_id, token) = (w.worker_id, w.token);
        let Some(exec_id) = w.exec else { return };
        let allowed = self.tokens.get(&token).is_some_and(|t| t.entry.host_api);
        if !allowed {
            let reply = HostReply {
                call_id: call.call_id,
                response: Vec::new(),
                error: format!("the host API is not enabled for code token code-{token}; load it with LoadOptions::host_api"),
            };
            self.queue_reply(key, reply);
            return;
        }
        let metadata = self.execs.get(&exec_id).map(|e| e.metadata.clone()).unwrap_or_default();
        let ctx = HostCallContext {
            code_token: CodeToken(token),
            execution: ExecutionToken { shard: self.config.index as u32, id: exec_id },
            metadata,
        };
        let shared = self.shared.clone();
        let call_id = call.call_id;
        self.config.host_api.call(&call.function, ctx, call.request, move |result| {
            shared.push(Cmd::HostReply { exec: exec_id, worker_id, call_id, result });
        });
    }

    pub(super) fn on_host_reply(&mut self, exec: u64, worker_id: u64, call_id: u64, result: crate::host_api::HostResult) {
        let Some(&key) = self.by_worker_id.get(&worker_id) else { return };
        let Some(w) = self.worker(key) else { return };
        if w.exec != Some(exec) || w.state != WState::Busy {
            return; // The execution ended (cancelled, timed out, ...) meanwhile.
        }
        let reply = match result {
            Ok(response) => HostReply { call_id, response, error: String::new() },
            Err(error) => HostReply { call_id, response: Vec::new(), error },
        };
        self.queue_reply(key, reply);
    }

    pub(super) fn queue_reply(&mut self, key: u32, reply: HostReply) {
        let bytes = reply.encode_length_delimited_to_vec();
        let Some(w) = self.worker(key) else { return };
        w.replies.push_back(bytes);
        if w.reply_inflight.is_none() {
            self.post_next_reply(key);
        }
    }

    pub(super) fn post_next_reply(&mut self, key: u32) {
        let Some(w) = self.worker(key) else { return };
        if w.fd.is_none() {
            return;
        }
        if w.reply_inflight.is_none() {
            match w.replies.pop_front() {
                Some(b) => w.reply_inflight = Some((b, 0)),
                None => return,
            }
        }
        let Some((bytes, off)) = w.reply_inflight.as_ref() else { return };
        let (ptr, len) = (bytes[*off..].as_ptr(), (bytes.len() - off).min(u32::MAX as usize) as u32);
        self.post_send(key, K_W_REPLY, ptr, len);
    }

    pub(super) fn on_reply_sent(&mut self, key: u32, res: i32) {
        let Some(w) = self.worker(key) else { return };
        if res < 0 {
            w.failure.get_or_insert_with(|| format!("host reply write failed: {}", std::io::Error::from_raw_os_error(-res)));
            w.reply_inflight = None;
            w.replies.clear();
            return;
        }
        let done = match w.reply_inflight.as_mut() {
            Some((bytes, off)) => {
                *off += res as usize;
                *off >= bytes.len()
            }
            None => return,
        };
        if done {
            w.reply_inflight = None;
            w.calls_outstanding = w.calls_outstanding.saturating_sub(1);
        }
        if w.state == WState::Busy {
            self.post_next_reply(key);
        }
    }
}

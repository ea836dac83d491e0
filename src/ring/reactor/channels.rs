//! Worker channels made by the runner: asking for them, and taking them with
//! `pidfd_getfd` into the shard's stock.

use super::*;

impl Reactor {
    /// Asks the runner for a batch of channels unless one is on its way. Not
    /// `urgent` (the stock is low, not empty): the runner may hold the report back
    /// for up to `Config::exit_report_hold` and send it with its next message,
    /// typically a batch of exit reports, which wakes this thread anyway; in
    /// sequential traffic that spares the wake-up a report of its own cost every
    /// `CHANNEL_BATCH` executions. `urgent` with a report held back: asks for it
    /// now (a `MakeChannels` of 0 sends what waits).
    pub(super) fn request_channels(&mut self, urgent: bool) {
        if self.runner.is_none() || self.runner_dead {
            return;
        }
        let count = match self.channels_requested {
            None => CHANNEL_BATCH,
            Some(false) if urgent => 0,
            Some(_) => return,
        };
        let defer_us = if urgent { 0 } else { u32::try_from(self.config.exit_report_hold.as_micros()).unwrap_or(u32::MAX) };
        self.channels_requested = Some(urgent);
        self.ctl_out.push(host_to_runner::Msg::MakeChannels(MakeChannels { count, defer_us }), Vec::new());
    }

    /// The runner made channels: take each host end from its descriptor table into
    /// the stock. The runner keeps its copy of each until the channel's worker is
    /// reaped, and so closes the socket for good: our close (`close_channel`) is
    /// then only a reference drop on this thread. Channels this shard cannot take
    /// are named unused, for the runner to close. If none could be had, this shard
    /// falls back to making channels itself.
    pub(super) fn on_channels(&mut self, report: Channels) {
        self.channels_requested = None;
        let mut taken = ChannelsTaken::default();
        let mut failure = (!report.error.is_empty()).then(|| format!("the runner could not make channels: {}", report.error));
        for ch in report.channels {
            if self.runner.is_none() {
                taken.unused.push(ch.id);
                continue;
            }
            match self.take_from_runner(ch.fd) {
                Ok(fd) => self.channel_stock.push((ch.id, fd)),
                Err(e) => {
                    taken.unused.push(ch.id);
                    failure = Some(format!("cannot take a channel from the runner (pidfd_getfd): {e}"));
                }
            }
        }
        if !taken.unused.is_empty() {
            self.ctl_out.push(host_to_runner::Msg::ChannelsTaken(taken), Vec::new());
        }
        if let Some(why) = failure {
            if self.channel_stock.is_empty() && self.runner.is_some() {
                tracing::warn!(shard = self.config.index, error = %why, "worker channels are made here and sent with each spawn order from now on");
                self.runner = None;
            }
        }
        // Slots that waited for a channel.
        for token in self.awaiting_channels.drain(..) {
            if !self.refills.contains(&token) {
                self.refills.push(token);
            }
        }
    }

    /// `pidfd_getfd` of the runner's fd `fd`. What the runner reports is not trusted
    /// blindly, and this needs no check of its own: every use of a channel is a
    /// socket operation (`recv`, `send`, `shutdown`, io_uring `RECV`/`SEND`), which
    /// the kernel refuses on anything but a socket (ENOTSOCK), and that fails the
    /// channel's worker like any broken channel. (An `fstat` here cost each
    /// execution a syscall, about 3 % of the engine thread's CPU in sequential
    /// traffic, and could not tell a worker's socket from any other the runner
    /// holds.)
    pub(super) fn take_from_runner(&self, fd: i32) -> std::io::Result<OwnedFd> {
        let Some(pidfd) = self.runner.as_ref() else {
            return Err(std::io::Error::other("no runner pidfd"));
        };
        // SAFETY: pidfd_getfd with a valid pidfd and no flags returns a fresh fd
        // (close-on-exec) or -1.
        let got = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) } as i32;
        if got < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: a fresh fd owned by us.
        Ok(unsafe { OwnedFd::from_raw_fd(got) })
    }
}

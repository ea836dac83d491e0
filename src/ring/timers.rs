//! A shard's timers: one per execution (its timeout), one per spawn (its start
//! deadline) and a few rarer ones, most of which never matter (the execution ends
//! first) and are simply skipped when they come due.
//!
//! Almost every timer is set a fixed duration after "now" (the execution timeout,
//! `worker_start_timeout`, ...), so the timers of one duration come due in the
//! order they were set. Each such duration gets a FIFO lane: setting and taking a
//! timer is O(1), whatever the number pending. A binary heap of hundreds of
//! thousands of stale timers (30 s of timeouts at thousands of executions per
//! second) cost a cache miss per level on every pop. Timers of other durations,
//! and any that would land out of order in their lane, go to a heap.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::time::{Duration, Instant};

/// Lanes kept at most; a timer of another duration goes to the heap (an empty
/// lane is reused for a new duration first).
const MAX_LANES: usize = 8;

struct Lane<T> {
    after: Duration,
    due: VecDeque<(Instant, T)>,
}

pub(super) struct Timers<T> {
    lanes: Vec<Lane<T>>,
    heap: BinaryHeap<Reverse<(Instant, T)>>,
}

impl<T: Ord + Copy> Default for Timers<T> {
    fn default() -> Self {
        Self { lanes: Vec::new(), heap: BinaryHeap::new() }
    }
}

impl<T: Ord + Copy> Timers<T> {
    /// Sets `timer` for `at`, which is `after` past some recent instant: it joins
    /// that duration's lane if it comes due no earlier than the lane's last timer.
    pub fn push(&mut self, at: Instant, after: Duration, timer: T) {
        let lane = match self.lanes.iter().position(|l| l.after == after) {
            Some(i) => Some(i),
            None => match self.lanes.iter().position(|l| l.due.is_empty()) {
                Some(i) => {
                    self.lanes[i].after = after;
                    Some(i)
                }
                None if self.lanes.len() < MAX_LANES => {
                    self.lanes.push(Lane { after, due: VecDeque::new() });
                    Some(self.lanes.len() - 1)
                }
                None => None,
            },
        };
        if let Some(lane) = lane.map(|i| &mut self.lanes[i]) {
            if lane.due.back().is_none_or(|(last, _)| *last <= at) {
                lane.due.push_back((at, timer));
                return;
            }
        }
        self.heap.push(Reverse((at, timer)));
    }

    /// The earliest timer: when it comes due, and its lane (`None`: the heap).
    fn earliest(&self) -> Option<(Instant, Option<usize>)> {
        let mut best: Option<(Instant, Option<usize>)> = self.heap.peek().map(|Reverse((at, _))| (*at, None));
        for (i, lane) in self.lanes.iter().enumerate() {
            if let Some((at, _)) = lane.due.front() {
                if best.is_none_or(|(b, _)| *at < b) {
                    best = Some((*at, Some(i)));
                }
            }
        }
        best
    }

    /// When the next timer comes due.
    pub fn next_due(&self) -> Option<Instant> {
        self.earliest().map(|(at, _)| at)
    }

    /// Drops the timers at the front of each lane and of the heap that `stale`
    /// says can no longer do anything, so `next_due` is the earliest timer that may.
    /// Each call asks `stale` about every timer it drops plus the live one it stops
    /// at, per lane and for the heap (a handful per call, whatever the number
    /// pending). A timer behind a live one stays until it comes due.
    pub fn drop_stale(&mut self, mut stale: impl FnMut(&T) -> bool) {
        for lane in &mut self.lanes {
            while lane.due.front().is_some_and(|(_, t)| stale(t)) {
                lane.due.pop_front();
            }
        }
        while self.heap.peek().is_some_and(|Reverse((_, t))| stale(t)) {
            self.heap.pop();
        }
    }

    /// Takes the earliest timer due at `now`, if any.
    pub fn pop_due(&mut self, now: Instant) -> Option<T> {
        match self.earliest() {
            Some((at, _)) if at > now => None,
            Some((_, Some(i))) => self.lanes[i].due.pop_front().map(|(_, t)| t),
            Some((_, None)) => self.heap.pop().map(|Reverse((_, t))| t),
            None => None,
        }
    }

    /// Timers pending (due or not).
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.lanes.iter().map(|l| l.due.len()).sum::<usize>() + self.heap.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(t: &mut Timers<u32>, now: Instant) -> Vec<u32> {
        std::iter::from_fn(|| t.pop_due(now)).collect()
    }

    #[test]
    fn timers_come_due_in_time_order_across_lanes_and_heap() {
        let base = Instant::now();
        let ms = Duration::from_millis;
        let mut t = Timers::default();
        // Two lanes, interleaved.
        t.push(base + ms(30), ms(30), 1);
        t.push(base + ms(10), ms(10), 2);
        t.push(base + ms(31), ms(30), 3);
        t.push(base + ms(12), ms(10), 4);
        // Out of order for its lane: goes to the heap, still comes due in order.
        t.push(base + ms(5), ms(30), 5);
        assert_eq!(t.next_due(), Some(base + ms(5)));
        assert_eq!(t.len(), 5);
        // Nothing is due before its time.
        assert_eq!(drain(&mut t, base + ms(4)), Vec::<u32>::new());
        assert_eq!(drain(&mut t, base + ms(12)), vec![5, 2, 4]);
        assert_eq!(t.next_due(), Some(base + ms(30)));
        assert_eq!(drain(&mut t, base + ms(100)), vec![1, 3]);
        assert_eq!(t.next_due(), None);
        assert_eq!(t.len(), 0);
    }

    #[test]
    fn timers_come_due_exactly_as_from_one_heap() {
        // Pseudo-random pushes (a few common durations, some rare ones, bases that
        // drift back and forth) interleaved with pops, against a plain heap.
        let base = Instant::now();
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut t = Timers::default();
        let mut heap = BinaryHeap::new();
        let mut now = base;
        for i in 0..20_000u32 {
            let r = next();
            if r % 3 == 0 {
                let after = Duration::from_micros(match r % 7 {
                    0..=3 => [500, 10_000, 30_000, 1_000][(r >> 8) as usize % 4],
                    _ => r >> 40,
                });
                let from = now - Duration::from_micros((r >> 20) % 300).min(now - base);
                t.push(from + after, after, i);
                heap.push(Reverse((from + after, i)));
            } else {
                now += Duration::from_micros((r >> 32) % 400);
                let mut want = Vec::new();
                while heap.peek().is_some_and(|Reverse((at, _))| *at <= now) {
                    want.push(heap.pop().unwrap().0);
                }
                let mut got = Vec::new();
                while let Some(id) = t.pop_due(now) {
                    got.push(id);
                }
                // Equal instants may come in either order: compare the instants, and
                // the set of timers.
                let mut want_ids: Vec<u32> = want.iter().map(|(_, id)| *id).collect();
                want_ids.sort_unstable();
                let mut got_sorted = got.clone();
                got_sorted.sort_unstable();
                assert_eq!(got_sorted, want_ids, "at step {i}");
                assert_eq!(t.next_due(), heap.peek().map(|Reverse((at, _))| *at), "at step {i}");
            }
        }
        assert_eq!(t.len(), heap.len());
    }

    #[test]
    fn stale_timers_at_the_fronts_are_dropped_and_live_ones_kept() {
        let base = Instant::now();
        let ms = Duration::from_millis;
        let mut t = Timers::default();
        // A lane: stale 1, 2, live 3, stale 4. The heap (out of order): stale 5, live 6.
        for (at, id) in [(10, 1), (11, 2), (12, 3), (13, 4)] {
            t.push(base + ms(at), ms(10), id);
        }
        t.push(base + ms(5), ms(10), 5);
        t.push(base + ms(6), ms(10), 6);
        assert_eq!(t.heap.len(), 2);
        let live = [3, 6];
        t.drop_stale(|id| !live.contains(id));
        // 1, 2 and 5 are gone; 4 stays behind the live 3 until it comes due.
        assert_eq!(t.len(), 3);
        assert_eq!(t.next_due(), Some(base + ms(6)));
        assert_eq!(drain(&mut t, base + ms(100)), vec![6, 3, 4]);
        // Everything stale: nothing is due any more.
        t.push(base + ms(20), ms(10), 7);
        t.drop_stale(|_| true);
        assert_eq!(t.next_due(), None);
    }

    #[test]
    fn durations_beyond_the_lanes_go_to_the_heap_and_empty_lanes_are_reused() {
        let base = Instant::now();
        let ms = Duration::from_millis;
        let mut t = Timers::default();
        for i in 0..(MAX_LANES as u32 + 3) {
            let d = ms(u64::from(100 - i));
            t.push(base + d, d, i);
        }
        assert_eq!(t.lanes.len(), MAX_LANES);
        assert_eq!(t.heap.len(), 3);
        // Latest duration first in time: the last pushed.
        let order = drain(&mut t, base + ms(1000));
        let want: Vec<u32> = (0..(MAX_LANES as u32 + 3)).rev().collect();
        assert_eq!(order, want);
        // Every lane is empty now: a new duration takes one, not the heap.
        t.push(base + ms(7), ms(7), 42);
        assert_eq!(t.heap.len(), 0);
        assert_eq!(t.lanes.len(), MAX_LANES);
        assert_eq!(drain(&mut t, base + ms(7)), vec![42]);
    }
}

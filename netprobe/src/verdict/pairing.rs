//! DNS pairing in amortised O(1) per datagram. Every UDP/53 datagram of every interface feeds
//! the always-on engine, and a client (or a spoofed flood) picks the addresses, ports and ids:
//! nothing here scans what the engine holds. Deadlines are queues in time order, popped from
//! the front; an exchange taken before its deadline leaves a stale entry that is skipped when
//! popped (its start no longer matches), and a queue holding mostly stale entries is compacted,
//! which amortises over the pushes that made it grow. Open and decided exchanges are capped
//! ([`MAX_OPEN`], [`MAX_DONE`]); what a cap lets go of is counted in `stats.dns`.

use std::{collections::VecDeque, net::IpAddr};

use super::{
    Attempt, Engine, Key, MAX_DONE, MAX_EVENTS_DNS, MAX_OPEN, SETTLE_NS, Verdict, keep_event, udp,
};
use crate::events::Event;

/// How long a decided exchange is remembered, so that its late evidence (a retry's drop, a
/// late reply) opens nothing.
pub const DONE_KEEP_UDP_NS: u64 = 6 * udp::UDP_TIMEOUT_NS;

/// A deadline queue is compacted when it holds this many times [`MAX_OPEN`] entries.
const COMPACT_AT: usize = 4 * MAX_OPEN;

/// The exchanges of one client address and port.
#[derive(Debug, Default)]
pub(super) struct PortIndex {
    /// Open exchanges, oldest first; entries of taken ones are dropped lazily.
    open: Vec<Key>,
    /// Open exchanges (the live entries of `open`).
    live: u32,
    /// Decided exchanges still remembered.
    done: u32,
}

impl Engine {
    /// A UDP event joins the exchange of its client port and DNS id; one without a DNS message
    /// (a drop, a rule, an ICMP error) joins the latest open exchange of its client port.
    pub(super) fn push_udp(&mut self, e: Event, now: u64) -> Vec<Verdict> {
        let Some((addr, port)) = udp::client_of(&e, self.ctx.port) else {
            return self.poll(now);
        };
        let key = match e.dns.as_ref() {
            Some(d) => Some((addr, port, Some(d.id))),
            // Late evidence of a decided exchange (a retry's drop) is not a new one.
            None => self
                .latest_open(addr, port)
                .or_else(|| (!self.port_has_done(addr, port)).then_some((addr, port, None))),
        };
        let Some(key) = key.filter(|k| !self.done.contains_key(k)) else {
            return self.poll(now);
        };
        self.adopt_unnamed(key);
        let mut out = self.make_room_udp(key, now);
        let terminal = udp::terminal(&e, (addr, port));
        if !self.attempts.contains_key(&key) {
            self.index_open(key);
        }
        let held = self.held;
        let a = self.attempt(key, now);
        let kept = keep_event(a, &e, terminal, held, MAX_EVENTS_DNS);
        if kept {
            a.events.push(e);
        }
        let newly_terminal = terminal && a.terminal_at.is_none();
        if newly_terminal {
            a.terminal_at = Some(now);
            self.settling.push_back((now, key));
        }
        self.count_kept(kept);
        self.compact_queues();
        out.extend(self.poll_udp(now));
        out
    }

    /// The latest open exchange of a client port; entries of taken ones are dropped on the way.
    fn latest_open(&mut self, addr: IpAddr, port: u16) -> Option<Key> {
        let index = self.by_port.get_mut(&(addr, port))?;
        while let Some(k) = index.open.last() {
            self.visited += 1;
            if self.attempts.contains_key(k) {
                return Some(*k);
            }
            index.open.pop();
        }
        None
    }

    fn port_has_done(&self, addr: IpAddr, port: u16) -> bool {
        self.by_port.get(&(addr, port)).is_some_and(|i| i.done > 0)
    }

    /// The rule trace arrives over netlink and the datagram over the ring buffer, in either
    /// order: evidence that came before the first DNS message of its client port opened an
    /// exchange without an id. That exchange is this one. Its queue entries are pushed again
    /// under the new key (a little out of order: they are due a few ms late at worst).
    fn adopt_unnamed(&mut self, key: Key) {
        if key.2.is_none() || self.attempts.contains_key(&key) {
            return;
        }
        let unnamed = (key.0, key.1, None);
        let Some(a) = self.attempts.remove(&unnamed) else {
            return;
        };
        self.order.push_back((a.started_at, key));
        if let Some(t) = a.terminal_at {
            self.settling.push_back((t, key));
        }
        self.attempts.insert(key, a);
        if let Some(index) = self.by_port.get_mut(&(key.0, key.1)) {
            self.visited += index.open.len() as u64;
            for k in index.open.iter_mut().filter(|k| **k == unnamed) {
                *k = key;
            }
        }
    }

    /// A new exchange beyond [`MAX_OPEN`]: the oldest one with a result is judged now (counted
    /// `judged_early`); without one, the oldest unanswered query is forgotten without a verdict
    /// (counted `dropped`): judged before its timeout it would be called unanswered while its
    /// reply may still come.
    fn make_room_udp(&mut self, key: Key, now: u64) -> Vec<Verdict> {
        if self.attempts.len() < MAX_OPEN || self.attempts.contains_key(&key) {
            return Vec::new();
        }
        while let Some((t, k)) = self.settling.pop_front() {
            self.visited += 1;
            if self.is_settling(t, &k) {
                self.stats.dns.judged_early += 1;
                return self.take(k, now).into_iter().collect();
            }
        }
        while let Some((started, k)) = self.order.pop_front() {
            self.visited += 1;
            if self.is_open_since(started, &k) {
                self.stats.dns.dropped += 1;
                self.forget_open(k, now);
                return Vec::new();
            }
        }
        Vec::new()
    }

    fn is_open_since(&self, started: u64, k: &Key) -> bool {
        self.attempts
            .get(k)
            .is_some_and(|a| a.started_at == started)
    }

    fn is_settling(&self, t: u64, k: &Key) -> bool {
        self.attempts
            .get(k)
            .is_some_and(|a| a.terminal_at == Some(t))
    }

    /// Exchanges whose result has settled, and queries left unanswered for
    /// [`udp::UDP_TIMEOUT_NS`]; decided exchanges older than [`DONE_KEEP_UDP_NS`] are forgotten.
    pub(super) fn poll_udp(&mut self, now: u64) -> Vec<Verdict> {
        let mut due = Vec::new();
        while let Some(&(t, k)) = self.settling.front() {
            if now < t.saturating_add(SETTLE_NS) {
                break;
            }
            self.settling.pop_front();
            self.visited += 1;
            if self.is_settling(t, &k) {
                due.push(k);
            }
        }
        while let Some(&(started, k)) = self.order.front() {
            if now < started.saturating_add(udp::UDP_TIMEOUT_NS) {
                break;
            }
            self.order.pop_front();
            self.visited += 1;
            // One with a result is taken from `settling`, after its settle time.
            if self.is_open_since(started, &k) && self.attempts[&k].terminal_at.is_none() {
                due.push(k);
            }
        }
        self.forget_done(now);
        due.into_iter().filter_map(|k| self.take(k, now)).collect()
    }

    /// Removes an open attempt and remembers it decided at `now` (DNS: in the port index and
    /// the queue of decided ones too, forgetting the oldest beyond [`MAX_DONE`]).
    pub(super) fn forget_open(&mut self, key: Key, now: u64) -> Option<Attempt> {
        let a = self.attempts.remove(&key)?;
        self.held -= a.events.len();
        self.done.insert(key, now);
        if self.ctx.udp {
            let index = self.by_port.entry((key.0, key.1)).or_default();
            index.live = index.live.saturating_sub(1);
            if index.live == 0 {
                index.open = Vec::new();
            }
            index.done += 1;
            self.done_order.push_back((now, key));
            while self.done.len() > MAX_DONE {
                self.stats.dns.forgotten_early += 1;
                self.forget_oldest_done();
            }
        }
        Some(a)
    }

    fn index_open(&mut self, key: Key) {
        let index = self.by_port.entry((key.0, key.1)).or_default();
        index.open.push(key);
        index.live += 1;
        // Entries of taken exchanges below the latest open one: dropped once they are half.
        if index.open.len() >= 2 * index.live as usize + 8 {
            self.visited += index.open.len() as u64;
            let attempts = &self.attempts;
            index.open.retain(|k| *k == key || attempts.contains_key(k));
        }
    }

    /// Decided exchanges older than [`DONE_KEEP_UDP_NS`] are forgotten.
    fn forget_done(&mut self, now: u64) {
        while let Some(&(t, _)) = self.done_order.front() {
            if now < t.saturating_add(DONE_KEEP_UDP_NS) {
                break;
            }
            self.forget_oldest_done();
        }
    }

    fn forget_oldest_done(&mut self) {
        let Some((t, k)) = self.done_order.pop_front() else {
            return;
        };
        self.visited += 1;
        if self.done.get(&k) != Some(&t) {
            return;
        }
        self.done.remove(&k);
        let port = (k.0, k.1);
        if let Some(index) = self.by_port.get_mut(&port) {
            index.done = index.done.saturating_sub(1);
            if index.done == 0 && index.live == 0 {
                self.by_port.remove(&port);
            }
        }
    }

    /// A deadline queue mostly made of stale entries (exchanges answered long before their
    /// timeout) is compacted: it holds at most [`COMPACT_AT`] entries, and compacting it costs
    /// no more than the pushes since the last time.
    fn compact_queues(&mut self) {
        if self.order.len() >= COMPACT_AT {
            self.visited += self.order.len() as u64;
            let attempts = &self.attempts;
            retain_live(&mut self.order, |(s, k)| {
                attempts.get(k).is_some_and(|a| a.started_at == *s)
            });
        }
        if self.settling.len() >= COMPACT_AT {
            self.visited += self.settling.len() as u64;
            let attempts = &self.attempts;
            retain_live(&mut self.settling, |(t, k)| {
                attempts.get(k).is_some_and(|a| a.terminal_at == Some(*t))
            });
        }
    }
}

fn retain_live(q: &mut VecDeque<(u64, Key)>, live: impl Fn(&(u64, Key)) -> bool) {
    q.retain(|e| live(e));
    q.shrink_to(COMPACT_AT);
}

#[cfg(test)]
#[path = "pairing_tests.rs"]
mod tests;

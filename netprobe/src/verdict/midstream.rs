//! The always-on agent's connections after the handshake, from failure signals alone: it sees
//! no healthy connection (no SYN, no state change, no data segment), so a connection is
//! followed only from its first sign of trouble — a segment dropped by a rule or as too big
//! for the path, the ICMP "fragmentation needed" about it, a reset that answers no SYN, a data
//! retransmit after a retransmission timeout, the application's ECONNRESET or ETIMEDOUT — and
//! judged by the same logic as `trace`'s followed connections ([`super::established`]).
//! A healthy transfer opens nothing and costs nothing.

use std::{collections::HashMap, net::IpAddr};

use super::{Endpoint, Engine, Key, Outcome, Verdict, established, established::Established};
use crate::{
    events::{Event, Kind},
    model::{Protocol, TcpFlag, drop_reason},
};

/// Connections followed at once; beyond it the one with the oldest news is judged with what it
/// has (or let go when it has no drop), counted in `EngineStats::tcp.followed_evicted`. Each
/// holds up to 128 events: 128 connections hold about what [`super::MAX_HELD`] does.
pub const MAX_FOLLOWED: usize = 128;
/// A followed connection without news for this long is let go without a verdict: nothing ended
/// it and no drop persisted (a retransmission timeout that recovered, a stray segment a rule
/// dropped).
pub const QUIET_NS: u64 = 5_000_000_000;
/// The connection's segments dropped this often by a rule on this node — a burst, or a segment
/// and its retransmit — is a drop that persists: judged at once. One alone (a late segment
/// conntrack calls INVALID) is no news.
const PERSISTENT_DROPS: u32 = 2;
/// Segments still too big for the path this long after the first: the sender did not learn the
/// path MTU (path MTU discovery takes one round trip when the ICMP gets through).
const STILL_TOO_BIG_NS: u64 = 1_000_000_000;
/// How often followed connections are looked at for quiet ones.
const SCAN_EVERY_NS: u64 = 1_000_000_000;
/// Errors an application gets on an established connection.
const ESTABLISHED_ERRORS: &[&str] = &["ECONNRESET", "ETIMEDOUT", "EPIPE"];
/// Drop reasons that open a followed connection: a rule, the path's MTU.
const OPENING_DROPS: &[&str] = &[drop_reason::NETFILTER_DROP, drop_reason::PKT_TOO_BIG];

/// What is kept besides the events of a followed connection.
#[derive(Debug, Default)]
struct News {
    /// Caller's clock at its latest event.
    last_at: u64,
    /// Its segments dropped by a rule.
    rule_drops: u32,
    /// Caller's clock at its first and latest segment dropped as too big for the path.
    too_big: Option<(u64, u64)>,
    /// The ICMP "fragmentation needed" about it was dropped on this node.
    icmp_eaten: bool,
    /// The address the client dialled (a ClusterIP before DNAT), from a drop's conntrack entry.
    dialed: Option<(IpAddr, u16)>,
}

impl News {
    fn note(&mut self, e: &Event, now: u64) {
        self.last_at = now;
        match dropped_for(e) {
            Some(drop_reason::NETFILTER_DROP) => self.rule_drops += 1,
            Some(drop_reason::PKT_TOO_BIG) => {
                let first = self.too_big.map_or(now, |(first, _)| first);
                self.too_big = Some((first, now));
            }
            _ => {}
        }
        self.icmp_eaten |= e.kind == Kind::Drop && established::frag_needed(e);
        if self.dialed.is_none() {
            self.dialed = e.dialed.as_ref().map(|d| (d.dst, d.dport));
        }
    }

    /// A drop on this node that does not go away: by a rule, again; too big for the path with
    /// the ICMP that would fix it eaten here, or still a second later.
    fn persists(&self) -> bool {
        self.rule_drops >= PERSISTENT_DROPS
            || self
                .too_big
                .is_some_and(|(first, last)| self.icmp_eaten || last >= first + STILL_TOO_BIG_NS)
    }
}

/// The agent's followed connections.
#[derive(Default)]
pub(super) struct Midstream {
    conns: Established,
    news: HashMap<Key, News>,
    /// Kernel socket → followed connection: a socket's error report after its reset carries
    /// no usable tuple any more.
    socks: HashMap<String, Key>,
    /// Connections were let go since the sockets were last released.
    let_go: bool,
    scanned_at: u64,
}

impl Midstream {
    fn contains(&self, key: &Key) -> bool {
        self.news.contains_key(key)
    }

    /// The followed connection `e` belongs to, by its socket or its tuple either way.
    fn key_of(&self, e: &Event) -> Option<Key> {
        let by_sock = e.sock.as_ref().and_then(|s| self.socks.get(s)).copied();
        let fwd = (e.src, e.sport, None);
        let rev = (e.dst, e.dport, None);
        by_sock.or_else(|| [fwd, rev].into_iter().find(|k| self.contains(k)))
    }

    /// The sockets of connections no longer followed: those with a verdict (`judged`) are
    /// handed back, the others forgotten.
    fn release_socks(&mut self, judged: &[Key]) -> Vec<(String, Key)> {
        if !std::mem::take(&mut self.let_go) {
            return Vec::new();
        }
        let news = &self.news;
        let (keep, gone): (HashMap<_, _>, HashMap<_, _>) =
            self.socks.drain().partition(|(_, k)| news.contains_key(k));
        self.socks = keep;
        gone.into_iter()
            .filter(|(_, k)| judged.contains(k))
            .collect()
    }

    /// An event of followed connection `key`.
    fn push(&mut self, key: Key, e: Event, now: u64) {
        if let Some(sock) = &e.sock {
            self.socks.insert(sock.clone(), key);
        }
        let n = self.news.entry(key).or_default();
        n.note(&e, now);
        let due = n.persists();
        self.conns.push(key, e, now);
        if due {
            self.conns.mark_due(key, now);
        }
    }

    /// Starts following `key` with `skeleton` (endpoints, no outcome yet); the one with the
    /// oldest news makes room beyond [`MAX_FOLLOWED`] (judged if a drop persisted).
    fn follow(&mut self, key: Key, skeleton: &Verdict, now: u64) -> (Vec<Verdict>, u64) {
        let mut out = Vec::new();
        let mut evicted = 0;
        if self.news.len() >= MAX_FOLLOWED
            && let Some(oldest) = self.oldest()
        {
            evicted += 1;
            out.extend(self.let_go(oldest));
        }
        self.conns.follow(key, skeleton, &[], Vec::new(), now);
        self.news.insert(key, News::default());
        (out, evicted)
    }

    fn oldest(&self) -> Option<Key> {
        self.news
            .iter()
            .min_by_key(|(_, n)| n.last_at)
            .map(|(k, _)| *k)
    }

    /// Judged now if a drop on this node persisted, else forgotten.
    fn let_go(&mut self, key: Key) -> Option<Verdict> {
        let n = self.news.remove(&key)?;
        self.let_go = true;
        if !n.persists() {
            self.conns.forget(&key);
            return None;
        }
        let v = self.conns.take_now(&key);
        v.map(|v| with_dialed(v, n.dialed))
    }

    /// Verdicts that are due; quiet connections judged or let go.
    fn poll(&mut self, now: u64) -> Vec<Verdict> {
        let mut out = Vec::new();
        if now >= self.scanned_at + SCAN_EVERY_NS {
            self.scanned_at = now;
            let quiet: Vec<Key> = self
                .news
                .iter()
                .filter(|(_, n)| now >= n.last_at + QUIET_NS)
                .map(|(k, _)| *k)
                .collect();
            out.extend(quiet.into_iter().filter_map(|k| self.let_go(k)));
        }
        for v in self.conns.poll(now) {
            let key = (v.client.addr, v.client.port, None);
            let dialed = self.news.remove(&key).and_then(|n| n.dialed);
            self.let_go = true;
            out.push(with_dialed(v, dialed));
        }
        out
    }
}

/// The dialled address (a ClusterIP) a drop showed, when the verdict has none.
fn with_dialed(mut v: Verdict, dialed: Option<(IpAddr, u16)>) -> Verdict {
    if v.dialed.is_none()
        && let Some((addr, port)) = dialed.filter(|d| *d != (v.server.addr, v.server.port))
    {
        v.dialed = Some(Endpoint::at(addr, port));
    }
    v
}

/// Why the connection's own segment was dropped, when a rule or the path's MTU did it.
fn dropped_for(e: &Event) -> Option<&'static str> {
    if e.kind != Kind::Drop || e.protocol.is_icmp() {
        return None;
    }
    let reason = established::loss(e)?.reason.as_str();
    OPENING_DROPS.iter().copied().find(|r| *r == reason)
}

/// Is `e` a sign that an established connection is in trouble (never one of a healthy
/// connection, nor one of a connection attempt)?
fn opens(e: &Event) -> bool {
    let (syn, ack, rst) = (
        e.has_flag(TcpFlag::Syn),
        e.has_flag(TcpFlag::Ack),
        e.has_flag(TcpFlag::Rst),
    );
    match e.kind {
        Kind::Drop => {
            established::frag_needed(e)
                || (e.protocol == Protocol::Tcp
                    && !syn
                    && established::loss(e)
                        .is_some_and(|d| OPENING_DROPS.contains(&d.reason.as_str())))
        }
        // The kernel reports a retransmit's flags only for a SYN.
        Kind::Retransmit => e.protocol == Protocol::Tcp && e.tcp_flags.is_empty(),
        // A reset answering a SYN acknowledges it from sequence 0; one of an established
        // connection carries the sequence the other side expects.
        Kind::Packet => established::frag_needed(e) || (rst && !syn && !(ack && e.seq == Some(0))),
        Kind::SendReset => !syn && e.protocol == Protocol::Tcp,
        Kind::SocketError => e
            .error
            .as_ref()
            .is_some_and(|x| ESTABLISHED_ERRORS.contains(&x.name.as_str())),
        _ => false,
    }
}

/// The client of a connection seen mid-stream: the side with the higher port (Linux picks
/// client ports from 32768 up; servers listen on lower ones, NodePorts included).
fn client_of(e: &Event) -> Option<((IpAddr, u16), (IpAddr, u16))> {
    if e.sport == 0 || e.dport == 0 {
        // A socket already closed: no tuple to follow it by.
        return None;
    }
    Some(if e.sport >= e.dport {
        ((e.src, e.sport), (e.dst, e.dport))
    } else {
        ((e.dst, e.dport), (e.src, e.sport))
    })
}

impl Engine {
    /// The always-on engine follows connections past their handshake from failure signals
    /// (see the module); `trace` follows them from their handshake instead.
    pub fn judge_midstream(mut self) -> Self {
        if !self.ctx.udp {
            self.midstream = Some(Midstream::default());
        }
        self
    }

    /// The followed connection `e` belongs to, or the one it opens (with the verdict it starts
    /// from); None: `e` is for the attempts.
    pub(super) fn midstream_key(&self, e: &Event) -> Option<(Key, Option<Verdict>)> {
        let m = self.midstream.as_ref()?;
        if let Some(k) = m.key_of(e) {
            return Some((k, None));
        }
        let known = |k: &Key| self.attempts.contains_key(k) || self.done.contains_key(k);
        let known_sock = e
            .sock
            .as_ref()
            .is_some_and(|s| self.sock_key.contains_key(s));
        if known(&(e.src, e.sport, None)) || known(&(e.dst, e.dport, None)) || known_sock {
            return None;
        }
        let (client, server) = opens(e).then(|| client_of(e)).flatten()?;
        let skeleton = skeleton(e, client, server, &self.ctx, &self.sock_process);
        Some(((client.0, client.1, None), Some(skeleton)))
    }

    /// An event of followed connection `key` (which it opens with `opened`): the verdicts due.
    pub(super) fn push_midstream(
        &mut self,
        key: Key,
        opened: Option<Verdict>,
        e: Event,
        now: u64,
    ) -> Vec<Verdict> {
        let Some(m) = &mut self.midstream else {
            return Vec::new();
        };
        let mut early = Vec::new();
        if let Some(skeleton) = opened {
            let (judged, evicted) = m.follow(key, &skeleton, now);
            self.stats.tcp.followed_evicted += evicted;
            early = judged;
        }
        m.push(key, e, now);
        let mut out = self.done_with(early, now);
        out.extend(self.poll(now));
        out
    }

    /// Followed connections' verdicts that are due; their keys are remembered as decided, so
    /// the retransmits and drops still to come open nothing.
    pub(super) fn poll_midstream(&mut self, now: u64) -> Vec<Verdict> {
        let Some(m) = &mut self.midstream else {
            return Vec::new();
        };
        let v = m.poll(now);
        self.done_with(v, now)
    }

    /// Verdicts of followed connections: their keys (and sockets) are remembered as decided.
    fn done_with(&mut self, verdicts: Vec<Verdict>, now: u64) -> Vec<Verdict> {
        let keys: Vec<Key> = verdicts
            .iter()
            .map(|v| (v.client.addr, v.client.port, None))
            .collect();
        for k in &keys {
            self.done.insert(*k, now);
        }
        if let Some(m) = &mut self.midstream {
            self.sock_key.extend(m.release_socks(&keys));
        }
        verdicts
    }
}

/// The verdict a followed connection starts from: its endpoints (as the first sign shows them),
/// `connected`, nothing else.
fn skeleton(
    e: &Event,
    client: (IpAddr, u16),
    server: (IpAddr, u16),
    ctx: &super::Context,
    procs: &HashMap<String, (String, u32)>,
) -> Verdict {
    let mut v = super::classify_to(std::slice::from_ref(e), client, server.1, ctx, procs);
    v.outcome = Outcome::Connected;
    v.headline = Outcome::Connected.headline().into();
    v.server = Endpoint {
        netns: v.server.netns.take(),
        ..Endpoint::at(server.0, server.1)
    };
    v.explanation.clear();
    v.next_steps.clear();
    v.timeline.clear();
    v.drop = None;
    v.netfilter = None;
    v.rule_prefix = None;
    v.listeners.clear();
    v.app_error = None;
    v
}

#[cfg(test)]
#[path = "midstream_tests.rs"]
mod tests;

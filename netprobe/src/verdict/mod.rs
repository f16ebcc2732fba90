//! The verdict engine: pure logic, no I/O. It groups enriched events into connection attempts
//! (keyed by the client's address and port, which survive DNAT) and classifies each attempt
//! with the evidence it has — never "policy" without a policy rule, never "refused" for a
//! silent drop. Fed live by `trace`, and in tests from recorded event streams.

mod drop_detail;
pub mod established;
mod midstream;
pub mod noroute;
pub mod overflow;
mod pairing;
pub mod resets;
pub mod udp;

use std::{
    collections::{HashMap, HashSet, VecDeque},
    net::IpAddr,
};

pub use crate::model::stats::EngineStats;

use serde::{Deserialize, Serialize};

pub use crate::model::{Encap, Endpoint, Outcome, RouteHint};
use crate::{
    attribution::{Netfilter, cni},
    enrich::listeners::Listener,
    events::{DropInfo, Event, Kind},
    model::{Direction, DnsFailureReason, NfAction, Protocol, TcpFlag, TcpState, drop_reason},
};

pub const SCHEMA: &str = "netprobe.verdict/v1";

/// An interface a SYN crossed, and the namespace it is in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Hop {
    pub interface: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub netns: Option<String>,
}

/// A cross-node attempt as both nodes saw it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct CrossNode {
    pub client_node: String,
    pub server_node: String,
    /// Where the SYN last left the client's node.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub left_via: Option<Hop>,
    /// The server's node saw the attempt.
    pub arrived: bool,
    /// Where the SYN entered the server's node.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub arrived_via: Option<Hop>,
    /// The server node's own verdict.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_node_outcome: Option<Outcome>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Checkpoint {
    pub time_ns: u64,
    pub what: String,
    /// The node whose clock `time_ns` is on: set only in a cross-node timeline (cluster mode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Verdict {
    pub schema: String,
    pub kind: String,
    pub outcome: Outcome,
    pub headline: String,
    pub client: Endpoint,
    /// Where the SYN finally went (after DNAT).
    pub server: Endpoint,
    /// The address the client dialled, when it differs (a ClusterIP before DNAT).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dialed: Option<Endpoint>,
    pub timeline: Vec<Checkpoint>,
    pub explanation: String,
    pub next_steps: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub drop: Option<DropInfo>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub netfilter: Option<Netfilter>,
    /// What the explanation says before the rule's sentence (empty for TCP), kept so the
    /// explanation can be rendered again once the rule's workload is named. Not in the JSON.
    #[serde(skip)]
    pub rule_prefix: Option<String>,
    /// Listeners in the server's namespace (for refusals).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub listeners: Vec<Listener>,
    pub syn_retransmits: u32,
    /// The errno the application got, if seen.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub app_error: Option<String>,
    /// Where the SYN first entered this node (or pod) namespace, by the tc programs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arrived_via: Option<Hop>,
    /// Where the SYN last left, by the tc programs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub left_via: Option<Hop>,
    /// For timeouts: the route toward the server and its device (filled in by the trace).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route: Option<RouteHint>,
    /// Set by a cluster-mode trace that asked the agents of both nodes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cross_node: Option<CrossNode>,
    /// UDP traces: whether a reply came back, and the DNS question and answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub udp: Option<udp::UdpExchange>,
    /// The SYN hit an error route (or none) on this node: where, and which route.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub no_route: Option<noroute::NoRoute>,
    /// A timeout that is a full accept queue: the listener, its queue and backlog.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listen_queue: Option<crate::enrich::backlog::ListenQueue>,
    /// `time_ns` (when it was written), `time` (RFC 3339) and `node`: added by the NDJSON
    /// writer.
    #[serde(flatten)]
    pub written: crate::model::Written,
    /// A connection's second verdict (`trace`), when it ended after its handshake: retransmits,
    /// drops, who reset it, the MTU black hole, the MSS both sides announced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after_handshake: Option<established::AfterHandshake>,
}

/// What the engine knows besides events: the traced port and protocol, and listeners by
/// namespace name.
#[derive(Debug, Clone, Default)]
pub struct Context {
    /// The traced port; [`ANY_PORT`] (0) judges attempts to every port (the always-on agent).
    pub port: u16,
    /// UDP exchanges (DNS lookups) instead of TCP connection attempts.
    pub udp: bool,
    pub listeners: HashMap<String, Vec<Listener>>,
}

/// The client's address and port (they survive DNAT), and for DNS the query id: a resolver may
/// ask A and AAAA from one socket at once.
type Key = (IpAddr, u16, Option<u16>);

/// [`Context::port`] for an engine that judges attempts to every port.
pub const ANY_PORT: u16 = 0;

/// Every port: an attempt that shows no result for this long after its last event is judged
/// with what it has (a SYN dropped once and never retried, a client that gave up).
pub const IDLE_NS: u64 = 5_000_000_000;

/// Every port and DNS: attempts (exchanges) open at once; beyond it the oldest is judged early
/// (DNS: forgotten unjudged if it has no result yet; both counted in `stats`).
pub const MAX_OPEN: usize = 4096;

/// Every port: how long a decided attempt is remembered, so that the retransmits still to come
/// (the kernel tries for about two minutes) do not open it again; and how many at most (DNS
/// too, for [`pairing::DONE_KEEP_UDP_NS`]).
pub const DONE_KEEP_NS: u64 = 150_000_000_000;
pub const MAX_DONE: usize = 16384;

/// Events kept per attempt (TCP; DNS: [`MAX_EVENTS_DNS`]); beyond it only events that may
/// decide the verdict (a result, a drop, a rule) are kept, up to twice as many. A client
/// repeating one DNS id (or one TCP tuple) must not grow one attempt without bound.
pub const MAX_EVENTS: usize = 64;
/// A DNS exchange is a query and a reply, each seen at a few checkpoints.
pub const MAX_EVENTS_DNS: usize = 16;
/// Events held by the open attempts of one engine (an event is ~2 KiB with its strings): beyond
/// it an attempt keeps only its first event and the one that decides it.
pub const MAX_HELD: usize = 4 * MAX_OPEN;

#[derive(Debug, Default)]
struct Attempt {
    events: Vec<Event>,
    /// The server port dialled (the traced port, or with [`ANY_PORT`] the opening event's).
    port: u16,
    /// Caller's clock at the first event (UDP: unanswered after [`udp::UDP_TIMEOUT_NS`]).
    started_at: u64,
    /// Caller's clock at the latest event.
    last_at: u64,
    /// Userspace clock (caller's) when a terminal event was seen.
    terminal_at: Option<u64>,
    /// The client's SYN dropped on this node, counting retransmissions.
    syn_drops: u32,
    /// A SYN freed with NETFILTER_DROP, and a rule report that dropped it (traced, with its
    /// path; or from the counters): with both, the cause is known before the first retransmit.
    netfilter_syn_drop: bool,
    rule_traced: bool,
    rule_counted: bool,
    /// The dropped SYN went to a Service endpoint: the ClusterIP dialled may be named only by
    /// the agent's armed trace of the retransmit.
    to_service_endpoint: bool,
}

/// A SYN dropped this many times (the first try and its retransmission, ~1 s apart) is a
/// persistent drop: the verdict need not wait for the client to give up (Go's dial timeout,
/// the kernel's ~2 minutes).
pub const PERSISTENT_SYN_DROPS: u32 = 2;

/// Time given to other sources (the netfilter trace arrives on another channel) after a
/// terminal event before the verdict is final.
pub const SETTLE_NS: u64 = 300_000_000;

/// TCP: how often the engine looks for verdicts that are due.
const SCAN_EVERY_NS: u64 = 50_000_000;

/// Errors connect() reports for an attempt that failed (never for an established connection).
const CONNECT_ERRORS: &[&str] = &["ECONNREFUSED", "EHOSTUNREACH", "ENETUNREACH"];

pub struct Engine {
    ctx: Context,
    attempts: HashMap<Key, Attempt>,
    /// Open attempts with their start (caller's clock), oldest first. TCP: each leaves it where
    /// it is taken. DNS: popped from the front at the timeout; entries of exchanges taken
    /// earlier stay until then (stale: the start no longer matches an open exchange).
    order: VecDeque<(u64, Key)>,
    /// DNS: the time each exchange showed a result, oldest first (popped after [`SETTLE_NS`]).
    settling: VecDeque<(u64, Key)>,
    /// DNS: decided exchanges by the time they were decided, oldest first (1:1 with `done`).
    done_order: VecDeque<(u64, Key)>,
    /// DNS: open and decided exchanges of each client address and port.
    by_port: HashMap<(IpAddr, u16), pairing::PortIndex>,
    /// Entries of the queues and indexes looked at: the work the engine did (tests bound it).
    pub(crate) visited: u64,
    /// Events held by open attempts (bounded by [`MAX_HELD`]).
    held: usize,
    /// Decided attempts (later events of theirs are ignored), with the caller's clock then.
    done: HashMap<Key, u64>,
    /// Kernel socket → process that created the connection (from SYN_SENT in process context).
    sock_process: HashMap<String, (String, u32)>,
    /// Kernel socket → attempt: state changes after close report port 0.
    sock_key: HashMap<String, Key>,
    /// Kernel sockets seen entering SYN_SENT (their connect() happened during the trace).
    syn_sent: HashSet<String>,
    /// Event time from which every probe was in place; see [`Engine::armed_at`].
    armed_at: u64,
    /// TCP: the caller's clock at the last scan for due verdicts and at the last pruning.
    scanned_at: u64,
    pruned_at: u64,
    /// Connections followed past their handshake (`trace`); None: attempts end at `connected`.
    established: Option<established::Established>,
    /// The agent's connections past their handshake, followed from failure signals.
    midstream: Option<midstream::Midstream>,
    pub stats: EngineStats,
}

fn flags(e: &Event) -> (bool, bool, bool) {
    (
        e.has_flag(TcpFlag::Syn),
        e.has_flag(TcpFlag::Ack),
        e.has_flag(TcpFlag::Rst),
    )
}

impl Engine {
    pub fn new(ctx: Context) -> Self {
        Self {
            ctx,
            attempts: HashMap::new(),
            order: VecDeque::new(),
            settling: VecDeque::new(),
            done_order: VecDeque::new(),
            by_port: HashMap::new(),
            visited: 0,
            held: 0,
            done: HashMap::new(),
            sock_process: HashMap::new(),
            sock_key: HashMap::new(),
            syn_sent: HashSet::new(),
            armed_at: 0,
            scanned_at: 0,
            pruned_at: 0,
            established: None,
            midstream: None,
            stats: EngineStats::default(),
        }
    }

    /// Keeps following connections that connected, and judges how they end (TCP traces: their
    /// tracepoints report state changes; the always-on agent sees no healthy connection).
    pub fn follow_established(mut self) -> Self {
        if !self.ctx.udp {
            self.established = Some(established::Established::default());
        }
        self
    }

    pub fn port(&self) -> u16 {
        self.ctx.port
    }

    pub fn is_udp(&self) -> bool {
        self.ctx.udp
    }

    /// The listeners known now: those of namespace `netns`, read at a refusal there (an
    /// always-on engine keeps no snapshot of every pod's listeners).
    pub fn listeners_now(&mut self, netns: String, listeners: Vec<Listener>) {
        self.ctx.listeners = HashMap::from([(netns, listeners)]);
    }

    /// From `time_ns` (event time) on, every probe was in place. An attempt with evidence from
    /// before then began while the trace was still attaching: some checkpoints (an egress
    /// interface, the client's connect()) may have missed it, so it is not judged.
    pub fn armed_at(&mut self, time_ns: u64) {
        self.armed_at = time_ns;
    }

    /// The client side of an event's tuple: the side whose port is not the traced one.
    fn key(&self, e: &Event) -> Option<Key> {
        let port = self.ctx.port;
        if port == ANY_PORT {
            return self.key_any_port(e);
        }
        let (syn, ack, _) = flags(e);
        let client = if e.kind == Kind::Packet && syn {
            if ack {
                (e.dst, e.dport)
            } else {
                (e.src, e.sport)
            }
        } else if e.dport == port {
            (e.src, e.sport)
        } else if e.sport == port {
            (e.dst, e.dport)
        } else {
            // DNAT to another port: the SYN direction decides.
            (e.src, e.sport)
        };
        (client.1 != 0).then_some((client.0, client.1, None))
    }

    /// Every port: the attempt an event belongs to, by its tuple in either direction; only
    /// evidence of a connection attempt opens one (a dropped SYN, a SYN retransmit, the kernel's
    /// NO_SOCKET reset, a refused or unreachable connect(), a rule, a reset or ICMP error on the
    /// way back). Anything else (segments of established connections) belongs to no attempt.
    fn key_any_port(&self, e: &Event) -> Option<Key> {
        let fwd = (e.src, e.sport, None);
        let rev = (e.dst, e.dport, None);
        let known = |k: &Key| self.attempts.contains_key(k) || self.done.contains_key(k);
        if known(&fwd) {
            return Some(fwd);
        }
        if known(&rev) {
            return Some(rev);
        }
        let (syn, ack, rst) = flags(e);
        let opener = match e.kind {
            Kind::Packet if syn => Some(if ack { rev } else { fwd }),
            // The quoted SYN of an ICMP error; a reset coming back from the server.
            Kind::Packet if e.icmp.is_some() => Some(fwd),
            Kind::Packet if rst => Some(rev),
            Kind::Drop | Kind::Retransmit if syn => Some(if ack { rev } else { fwd }),
            Kind::SendReset => e
                .reset
                .as_ref()
                .is_some_and(|r| r.reason.as_deref() == Some(drop_reason::NO_SOCKET))
                .then_some(fwd),
            Kind::SocketError => e
                .error
                .as_ref()
                .is_some_and(|x| CONNECT_ERRORS.contains(&x.name.as_str()))
                .then_some(fwd),
            Kind::Netfilter => Some(fwd),
            Kind::StateChange => e
                .state
                .as_ref()
                .is_some_and(|s| s.new == TcpState::SynSent)
                .then_some(fwd),
            _ => None,
        };
        opener.filter(|k| k.1 != 0)
    }

    /// The server port of a new attempt: the other side of the event that opened it.
    fn port_of(&self, e: &Event, key: Key) -> u16 {
        if self.ctx.port != ANY_PORT {
            self.ctx.port
        } else if (e.src, e.sport) == (key.0, key.1) {
            e.dport
        } else {
            e.sport
        }
    }

    fn terminal(e: &Event, port: u16) -> bool {
        match e.kind {
            Kind::SocketError => true,
            Kind::StateChange => {
                let st = e.state.as_ref().expect("state_change has state");
                let client_side = e.dport == port;
                client_side
                    && (st.new == TcpState::Established
                        || (st.old == TcpState::SynSent && st.new == TcpState::Close))
            }
            Kind::Netfilter => e
                .netfilter
                .as_ref()
                .is_some_and(|n| n.action == NfAction::Reject),
            Kind::SendReset => true,
            Kind::Packet => {
                let (syn, ack, rst) = flags(e);
                (syn && ack) || rst
            }
            _ => false,
        }
    }

    /// Adds an event; `now` is the caller's clock (ns). Returns verdicts that became final.
    pub fn push(&mut self, e: Event, now: u64) -> Vec<Verdict> {
        if self.ctx.udp {
            return self.push_udp(e, now);
        }
        if let Some((key, opened)) = self.midstream_key(&e) {
            return self.push_midstream(key, opened, e, now);
        }
        if e.kind == Kind::StateChange
            && let Some(sock) = &e.sock
            && e.state.as_ref().is_some_and(|s| s.new == TcpState::SynSent)
        {
            self.syn_sent.insert(sock.clone());
            if let Some(p) = &e.process {
                self.sock_process
                    .insert(sock.clone(), (format!("{} (pid {})", p.comm, p.pid), p.pid));
            }
        }
        let key = match (self.key(&e), &e.sock) {
            (Some(k), Some(sock)) => {
                self.sock_key.insert(sock.clone(), k);
                Some(k)
            }
            (Some(k), None) => Some(k),
            (None, Some(sock)) => self.sock_key.get(sock).copied(),
            (None, None) => None,
        };
        let Some(key) = key else {
            return self.poll(now);
        };
        if let Some(f) = &mut self.established
            && f.contains(&key)
        {
            f.push(key, e, now);
            return self.poll(now);
        }
        if self.done.contains_key(&key) {
            return self.poll(now);
        }
        let port = self.port_of(&e, key);
        let mut early = self.make_room(key, now);
        let held = self.held;
        let a = self.attempt(key, now);
        if a.port == 0 {
            a.port = port;
        }
        a.last_at = now;
        let terminal = Self::terminal(&e, a.port);
        let (syn, ack, _) = flags(&e);
        if e.kind == Kind::Drop && syn && !ack {
            a.syn_drops += 1;
        }
        a.note_rule_drop(&e, syn && !ack);
        let terminal = terminal || a.syn_drops >= PERSISTENT_SYN_DROPS || a.dropped_by_a_rule();
        let kept = keep_event(a, &e, terminal, held, MAX_EVENTS);
        if kept {
            a.events.push(e);
        }
        if terminal && a.terminal_at.is_none() {
            a.terminal_at = Some(now);
        }
        self.count_kept(kept);
        early.extend(self.poll(now));
        early
    }

    /// Every port: a new attempt beyond [`MAX_OPEN`] has the oldest one judged now.
    fn make_room(&mut self, key: Key, now: u64) -> Vec<Verdict> {
        if self.attempts.len() < MAX_OPEN || self.attempts.contains_key(&key) {
            return Vec::new();
        }
        while let Some((_, oldest)) = self.order.pop_front() {
            if self.attempts.contains_key(&oldest) {
                self.stats.tcp.judged_early += 1;
                return self.take(oldest, now).into_iter().collect();
            }
        }
        Vec::new()
    }

    /// Counts an event kept (held) or dropped (by the engine's kind).
    fn count_kept(&mut self, kept: bool) {
        if kept {
            self.held += 1;
        } else if self.ctx.udp {
            self.stats.dns.events_dropped += 1;
        } else {
            self.stats.tcp.events_dropped += 1;
        }
    }

    fn attempt(&mut self, key: Key, now: u64) -> &mut Attempt {
        self.attempts.entry(key).or_insert_with(|| {
            self.order.push_back((now, key));
            Attempt {
                started_at: now,
                last_at: now,
                ..Attempt::default()
            }
        })
    }

    /// Verdicts whose settle time has passed (and UDP exchanges left without an answer).
    pub fn poll(&mut self, now: u64) -> Vec<Verdict> {
        if self.ctx.udp {
            return self.poll_udp(now);
        }
        let any_port = self.ctx.port == ANY_PORT;
        // A storm of SYNs (every port, or the traced one) is many events: scan every 50 ms,
        // not at each one; and forget decided attempts in a trace too (a SYN flood from new
        // ports made one entry each, for as long as the trace ran).
        if now < self.scanned_at + SCAN_EVERY_NS {
            return Vec::new();
        }
        self.scanned_at = now;
        self.prune(now);
        self.visited += self.order.len() as u64;
        let ready: Vec<Key> = self
            .order
            .iter()
            .map(|(_, k)| k)
            .filter(|k| {
                self.attempts.get(k).is_some_and(|a| match a.terminal_at {
                    Some(t) => now >= t + SETTLE_NS,
                    None => any_port && now >= a.last_at + IDLE_NS,
                })
            })
            .copied()
            .collect();
        if !ready.is_empty() {
            // One pass over the order, not one per attempt (an always-on engine has thousands).
            let taken: HashSet<Key> = ready.iter().copied().collect();
            self.order.retain(|(_, k)| !taken.contains(k));
        }
        let mut verdicts: Vec<Verdict> = ready
            .into_iter()
            .filter_map(|k| self.take(k, now))
            .collect();
        if let Some(f) = &mut self.established {
            verdicts.extend(f.poll(now));
        }
        verdicts.extend(self.poll_midstream(now));
        verdicts
    }

    /// TCP, once a second: decided attempts are forgotten after [`DONE_KEEP_NS`] (or
    /// the oldest half of them beyond [`MAX_DONE`]), and so are the sockets that led to them.
    fn prune(&mut self, now: u64) {
        if now < self.pruned_at + 1_000_000_000 {
            return;
        }
        self.pruned_at = now;
        self.done.retain(|_, t| now < *t + DONE_KEEP_NS);
        if self.done.len() > MAX_DONE {
            let mut times: Vec<u64> = self.done.values().copied().collect();
            // Keep the newest half of MAX_DONE (cutting at the median of all of them kept
            // every entry beyond MAX_DONE / 2: under a flood they grew by the rest each second).
            let keep_from = times.len() - MAX_DONE / 2;
            let (_, nth, _) = times.select_nth_unstable(keep_from);
            let cut = *nth;
            let before = self.done.len();
            self.done.retain(|_, t| *t > cut);
            self.stats.tcp.forgotten_early += (before - self.done.len()) as u64;
        }
        if self.ctx.port != ANY_PORT {
            // A trace keeps its sockets: a SYN_SENT seen before its attempt opened must still
            // count (the ClusterIP lab test lost its verdict when they were pruned). They grow
            // only with connect() calls in the traced namespaces, not with a spoofed flood.
            return;
        }
        let (attempts, done) = (&self.attempts, &self.done);
        self.sock_key
            .retain(|_, k| attempts.contains_key(k) || done.contains_key(k));
        let socks = &self.sock_key;
        self.sock_process.retain(|s, _| socks.contains_key(s));
        self.syn_sent.retain(|s| socks.contains_key(s));
    }

    /// Everything still open, classified with what was seen (the trace is ending).
    pub fn finish(&mut self) -> Vec<Verdict> {
        // DNS: an exchange still settling may have left the order already.
        let keys: Vec<Key> = (self.order.drain(..))
            .chain(self.settling.drain(..))
            .map(|(_, k)| k)
            .collect();
        let mut verdicts: Vec<Verdict> = keys
            .into_iter()
            .filter_map(|k| self.take(k, u64::MAX))
            .collect();
        if let Some(f) = &mut self.established {
            verdicts.extend(f.finish());
        }
        verdicts
    }

    fn take(&mut self, key: Key, now: u64) -> Option<Verdict> {
        let a = self.forget_open(key, now)?;
        let mut events = a.events;
        events.sort_by_key(|e| e.time_ns);
        let client = (key.0, key.1);
        if events.first().is_some_and(|e| e.time_ns < self.armed_at) {
            return None;
        }
        // The always-on agent does not watch connect() (it would cost an event per healthy
        // connection): every attempt it sees began while it was watching.
        if !self.ctx.udp
            && self.ctx.port != ANY_PORT
            && began_before_the_trace(&events, client, &self.syn_sent)
        {
            return None;
        }
        let v = if self.ctx.udp {
            udp::classify(&events, client, &self.ctx)
        } else if self.established.is_some() {
            return self.connected_then_follow(key, events, a.port, now);
        } else {
            classify_to(&events, client, a.port, &self.ctx, &self.sock_process)
        };
        (v.outcome != Outcome::Unknown || was_an_attempt(&events, &v)).then_some(v)
    }

    /// Classifies the handshake's events; a connection that connected is then followed with
    /// what it showed after the handshake (judged on its own when it ends).
    fn connected_then_follow(
        &mut self,
        key: Key,
        events: Vec<Event>,
        port: u16,
        now: u64,
    ) -> Option<Verdict> {
        let (handshake, after) = established::split_after(events, port);
        let v = classify_to(
            &handshake,
            (key.0, key.1),
            port,
            &self.ctx,
            &self.sock_process,
        );
        if v.outcome == Outcome::Connected
            && let Some(f) = &mut self.established
        {
            let evicted = f.evicted;
            f.follow(key, &v, &handshake, after, now);
            self.stats.tcp.followed_evicted += f.evicted - evicted;
        }
        (v.outcome != Outcome::Unknown || was_an_attempt(&handshake, &v)).then_some(v)
    }
}

impl Attempt {
    /// Notes the halves of a rule drop: the kernel's NETFILTER_DROP of the SYN (`syn` says the
    /// event is the client's SYN) and the rule that dropped it (reports arrive in either order).
    fn note_rule_drop(&mut self, e: &Event, syn: bool) {
        match (e.kind, &e.drop, &e.netfilter) {
            (Kind::Drop, Some(d), _) if syn && d.reason == drop_reason::NETFILTER_DROP => {
                self.netfilter_syn_drop = true;
                // The drop's conntrack entry already names the address dialled (a ClusterIP,
                // or the endpoint itself): nothing for the retransmit's trace to add.
                self.to_service_endpoint |= e.to_service_endpoint && e.dialed.is_none();
            }
            (Kind::Netfilter, _, Some(n)) if n.action == NfAction::Drop => {
                let traced = n.evidence.is_trace();
                self.rule_traced |= traced;
                self.rule_counted |= !traced;
            }
            _ => {}
        }
    }

    /// The SYN was dropped by a known rule: the verdict need not wait for the retransmit (~1 s
    /// later), only [`SETTLE_NS`] for a more detailed report of the same drop. It waits when
    /// the retransmit may still name something: a rule not known yet (bounded by
    /// [`PERSISTENT_SYN_DROPS`]), or, for a rule known from counters only, the ClusterIP of a
    /// SYN to a Service endpoint whose drop did not carry its conntrack entry (the agent's
    /// armed trace names it).
    fn dropped_by_a_rule(&self) -> bool {
        self.netfilter_syn_drop
            && (self.rule_traced || (self.rule_counted && !self.to_service_endpoint))
    }
}

/// Whether `e` joins attempt `a`'s events (`held` by the engine, at most `cap` per attempt):
/// the first one always, the one that decides it always; others below `cap`, and beyond it (up
/// to twice as many) only when they may decide the verdict; none once the engine holds
/// [`MAX_HELD`].
fn keep_event(a: &Attempt, e: &Event, decides: bool, held: usize, cap: usize) -> bool {
    let n = a.events.len();
    if n == 0 || (decides && a.terminal_at.is_none()) {
        return true;
    }
    held < MAX_HELD
        && (n < cap || (n < 2 * cap && (decides || matches!(e.kind, Kind::Drop | Kind::Netfilter))))
}

/// Undecided evidence without a SYN (or a SYN state) and without a UDP request is not an
/// attempt: leftovers of connections that started before the trace (e.g. a FIN), replies to
/// datagrams sent before it. They get no verdict.
fn was_an_attempt(events: &[Event], v: &Verdict) -> bool {
    let syn_state = |s: TcpState| {
        matches!(
            s,
            TcpState::SynSent | TcpState::SynRecv | TcpState::NewSynRecv
        )
    };
    events.iter().any(|e| {
        e.has_flag(TcpFlag::Syn)
            // The kernel reports a retransmit's flags only for a SYN.
            || (e.kind == Kind::Retransmit && !e.tcp_flags.is_empty())
            || e.state
                .as_ref()
                .is_some_and(|s| syn_state(s.old) || syn_state(s.new))
            || e.error
                .as_ref()
                .is_some_and(|x| CONNECT_ERRORS.contains(&x.name.as_str()))
    }) || v.udp.as_ref().is_some_and(|u| u.requests > 0)
}

/// The client's socket is watched (its retransmits or state changes are here) but its
/// `SYN_SENT` was not seen: the attempt began before the probes were attached, and what was
/// missed (the first SYN, the interfaces it crossed) would make the verdict a guess. Not judged.
fn began_before_the_trace(
    events: &[Event],
    client: (IpAddr, u16),
    syn_sent: &HashSet<String>,
) -> bool {
    let own: Vec<&Event> = events
        .iter()
        .filter(|e| {
            (e.src, e.sport) == client
                && matches!(
                    e.kind,
                    Kind::StateChange | Kind::Retransmit | Kind::SocketError
                )
        })
        .collect();
    !own.is_empty()
        && !own
            .iter()
            .any(|e| e.sock.as_ref().is_some_and(|s| syn_sent.contains(s)))
}

fn endpoint_str(addr: IpAddr, port: u16) -> String {
    match addr {
        IpAddr::V4(a) => format!("{a}:{port}"),
        IpAddr::V6(a) => format!("[{a}]:{port}"),
    }
}

fn ns_name(e: &Event) -> Option<String> {
    e.netns
        .as_ref()
        .map(|n| n.name.clone().unwrap_or_else(|| n.inode.to_string()))
}

fn checkpoint(e: &Event) -> String {
    let at = match (&e.interface, ns_name(e)) {
        (Some(i), Some(ns)) => format!(
            " on {} in {ns}",
            i.name.clone().unwrap_or_else(|| i.ifindex.to_string())
        ),
        (Some(i), None) => format!(
            " on {}",
            i.name.clone().unwrap_or_else(|| i.ifindex.to_string())
        ),
        (None, Some(ns)) => format!(" in {ns}"),
        _ => String::new(),
    };
    let tuple = format!(
        "{} > {}",
        endpoint_str(e.src, e.sport),
        endpoint_str(e.dst, e.dport)
    );
    match e.kind {
        Kind::Packet => {
            let what = if e.icmp.is_some() {
                "ICMP unreachable".to_string()
            } else if let Some(d) = &e.dns {
                format!("DNS {}", d.summary())
            } else if e.protocol == Protocol::Udp {
                "UDP".to_string()
            } else {
                e.flag_names().join("-")
            };
            format!(
                "{what} {}{at} ({tuple})",
                e.direction.as_ref().map_or("", Direction::as_str)
            )
        }
        Kind::Drop => {
            let d = e.drop.as_ref().expect("drop info");
            format!(
                "dropped by the kernel: {} at {}{at} ({tuple})",
                d.reason, d.location
            )
        }
        Kind::SendReset => format!(
            "kernel sent RST{}{at} (for {tuple})",
            e.reset
                .as_ref()
                .and_then(|r| r.reason.clone())
                .map(|r| format!(" ({r})"))
                .unwrap_or_default()
        ),
        Kind::ReceiveReset => format!("socket received RST{at}"),
        Kind::Retransmit => format!(
            "{} retransmitted{at} ({tuple})",
            if e.tcp_flags.is_empty() {
                "segment"
            } else {
                "SYN"
            }
        ),
        Kind::StateChange => {
            let s = e.state.as_ref().expect("state");
            format!("{} → {}{at}", s.old, s.new)
        }
        Kind::SocketError => format!(
            "application gets {}{at}",
            e.error.as_ref().map(|x| x.name.clone()).unwrap_or_default()
        ),
        Kind::RouteFailed => format!(
            "route lookup for {} failed ({}){at}: no packet left",
            endpoint_str(e.dst, e.dport),
            e.error.as_ref().map(|x| x.name.clone()).unwrap_or_default()
        ),
        Kind::DnsFailure => format!(
            "DNS lookup failed: {}{at}",
            e.dns_failure.as_ref().map_or("", |f| f.reason.as_str())
        ),
        Kind::Netfilter => {
            let n = e.netfilter.as_ref().expect("netfilter");
            format!(
                "{} by {} {} {} chain {} rule {}{at}",
                n.action,
                n.backend,
                n.family,
                n.table,
                n.chain,
                n.position
                    .map_or_else(|| "(policy)".to_string(), |p| format!("#{p}"))
            )
        }
    }
}

/// ` The SYN last left via cali… in node.`
fn last_left_via(what: &str, e: &Event) -> String {
    format!(
        " {what} last left via {}{}.",
        e.interface
            .as_ref()
            .and_then(|i| i.name.clone())
            .unwrap_or_else(|| "?".into()),
        ns_name(e).map(|n| format!(" in {n}")).unwrap_or_default()
    )
}

fn timeline(events: &[Event]) -> Vec<Checkpoint> {
    events
        .iter()
        .filter(|e| informative(e))
        .map(|e| Checkpoint {
            time_ns: e.time_ns,
            what: checkpoint(e),
            node: None,
        })
        .collect()
}

/// Is `e` worth a line in a timeline? Not: an error report without an error (errno 0, the
/// socket's error already taken), frees that are not losses (a socket's queues purged at close,
/// skbs freed without a reason once answered), a state "change" to the same state.
fn informative(e: &Event) -> bool {
    match e.kind {
        Kind::SocketError => e.error.as_ref().is_some_and(|x| x.errno != 0),
        Kind::Drop => e.drop.as_ref().is_none_or(|d| {
            d.reason != drop_reason::NOT_SPECIFIED && d.reason != drop_reason::QUEUE_PURGE
        }),
        Kind::StateChange => e.state.as_ref().is_none_or(|s| s.old != s.new),
        _ => true,
    }
}

/// What one attempt's events show about it, gathered once (TCP).
struct Evidence<'a> {
    first_syn: Option<&'a Event>,
    /// The server as the SYN's last observation shows it (after DNAT).
    server: (IpAddr, u16),
    /// The address dialled, as the client's socket or its first SYN shows it.
    dialed: Option<(IpAddr, u16)>,
    netfilter: Option<Netfilter>,
    syn_drop: Option<&'a Event>,
    /// The kernel found no socket (a NO_SOCKET drop or reset).
    no_socket: Option<&'a Event>,
    syn_ack: bool,
    established: bool,
    rst_from_server: bool,
    received_reset: bool,
    icmp: Option<&'a Event>,
    /// The SYN hit an error route (or none) here.
    route_error: Option<&'a Event>,
    retransmits: u32,
    app_error: Option<String>,
    last_egress: Option<&'a Event>,
}

impl<'a> Evidence<'a> {
    fn gather(events: &'a [Event], client: (IpAddr, u16), port: u16) -> Self {
        let first_syn = events.iter().find(|e| e.kind == Kind::Packet && e.is_syn());
        let server = server_of(events, client, port);
        let (syn_drop, no_socket) = drops_of(events);
        Self {
            first_syn,
            server,
            dialed: events
                .iter()
                .find(|e| {
                    e.kind == Kind::StateChange && e.dport == port && (e.src, e.sport) == client
                })
                .or(first_syn)
                .or_else(|| client_socket(events, client))
                .map(|e| (e.dst, e.dport))
                .or_else(|| dialed_per_conntrack(events)),
            netfilter: most_detailed_rule(events),
            syn_drop,
            no_socket,
            syn_ack: events
                .iter()
                .any(|e| e.kind == Kind::Packet && flags(e).0 && flags(e).1),
            established: events.iter().any(|e| {
                e.kind == Kind::StateChange
                    && e.state
                        .as_ref()
                        .is_some_and(|s| s.new == TcpState::Established)
                    && e.dport == port
            }),
            rst_from_server: events
                .iter()
                .any(|e| e.kind == Kind::Packet && flags(e).2 && e.sport == server.1),
            received_reset: events.iter().any(|e| e.kind == Kind::ReceiveReset),
            // A packet that came back, not an ICMP error dropped on its way (kfree_skb names
            // those by the packet they quote too).
            icmp: events
                .iter()
                .find(|e| e.kind == Kind::Packet && e.icmp.is_some()),
            route_error: events.iter().find(|e| noroute::is_route_error(e)),
            retransmits: events
                .iter()
                .filter(|e| e.kind == Kind::Retransmit && !e.tcp_flags.is_empty())
                .count() as u32,
            app_error: app_error(events),
            last_egress: syn_via(events.iter().rev(), Direction::Egress),
        }
    }
}

/// The destination a dropped packet's conntrack entry shows (before DNAT): in the always-on
/// agent the first drop is often all there is when the verdict is made.
fn dialed_per_conntrack(events: &[Event]) -> Option<(IpAddr, u16)> {
    events
        .iter()
        .filter(|e| e.kind == Kind::Drop)
        .find_map(|e| e.dialed.as_ref().map(|d| (d.dst, d.dport)))
}

/// An event of the client's own socket (a SYN retransmit, its error): its peer address is the
/// one dialled, before any DNAT.
fn client_socket(events: &[Event], client: (IpAddr, u16)) -> Option<&Event> {
    events.iter().find(|e| {
        matches!(e.kind, Kind::Retransmit | Kind::SocketError) && (e.src, e.sport) == client
    })
}

/// The rule that decided: of several reports, the first traced one with the longest chain path
/// (a trace of a retransmit shows the path; a counter difference at the first drop names only
/// the rule).
fn most_detailed_rule(events: &[Event]) -> Option<Netfilter> {
    let detail = |nf: &Netfilter| (nf.evidence.is_trace(), nf.path.len());
    events
        .iter()
        .filter_map(|e| e.netfilter.as_ref())
        .fold(None, |best: Option<&Netfilter>, nf| match best {
            Some(b) if detail(b) >= detail(nf) => Some(b),
            _ => Some(nf),
        })
        .cloned()
}

/// The server as the SYN's last observation shows it (after DNAT).
fn server_of(events: &[Event], client: (IpAddr, u16), port: u16) -> (IpAddr, u16) {
    events
        .iter()
        .rev()
        .find(|e| {
            (e.src, e.sport) == client
                && matches!(
                    e.kind,
                    Kind::Packet | Kind::Drop | Kind::Netfilter | Kind::SendReset
                )
        })
        .or(events.last())
        .map_or((client.0, port), |e| match &e.translated {
            // A rule report of an armed flow, or the client's socket (its retransmit, its
            // error), shows the address dialled; where DNAT sent it is the server.
            Some(t) => (t.dst, t.dport),
            None => (e.dst, e.dport),
        })
}

/// The SYN's decisive drop (answered SYNs may be freed with NOT_SPECIFIED; QUEUE_PURGE etc.
/// happen at close), and the kernel's "no socket" (a drop or the reset it sent).
fn drops_of(events: &[Event]) -> (Option<&Event>, Option<&Event>) {
    let reason_is = |e: &Event, r: &str| e.drop.as_ref().is_some_and(|x| x.reason == r);
    let drops = || events.iter().filter(|e| e.kind == Kind::Drop);
    let syn_drop = drops()
        .find(|d| d.is_syn() && !reason_is(d, drop_reason::NOT_SPECIFIED) && d.drop.is_some());
    let no_socket = drops()
        .find(|d| reason_is(d, drop_reason::NO_SOCKET))
        .or_else(|| {
            events.iter().find(|e| {
                e.kind == Kind::SendReset
                    && e.reset.as_ref().and_then(|r| r.reason.as_deref())
                        == Some(drop_reason::NO_SOCKET)
            })
        });
    (syn_drop, no_socket)
}

/// The last errno the application got.
fn app_error(events: &[Event]) -> Option<String> {
    events.iter().rev().find_map(|e| {
        e.error
            .as_ref()
            .filter(|x| x.errno != 0)
            .map(|x| x.name.clone())
    })
}

/// The first SYN packet (in `events`' order) that passed a tc checkpoint in `direction`.
fn syn_via<'a>(
    mut events: impl Iterator<Item = &'a Event>,
    direction: Direction,
) -> Option<&'a Event> {
    events.find(|e| e.kind == Kind::Packet && e.is_syn() && e.direction == Some(direction))
}

fn hop(e: &Event) -> Option<Hop> {
    e.interface.as_ref().map(|i| Hop {
        interface: i.name.clone().unwrap_or_else(|| i.ifindex.to_string()),
        netns: ns_name(e),
    })
}

/// The outcome the evidence supports, strongest evidence first, and why.
fn decide(
    ev: &Evidence,
    ctx: &Context,
    listeners: &mut Vec<Listener>,
    next_steps: &mut Vec<String>,
) -> (Outcome, String) {
    if let Some(nf) = &ev.netfilter {
        netfilter_verdict(nf, next_steps)
    } else if ev.established || (ev.syn_ack && !ev.rst_from_server) {
        (Outcome::Connected, "The handshake completed.".to_string())
    } else if let Some(ns_ev) = ev.no_socket {
        let why = no_listener(
            ns_ev,
            ctx,
            "TCP",
            "the kernel answered the SYN with RST (NO_SOCKET) and the client gets ECONNREFUSED",
            listeners,
            next_steps,
        );
        (Outcome::RefusedNoListener, why)
    } else if let Some(d) = ev.syn_drop {
        kernel_drop_verdict(d, "SYN", next_steps)
    } else if let Some(i) = ev.icmp {
        let c = i.icmp.as_ref().expect("icmp");
        (
            Outcome::Unreachable,
            format!(
                // The event's addresses are the quoted SYN's: they do not say who sent it.
                "An ICMP error (type {} code {}) came back for the SYN to {}{}, without a rule on this node rejecting it.",
                c.icmp_type,
                c.code,
                endpoint_str(i.dst, i.dport),
                hop(i)
                    .map(|h| format!(
                        " (seen on {}{})",
                        h.interface,
                        h.netns.map(|n| format!(" in {n}")).unwrap_or_default()
                    ))
                    .unwrap_or_default()
            ),
        )
    } else if ev.rst_from_server || ev.received_reset {
        (Outcome::ResetByPeer, "The peer answered with a reset, not the local kernel: something on the server side (or a middlebox) rejected the connection.".into())
    } else if ev.retransmits > 0
        || ev.app_error.as_deref() == Some("ETIMEDOUT")
        || ev.first_syn.is_some()
    {
        timed_out(ev, next_steps)
    } else {
        (
            Outcome::Unknown,
            "The trace ended before the attempt showed a result.".into(),
        )
    }
}

fn timed_out(ev: &Evidence, next_steps: &mut Vec<String>) -> (Outcome, String) {
    let via = ev
        .last_egress
        .map(|e| last_left_via("The SYN", e))
        .unwrap_or_default();
    next_steps.push("look at the next hop: the destination node or pod, the overlay (VXLAN/IPIP) and underlay routing".into());
    (
        Outcome::TimedOut,
        format!(
            "SYNs were sent ({} retransmits) and nothing answered, and nothing on this node dropped them.{via}",
            ev.retransmits
        ),
    )
}

/// The client's endpoint: where its own socket lives (packets and drops only say where they
/// passed) and the process that connected.
fn client_endpoint(
    events: &[Event],
    client: (IpAddr, u16),
    port: u16,
    procs: &HashMap<String, (String, u32)>,
) -> Endpoint {
    let netns = events
        .iter()
        .find(|e| {
            matches!(
                e.kind,
                Kind::StateChange | Kind::Retransmit | Kind::SocketError | Kind::ReceiveReset
            ) && e.dport == port
        })
        .and_then(ns_name);
    let process = events
        .iter()
        .find_map(|e| e.sock.as_ref().and_then(|s| procs.get(s)))
        .cloned();
    Endpoint {
        netns,
        pid: process.as_ref().map(|p| p.1),
        process: process.map(|p| p.0),
        ..Endpoint::at(client.0, client.1)
    }
}

/// The server's endpoint; its namespace is known only where the server side showed itself:
/// its kernel answered, or its socket moved.
fn server_endpoint(events: &[Event], ev: &Evidence, client: (IpAddr, u16)) -> Endpoint {
    let netns = ev.no_socket.and_then(ns_name).or_else(|| {
        events
            .iter()
            .find(|e| e.kind == Kind::StateChange && e.sport == ev.server.1 && e.dport == client.1)
            .and_then(ns_name)
    });
    Endpoint {
        netns,
        ..Endpoint::at(ev.server.0, ev.server.1)
    }
}

/// Classifies one attempt's events (sorted by time).
pub fn classify(
    events: &[Event],
    client: (IpAddr, u16),
    ctx: &Context,
    procs: &HashMap<String, (String, u32)>,
) -> Verdict {
    classify_to(events, client, ctx.port, ctx, procs)
}

/// Classifies one attempt's events (sorted by time) to server port `port`.
fn classify_to(
    events: &[Event],
    client: (IpAddr, u16),
    port: u16,
    ctx: &Context,
    procs: &HashMap<String, (String, u32)>,
) -> Verdict {
    let ev = Evidence::gather(events, client, port);
    let mut listeners = Vec::new();
    let mut next_steps = Vec::new();
    let (outcome, explanation) = decide(&ev, ctx, &mut listeners, &mut next_steps);
    let drop = ev
        .syn_drop
        .or(ev.no_socket.filter(|e| e.kind == Kind::Drop))
        .and_then(|e| e.drop.clone());
    let mut v = Verdict {
        schema: SCHEMA.into(),
        kind: "verdict".into(),
        outcome,
        headline: drop
            .as_ref()
            .filter(|_| outcome == Outcome::DroppedByKernel)
            .and_then(drop_detail::headline)
            .unwrap_or_else(|| outcome.headline().into()),
        client: client_endpoint(events, client, port, procs),
        server: server_endpoint(events, &ev, client),
        dialed: ev
            .dialed
            .filter(|d| *d != ev.server)
            .map(|(addr, port)| Endpoint::at(addr, port)),
        timeline: timeline(events),
        explanation,
        next_steps,
        drop,
        rule_prefix: ev.netfilter.as_ref().map(|_| String::new()),
        netfilter: ev.netfilter,
        listeners,
        syn_retransmits: ev.retransmits,
        app_error: ev.app_error,
        arrived_via: syn_via(events.iter(), Direction::Ingress).and_then(hop),
        left_via: ev.last_egress.and_then(hop),
        route: None,
        cross_node: None,
        udp: None,
        no_route: None,
        listen_queue: None,
        written: Default::default(),
        after_handshake: None,
    };
    if let Some(d) = ev.route_error
        && matches!(
            v.outcome,
            Outcome::Unreachable | Outcome::TimedOut | Outcome::DroppedByKernel
        )
    {
        v.drop = d.drop.clone();
        v.no_route = Some(noroute::no_route(d, ev.icmp));
        noroute::render(&mut v);
    }
    v
}

/// A netfilter rule decided: which rule, its owner (the CNI module that made it says what to
/// check next), and what the client sees.
fn netfilter_verdict(nf: &Netfilter, next_steps: &mut Vec<String>) -> (Outcome, String) {
    inspect_rule(nf, next_steps);
    let outcome = if nf.action == NfAction::Reject {
        Outcome::RefusedByRule
    } else {
        Outcome::DroppedByRule
    };
    (outcome, rule_sentence(nf))
}

/// What to check for a rule that decided: the rule itself, and what its owner (the CNI module
/// that wrote it) suggests.
fn inspect_rule(nf: &Netfilter, next_steps: &mut Vec<String>) {
    let rule = nf.rule.clone().unwrap_or_else(|| "(chain policy)".into());
    next_steps.push(format!(
        "inspect {} {} chain {}: {}",
        nf.family, nf.table, nf.chain, rule
    ));
    next_steps.push(cni::next_step(nf));
}

/// `<the owner's explanation>. The client sees <…>.`
fn rule_sentence(nf: &Netfilter) -> String {
    format!(
        "{}. The client sees {}.",
        nf.owner.explanation, nf.client_sees
    )
}

impl Verdict {
    /// Did the attempt or lookup fail, as the application sees it? A DNS lookup answered
    /// SERVFAIL or REFUSED failed although its outcome is `answered` (NXDOMAIN did not: it is
    /// the answer for a name that does not exist, what every search-path expansion gets).
    pub fn is_failure(&self) -> bool {
        let rcode = self
            .udp
            .as_ref()
            .and_then(|u| u.dns.as_ref())
            .and_then(|d| d.rcode.as_deref());
        self.outcome.is_failure()
            || (self.outcome == Outcome::Answered
                && DnsFailureReason::of(self.outcome, rcode).is_some())
    }

    /// Names the pod behind the deciding rule's workload interface (from the inventory), and
    /// renders the owner's and the verdict's explanations again with it.
    pub fn name_rule_workload(&mut self, workload: String) {
        let Some(nf) = &mut self.netfilter else {
            return;
        };
        nf.owner.workload = Some(workload);
        if let Some(text) = cni::explain(nf) {
            nf.owner.explanation = text;
        }
        if let Some(prefix) = &self.rule_prefix {
            self.explanation = format!("{prefix}{}", rule_sentence(nf));
        }
    }
}

/// "Nothing listens on …": the listeners of the server's namespace and of the others, and what
/// to check next. `proto` is `TCP` or `UDP`; `how` says how the kernel answered.
fn no_listener(
    ns_ev: &Event,
    ctx: &Context,
    proto: &str,
    how: &str,
    listeners: &mut Vec<Listener>,
    next_steps: &mut Vec<String>,
) -> String {
    let ns = ns_name(ns_ev);
    *listeners = ns
        .as_ref()
        .and_then(|n| ctx.listeners.get(n))
        .cloned()
        .unwrap_or_default();
    let target = (ns_ev.dst, ns_ev.dport);
    let mut why = format!(
        "Nothing listens on {}{} in {}: {how}.",
        // TCP is the default: said only for UDP.
        if proto == "UDP" { "udp " } else { "" },
        endpoint_str(target.0, target.1),
        ns.as_deref().unwrap_or("that network namespace")
    );
    let same_port: Vec<&Listener> = listeners.iter().filter(|l| l.port == target.1).collect();
    if !same_port.is_empty() {
        let l: Vec<String> = same_port.iter().map(|l| l.endpoint()).collect();
        why.push_str(&format!(
            " A server does listen on port {} but bound to {} only, which does not accept connections to {}.",
            target.1,
            l.join(", "),
            target.0
        ));
        next_steps.push(format!("make the server listen on {} (or 0.0.0.0 / [::]), or connect to the address it is bound to", endpoint_str(target.0, target.1)));
    } else if listeners.is_empty() {
        why.push_str(&format!(
            " Nothing listens on any {proto} port in this namespace."
        ));
        next_steps.push(
            "check that the server process is running and has started listening (readiness)".into(),
        );
    } else {
        let l: Vec<String> = listeners.iter().map(Listener::describe).collect();
        why.push_str(&format!(" This namespace listens on: {}.", l.join(", ")));
        next_steps.push(format!(
            "is the server configured for port {}? it listens on {}",
            target.1,
            l.join(", ")
        ));
    }
    for (other_ns, ls) in &ctx.listeners {
        if Some(other_ns) != ns.as_ref()
            && ls
                .iter()
                .any(|l| l.accepts(target.0, target.1) || l.port == target.1)
        {
            why.push_str(&format!(
                " Port {} is listened on in another namespace: {other_ns}.",
                target.1
            ));
        }
    }
    why
}

/// The kernel dropped the packet (`what`: SYN, datagram): in netfilter without a traced rule,
/// or for another reason, with a hint per reason.
fn kernel_drop_verdict(d: &Event, what: &str, next_steps: &mut Vec<String>) -> (Outcome, String) {
    let info = d.drop.as_ref().expect("drop");
    if info.reason == drop_reason::NETFILTER_DROP {
        let backend = if info.location.starts_with("nft_do_chain") {
            "nf_tables (nftables or iptables-nft)"
        } else {
            "x_tables (iptables-legacy)"
        };
        next_steps.push("run the trace without --no-rule-trace to name the rule".into());
        (
            Outcome::DroppedInNetfilter,
            format!(
                "A netfilter rule in {backend} dropped the {what}{}; the rule was not traced.",
                ns_name(d).map(|n| format!(" in {n}")).unwrap_or_default()
            ),
        )
    } else if let Some(why) = drop_detail::explain(d, what, next_steps) {
        next_steps.push(format!(
            "kernel drop reason {} at {}",
            info.reason, info.location
        ));
        (Outcome::DroppedByKernel, why)
    } else {
        let hint = drop_reason::hint(&info.reason);
        next_steps.push(format!(
            "kernel drop reason {} at {}",
            info.reason, info.location
        ));
        (
            Outcome::DroppedByKernel,
            format!(
                "The kernel dropped the {what}{}: {} ({hint}).",
                d.interface
                    .as_ref()
                    .and_then(|i| i.name.clone())
                    .map(|n| format!(" on {n}"))
                    .unwrap_or_default(),
                info.reason
            ),
        )
    }
}

/// The `dns_failure` event of a DNS verdict that is a failure (dropped, rejected, unanswered,
/// or answered SERVFAIL/REFUSED); None for lookups that worked (NXDOMAIN included) or are
/// undecided. Timed at the query.
pub fn dns_failure(v: &Verdict) -> Option<Event> {
    let u = v.udp.as_ref()?;
    let q = u.dns.as_ref()?;
    let reason = DnsFailureReason::of(v.outcome, q.rcode.as_deref())?;
    let asked = v.dialed.as_ref().unwrap_or(&v.server);
    let time_ns = v.timeline.first().map_or(0, |c| c.time_ns);
    Some(Event {
        drop: v.drop.clone(),
        netfilter: v.netfilter.clone(),
        source: v.client.peer.clone(),
        destination: asked.peer.clone(),
        dns: Some(q.question()),
        dns_failure: Some(crate::events::DnsFailure {
            reason,
            outcome: v.outcome,
            explanation: v.explanation.clone(),
            backend: v.dialed.as_ref().map(|_| v.server.clone()),
            replied: u.replied,
        }),
        ..crate::events::derived(
            time_ns,
            Kind::DnsFailure,
            Protocol::Udp,
            (v.client.addr, v.client.port, asked.addr, asked.port),
        )
    })
}

mod join;
pub use join::join;

#[cfg(test)]
mod established_tests;
#[cfg(test)]
mod golden;
#[cfg(test)]
mod resets_tests;
#[cfg(test)]
mod tests;

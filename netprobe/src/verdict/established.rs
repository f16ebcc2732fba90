//! Connections past their handshake (`trace`): after its `connected` verdict a connection on
//! the traced port stays followed until it ends, and how it ends is judged — a clean close, a
//! reset (and who sent it), a stall (data sent again, nothing acknowledged), a path MTU black
//! hole, the application giving up. Only what the kernel reports anyway is used (retransmits,
//! resets, drops, errors, state changes): a healthy transfer costs no event per data packet.

use std::collections::{HashMap, VecDeque};

use serde::{Deserialize, Serialize};

use super::{Hop, Key, MAX_EVENTS, SETTLE_NS, Verdict, hop, inspect_rule, ns_name, timeline};
use crate::{
    attribution::Netfilter,
    events::{Event, Kind},
    model::{NfAction, Outcome, TcpFlag, TcpState, drop_reason},
};

/// Connections followed at once; beyond it the oldest is let go without a second verdict.
pub const MAX_FOLLOWED: usize = 4096;
/// The same data segment sent again this many times (RTO backoff: ~6 s at the minimum RTO) is a
/// stall the verdict need not wait longer for.
pub const STALL_RETRANSMITS: u32 = 5;
/// Retransmits of one segment that show nothing is acknowledged (a healthy transfer resends a
/// lost segment once).
const STALLED_AT: u32 = 2;
/// A segment sent again sooner than this after its previous retransmit is a fast retransmit or
/// a loss probe, not a retransmission timeout (the minimum RTO is 200 ms): a busy, lossy but
/// healthy transfer has many of those.
const RTO_MIN_NS: u64 = 150_000_000;
/// Segments whose retransmits are remembered per connection.
const MAX_RESENT: usize = 1024;
/// Events kept per followed connection.
const MAX_CONN_EVENTS: usize = 2 * MAX_EVENTS;

/// What happened to a connection after its handshake (verdicts of connections that connected).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct AfterHandshake {
    /// The MSS each side announced in the handshake (tc checkpoints of SYN and SYN-ACK).
    pub mss: Mss,
    /// Data segments sent again, oldest first: sequence number and payload bytes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub retransmits: Vec<Retransmit>,
    /// This connection's packets the kernel dropped on this node after the handshake.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub drops: Vec<SegmentDrop>,
    /// `reset_after_established`: who sent the reset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reset_by: Option<ResetBy>,
    /// `reset_after_established`: the kernel's reason for the reset this node sent
    /// (`enum sk_rst_reason` named from its BTF, e.g. `TCP_ABORT_ON_CLOSE`, `NO_SOCKET`;
    /// `unknown` before 6.10); absent when nothing on this node sent it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reset_reason: Option<String>,
    /// `reset_after_established`: the socket on this node that sent the reset by its own
    /// decision (its side, pod and the process that closed it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reset_sender: Option<super::resets::ResetSender>,
    /// `mtu_blackhole`: the device, its MTU, the dropped sizes and the ICMP error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<MtuBlackhole>,
    /// Segments both ends sent again over the connection's life, fast retransmits and loss
    /// probes included (the kernel's count at each socket's last state change seen);
    /// `retransmits` lists only those after a retransmission timeout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resent_total: Option<u32>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Mss {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server: Option<u16>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Retransmit {
    pub time_ns: u64,
    pub seq: u32,
    pub bytes: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct SegmentDrop {
    pub time_ns: u64,
    pub reason: String,
    pub location: String,
    /// The dropped packet's IP length.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at: Option<Hop>,
}

/// Who reset an established connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ResetBy {
    /// The other end: its socket on this node reset the connection (`reset_sender` names the
    /// process), or a reset arrived from beyond this node and nothing here sent it.
    Peer,
    /// A netfilter rule on this node (REJECT with tcp-reset): `netfilter` names it.
    Rule,
    /// This node's kernel: a segment found no socket (closed), or was out of window.
    Kernel,
    /// The client's own socket (its application closed with unread data, or aborted).
    Client,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct MtuBlackhole {
    /// Where the segments were dropped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<String>,
    /// The device toward the server there and its MTU (its route, read when judged).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    /// IP lengths of the dropped segments (distinct, ascending).
    pub dropped_sizes: Vec<u32>,
    /// The ICMP "fragmentation needed" / ICMPv6 "packet too big" the dropping node sends.
    pub icmp: IcmpBack,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct IcmpBack {
    /// Seen leaving toward the client (tc checkpoint).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub went_back_via: Option<Hop>,
    /// Dropped on this node.
    pub dropped: bool,
    /// The rule that dropped it, when named.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dropped_by: Option<Netfilter>,
}

struct Followed {
    /// The `connected` verdict: endpoints, dialled address, interfaces.
    connected: Verdict,
    mss: Mss,
    events: Vec<Event>,
    /// Caller's clock when a terminal event was seen.
    terminal_at: Option<u64>,
    /// Retransmission timeouts per sequence number (and the last one's time), and the most any
    /// one segment had.
    resent: HashMap<u32, (u32, u64)>,
    worst: u32,
}

/// The followed connections of one engine.
#[derive(Default)]
pub(super) struct Established {
    conns: HashMap<Key, Followed>,
    /// Keys in the order they were followed (stale entries are skipped).
    order: VecDeque<Key>,
    /// Keys whose connection ended or stalled, with the caller's clock when due.
    due: Vec<(u64, Key)>,
    /// Followed connections let go at the bound.
    pub(super) evicted: u64,
}

impl Established {
    pub(super) fn contains(&self, key: &Key) -> bool {
        self.conns.contains_key(key)
    }

    /// Starts following a connection that connected, with the events it had after the
    /// handshake already (`after`) and its handshake's (`handshake`, for the MSS).
    pub(super) fn follow(
        &mut self,
        key: Key,
        connected: &Verdict,
        handshake: &[Event],
        after: Vec<Event>,
        now: u64,
    ) {
        if self.conns.len() >= MAX_FOLLOWED {
            self.evict_oldest();
        }
        let mss = mss_of(handshake, connected.client.port);
        self.conns.insert(
            key,
            Followed {
                connected: connected.clone(),
                mss,
                events: Vec::new(),
                terminal_at: None,
                resent: HashMap::new(),
                worst: 0,
            },
        );
        self.compact_order();
        self.order.push_back(key);
        for e in after {
            self.push(key, e, now);
        }
    }

    /// The agent's follower: `key`'s connection is judged at its next poll (after
    /// [`SETTLE_NS`]), as if something had ended it.
    pub(super) fn mark_due(&mut self, key: Key, now: u64) {
        if let Some(f) = self.conns.get_mut(&key)
            && f.terminal_at.is_none()
        {
            f.terminal_at = Some(now);
            self.due.push((now + SETTLE_NS, key));
        }
    }

    /// Lets a connection go without a verdict.
    pub(super) fn forget(&mut self, key: &Key) {
        self.conns.remove(key);
    }

    /// Judges a connection now, with what it has.
    pub(super) fn take_now(&mut self, key: &Key) -> Option<Verdict> {
        self.conns.remove(key).and_then(judge)
    }

    /// Keys of connections no longer followed are dropped from the order once they are the
    /// majority (a long-running agent follows connections one after another).
    fn compact_order(&mut self) {
        if self.order.len() > 2 * self.conns.len() + 64 {
            let conns = &self.conns;
            self.order.retain(|k| conns.contains_key(k));
        }
    }

    fn evict_oldest(&mut self) {
        while let Some(k) = self.order.pop_front() {
            if self.conns.remove(&k).is_some() {
                self.evicted += 1;
                return;
            }
        }
    }

    /// An event of a followed connection.
    pub(super) fn push(&mut self, key: Key, e: Event, now: u64) {
        let Some(f) = self.conns.get_mut(&key) else {
            return;
        };
        if let (Kind::Retransmit, Some(seq)) = (e.kind, e.seq) {
            f.note_retransmit(seq, e.time_ns);
        }
        let ends = ends(&e);
        if f.events.len() < MAX_CONN_EVENTS || ends {
            f.events.push(e);
        }
        let stalled = f.worst >= STALL_RETRANSMITS;
        if (ends || stalled) && f.terminal_at.is_none() {
            f.terminal_at = Some(now);
            self.due.push((now + SETTLE_NS, key));
        }
    }

    /// Verdicts of connections that ended (or stalled) at least [`SETTLE_NS`] ago.
    pub(super) fn poll(&mut self, now: u64) -> Vec<Verdict> {
        let (ready, wait): (Vec<_>, Vec<_>) = self.due.drain(..).partition(|(t, _)| now >= *t);
        self.due = wait;
        ready
            .into_iter()
            .filter_map(|(_, k)| self.conns.remove(&k))
            .filter_map(judge)
            .collect()
    }

    /// The trace ends: connections that showed trouble are judged with what they have; healthy
    /// ones still open get no second verdict.
    pub(super) fn finish(&mut self) -> Vec<Verdict> {
        self.due.clear();
        self.order.clear();
        let all: Vec<Followed> = self.conns.drain().map(|(_, f)| f).collect();
        all.into_iter()
            .filter(|f| f.terminal_at.is_some() || troubled(f))
            .filter_map(judge)
            .collect()
    }
}

impl Followed {
    /// Counts a retransmission timeout of segment `seq` (not a fast retransmit or probe).
    fn note_retransmit(&mut self, seq: u32, time_ns: u64) {
        if self.resent.len() >= MAX_RESENT && !self.resent.contains_key(&seq) {
            self.resent.retain(|_, (n, _)| *n > 1);
            if self.resent.len() >= MAX_RESENT {
                return;
            }
        }
        let (n, last) = self.resent.entry(seq).or_insert((0, 0));
        if *n == 0 || time_ns >= *last + RTO_MIN_NS {
            *n += 1;
            *last = time_ns;
            self.worst = self.worst.max(*n);
        }
    }
}

/// Does `e` end an established connection?
fn ends(e: &Event) -> bool {
    match e.kind {
        Kind::SocketError => e.error.as_ref().is_some_and(|x| x.errno != 0),
        Kind::StateChange => e.state.as_ref().is_some_and(|s| s.new == TcpState::Close),
        Kind::ReceiveReset | Kind::SendReset => true,
        Kind::Packet => e.has_flag(TcpFlag::Rst),
        Kind::Netfilter => e
            .netfilter
            .as_ref()
            .is_some_and(|n| n.action == NfAction::Reject),
        _ => false,
    }
}

fn troubled(f: &Followed) -> bool {
    f.worst >= STALLED_AT || f.events.iter().any(|e| loss(e).is_some())
}

/// The MSS announced by the client's SYN and by the server's SYN-ACK.
fn mss_of(handshake: &[Event], client_port: u16) -> Mss {
    let announced = |from_client: bool| {
        handshake.iter().find_map(|e| {
            let syn = e.kind == super::Kind::Packet && e.has_flag(TcpFlag::Syn);
            (syn && (e.sport == client_port) == from_client)
                .then_some(e.mss)
                .flatten()
        })
    };
    Mss {
        client: announced(true),
        server: announced(false),
    }
}

/// A drop that lost something of the connection (not the teardown frees).
pub(super) fn loss(e: &Event) -> Option<&crate::events::DropInfo> {
    (e.kind == Kind::Drop)
        .then_some(e.drop.as_ref())
        .flatten()
        .filter(|d| {
            !matches!(
                d.reason.as_str(),
                drop_reason::NOT_SPECIFIED | drop_reason::QUEUE_PURGE | drop_reason::SOCKET_CLOSE
            )
        })
}

/// An ICMP "fragmentation needed" (type 3 code 4) or ICMPv6 "packet too big" (type 2).
pub(super) fn frag_needed(e: &Event) -> bool {
    e.icmp.as_ref().is_some_and(|i| {
        (e.protocol == crate::model::Protocol::Icmp && i.icmp_type == 3 && i.code == 4)
            || (e.protocol == crate::model::Protocol::Icmpv6 && i.icmp_type == 2)
    })
}

/// The rule that dropped the connection's segments (`icmp`: its ICMP errors); a traced one
/// (with its path) before one named by counters.
fn traced_first(events: &[Event], icmp: bool) -> Option<Netfilter> {
    let mut rules = events
        .iter()
        .filter(|e| e.protocol.is_icmp() == icmp)
        .filter_map(|e| e.netfilter.as_ref());
    let first = rules.clone().next()?;
    Some(
        rules
            .find(|n| n.evidence.is_trace())
            .unwrap_or(first)
            .clone(),
    )
}

/// What the events after the handshake show.
struct After<'a> {
    retransmits: Vec<Retransmit>,
    drops: Vec<&'a Event>,
    too_big: Vec<&'a Event>,
    icmp: IcmpBack,
    /// A rule that decided about the connection's own segments (not the ICMP error's).
    rule: Option<Netfilter>,
    kernel_reset: Option<&'a Event>,
    reset_seen: bool,
    errno: Option<String>,
    closed: bool,
    resent_total: Option<u32>,
}

impl<'a> After<'a> {
    fn gather(events: &'a [Event]) -> Self {
        let drops: Vec<&Event> = events
            .iter()
            .filter(|e| loss(e).is_some() && !e.protocol.is_icmp())
            .collect();
        let too_big = drops
            .iter()
            .copied()
            .filter(|e| loss(e).is_some_and(|d| d.reason == drop_reason::PKT_TOO_BIG))
            .collect();
        let rules = |icmp: bool| traced_first(events, icmp);
        Self {
            retransmits: events
                .iter()
                .filter(|e| e.kind == Kind::Retransmit)
                .filter_map(|e| {
                    Some(Retransmit {
                        time_ns: e.time_ns,
                        seq: e.seq?,
                        bytes: e.size?,
                    })
                })
                .collect(),
            drops,
            too_big,
            icmp: IcmpBack {
                went_back_via: events
                    .iter()
                    .find(|e| e.kind == Kind::Packet && frag_needed(e))
                    .and_then(hop),
                dropped: events
                    .iter()
                    .any(|e| e.kind == Kind::Drop && frag_needed(e)),
                dropped_by: rules(true),
            },
            rule: rules(false),
            kernel_reset: events.iter().find(|e| e.kind == Kind::SendReset),
            reset_seen: events.iter().any(|e| {
                matches!(e.kind, Kind::ReceiveReset | Kind::SendReset)
                    || (e.kind == Kind::Packet && e.has_flag(TcpFlag::Rst))
            }),
            errno: super::app_error(events),
            closed: events
                .iter()
                .any(|e| e.state.as_ref().is_some_and(|s| s.new == TcpState::Close)),
            resent_total: resent_total(events),
        }
    }
}

/// Both sockets' lifetime retransmit counts, each at its last state change seen.
fn resent_total(events: &[Event]) -> Option<u32> {
    let mut by_sock: HashMap<&str, u32> = HashMap::new();
    for e in events {
        if let (Some(sock), Some(n)) = (&e.sock, e.state.as_ref().and_then(|s| s.retransmitted)) {
            let seen = by_sock.entry(sock).or_default();
            *seen = (*seen).max(n);
        }
    }
    (!by_sock.is_empty()).then(|| by_sock.values().sum())
}

/// How much was resent on the way: the kernel's lifetime count when a state change carried
/// it, else the retransmits after a timeout that were seen.
fn resent_words(a: &After) -> String {
    let timeouts = a.retransmits.len();
    match a.resent_total {
        Some(n) => format!(
            "{n} segments resent on the way, {timeouts} of them after a retransmission timeout"
        ),
        None => format!("{timeouts} segments resent after a retransmission timeout"),
    }
}

/// The second verdict of a followed connection; None when nothing ended it.
fn judge(f: Followed) -> Option<Verdict> {
    let mut events = f.events;
    events.sort_by_key(|e| e.time_ns);
    let after = After::gather(&events);
    let mut v = f.connected;
    let mut next_steps = Vec::new();
    let (outcome, why) = decide(&after, &v, f.worst, &mut next_steps)?;
    v.outcome = outcome;
    v.headline = outcome.headline().into();
    v.explanation = why;
    v.next_steps = next_steps;
    v.timeline = timeline(&few_retransmits(&events));
    let reset = outcome == Outcome::ResetAfterEstablished;
    let by = reset_by(&after, &v);
    let sent = after.kernel_reset.filter(|_| reset && by != ResetBy::Rule);
    let reset_sender = sent.and_then(|e| super::resets::sender(e, &v));
    v.app_error = after.errno.clone();
    v.rule_prefix = None;
    v.drop = after.drops.first().and_then(|e| e.drop.clone());
    v.netfilter = after.rule.clone().or(after.icmp.dropped_by.clone());
    v.after_handshake = Some(AfterHandshake {
        mss: f.mss,
        retransmits: after
            .retransmits
            .iter()
            .take(LISTED_RETRANSMITS)
            .cloned()
            .collect(),
        drops: after.drops.iter().map(|e| segment_drop(e)).collect(),
        reset_by: reset.then_some(by),
        reset_reason: sent.map(super::resets::reason),
        reset_sender,
        mtu: (outcome == Outcome::MtuBlackhole).then(|| mtu_blackhole(&after)),
        resent_total: after.resent_total,
    });
    Some(v)
}

/// Retransmits shown in a timeline (all of them are in `after_handshake.retransmits`).
const TIMELINE_RETRANSMITS: usize = 5;
/// Retransmits listed in `after_handshake.retransmits`.
const LISTED_RETRANSMITS: usize = 32;

/// The events with only the first [`TIMELINE_RETRANSMITS`] retransmits.
fn few_retransmits(events: &[Event]) -> Vec<Event> {
    let mut n = 0;
    events
        .iter()
        .filter(|e| {
            if e.kind != Kind::Retransmit {
                return true;
            }
            n += 1;
            n <= TIMELINE_RETRANSMITS
        })
        .cloned()
        .collect()
}

fn segment_drop(e: &Event) -> SegmentDrop {
    let d = e.drop.as_ref().expect("a drop");
    SegmentDrop {
        time_ns: e.time_ns,
        reason: d.reason.clone(),
        location: d.location.clone(),
        bytes: e.size,
        at: hop(e).or_else(|| {
            ns_name(e).map(|netns| Hop {
                interface: "?".into(),
                netns: Some(netns),
            })
        }),
    }
}

fn reset_by(a: &After, v: &Verdict) -> ResetBy {
    if a.rule
        .as_ref()
        .is_some_and(|n| n.action == NfAction::Reject)
    {
        ResetBy::Rule
    } else if let Some(sent) = a.kernel_reset {
        // An active reset is its socket owner's; one in answer to a segment, the kernel's.
        match super::resets::sender(sent, v).map(|s| s.side) {
            Some(super::resets::Side::Server) => ResetBy::Peer,
            Some(super::resets::Side::Client) => ResetBy::Client,
            None => ResetBy::Kernel,
        }
    } else {
        ResetBy::Peer
    }
}

fn mtu_blackhole(a: &After) -> MtuBlackhole {
    let mut sizes: Vec<u32> = a.too_big.iter().filter_map(|e| e.size).collect();
    sizes.sort_unstable();
    sizes.dedup();
    MtuBlackhole {
        netns: a.too_big.first().and_then(|e| ns_name(e)),
        device: None,
        mtu: None,
        dropped_sizes: sizes,
        icmp: a.icmp.clone(),
    }
}

/// How the connection ended, strongest evidence first, and why.
fn decide(
    a: &After,
    v: &Verdict,
    worst: u32,
    next_steps: &mut Vec<String>,
) -> Option<(Outcome, String)> {
    let reset = a.reset_seen
        || a.rule
            .as_ref()
            .is_some_and(|n| n.action == NfAction::Reject);
    if a.closed && a.errno.is_none() && !reset && worst < STALL_RETRANSMITS {
        // Both sides closed without an error: whatever was resent got through in the end.
        Some((
            Outcome::Closed,
            format!(
                "The connection was established and closed cleanly, without a reset or an error ({}).",
                resent_words(a)
            ),
        ))
    } else if !a.too_big.is_empty() {
        Some((Outcome::MtuBlackhole, mtu_sentence(a, next_steps)))
    } else if reset {
        Some((
            Outcome::ResetAfterEstablished,
            reset_sentence(a, v, next_steps),
        ))
    } else if worst >= STALLED_AT
        || a.errno.as_deref() == Some("ETIMEDOUT")
        || a.rule.is_some()
        || !a.drops.is_empty()
    {
        Some((Outcome::Stalled, stall_sentence(a, v, next_steps)))
    } else {
        a.errno.as_ref().map(|errno| {
            (
                Outcome::Aborted,
                format!(
                    "After the handshake the application got {errno}, without retransmits, drops or resets on this node that explain it."
                ),
            )
        })
    }
}

fn sizes_text(events: &[&Event]) -> String {
    let mut sizes: Vec<u32> = events.iter().filter_map(|e| e.size).collect();
    sizes.sort_unstable();
    sizes.dedup();
    let s: Vec<String> = sizes.iter().map(u32::to_string).collect();
    if s.is_empty() {
        String::new()
    } else {
        format!(" ({} bytes)", s.join(", "))
    }
}

/// ` the kernel dropped N packet(s) (sizes): REASON at LOCATION in NETNS.` (`drops` not empty)
fn dropped(drops: &[&Event]) -> String {
    let first = drops[0];
    let d = first.drop.as_ref().expect("a drop");
    format!(
        " the kernel dropped {} packet(s){}: {} at {}{}.",
        drops.len(),
        sizes_text(drops),
        d.reason,
        d.location,
        ns_name(first)
            .map(|n| format!(" in {n}"))
            .unwrap_or_default()
    )
}

fn mtu_sentence(a: &After, next_steps: &mut Vec<String>) -> String {
    let mut why = format!(
        "After the handshake segments of this connection were too big for the path:{}",
        dropped(&a.too_big)
    );
    why.push_str(&icmp_sentence(&a.icmp));
    next_steps.push("set the pod (overlay) MTU to what the path carries: for Calico, Felix's `mtu` setting (FelixConfiguration vxlanMTU / ipipMTU / wireguardMTU) or the IPPool's MTU — VXLAN 1450, IPIP 1480, WireGuard 1420 below a 1500 underlay; Flannel: its backend MTU".into());
    if let Some(nf) = &a.icmp.dropped_by {
        next_steps.push(format!(
            "let ICMP \"fragmentation needed\" through: {} {} chain {}: {}",
            nf.family,
            nf.table,
            nf.chain,
            nf.rule.clone().unwrap_or_else(|| "(chain policy)".into())
        ));
    } else if a.icmp.dropped {
        next_steps.push("find the rule that drops ICMP type 3 code 4 (ICMPv6 type 2) on this node and let it through".into());
    }
    why
}

fn icmp_sentence(icmp: &IcmpBack) -> String {
    match (&icmp.dropped_by, icmp.dropped, &icmp.went_back_via) {
        (Some(nf), _, _) => format!(
            " The ICMP \"fragmentation needed\" that should tell the sender to send smaller segments was dropped on this node by a rule: {}, so the sender never learns the path MTU and resends the same segments.",
            nf.owner.explanation
        ),
        (None, true, _) => " The ICMP \"fragmentation needed\" that should tell the sender to send smaller segments was dropped on this node (rule not named), so the sender never learns the path MTU.".into(),
        (None, false, Some(h)) => format!(
            " An ICMP \"fragmentation needed\" went back via {}{}; the sender still resent full-size segments, so it was lost or ignored beyond this node.",
            h.interface,
            h.netns.as_ref().map(|n| format!(" in {n}")).unwrap_or_default()
        ),
        (None, false, None) => " No ICMP \"fragmentation needed\" was seen going back to the sender.".into(),
    }
}

fn reset_sentence(a: &After, v: &Verdict, next_steps: &mut Vec<String>) -> String {
    let sent = a.kernel_reset.map(|e| (e, super::resets::reason(e)));
    let app_sees = a.errno.as_deref().unwrap_or("ECONNRESET");
    let by = reset_by(a, v);
    if by != ResetBy::Rule
        && let Some((e, reason)) = &sent
        && let Some(s) = super::resets::sender(e, v)
    {
        return super::resets::sentence(&s, reason, app_sees, next_steps);
    }
    match by {
        ResetBy::Rule => {
            let nf = a.rule.as_ref().expect("a rule");
            inspect_rule(nf, next_steps);
            format!(
                "The connection was established, then a netfilter rule on this node rejected one of its segments with a TCP reset: {}. The application sees {}.",
                nf.owner.explanation, app_sees
            )
        }
        ResetBy::Kernel | ResetBy::Client => {
            let (e, reason) = sent.expect("a reset sent here");
            super::resets::kernel_sentence(e, &reason, next_steps)
        }
        ResetBy::Peer => {
            next_steps.push("look at the server (its logs, restarts, idle timeouts) and at middleboxes beyond this node that reset idle or long flows".into());
            "The connection was established, then a reset arrived from the peer's side; nothing on this node sent it.".into()
        }
    }
}

fn stall_sentence(a: &After, v: &Verdict, next_steps: &mut Vec<String>) -> String {
    let mut resent: Vec<String> = a
        .retransmits
        .iter()
        .take(TIMELINE_RETRANSMITS)
        .map(|r| format!("seq {} {} bytes", r.seq, r.bytes))
        .collect();
    if a.retransmits.len() > TIMELINE_RETRANSMITS {
        resent.push("…".into());
    }
    let mut why = format!(
        "After the handshake data was sent again {} time(s){} and nothing acknowledged it.",
        a.retransmits.len(),
        if resent.is_empty() {
            String::new()
        } else {
            format!(" ({})", resent.join(", "))
        }
    );
    if let Some(nf) = &a.rule {
        why.push_str(&format!(
            " A netfilter rule on this node drops its segments: {}.",
            nf.owner.explanation
        ));
        inspect_rule(nf, next_steps);
        why.push_str(&ct_invalid(nf, next_steps));
    } else if let Some(first) = a.drops.first() {
        let d = first.drop.as_ref().expect("a drop");
        why.push_str(" On this node");
        why.push_str(&dropped(&a.drops));
        next_steps.push(format!("kernel drop reason {} at {}", d.reason, d.location));
        why.push_str(&ruleless_netfilter_drop(d, next_steps));
    } else {
        why.push_str(" Nothing on this node dropped its packets.");
        if let Some(h) = &v.left_via {
            why.push_str(&format!(
                " Its packets leave via {}{} (as its SYN did).",
                h.interface,
                h.netns
                    .as_ref()
                    .map(|n| format!(" in {n}"))
                    .unwrap_or_default()
            ));
        }
        next_steps.push("look at the next hop: the destination node or pod, the overlay (VXLAN/IPIP) and underlay routing, a firewall beyond this node".into());
    }
    if let Some(errno) = &a.errno {
        why.push_str(&format!(" The application gave up with {errno}."));
    }
    why
}

/// When the rule drops conntrack INVALID packets: what INVALID means mid-stream, and where to
/// look (the sentence, after the rule's).
fn ct_invalid(nf: &Netfilter, next_steps: &mut Vec<String>) -> String {
    let text = nf.rule.as_deref().unwrap_or_default().to_lowercase();
    let invalid =
        (text.contains("ctstate") || text.contains("ct state")) && text.contains("invalid");
    if !invalid {
        return String::new();
    }
    next_steps.push("asymmetric routing: do both directions of the flow pass this node (the replies through another node or interface leave conntrack here with half a connection)?".into());
    next_steps.push("the conntrack table: `conntrack -L` for the flow, `conntrack -S` (insert_failed, drop, early_drop), `nf_conntrack_count` against `nf_conntrack_max` — an entry deleted or evicted mid-stream".into());
    next_steps.push("`sysctl net.netfilter.nf_conntrack_tcp_loose`: at 0 conntrack does not pick up an established flow it lost, and its segments stay INVALID".into());
    " The rule drops packets conntrack deems INVALID: conntrack has no entry that this segment fits (the entry was lost or deleted mid-stream, or the flow's other direction bypasses this node), so every later segment of the connection is dropped too.".into()
}

/// A netfilter drop at a hook with no rule named (nf_tables rules are named by trace or
/// counters, iptables-legacy ones by counters): conntrack itself drops what it cannot track —
/// its table full, or no entry a mid-stream segment may create.
fn ruleless_netfilter_drop(d: &crate::events::DropInfo, next_steps: &mut Vec<String>) -> String {
    if d.reason != drop_reason::NETFILTER_DROP || !d.location.starts_with("nf_hook_slow") {
        return String::new();
    }
    next_steps.push("conntrack: `conntrack -S` (drop, early_drop, insert_failed), `nf_conntrack_count` against `nf_conntrack_max`, and the kernel log's \"nf_conntrack: table full, dropping packet\"".into());
    " No rule was named for it: unless an iptables-legacy rule dropped it while its counters were not read, conntrack itself did — its table is full (nf_conntrack_max), or it could not track the segment.".into()
}

/// `mtu_blackhole`: the device toward the server where the segments were dropped and its MTU
/// (from that namespace's route, read by the judge), said in the explanation.
pub fn name_mtu_device(v: &mut Verdict, route: &crate::model::RouteHint) {
    let Some(m) = v.after_handshake.as_mut().and_then(|a| a.mtu.as_mut()) else {
        return;
    };
    m.device = Some(route.dev.clone());
    m.mtu = route.mtu;
    let mtu = route.mtu.map(|m| format!(", MTU {m}")).unwrap_or_default();
    let biggest = m.dropped_sizes.last().copied();
    v.explanation.push_str(&format!(
        " Toward {} the route there leaves via {}{mtu}{}.",
        route.dst,
        route.dev,
        match (biggest, route.mtu) {
            (Some(b), Some(mtu)) if b > mtu => format!(": segments of {b} bytes do not fit"),
            _ => String::new(),
        }
    ));
    if let Some(mtu) = route.mtu {
        v.next_steps.insert(
            0,
            format!(
                "the path through {} carries {mtu}-byte packets: set the pods' MTU to {mtu} or less (or raise {}'s)",
                route.dev, route.dev
            ),
        );
    }
}

/// Is `v` a verdict about a connection after its handshake?
pub fn after_handshake(v: &Verdict) -> bool {
    v.after_handshake.is_some()
}

/// The events of an attempt after its handshake: those later than the client's ESTABLISHED
/// (else the SYN-ACK) that are not the handshake's own segments.
pub(super) fn split_after(events: Vec<Event>, port: u16) -> (Vec<Event>, Vec<Event>) {
    let est = events
        .iter()
        .find(|e| {
            e.kind == Kind::StateChange
                && e.dport == port
                && e.state
                    .as_ref()
                    .is_some_and(|s| s.new == TcpState::Established)
        })
        .or_else(|| {
            events.iter().rev().find(|e| {
                e.kind == Kind::Packet && e.has_flag(TcpFlag::Syn) && e.has_flag(TcpFlag::Ack)
            })
        })
        .map(|e| e.time_ns);
    let Some(t) = est else {
        return (events, Vec::new());
    };
    events
        .into_iter()
        .partition(|e| e.time_ns <= t || (e.kind == Kind::Packet && e.has_flag(TcpFlag::Syn)))
}

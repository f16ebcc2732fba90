//! Rule attribution for the always-on agent, without anyone running a trace: when a flow's SYN
//! (or datagram) dies in netfilter, [`ArmOnDrop`] arms a narrow nftables trace for that client
//! flow alone (its source address, port and protocol, matched before conntrack and DNAT, so a
//! ClusterIP flow is caught), and [`ArmedTrace`] turns the traced path of its next packet (the
//! client's retransmit) into a `netfilter` event, like [`super::RuleTrace`] does for `trace`.
//!
//! Bounded and cheap: at most `limit` flows are armed at once (more are refused and counted),
//! each for `ttl` at most (the kernel also forgets it then), and the netprobe table with its
//! chains exists in a namespace only while one of its flows is armed — healthy traffic never
//! passes a netprobe chain. The `nft` runs happen on a worker thread ([`super::worker`]), in
//! order: arming costs the session microseconds. [`Arming`] is the handle the agent shares
//! between the stage, the source and its housekeeping (`expire`) and verdicts (`disarm`).

use std::{
    cell::RefCell,
    collections::HashMap,
    net::IpAddr,
    rc::Rc,
    time::{Duration, Instant},
};

pub use crate::model::stats::ArmStats;

use futures::future::LocalBoxFuture;
use tokio::sync::mpsc;

use super::{
    reader::{Message, NsRules, TraceReaders},
    worker::NftWorker,
};
use crate::{
    enrich::{Enricher, Stage},
    error::Result,
    events::{self, Event, Kind, Translated},
    model::{Protocol, TcpFlag},
    netlink::nftrace::TraceMsg,
    netns::NetnsRef,
    probes::nft_trace::{ArmedOp, ClientFlow},
    session::{Input, Source},
    sinks::Summary,
};

/// How long a flow stays armed when no verdict disarms it: past the first SYN retransmits
/// (1 s, 3 s) and a resolver's first retry.
pub const DEFAULT_TTL: Duration = Duration::from_secs(5);

const DNS_PORT: u16 = 53;

/// Flows armed at once, by default.
pub const DEFAULT_LIMIT: usize = 32;

/// (netns inode, protocol, client address, client port).
type FlowKey = (u64, Protocol, IpAddr, u16);

struct ArmedNs {
    rules: NsRules,
    /// Armed flows of this namespace: the table exists while there are some.
    flows: usize,
}

struct State {
    namespaces: HashMap<u64, ArmedNs>,
    flows: HashMap<FlowKey, Instant>,
    /// Declared before the readers: the tables are removed before the readers stop.
    worker: NftWorker,
    readers: TraceReaders,
    limit: usize,
    ttl: Duration,
    stats: ArmStats,
    /// Flows already explained (their drop traced, or their verdict out): the client keeps
    /// retransmitting for a while, and each drop must not arm the flow again.
    explained: HashMap<FlowKey, Instant>,
    /// Arms in the current second: each costs `nft` runs (10–30 ms of CPU), so a storm of
    /// distinct dropped flows must not turn into a storm of `nft` processes.
    arms_this_second: (u64, u32),
    started: Instant,
}

/// New flows armed per second at most; more are refused (counted with those refused at the
/// bound). A failure worth a trace is retried: one of its later drops finds room.
pub const MAX_ARMS_PER_SECOND: u32 = 4;

/// How long an explained flow is not armed again (the kernel retries a SYN for about two
/// minutes), and how many such flows are remembered at most.
const EXPLAINED_KEEP: Duration = Duration::from_secs(150);
const MAX_EXPLAINED: usize = 4096;

fn client_flow(&(_, proto, addr, port): &FlowKey) -> ClientFlow {
    ClientFlow {
        proto: if proto == Protocol::Udp { "udp" } else { "tcp" },
        addr,
        port,
    }
}

impl State {
    fn arm(&mut self, key: FlowKey) -> bool {
        if self.flows.contains_key(&key) {
            return true;
        }
        if self
            .explained
            .get(&key)
            .is_some_and(|at| at.elapsed() < EXPLAINED_KEEP)
        {
            return false;
        }
        let Some(ns) = self.namespaces.get_mut(&key.0) else {
            return false;
        };
        let second = self.started.elapsed().as_secs();
        if self.arms_this_second.0 != second {
            self.arms_this_second = (second, 0);
        }
        if self.flows.len() >= self.limit || self.arms_this_second.1 >= MAX_ARMS_PER_SECOND {
            self.stats.refused += 1;
            return false;
        }
        self.arms_this_second.1 += 1;
        let started = Instant::now();
        // Listening before anything is marked, so no message is missed; a namespace where
        // nothing was ever armed costs no reader thread.
        if self.readers.listen(&ns.rules.ns).is_err() {
            self.stats.errors += 1;
            return false;
        }
        let flow = client_flow(&key);
        let op = if ns.flows == 0 {
            ArmedOp::Create(flow)
        } else {
            ArmedOp::Add(flow)
        };
        self.worker.submit(&ns.rules.ns, op);
        ns.flows += 1;
        self.flows.insert(key, started);
        self.stats.armed_total += 1;
        let us = started.elapsed().as_micros() as u64;
        self.stats.arm_us_max = self.stats.arm_us_max.max(us);
        true
    }

    /// Stops marking a flow; the namespace's table goes with its last flow.
    fn disarm(&mut self, key: &FlowKey) -> bool {
        if self.flows.remove(key).is_none() {
            return false;
        }
        if let Some(ns) = self.namespaces.get_mut(&key.0) {
            ns.flows = ns.flows.saturating_sub(1);
            let op = if ns.flows == 0 {
                ArmedOp::Remove
            } else {
                ArmedOp::Forget(client_flow(key))
            };
            self.worker.submit(&ns.rules.ns, op);
        }
        true
    }

    /// Disarms a flow whose drop is explained, and keeps it from being armed again.
    fn explained(&mut self, key: &FlowKey) {
        self.disarm(key);
        if self.explained.len() >= MAX_EXPLAINED {
            self.explained.retain(|_, at| at.elapsed() < EXPLAINED_KEEP);
            if self.explained.len() >= MAX_EXPLAINED {
                // All recent: forgetting them only costs a second trace of a retried flow.
                self.explained.clear();
            }
        }
        self.explained.insert(*key, Instant::now());
    }

    /// The armed flow a traced packet from `client` belongs to.
    fn armed_flow(&self, inode: u64, (addr, port): (IpAddr, u16)) -> Option<FlowKey> {
        [Protocol::Tcp, Protocol::Udp]
            .into_iter()
            .map(|p| (inode, p, addr, port))
            .find(|k| self.flows.contains_key(k))
    }
}

impl Drop for State {
    /// The tables of namespaces with armed flows go: the worker runs its queue before it ends
    /// (it is dropped after this), then the readers stop.
    fn drop(&mut self) {
        for ns in self.namespaces.values().filter(|n| n.flows > 0) {
            self.worker.submit(&ns.rules.ns, ArmedOp::Remove);
        }
    }
}

/// The shared handle: namespaces, arming, disarming, stats. Cloneable (one state).
#[derive(Clone)]
pub struct Arming(Rc<RefCell<State>>);

impl Arming {
    /// Watches a namespace: flows dropped in it can be armed there. Costs nothing until a
    /// first flow is armed in it: then a reader listens to its trace group (until the
    /// namespace is removed), and the ruleset is read when a first armed packet is traced.
    pub fn add_netns(&self, ns: &NetnsRef) {
        self.0
            .borrow_mut()
            .namespaces
            .entry(ns.inode)
            .or_insert_with(|| ArmedNs {
                rules: NsRules::new(ns),
                flows: 0,
            });
    }

    /// Forgets a namespace (deleted): its flows, its table (if the namespace still exists),
    /// its reader.
    pub fn remove_netns(&self, inode: u64) {
        let mut s = self.0.borrow_mut();
        s.flows.retain(|k, _| k.0 != inode);
        if let Some(ns) = s.namespaces.remove(&inode)
            && ns.flows > 0
        {
            s.worker.submit(&ns.rules.ns, ArmedOp::Remove);
        }
        s.readers.forget(inode);
    }

    /// Marks, from now on, the packets of the `proto` flow whose client is `client` in the
    /// namespace `netns` (inode). `false`: not armed — `limit` flows are armed (counted), the
    /// namespace is not watched, or the protocol is neither TCP nor UDP. Idempotent. The
    /// session does not wait for `nft`: the change is in the kernel some 10–40 ms later (see
    /// [`Self::settle`]); if nft refuses it, `errors` counts it.
    pub fn arm(&self, netns: u64, proto: Protocol, client: (IpAddr, u16)) -> bool {
        matches!(proto, Protocol::Tcp | Protocol::Udp)
            && self.0.borrow_mut().arm((netns, proto, client.0, client.1))
    }

    /// Waits until every arm and disarm so far is in the kernel (tests; shutdown).
    pub fn settle(&self) {
        self.0.borrow().worker.flush();
    }

    /// Stops marking the flow of `client` (its verdict is out), in whichever namespace, and
    /// keeps its later retransmits from arming it again.
    pub fn disarm(&self, proto: Protocol, client: (IpAddr, u16)) {
        let mut s = self.0.borrow_mut();
        let keys: Vec<FlowKey> = s
            .namespaces
            .keys()
            .map(|inode| (*inode, proto, client.0, client.1))
            .collect();
        for k in keys {
            s.explained(&k);
        }
    }

    /// Stops marking every flow whose client is one of `addrs` (a pod whose trace ended:
    /// what was armed for it goes now, not at its expiry).
    pub fn disarm_addrs(&self, addrs: &[IpAddr]) {
        let mut s = self.0.borrow_mut();
        let keys: Vec<FlowKey> = s
            .flows
            .keys()
            .filter(|k| addrs.contains(&k.2))
            .copied()
            .collect();
        for k in keys {
            s.disarm(&k);
        }
    }

    /// Disarms the flows armed for `ttl` or longer (the housekeeping tick calls it).
    pub fn expire(&self, now: Instant) {
        let mut s = self.0.borrow_mut();
        let ttl = s.ttl;
        let old: Vec<FlowKey> = s
            .flows
            .iter()
            .filter(|(_, since)| now.saturating_duration_since(**since) >= ttl)
            .map(|(k, _)| *k)
            .collect();
        for k in old {
            if s.disarm(&k) {
                s.stats.expired += 1;
            }
        }
    }

    pub fn stats(&self) -> ArmStats {
        let s = self.0.borrow();
        ArmStats {
            armed_now: s.flows.len() as u64,
            trace_overruns: s.readers.overruns(),
            errors: s.stats.errors + s.worker.errors(),
            nft_us_max: s.worker.us_max(),
            ..s.stats
        }
    }
}

/// The source: traced paths of armed flows that end in a drop, as `netfilter` events.
pub struct ArmedTrace {
    arming: Arming,
    rx: mpsc::Receiver<Message>,
    enricher: Rc<Enricher>,
}

impl ArmedTrace {
    /// Nothing armed, no namespace watched yet: see [`Arming::add_netns`].
    pub fn new(enricher: Rc<Enricher>, limit: usize, ttl: Duration) -> Self {
        let (readers, rx) = TraceReaders::new();
        let state = State {
            namespaces: HashMap::new(),
            flows: HashMap::new(),
            worker: NftWorker::start(ttl),
            readers,
            limit,
            ttl,
            stats: ArmStats::default(),
            explained: HashMap::new(),
            arms_this_second: (0, 0),
            started: Instant::now(),
        };
        Self {
            arming: Arming(Rc::new(RefCell::new(state))),
            rx,
            enricher,
        }
    }

    pub fn arming(&self) -> Arming {
        self.arming.clone()
    }

    /// A path of an armed flow ending in a drop → an event; the flow is then disarmed (its
    /// drop is explained). Paths of other flows (another netprobe's trace) are ignored, and so
    /// is a namespace that vanished meanwhile.
    fn on_message(&mut self, inode: u64, m: TraceMsg) -> Option<Event> {
        let mut s = self.arming.0.borrow_mut();
        let ns = s.namespaces.get_mut(&inode)?;
        let (path, nf) = ns.rules.push(m).ok()??;
        let iface = ns.rules.interface(&path, &self.enricher);
        // The first headers are the packet as the client sent it (our chain runs before DNAT);
        // the last ones as it was dropped.
        let (src, sport, dst, dport) = path.iter().find_map(|m| m.tuple)?;
        let dropped = path.iter().rev().find_map(|m| m.tuple);
        let key = s.armed_flow(inode, (src, sport))?;
        s.explained(&key);
        s.stats.traced += 1;
        let mut e = events::netfilter(
            self.enricher.now_ns(),
            key.1,
            Some(self.enricher.netns(inode)),
            iface,
            Some((src, sport, dst, dport)),
            nf,
        );
        e.translated = dropped
            .filter(|d| (d.2, d.3) != (dst, dport))
            .map(|d| Translated {
                dst: d.2,
                dport: d.3,
                peer: None,
            });
        Some(e)
    }
}

impl Source for ArmedTrace {
    fn next(&mut self) -> LocalBoxFuture<'_, Result<Input>> {
        Box::pin(async move {
            let Some((inode, m)) = self.rx.recv().await else {
                return std::future::pending().await;
            };
            Ok(Input::Events(
                self.on_message(inode, m).into_iter().collect(),
            ))
        })
    }

    fn report(&self, summary: &mut Summary) {
        summary.netfilter_trace_overruns += self.arming.stats().trace_overruns;
    }
}

/// The stage: a SYN (without ACK) or a DNS query (UDP to port 53) dropped by a netfilter rule
/// arms its client flow in the namespace of the drop, so its retransmit is traced.
pub struct ArmOnDrop(pub Arming);

/// The client flow of a dropped connection attempt or datagram, if `e` is one.
pub fn dropped_attempt(e: &Event) -> Option<(u64, Protocol, (IpAddr, u16))> {
    let by_rule = e.kind == Kind::Drop
        && e.drop
            .as_ref()
            .is_some_and(|d| d.reason == crate::model::drop_reason::NETFILTER_DROP);
    let attempt = match e.protocol {
        Protocol::Tcp => {
            e.tcp_flags.contains(&TcpFlag::Syn) && !e.tcp_flags.contains(&TcpFlag::Ack)
        }
        // A DNS query, not a response: arming a server's port would mark all its traffic.
        Protocol::Udp => e.dport == DNS_PORT,
        _ => false,
    };
    let inode = e.netns.as_ref()?.inode;
    (by_rule && attempt).then_some((inode, e.protocol, (e.src, e.sport)))
}

impl Stage for ArmOnDrop {
    fn enrich(&mut self, e: &mut Event, _derived: &mut Vec<Event>) {
        if let Some((netns, proto, client)) = dropped_attempt(e) {
            // Refused at the bound: counted; the drop itself goes on unexplained.
            self.0.arm(netns, proto, client);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::{DropInfo, Netns, derived};

    fn dropped(proto: Protocol, flags: &[TcpFlag], dport: u16, reason: &str) -> Event {
        let tuple = (
            "10.42.0.20".parse().unwrap(),
            40000,
            "10.43.51.131".parse().unwrap(),
            dport,
        );
        let mut e = derived(1, Kind::Drop, proto, tuple);
        e.tcp_flags = flags.to_vec();
        e.netns = Some(Netns {
            inode: 7,
            name: None,
        });
        e.drop = Some(DropInfo {
            reason: reason.into(),
            reason_code: 12,
            location: "nft_do_chain+0x46f".into(),
            ..Default::default()
        });
        e
    }

    #[test]
    fn a_syn_or_dns_query_dropped_by_a_rule_arms_its_client_flow() {
        let client = ("10.42.0.20".parse().unwrap(), 40000);
        let syn = dropped(Protocol::Tcp, &[TcpFlag::Syn], 9004, "NETFILTER_DROP");
        assert_eq!(dropped_attempt(&syn), Some((7, Protocol::Tcp, client)));
        let query = dropped(Protocol::Udp, &[], 53, "NETFILTER_DROP");
        assert_eq!(dropped_attempt(&query), Some((7, Protocol::Udp, client)));
        for not_an_attempt in [
            dropped(
                Protocol::Tcp,
                &[TcpFlag::Syn, TcpFlag::Ack],
                9004,
                "NETFILTER_DROP",
            ),
            dropped(Protocol::Tcp, &[TcpFlag::Ack], 9004, "NETFILTER_DROP"),
            dropped(Protocol::Udp, &[], 9999, "NETFILTER_DROP"),
            dropped(Protocol::Tcp, &[TcpFlag::Syn], 9004, "NO_SOCKET"),
            dropped(Protocol::Icmp, &[], 0, "NETFILTER_DROP"),
        ] {
            assert_eq!(dropped_attempt(&not_an_attempt), None, "{not_an_attempt:?}");
        }
    }
}

//! The verdict stage: the pure engine, fed by the session's clock, and what needs the node to
//! finish a verdict — names for its endpoints, the client pod asked for, this node's route
//! toward a server that never answered.

use std::{cell::RefCell, rc::Rc, time::Instant};

use crate::{
    enrich::{listeners::Listener, names::PodContext, pods::cgroup_of},
    events::{Event, Kind},
    model::{Protocol, drop_reason},
    netns::NetnsRef,
    verdict::{Engine, EngineStats, Outcome, Verdict},
};

/// The listeners of a namespace (by inode), read when the kernel refused a connection there:
/// its name as the engine keys it, and who listens.
pub type ListenerLookup = Box<dyn FnMut(u64) -> Option<(String, Vec<Listener>)>>;

/// The namespaces (node and pods) a verdict may need to look into: for a timeout, the one where
/// the server listens (its accept queue); for a failed route lookup, the one where it failed.
pub type NamespaceList = Box<dyn Fn() -> Vec<NetnsRef>>;

pub struct Judge {
    /// One engine, or (the agent) one for TCP on every port and one for DNS.
    engines: Vec<Engine>,
    started: Instant,
    listeners: Option<ListenerLookup>,
    names: Option<Rc<RefCell<PodContext>>>,
    /// Name the endpoints of healthy verdicts too (the always-on agent only counts them).
    name_healthy: bool,
    /// Add this node's route to verdicts of attempts that went unanswered.
    route_hints: bool,
    namespaces: Option<NamespaceList>,
    looked: Looked,
    /// Failed route lookups judged lately, so that one connect() is one verdict (a lookup
    /// walks several tables, each miss an event).
    lookups: RecentLookups,
}

impl Judge {
    pub fn new(engine: Engine) -> Self {
        Self {
            engines: vec![engine],
            started: Instant::now(),
            listeners: None,
            names: None,
            name_healthy: true,
            route_hints: false,
            namespaces: None,
            looked: RefCell::new(crate::enrich::recent::Recent::new(
                QUEUE_RECHECK,
                QUEUE_REMEMBERED,
            )),
            lookups: RecentLookups::default(),
        }
    }

    /// A second engine for the other protocol: UDP events (and ICMP errors quoting the UDP
    /// engine's port) go to the UDP engine, the rest to the TCP one.
    pub fn and(mut self, engine: Engine) -> Self {
        self.engines.push(engine);
        self
    }

    /// Refusals get the listeners of their namespace as they are at that moment (an always-on
    /// engine has no listener snapshot from its start).
    pub fn with_listener_lookup(mut self, lookup: ListenerLookup) -> Self {
        self.listeners = Some(lookup);
        self
    }

    /// What the engines had to let go of to stay bounded.
    pub fn stats(&self) -> EngineStats {
        self.engines
            .iter()
            .fold(EngineStats::default(), |acc, e| acc + e.stats)
    }

    pub fn with_names(mut self, names: Option<Rc<RefCell<PodContext>>>) -> Self {
        self.names = names;
        self
    }

    /// Healthy verdicts keep their bare addresses (no name lookups for what is only counted).
    pub fn name_failures_only(mut self) -> Self {
        self.name_healthy = false;
        self
    }

    /// The judge runs in the node's namespace: its route toward a silent server is the node's.
    pub fn with_route_hints(mut self) -> Self {
        self.route_hints = true;
        self
    }

    /// Timeouts and failed route lookups are looked into in these namespaces (and this one).
    pub fn with_namespaces(mut self, list: NamespaceList) -> Self {
        self.namespaces = Some(list);
        self
    }

    fn now(&self) -> u64 {
        self.started.elapsed().as_nanos() as u64
    }

    pub fn push(&mut self, e: Event) -> Vec<Verdict> {
        let now = self.now();
        if e.kind == Kind::RouteFailed {
            return self.route_failed(e, now);
        }
        if let Some(lookup) = &mut self.listeners
            && no_socket(&e)
            && let Some(inode) = e.netns.as_ref().map(|n| n.inode)
            && let Some((name, found)) = lookup(inode)
        {
            for engine in &mut self.engines {
                engine.listeners_now(name.clone(), found.clone());
            }
        }
        let i = self.engine_for(&e);
        let v = self.engines[i].push(e, now);
        self.finalize(v)
    }

    /// A connect() whose route lookup failed: a verdict of its own (no packet, no port to
    /// join an attempt by), once per connect().
    fn route_failed(&mut self, e: Event, now: u64) -> Vec<Verdict> {
        if !self.lookups.first(&e, now) {
            return Vec::new();
        }
        self.finalize(vec![crate::verdict::noroute::lookup_failed(&e)])
    }

    /// Which engine takes `e`.
    fn engine_for(&self, e: &Event) -> usize {
        if self.engines.len() == 1 {
            return 0;
        }
        let udp = |eng: &Engine| {
            let port = eng.port();
            e.protocol == Protocol::Udp
                || (e.protocol.is_icmp() && (e.sport == port || e.dport == port))
        };
        self.engines
            .iter()
            .position(|eng| eng.is_udp() == udp(eng))
            .unwrap_or(0)
    }

    pub fn poll(&mut self) -> Vec<Verdict> {
        let now = self.now();
        let v = self.engines.iter_mut().flat_map(|e| e.poll(now)).collect();
        self.finalize(v)
    }

    pub fn finish(&mut self) -> Vec<Verdict> {
        let v = self.engines.iter_mut().flat_map(Engine::finish).collect();
        self.finalize(v)
    }

    fn finalize(&self, verdicts: Vec<Verdict>) -> Vec<Verdict> {
        verdicts
            .into_iter()
            .filter_map(|mut v| {
                if let Some(list) = &self.namespaces
                    && !look_inside(list, self.names.as_deref(), &self.looked, &mut v)
                {
                    return None;
                }
                if v.outcome == Outcome::MtuBlackhole {
                    name_mtu_device(self.namespaces.as_ref(), &mut v);
                }
                if let Some(names) = &self.names
                    && (self.name_healthy || failed(&v))
                {
                    let names = names.borrow();
                    name_verdict(&names, &mut v);
                    if !wanted(&names, &v) {
                        return None;
                    }
                }
                // Its texts name the listener's pod and container, known only now.
                crate::verdict::overflow::render(&mut v);
                if self.route_hints {
                    add_route_hint(&mut v);
                }
                Some(v)
            })
            .collect()
    }
}

/// The kernel found no socket for a packet: the namespace's listeners explain the refusal.
fn no_socket(e: &Event) -> bool {
    let no_socket = |r: Option<&str>| r == Some(drop_reason::NO_SOCKET);
    match e.kind {
        Kind::SendReset => no_socket(e.reset.as_ref().and_then(|r| r.reason.as_deref())),
        Kind::Drop => no_socket(e.drop.as_ref().map(|d| d.reason.as_str())),
        _ => false,
    }
}

/// A lookup or attempt that failed (for DNS: the application sees a failed lookup).
fn failed(v: &Verdict) -> bool {
    crate::verdict::dns_failure(v).is_some() || (v.udp.is_none() && v.outcome.is_failure())
}

/// How long what was found of a server's accept queue is reused: a flood of timeouts to one
/// server must not cost a namespace walk each (and a flood to many servers is held to the
/// reads per second of [`Recent`]).
const QUEUE_RECHECK: std::time::Duration = std::time::Duration::from_secs(1);
/// Servers remembered at most.
const QUEUE_REMEMBERED: usize = 1024;

/// Servers looked into lately, and the full accept queue found (None: not full).
type Looked = RefCell<
    crate::enrich::recent::Recent<
        (std::net::IpAddr, u16),
        Option<crate::enrich::backlog::ListenQueue>,
    >,
>;

/// How long a failed lookup of one task toward one destination counts as the same connect().
const LOOKUP_SAME_NS: u64 = 500_000_000;
/// Failed lookups remembered at most (a task retrying in a loop, many destinations).
const LOOKUPS_REMEMBERED: usize = 1024;

/// (namespace, pid, destination, port) of failed lookups judged, and when.
#[derive(Default)]
struct RecentLookups(std::collections::HashMap<(u64, u32, std::net::IpAddr, u16), u64>);

impl RecentLookups {
    /// Is `e` the first failed lookup of its connect()? The tables after the first miss (and
    /// the lookups of a retry within [`LOOKUP_SAME_NS`]) are not.
    fn first(&mut self, e: &Event, now: u64) -> bool {
        let key = (
            e.netns.as_ref().map_or(0, |n| n.inode),
            e.process.as_ref().map_or(0, |p| p.pid),
            e.dst,
            e.dport,
        );
        if self
            .0
            .get(&key)
            .is_some_and(|&t| now.saturating_sub(t) < LOOKUP_SAME_NS)
        {
            return false;
        }
        if self.0.len() >= LOOKUPS_REMEMBERED {
            self.0
                .retain(|_, t| now.saturating_sub(*t) < LOOKUP_SAME_NS);
            if self.0.len() >= LOOKUPS_REMEMBERED {
                // Still live: forgetting them may judge a retry's lookup again, so it is counted.
                crate::enrich::recent::count_forgotten(self.0.len());
                self.0.clear();
            }
        }
        self.0.insert(key, now);
        true
    }
}

/// What only the namespaces show: a timeout whose server's accept queue is full, and the route
/// a failed lookup hit. False: the verdict was wrong, drop it (a connect()'s lookup that
/// missed one table but found a usable route in the next).
fn look_inside(
    list: &NamespaceList,
    names: Option<&RefCell<PodContext>>,
    looked: &Looked,
    v: &mut Verdict,
) -> bool {
    let timed_out = v.outcome == Outcome::TimedOut && v.udp.is_none();
    let lookup_failed = v.no_route.as_ref().is_some_and(|n| n.route.is_none());
    if !timed_out && !lookup_failed {
        return true;
    }
    let mut all = list();
    if let Ok(me) = NetnsRef::current()
        && !all.iter().any(|n| n.inode == me.inode)
    {
        all.push(me);
    }
    let inode_of = |name: &str| names.and_then(|n| n.borrow().netns_inode(name));
    let named = |ns: &NetnsRef, name: &str| {
        ns.name == name || ns.inode.to_string() == name || inode_of(name) == Some(ns.inode)
    };
    if timed_out {
        // The server's own namespace first, when the events showed it.
        if let Some(n) = v.server.netns.clone() {
            all.sort_by_key(|ns| !named(ns, &n));
        }
        full_queue(&all, looked, v);
    } else if let Some(n) = &mut v.no_route
        && let Some(ns) = all
            .iter()
            .find(|ns| n.netns.as_deref().is_some_and(|x| named(ns, x)))
    {
        let dst = v.server.addr;
        n.route = ns
            .run(|| crate::enrich::route::error_route(dst))
            .ok()
            .and_then(Result::ok)
            .flatten();
        if n.in_connect && n.route.is_none() {
            return false;
        }
        crate::verdict::noroute::render(v);
    }
    true
}

/// A timed-out server on this node (routed to a pod's veth, or local) whose listener's accept
/// queue is full, in the first namespace of `all` that owns its address.
fn full_queue(all: &[NetnsRef], looked: &Looked, v: &mut Verdict) {
    let key = (v.server.addr, v.server.port);
    if !crate::enrich::backlog::served_here(key.0) {
        return;
    }
    let found = looked.borrow_mut().get_or(key, || {
        all.iter().find_map(|ns| {
            crate::enrich::backlog::full_queue(ns, key.0, key.1)
                .ok()
                .flatten()
        })
    });
    if let Some(q) = found.flatten() {
        crate::verdict::overflow::attach(v, q);
    }
}

/// `mtu_blackhole`: the route toward the server in the namespace where the segments were
/// dropped names the device and its MTU.
fn name_mtu_device(list: Option<&NamespaceList>, v: &mut Verdict) {
    let at = v
        .after_handshake
        .as_ref()
        .and_then(|a| a.mtu.as_ref())
        .and_then(|m| m.netns.clone());
    let dst = v.server.addr;
    let ns = list.and_then(|l| {
        l().into_iter().find(|ns| {
            at.as_deref()
                .is_some_and(|n| ns.name == n || ns.inode.to_string() == n)
        })
    });
    let route = match ns {
        Some(ns) => ns
            .run(|| crate::enrich::route::route_hint(dst))
            .ok()
            .and_then(Result::ok)
            .flatten(),
        None => crate::enrich::route::route_hint(dst).ok().flatten(),
    };
    if let Some(r) = route {
        crate::verdict::established::name_mtu_device(v, &r);
        v.route = Some(r);
    }
}

/// A stall that nothing on this node explains (no drop, no rule): like a timeout, the node's
/// route toward the server says what lies beyond.
fn unexplained_stall(v: &Verdict) -> bool {
    v.outcome == Outcome::Stalled
        && v.netfilter.is_none()
        && v.after_handshake
            .as_ref()
            .is_some_and(|a| a.drops.is_empty())
}

fn add_route_hint(v: &mut Verdict) {
    if (matches!(v.outcome, Outcome::TimedOut | Outcome::Unanswered) || unexplained_stall(v))
        && v.route.is_none()
        && let Ok(Some(r)) = crate::enrich::route::route_hint(v.server.addr)
    {
        v.explanation
            .push_str(&format!(" This node routes {} {}.", r.dst, r.describe()));
        v.route = Some(r);
    }
}

/// Is this verdict about the client pod asked for (if any)?
fn wanted(names: &PodContext, v: &Verdict) -> bool {
    let Some((ns, name)) = names.from_pod() else {
        return true;
    };
    let Some(peer) = &v.client.peer else {
        return false;
    };
    peer.pod.as_deref() == Some(name) && ns.is_none_or(|n| peer.namespace.as_deref() == Some(n))
}

/// Pod, container, node or Service of both endpoints, of the dialled address, of the listeners
/// and of the workload behind a Calico interface; for a refusal, what the pod declares.
fn name_verdict(names: &PodContext, v: &mut Verdict) {
    let inode = |n: &Option<String>| n.as_deref().and_then(|n| names.netns_inode(n));
    let inv = &names.inventory;
    let cgroup = v.client.pid.and_then(cgroup_of);
    v.client.peer = Some(inv.peer(
        v.client.addr,
        v.client.port,
        inode(&v.client.netns),
        cgroup.as_deref(),
    ));
    super::source_addr::name_client_by_netns(names, v, cgroup.as_deref());
    let server_ns = inode(&v.server.netns);
    v.server.peer = Some(inv.peer(v.server.addr, v.server.port, server_ns, None));
    name_client_in_next_steps(v);
    if let Some(d) = &mut v.dialed {
        d.peer = Some(inv.peer(d.addr, d.port, None, None));
    }
    if let Some(iface) = v
        .netfilter
        .as_ref()
        .and_then(|nf| nf.owner.interface.as_ref())
        && let Some(pod) = inv.pod_of_calico_iface(iface)
    {
        v.name_rule_workload(format!("{}/{}", pod.namespace, pod.name));
    }
    for l in &mut v.listeners {
        let cg = l.pid.and_then(cgroup_of);
        l.container = inv.peer(l.addr, l.port, server_ns, cg.as_deref()).container;
    }
    if v.outcome == Outcome::RefusedNoListener {
        declared_ports(names, v);
        if v.server.addr.is_loopback() {
            // An unnamed namespace is shown by its inode.
            let own = server_ns.or_else(|| v.server.netns.as_deref().and_then(|n| n.parse().ok()));
            served_elsewhere(names, v, own);
        }
    }
}

/// A command to run in the client pod (DNS next steps) gets its namespace and name.
fn name_client_in_next_steps(v: &mut Verdict) {
    let Some(crate::model::Peer {
        namespace: Some(ns),
        pod: Some(pod),
        ..
    }) = &v.client.peer
    else {
        return;
    };
    let named = format!("-n {ns} {pod}");
    for n in &mut v.next_steps {
        *n = n.replace(crate::verdict::udp::CLIENT_POD, &named);
    }
}

/// A refusal on 127.0.0.1 (or ::1) for a port another pod or a Service serves: the usual
/// mistake behind it, said with what to dial instead.
fn served_elsewhere(names: &PodContext, v: &mut Verdict, server_ns: Option<u64>) {
    let port = v.server.port;
    let servers =
        crate::enrich::served::serving(&names.inventory, port, v.udp.is_some(), server_ns);
    if let Some((why, next)) = crate::enrich::served::loopback_hint(&servers, v.server.addr, port) {
        v.explanation.push_str(&why);
        // First: it is the likely fix.
        v.next_steps.splice(0..0, next);
    }
}

/// What the pod declares versus what listens: the classic S2 misconfiguration.
fn declared_ports(names: &PodContext, v: &mut Verdict) {
    let Some(peer) = &v.server.peer else {
        return;
    };
    let (Some(ns), Some(name)) = (&peer.namespace, &peer.pod) else {
        return;
    };
    let Some(pod) = names.inventory.find_pod(Some(ns), name).first().copied() else {
        return;
    };
    let declared: Vec<String> = pod
        .ports
        .iter()
        .map(|(c, p)| format!("{p} ({c})"))
        .collect();
    if let Some((c, _)) = pod.ports.iter().find(|(_, p)| *p == v.server.port) {
        v.explanation.push_str(&format!(
            " Pod {ns}/{name} declares containerPort {} in container {c}, but nothing listens on it.",
            v.server.port
        ));
    } else if !declared.is_empty() {
        v.explanation.push_str(&format!(
            " Pod {ns}/{name} declares containerPorts {}.",
            declared.join(", ")
        ));
    }
}

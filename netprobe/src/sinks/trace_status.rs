//! The agent's part of a `Trace` object (issue #24): a sink that hands the verdicts (and, when
//! asked, the events) of each running trace's scope to the controller that writes them into
//! the object's status ([`crate::sources::traces`]).
//!
//! The scope is enforced here, before anything leaves the session: a record is a trace's only
//! when one of its endpoints is an address of the traced pod and its port is the traced port.
//! What the record says of the other endpoint is cut to what a tenant may see of a peer (its
//! pod, namespace, workload, IP and the rule that decided): never its processes or listeners.

use std::{
    collections::HashSet,
    io,
    net::IpAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use serde_json::Value;

use super::{Sink, ndjson::Ndjson};
use crate::{events::Event, model::Protocol, verdict::Verdict};

/// Which Trace object a record is for: (namespace, name, uid).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TraceKey {
    pub namespace: String,
    pub name: String,
    pub uid: String,
}

/// A record for one trace, as `trace -o json` prints it (stamped with its time and node), cut
/// to what the trace may see.
#[derive(Debug)]
pub enum TraceRecord {
    Verdict(Box<Verdict>),
    Event(Box<Event>),
}

/// Records in flight from the session to the controller, at most; the rest are counted as
/// dropped in the object's status (`verdictsDropped`, `eventsDropped`).
pub const IN_FLIGHT: usize = 1024;

/// What a running trace looks at.
#[derive(Debug)]
pub struct Subscription {
    pub key: TraceKey,
    /// The traced pod's addresses: one of them is an endpoint of every record it gets.
    pub addrs: Vec<IpAddr>,
    pub port: u16,
    pub protocol: Protocol,
    /// Also the raw events (`spec.events`).
    pub events: bool,
    /// Records the channel refused (full): verdicts, events.
    pub lost: Arc<(AtomicU64, AtomicU64)>,
}

impl Subscription {
    /// Is a flow between `a` and `b` (ports `pa`, `pb`) this trace's? One end is the pod, and
    /// the traced port is one of the flow's ports.
    fn covers(&self, protocol: Protocol, a: (IpAddr, u16), b: (IpAddr, u16)) -> bool {
        let proto_ok = match protocol {
            Protocol::Tcp | Protocol::Udp => protocol == self.protocol,
            // ICMP errors carry the tuple of the packet they quote.
            _ => true,
        };
        proto_ok
            && (self.addrs.contains(&a.0) || self.addrs.contains(&b.0))
            && (a.1 == self.port || b.1 == self.port)
    }

    fn verdict_covered(&self, v: &Verdict) -> bool {
        let protocol = if v.udp.is_some() {
            Protocol::Udp
        } else {
            Protocol::Tcp
        };
        let client = (v.client.addr, v.client.port);
        // The pod dialled a Service: the port dialled is the traced one, the backend's may differ.
        let server_port = v
            .dialed
            .as_ref()
            .filter(|d| d.port == self.port)
            .map_or(v.server.port, |d| d.port);
        self.covers(protocol, client, (v.server.addr, server_port))
    }
}

/// The running traces, shared by the controller (which adds and removes them) and the sink.
#[derive(Clone)]
pub struct Subscriptions {
    running: Arc<Mutex<Vec<Subscription>>>,
    tx: tokio::sync::mpsc::Sender<(TraceKey, TraceRecord)>,
}

impl Subscriptions {
    pub fn new() -> (Self, tokio::sync::mpsc::Receiver<(TraceKey, TraceRecord)>) {
        let (tx, rx) = tokio::sync::mpsc::channel(IN_FLIGHT);
        let running = Arc::new(Mutex::new(Vec::new()));
        (Self { running, tx }, rx)
    }

    pub fn add(&self, s: Subscription) {
        let mut running = self.running.lock().expect("subscriptions lock");
        running.retain(|r| r.key != s.key);
        running.push(s);
    }

    /// Stops a trace's records at once; its addresses (to let go of what the session holds for
    /// them), if it was running.
    pub fn remove(&self, key: &TraceKey) -> Option<Vec<IpAddr>> {
        let mut running = self.running.lock().expect("subscriptions lock");
        let at = running.iter().position(|r| r.key == *key)?;
        Some(running.remove(at).addrs)
    }

    pub fn len(&self) -> usize {
        self.running.lock().expect("subscriptions lock").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Hands a record to the controller; counts it lost when it could not be rendered or the
    /// controller is behind.
    fn send(&self, s: &Subscription, record: Option<TraceRecord>, verdict: bool) {
        let sent = record.is_some_and(|r| self.tx.try_send((s.key.clone(), r)).is_ok());
        if !sent {
            let counter = if verdict { &s.lost.0 } else { &s.lost.1 };
            counter.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The sink of the agent's session that feeds the running traces.
pub struct TraceStatusSink {
    subs: Subscriptions,
    node: String,
}

impl TraceStatusSink {
    pub fn new(subs: Subscriptions, node: impl Into<String>) -> Self {
        Self {
            subs,
            node: node.into(),
        }
    }

    /// The record exactly as `trace -o json` writes it (stamped with time and node).
    fn render(&self, record: &impl super::ndjson::Record) -> serde_json::Result<Value> {
        let mut buf = Vec::new();
        Ndjson::new(&mut buf)
            .on_node(self.node.as_str())
            .write(record)
            .map_err(serde_json::Error::io)?;
        serde_json::from_slice(&buf)
    }
}

impl Sink for TraceStatusSink {
    // A record that cannot be rendered is counted as lost for its trace, never an error: the
    // agent's session must not end over one trace.
    fn verdict(&mut self, v: &Verdict) -> io::Result<()> {
        let running = self.subs.running.lock().expect("subscriptions lock");
        let mut rendered = None;
        for s in running.iter().filter(|s| s.verdict_covered(v)) {
            let r = rendered.get_or_insert_with(|| self.render(v).ok());
            let record = r.clone().and_then(|mut r| {
                redact_verdict(&mut r, &s.addrs);
                serde_json::from_value(r).ok()
            });
            self.subs
                .send(s, record.map(|v| TraceRecord::Verdict(Box::new(v))), true);
        }
        Ok(())
    }

    fn event(&mut self, e: &Event) -> io::Result<()> {
        let running = self.subs.running.lock().expect("subscriptions lock");
        for s in running
            .iter()
            .filter(|s| s.events && s.covers(e.protocol, (e.src, e.sport), (e.dst, e.dport)))
        {
            let record = self.render(e).and_then(|mut r| {
                redact_event(&mut r, e, &s.addrs);
                Ok(TraceRecord::Event(Box::new(serde_json::from_value(r)?)))
            });
            self.subs.send(s, record.ok(), false);
        }
        Ok(())
    }
}

/// What a verdict may say of an endpoint that is not the traced pod: its address, port and
/// `peer` (pod, container, namespace, workload, Service) but not its processes, its
/// namespace's name on the node, or (for a peer server) its listeners. Their strings are also
/// cut from the verdict's texts.
pub fn redact_verdict(v: &mut Value, pod_addrs: &[IpAddr]) {
    let mut secrets = HashSet::new();
    let mut peer_sides = Vec::new();
    for side in ["client", "server"] {
        let is_pod = v[side]["addr"]
            .as_str()
            .and_then(|a| a.parse::<IpAddr>().ok())
            .is_some_and(|a| pod_addrs.contains(&a));
        if is_pod {
            continue;
        }
        peer_sides.push(side);
        if let Some(ep) = v[side].as_object_mut() {
            cut_endpoint(ep, &mut secrets);
        }
    }
    let o = v.as_object_mut().expect("a verdict is an object");
    if peer_sides.contains(&"server") {
        if let Some(Value::Array(listeners)) = o.get_mut("listeners") {
            listeners
                .iter()
                .for_each(|l| collect_process_strings(l, &mut secrets));
            listeners.clear();
        }
        if let Some(q) = o.remove("listen_queue") {
            collect_process_strings(&q, &mut secrets);
        }
    }
    // A reset sent by the peer's socket names the process that closed it.
    if let Some(sender) = o
        .get_mut("after_handshake")
        .and_then(|a| a.get_mut("reset_sender"))
        .and_then(Value::as_object_mut)
        && sender
            .get("side")
            .and_then(Value::as_str)
            .is_some_and(|side| peer_sides.contains(&side))
    {
        for field in ["process", "netns"] {
            if let Some(p) = sender.remove(field) {
                collect_process_strings(&p, &mut secrets);
            }
        }
    }
    scrub_texts(v, &secrets);
}

/// An event's endpoint that is not the pod loses its process (the event's `process` is the
/// local socket's: cut when that socket is the peer's).
fn redact_event(record: &mut Value, e: &Event, pod_addrs: &[IpAddr]) {
    let mut secrets = HashSet::new();
    let pod_is_src = pod_addrs.contains(&e.src);
    let pod_is_dst = pod_addrs.contains(&e.dst);
    if !(pod_is_src && pod_is_dst)
        && let Some(o) = record.as_object_mut()
    {
        if let Some(p) = o.remove("process") {
            collect_process_strings(&p, &mut secrets);
        }
        if !pod_is_src || !pod_is_dst {
            o.remove("netns");
        }
    }
    scrub_texts(record, &secrets);
}

fn cut_endpoint(ep: &mut serde_json::Map<String, Value>, secrets: &mut HashSet<String>) {
    for field in ["process", "pid", "netns"] {
        if let Some(x) = ep.remove(field) {
            collect_process_strings(&x, secrets);
        }
    }
}

/// Strings and numbers that name a process (comm, pid, container) inside `v`.
fn collect_process_strings(v: &Value, out: &mut HashSet<String>) {
    match v {
        Value::String(s) if s.len() >= 3 => {
            out.insert(s.clone());
        }
        Value::Number(n) => {
            out.insert(n.to_string());
        }
        Value::Array(a) => a.iter().for_each(|x| collect_process_strings(x, out)),
        Value::Object(o) => {
            for (k, x) in o {
                // Addresses and ports stay: they are the peer's, which the verdict names anyway.
                if !matches!(k.as_str(), "addr" | "port" | "family" | "proto") {
                    collect_process_strings(x, out);
                }
            }
        }
        _ => {}
    }
}

/// Replaces every cut string in the texts a person reads (headline, explanation, next steps,
/// the timeline), so a peer's process is not named there either.
fn scrub_texts(v: &mut Value, secrets: &HashSet<String>) {
    if secrets.is_empty() {
        return;
    }
    let scrub = |s: &mut String| {
        for secret in secrets {
            // Numbers (pids) only as whole words: a port or a count must stay.
            if secret.chars().all(|c| c.is_ascii_digit()) {
                *s = replace_word(s, secret);
            } else if s.contains(secret.as_str()) {
                *s = s.replace(secret.as_str(), "[redacted]");
            }
        }
    };
    for field in ["headline", "explanation"] {
        if let Some(Value::String(s)) = v.get_mut(field) {
            scrub(s);
        }
    }
    for list in ["next_steps"] {
        if let Some(Value::Array(a)) = v.get_mut(list) {
            a.iter_mut().for_each(|x| {
                if let Value::String(s) = x {
                    scrub(s)
                }
            });
        }
    }
    if let Some(Value::Array(a)) = v.get_mut("timeline") {
        for c in a {
            if let Some(Value::String(s)) = c.get_mut("what") {
                scrub(s);
            }
        }
    }
}

/// `s` with whole-word occurrences of `word` replaced.
fn replace_word(s: &str, word: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(at) = rest.find(word) {
        let before = rest[..at].chars().next_back();
        let after = rest[at + word.len()..].chars().next();
        let bounded = |c: Option<char>| c.is_none_or(|c| !c.is_ascii_alphanumeric());
        out.push_str(&rest[..at]);
        if bounded(before) && bounded(after) {
            out.push_str("[redacted]");
        } else {
            out.push_str(word);
        }
        rest = &rest[at + word.len()..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn sub(addrs: &[&str], port: u16, protocol: Protocol) -> Subscription {
        Subscription {
            key: TraceKey {
                namespace: "team-a".into(),
                name: "t".into(),
                uid: "u".into(),
            },
            addrs: addrs.iter().map(|a| a.parse().unwrap()).collect(),
            port,
            protocol,
            events: true,
            lost: Arc::default(),
        }
    }

    fn at(a: &str, port: u16) -> (IpAddr, u16) {
        (a.parse().unwrap(), port)
    }

    /// A flow is a trace's only with the pod at one end and the traced port at either end:
    /// two other pods talking on the same port are not.
    #[test]
    fn the_scope_is_the_pods_addresses_and_the_port() {
        let s = sub(&["10.42.0.40", "fd00::40"], 5432, Protocol::Tcp);
        let tcp = Protocol::Tcp;
        assert!(s.covers(tcp, at("10.42.0.40", 40000), at("10.42.0.41", 5432)));
        assert!(s.covers(tcp, at("10.42.0.41", 40000), at("10.42.0.40", 5432)));
        assert!(s.covers(tcp, at("fd00::40", 5432), at("fd00::41", 40000)));
        // team-b's flow on the same port.
        assert!(!s.covers(tcp, at("10.42.0.41", 40000), at("10.42.0.42", 5432)));
        // The pod on another port.
        assert!(!s.covers(tcp, at("10.42.0.40", 40000), at("10.42.0.41", 80)));
        // Another protocol.
        assert!(!s.covers(
            Protocol::Udp,
            at("10.42.0.40", 40000),
            at("10.42.0.41", 5432)
        ));
        // An ICMP error quoting the pod's flow.
        assert!(s.covers(
            Protocol::Icmp,
            at("10.42.0.40", 40000),
            at("10.42.0.41", 5432)
        ));
    }

    fn verdict(client: &str, server: &str) -> Value {
        json!({
            "schema": "netprobe.verdict/v1",
            "headline": "connection refused by python3 (pid 4242)",
            "explanation": "python3 (pid 4242) listens on 127.0.0.1:9000, not on port 9500 of 10.42.0.41",
            "next_steps": ["ask the owner of python3"],
            "client": {"addr": client, "port": 40000, "process": "curl", "pid": 777,
                       "netns": "cni-aaaa", "peer": {"pod": "web-0", "namespace": "team-a", "container": "web"}},
            "server": {"addr": server, "port": 9500, "netns": "cni-bbbb",
                       "peer": {"pod": "db-0", "namespace": "team-b", "container": "db"}},
            "listeners": [{"addr": "127.0.0.1", "port": 9000, "v6only": false, "pid": 4242, "comm": "python3"}],
            "timeline": [{"time_ns": 1, "what": "SYN sent by curl (pid 777)"}],
        })
    }

    /// The traced pod is the client: the peer server's listeners and namespace go, and their
    /// process names are cut from the texts; the pod's own process stays.
    #[test]
    fn a_peer_servers_processes_and_listeners_are_cut() {
        let mut v = verdict("10.42.0.40", "10.42.0.41");
        redact_verdict(&mut v, &["10.42.0.40".parse().unwrap()]);
        assert_eq!(v["listeners"], json!([]));
        assert!(v["server"].get("netns").is_none(), "{v:#}");
        assert_eq!(v["server"]["peer"]["pod"], "db-0");
        assert_eq!(v["server"]["peer"]["namespace"], "team-b");
        assert_eq!(v["client"]["process"], "curl");
        assert_eq!(v["client"]["pid"], 777);
        let text = v.to_string();
        assert!(!text.contains("python3") && !text.contains("4242"), "{v:#}");
        // Ports and addresses are not processes.
        assert!(
            v["explanation"]
                .as_str()
                .unwrap()
                .contains("port 9500 of 10.42.0.41"),
            "{v:#}"
        );
        assert!(text.contains("SYN sent by curl (pid 777)"), "{v:#}");
    }

    /// The traced pod is the server: the peer client's process goes, the pod's listeners stay.
    #[test]
    fn a_peer_clients_process_is_cut() {
        let mut v = verdict("10.42.0.41", "10.42.0.40");
        redact_verdict(&mut v, &["10.42.0.40".parse().unwrap()]);
        for f in ["process", "pid", "netns"] {
            assert!(v["client"].get(f).is_none(), "{f}: {v:#}");
        }
        assert_eq!(v["listeners"][0]["comm"], "python3");
        assert_eq!(
            v["timeline"][0]["what"],
            "SYN sent by [redacted] (pid [redacted])"
        );
    }

    #[test]
    fn whole_words_only() {
        assert_eq!(
            replace_word("pid 77 port 7700 77", "77"),
            "pid [redacted] port 7700 [redacted]"
        );
    }
}

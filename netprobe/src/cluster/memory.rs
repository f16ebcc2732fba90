//! The agent's memory of failures, a sink: every failed connection attempt or DNS lookup verdict,
//! grouped by client workload → destination (Service, else server workload) and port, outcome
//! and rule, counted per minute for a window (default 60 min), with the latest verdict of each
//! group as its example. Served on `/v1/failures` ([`crate::cluster::failures`]).
//!
//! Keyed by what tenants control, so bounded: at most `max_groups` groups; the group seen
//! longest ago is forgotten first, and forgetting is counted (`evicted` in the answer).

use std::{
    collections::{HashMap, VecDeque},
    io,
    net::IpAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use super::failures::{
    FailureGroup, FailuresAnswer, FailuresQuery, GroupKey, MinuteCount, NodeReport, Party, RuleRef,
    minute_of, recent,
};
use crate::{
    model::{DnsFailureReason, Endpoint, Named, Peer},
    sinks::Sink,
    verdict::Verdict,
};

pub const DEFAULT_WINDOW: Duration = Duration::from_secs(3600);
pub const DEFAULT_MAX_GROUPS: usize = 1000;

/// The memory, shared with the HTTP server's tasks.
pub type SharedFailures = Arc<Mutex<Failures>>;

/// What the agent remembers of one group.
struct Memory {
    /// Oldest first; only minutes with failures.
    minutes: VecDeque<MinuteCount>,
    first_seen: u64,
    last_seen: u64,
    example: Verdict,
}

pub struct Failures {
    node: String,
    window_s: u64,
    max_groups: usize,
    groups: HashMap<GroupKey, Memory>,
    evicted: u64,
    /// Last time expired minutes were dropped (Unix seconds).
    expired_at: u64,
}

/// Now, Unix seconds.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The node's name: `--node-name`, else the host name.
pub fn this_node(name: Option<&str>) -> String {
    name.map(str::to_string).unwrap_or_else(|| {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_default()
    })
}

/// Did the attempt or lookup fail? (A DNS SERVFAIL or REFUSED is an answer that failed.)
pub fn failed(v: &Verdict) -> bool {
    let dns = v.udp.as_ref().and_then(|u| u.dns.as_ref());
    v.outcome.is_failure()
        || dns.is_some_and(|q| DnsFailureReason::of(v.outcome, q.rcode.as_deref()).is_some())
}

/// A side as tenants name it: workload, else pod, else Service, else the bare address.
fn party(peer: Option<&Peer>, addr: IpAddr) -> Party {
    let Some(p) = peer else {
        return Party {
            namespace: None,
            name: addr.to_string(),
        };
    };
    let service = p.service.as_deref().map(|s| {
        // `namespace/name:port`
        let name = s.split_once('/').map_or(s, |(_, n)| n);
        format!("Service/{}", name.split_once(':').map_or(name, |(n, _)| n))
    });
    let name = p
        .workload
        .clone()
        .or_else(|| p.pod.as_ref().map(|pod| format!("Pod/{pod}")))
        .or(service);
    match name {
        Some(name) => Party {
            namespace: p.namespace.clone(),
            name,
        },
        None => party(None, addr),
    }
}

pub fn endpoint_party(e: &Endpoint) -> Party {
    party(e.peer.as_ref(), e.addr)
}

/// The Service the client dialled, else where the attempt went; and the port dialled.
fn destination(v: &Verdict) -> (Party, u16) {
    match &v.dialed {
        Some(d) if d.peer.as_ref().is_some_and(|p| p.service.is_some()) => {
            (endpoint_party(d), d.port)
        }
        _ => (endpoint_party(&v.server), v.server.port),
    }
}

fn rule(v: &Verdict) -> Option<RuleRef> {
    let nf = v.netfilter.as_ref()?;
    Some(RuleRef {
        owner: nf.owner.system.name().into_owned(),
        policies: nf.owner.policies.clone(),
        table: nf.table.clone(),
        chain: nf.chain.clone(),
        position: nf.position,
    })
}

/// The group a failed verdict belongs to.
pub fn key_of(v: &Verdict) -> GroupKey {
    let (destination, port) = destination(v);
    GroupKey {
        client: endpoint_party(&v.client),
        destination,
        port,
        outcome: v.outcome,
        rule: rule(v),
    }
}

impl Failures {
    pub fn new(node: String, window: Duration, max_groups: usize) -> Self {
        Self {
            node,
            window_s: window.as_secs().max(60),
            max_groups: max_groups.max(1),
            groups: HashMap::new(),
            evicted: 0,
            expired_at: 0,
        }
    }

    /// The default memory (60 min, 1000 groups), shared.
    pub fn shared(node: String) -> SharedFailures {
        Arc::new(Mutex::new(Self::new(
            node,
            DEFAULT_WINDOW,
            DEFAULT_MAX_GROUPS,
        )))
    }

    /// Counts a failed verdict at `now` (Unix seconds).
    pub fn record(&mut self, v: &Verdict, now: u64) {
        let key = key_of(v);
        if !self.groups.contains_key(&key) && self.groups.len() >= self.max_groups {
            self.expire(now);
            if self.groups.len() >= self.max_groups {
                self.evict_oldest();
            }
        }
        let m = self.groups.entry(key).or_insert_with(|| Memory {
            minutes: VecDeque::new(),
            first_seen: now,
            last_seen: now,
            example: v.clone(),
        });
        let minute = minute_of(now);
        match m.minutes.back_mut() {
            Some(c) if c.minute == minute => c.count += 1,
            _ => m.minutes.push_back(MinuteCount { minute, count: 1 }),
        }
        m.last_seen = m.last_seen.max(now);
        m.example = v.clone();
    }

    /// Forgets minutes older than the window, and groups left without any.
    pub fn expire(&mut self, now: u64) {
        self.expired_at = now;
        let oldest = minute_of(now).saturating_sub(self.window_s);
        self.groups.retain(|_, m| {
            while m.minutes.front().is_some_and(|c| c.minute < oldest) {
                m.minutes.pop_front();
            }
            !m.minutes.is_empty()
        });
    }

    fn evict_oldest(&mut self) {
        let oldest = self
            .groups
            .iter()
            .min_by_key(|(_, m)| m.last_seen)
            .map(|(k, _)| k.clone());
        if let Some(k) = oldest {
            self.groups.remove(&k);
            self.evicted += 1;
        }
    }

    /// The groups `q` selects, counted over its `since` (at most the window).
    pub fn answer(&mut self, q: &FailuresQuery, now: u64) -> FailuresAnswer {
        self.expire(now);
        let from = minute_of(now.saturating_sub(q.since.as_secs()));
        let groups = self
            .groups
            .iter()
            .filter(|(k, _)| q.selects(k))
            .filter_map(|(k, m)| self.group(k, m, from, now))
            .collect();
        let report = NodeReport {
            node: self.node.clone(),
            window_s: Some(self.window_s),
            evicted: self.evicted,
            error: None,
        };
        FailuresAnswer::new(now, q.since, vec![report], groups)
    }

    fn group(&self, k: &GroupKey, m: &Memory, from: u64, now: u64) -> Option<FailureGroup> {
        let per_minute: Vec<MinuteCount> = m
            .minutes
            .iter()
            .filter(|c| c.minute >= from)
            .copied()
            .collect();
        (!per_minute.is_empty()).then(|| FailureGroup {
            key: k.clone(),
            count: per_minute.iter().map(|c| c.count).sum(),
            now: recent(&per_minute, now),
            per_minute,
            first_seen: m.first_seen,
            last_seen: m.last_seen,
            nodes: vec![self.node.clone()],
            example: Some(Box::new(m.example.clone())),
            note: None,
            events: None,
        })
    }
}

/// Feeds the memory with the session's failed verdicts.
pub struct FailuresSink(SharedFailures);

impl FailuresSink {
    pub fn new(memory: SharedFailures) -> Self {
        Self(memory)
    }

    fn memory(&self) -> std::sync::MutexGuard<'_, Failures> {
        // A panic elsewhere while counting leaves counts that are still counts.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Sink for FailuresSink {
    fn verdict(&mut self, v: &Verdict) -> io::Result<()> {
        if failed(v) {
            self.memory().record(v, unix_now());
        }
        Ok(())
    }

    fn tick(&mut self) -> io::Result<()> {
        let now = unix_now();
        let mut m = self.memory();
        // Expired minutes go once a minute, not on every 200 ms tick.
        if now >= m.expired_at + 60 {
            m.expire(now);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        attribution::{Netfilter, Owner},
        model::{Cni, Outcome},
    };

    /// The start of a minute.
    const T: u64 = 1_800_000_000;

    fn peer(ns: &str, pod: &str, workload: Option<&str>) -> Peer {
        Peer {
            namespace: Some(ns.into()),
            pod: Some(pod.into()),
            workload: workload.map(str::to_string),
            ..Default::default()
        }
    }

    /// A drop of client `pod` (of `workload`) dialling the scheduler's ClusterIP.
    fn dropped(pod: &str, workload: Option<&str>, explanation: &str) -> Verdict {
        let mut v = crate::verdict::classify(
            &[],
            ("10.42.0.5".parse().unwrap(), 40000),
            &Default::default(),
            &Default::default(),
        );
        v.outcome = Outcome::DroppedByRule;
        v.explanation = explanation.into();
        v.client.peer = Some(peer("financial-inference", pod, workload));
        v.server = Endpoint::at("10.42.1.7".parse().unwrap(), 9004);
        v.server.peer = Some(peer(
            "financial-inference",
            "seldon-scheduler-0",
            Some("StatefulSet/seldon-scheduler"),
        ));
        let mut dialed = Endpoint::at("10.43.51.131".parse().unwrap(), 9004);
        dialed.peer = Some(Peer {
            namespace: Some("financial-inference".into()),
            service: Some("financial-inference/seldon-scheduler:9004".into()),
            ..Default::default()
        });
        v.dialed = Some(dialed);
        v
    }

    fn with_rule(mut v: Verdict) -> Verdict {
        let mut owner = Owner::new(Cni::Calico, "calico-end-of-tier-deny", "deny".into());
        owner.policies = vec!["financial-inference/scheduler-allow-xds".into()];
        v.netfilter = Some(Netfilter {
            backend: crate::model::Backend::IptablesNft,
            family: "ip".into(),
            hook: Some("forward".into()),
            table: "filter".into(),
            chain: "cali-tw-cali0123".into(),
            handle: Some(12),
            position: Some(7),
            rule: None,
            comments: Vec::new(),
            action: crate::model::NfAction::Drop,
            client_sees: "timeout".into(),
            path: Vec::new(),
            owner,
            evidence: Default::default(),
        });
        v
    }

    fn memory(max: usize) -> Failures {
        Failures::new("node-a".into(), DEFAULT_WINDOW, max)
    }

    fn all(since_s: u64) -> FailuresQuery {
        FailuresQuery {
            since: Duration::from_secs(since_s),
            ..Default::default()
        }
    }

    #[test]
    fn failures_group_by_client_workload_service_port_outcome_and_rule() {
        let mut f = memory(10);
        // Two pods of one Deployment: one group (a restarted pod is no new group).
        f.record(&dropped("client-0", Some("Deployment/client"), "first."), T);
        f.record(
            &dropped("client-1", Some("Deployment/client"), "second."),
            T + 5,
        );
        // The same attempts dropped by a named rule: another group.
        f.record(
            &with_rule(dropped("client-0", Some("Deployment/client"), "r.")),
            T + 6,
        );
        // No workload known: the pod.
        f.record(&dropped("lonely", None, "pod."), T + 7);
        let a = f.answer(&all(600), T + 10);
        assert_eq!(a.groups.len(), 3, "{:#?}", a.groups);
        let g = &a.groups[0];
        assert_eq!(
            g.key.client.describe(),
            "financial-inference/Deployment/client"
        );
        assert_eq!(
            g.key.destination.describe(),
            "financial-inference/Service/seldon-scheduler"
        );
        assert_eq!((g.key.port, g.key.outcome), (9004, Outcome::DroppedByRule));
        assert_eq!(
            (g.count, g.now, g.first_seen, g.last_seen),
            (2, 2, T, T + 5)
        );
        assert_eq!(
            g.example.as_ref().unwrap().explanation,
            "second.",
            "the latest is the example"
        );
        let r = a
            .groups
            .iter()
            .find_map(|g| g.key.rule.as_ref())
            .expect("the ruled group");
        assert_eq!(
            r.describe(),
            "calico cali-tw-cali0123 rule 7 (policy financial-inference/scheduler-allow-xds)"
        );
        assert!(a.groups.iter().any(|g| g.key.client.name == "Pod/lonely"));
        assert_eq!(a.nodes[0].node, "node-a");
        assert_eq!(a.nodes[0].window_s, Some(3600));
    }

    #[test]
    fn without_a_service_the_destination_is_the_server_workload_then_its_address() {
        let mut v = dropped("client-0", Some("Deployment/client"), "x.");
        v.dialed = None;
        assert_eq!(key_of(&v).destination.name, "StatefulSet/seldon-scheduler");
        v.server.peer = None;
        let k = key_of(&v);
        assert_eq!((k.destination.name.as_str(), k.port), ("10.42.1.7", 9004));
        assert_eq!(k.destination.namespace, None);
    }

    #[test]
    fn minutes_expire_with_the_window_and_since_selects_the_recent_ones() {
        let mut f = Failures::new("n".into(), Duration::from_secs(600), 10);
        let v = dropped("client-0", Some("Deployment/client"), "x.");
        f.record(&v, T);
        f.record(&v, T + 1);
        f.record(&v, T + 300);
        f.record(&v, T + 420);
        let a = f.answer(&all(3600), T + 430);
        let per: Vec<(u64, u64)> = a.groups[0]
            .per_minute
            .iter()
            .map(|c| (c.minute, c.count))
            .collect();
        assert_eq!(per, [(T, 2), (T + 300, 1), (T + 420, 1)]);
        assert_eq!((a.groups[0].count, a.groups[0].now), (4, 1));
        // The last 3 minutes only.
        assert_eq!(f.answer(&all(180), T + 430).groups[0].count, 2);
        // The window (10 min) passed for the first minute.
        assert_eq!(f.answer(&all(3600), T + 660).groups[0].count, 2);
        // Nothing left in the window: the group is gone, and that is no eviction.
        let a = f.answer(&all(3600), T + 1100);
        assert!(a.groups.is_empty());
        assert_eq!(a.nodes[0].evicted, 0);
        assert!(f.groups.is_empty());
    }

    #[test]
    fn the_memory_is_bounded_and_forgets_the_group_seen_longest_ago_counting_it() {
        let mut f = memory(3);
        for (i, w) in ["a", "b", "c"].iter().enumerate() {
            f.record(
                &dropped("p", Some(&format!("Deployment/{w}")), "x."),
                T + i as u64,
            );
        }
        // "a" is seen again: "b" is now the one seen longest ago.
        f.record(&dropped("p", Some("Deployment/a"), "x."), T + 10);
        f.record(&dropped("p", Some("Deployment/d"), "x."), T + 11);
        f.record(&dropped("p", Some("Deployment/e"), "x."), T + 12);
        let a = f.answer(&all(600), T + 20);
        let mut names: Vec<&str> = a
            .groups
            .iter()
            .map(|g| g.key.client.name.as_str())
            .collect();
        names.sort();
        assert_eq!(names, ["Deployment/a", "Deployment/d", "Deployment/e"]);
        assert_eq!(a.nodes[0].evicted, 2);
    }

    #[test]
    fn the_answer_is_filtered_by_namespace_and_workload() {
        let mut f = memory(10);
        f.record(&dropped("client-0", Some("Deployment/client"), "x."), T);
        let mut other = dropped("b-0", Some("Deployment/b"), "x.");
        other.client.peer.as_mut().unwrap().namespace = Some("team-b".into());
        other.dialed = None;
        other.server.peer = None;
        f.record(&other, T);
        let q = |s: &str| FailuresQuery::from_query(s).unwrap();
        assert_eq!(f.answer(&q("namespace=team-b"), T + 1).groups.len(), 1);
        assert_eq!(
            f.answer(&q("namespace=financial-inference"), T + 1)
                .groups
                .len(),
            1
        );
        assert_eq!(
            f.answer(&q("workload=seldon-scheduler"), T + 1)
                .groups
                .len(),
            1
        );
        assert_eq!(f.answer(&q("workload=Deployment/b"), T + 1).groups.len(), 1);
        assert_eq!(f.answer(&q(""), T + 1).groups.len(), 2);
    }

    #[test]
    fn a_servfail_is_a_failure_nxdomain_is_not_and_the_example_names_the_query() {
        use crate::verdict::udp::{DnsLookup, UdpExchange};
        let mut v = dropped("client-0", Some("Deployment/client"), "x.");
        v.outcome = Outcome::Answered;
        let lookup = |rcode: &str| DnsLookup {
            id: 7,
            name: Some("seldon-scheduler.financial-inference.svc.cluster.local".into()),
            qtype: Some("A".into()),
            rcode: Some(rcode.into()),
            answers: Some(0),
        };
        v.udp = Some(UdpExchange {
            requests: 1,
            replied: true,
            dns: Some(lookup("SERVFAIL")),
        });
        assert!(failed(&v));
        assert!(
            crate::cluster::failures::one_line(&v)
                .contains(" (DNS A seldon-scheduler.financial-inference.svc.cluster.local): x.")
        );
        v.udp.as_mut().unwrap().dns = Some(lookup("NXDOMAIN"));
        assert!(!failed(&v), "NXDOMAIN is an answer");
    }

    #[test]
    fn the_sink_keeps_failures_only() {
        let shared = Failures::shared("node-a".into());
        let mut sink = FailuresSink::new(shared.clone());
        let mut ok = dropped("client-0", Some("Deployment/client"), "x.");
        ok.outcome = Outcome::Connected;
        sink.verdict(&ok).unwrap();
        sink.verdict(&dropped("client-0", Some("Deployment/client"), "x."))
            .unwrap();
        sink.tick().unwrap();
        let a = shared.lock().unwrap().answer(&all(600), unix_now());
        assert_eq!(a.groups.len(), 1);
        assert_eq!(a.groups[0].count, 1);
    }
}

//! Kubernetes Events: every failed verdict becomes a `Warning` Event on the server pod and on the
//! client pod (those of this node: each agent speaks for its own pods), reason by outcome
//! (`ConnectionDropped`, `ConnectionRefused`, `ConnectionTimedOut`, `ConnectionReset`,
//! `ConnectionUnreachable`, `PathMTUBlackhole`, `ConnectionStalled`, `ConnectionAborted`,
//! `DNSLookupFailed`), the note one line naming the rule or policy and
//! both sides. Raw drops get none: a dropped SYN or DNS query is explained by its attempt's
//! verdict, and a drop that belongs to no attempt is only counted (`/metrics`).
//!
//! Rate-limited per (pod, reason, peer workload, port): one new Event, then at most one update a
//! minute whose `series.count` includes the repeats held back meanwhile (also sent on a tick when
//! no further failure comes). The limiter's keys are bounded; evictions are counted; the keys
//! of a pod deleted from the inventory are released (its held repeats sent first). Published
//! in the background; a failure is logged and counted, never fatal.

use std::{
    cell::RefCell,
    collections::HashMap,
    io,
    rc::Rc,
    time::{Duration, Instant},
};

use k8s_openapi::{
    api::{core::v1::ObjectReference, events::v1::Event as K8sEvent, events::v1::EventSeries},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
    chrono::Utc,
};

use super::{Sink, prometheus::SharedMetrics};
use crate::{
    enrich::{
        names::PodContext,
        pods::{Inventory, PodEntry},
    },
    model::{Cni, Named, Outcome, OwnerSystem, Peer},
    verdict::Verdict,
};

/// At most one Event (new or updated) per key and interval.
pub const EVENT_INTERVAL: Duration = Duration::from_secs(60);
/// A key quiet this long is forgotten: its next failure starts a new Event.
pub const SERIES_IDLE: Duration = Duration::from_secs(600);
/// Keys the limiter remembers; the least recently seen is evicted for a new one.
pub const MAX_KEYS: usize = 1024;
/// How often keys of deleted pods are looked for.
const RELEASE_EVERY: Duration = Duration::from_secs(1);
/// The API server's limit on a note is 1 kB.
const NOTE_MAX_CHARS: usize = 1000;

/// Posts Events through the API client the inventory uses.
pub struct KubeEventsSink {
    client: kube::Client,
    names: Rc<RefCell<PodContext>>,
    /// `netprobe-<node>`: the reporting instance.
    instance: String,
    limit: EventRateLimit,
    metrics: Option<SharedMetrics>,
    /// Makes Event names unique within one nanosecond.
    seq: u64,
    released_at: Instant,
}

impl KubeEventsSink {
    pub fn new(names: Rc<RefCell<PodContext>>, node: Option<String>) -> Self {
        let client = names.borrow().kube.client();
        Self {
            client,
            names,
            instance: node.map_or_else(|| "netprobe".into(), |n| format!("netprobe-{n}")),
            limit: EventRateLimit::default(),
            metrics: None,
            seq: 0,
            released_at: Instant::now(),
        }
    }

    /// Counts Events created, updated, held back, failed and limiter evictions in `/metrics`.
    pub fn with_metrics(mut self, metrics: SharedMetrics) -> Self {
        self.metrics = Some(metrics);
        self
    }

    fn count(&self, result: &'static str, n: u64) {
        count(self.metrics.as_ref(), result, n);
    }

    /// The Event for one side of a failed verdict, admitted (or held) by the limiter.
    fn observe(&mut self, v: &Verdict, side: Side, inventory: &Inventory, now: Instant) {
        let Some((key, pod)) = side_of(v, side, inventory) else {
            return;
        };
        self.seq += 1;
        let seq = self.seq;
        let instance = &self.instance;
        let evicted = self.limit.evicted;
        let publish = self
            .limit
            .observe(key, now, || event(v, &pod, side, instance, seq));
        self.count("evicted", self.limit.evicted - evicted);
        match publish {
            Some(p) => self.publish(p),
            None => self.count("held", 1),
        }
    }

    /// Forgets the keys of pods gone from the inventory, after sending their held repeats.
    fn release_deleted_pods(&mut self, now: Instant) {
        let pods = self.names.borrow().inventory.pod_names();
        let (last, released) = self.limit.release(
            |ns, pod| pods.contains(&crate::sinks::prometheus::pods::qualified(ns, pod)),
            now,
        );
        for p in last {
            self.publish(p);
        }
        self.count("released", released as u64);
        if let Some(m) = &self.metrics {
            m.lock().expect("metrics lock").kube_event_keys = self.limit.len();
        }
    }

    fn publish(&self, p: Publish) {
        let (client, metrics) = (self.client.clone(), self.metrics.clone());
        tokio::spawn(async move {
            let result = p.send(client).await;
            match result {
                Ok(()) => count(metrics.as_ref(), p.result(), 1),
                Err(err) => {
                    log::warn!("publishing a Kubernetes Event failed: {err}");
                    count(metrics.as_ref(), "failed", 1);
                }
            }
        });
    }
}

fn count(metrics: Option<&SharedMetrics>, result: &'static str, n: u64) {
    if let (Some(m), true) = (metrics, n > 0) {
        *m.lock()
            .expect("metrics lock")
            .kube_events
            .entry(result)
            .or_default() += n;
    }
}

impl Sink for KubeEventsSink {
    fn verdict(&mut self, v: &Verdict) -> io::Result<()> {
        if !v.outcome.is_failure() {
            return Ok(());
        }
        let names = self.names.clone();
        let names = names.borrow();
        let now = Instant::now();
        for &side in sides(v) {
            self.observe(v, side, &names.inventory, now);
        }
        Ok(())
    }

    /// Repeats held back get their update once the interval has passed, without waiting for
    /// another failure; keys of deleted pods are released.
    fn tick(&mut self) -> io::Result<()> {
        let now = Instant::now();
        for p in self.limit.due(now) {
            self.publish(p);
        }
        if now.duration_since(self.released_at) >= RELEASE_EVERY {
            self.released_at = now;
            self.release_deleted_pods(now);
        }
        Ok(())
    }
}

/// Which pod of the attempt an Event is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Client,
    Server,
}

/// The sides to post on: both, or the server alone when the client is the same pod (a refusal
/// on its own loopback), so one failure is one Event.
fn sides(v: &Verdict) -> &'static [Side] {
    let pod = |p: &Option<Peer>| {
        p.as_ref()
            .and_then(|p| Some((p.namespace.clone()?, p.pod.clone()?)))
    };
    let server = pod(&v.server.peer);
    if server.is_some() && server == pod(&v.client.peer) {
        &[Side::Server]
    } else {
        &[Side::Server, Side::Client]
    }
}

/// What the limiter counts by: the pod, the reason, the other side (its workload, else its
/// pod or address) and the port dialled.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct EventKey {
    pub namespace: String,
    pub pod: String,
    pub reason: &'static str,
    pub peer: String,
    pub port: u16,
}

/// The key and the inventory's pod for one side of `v`, when that pod is on this node.
fn side_of(v: &Verdict, side: Side, inventory: &Inventory) -> Option<(EventKey, PodEntry)> {
    let (this, other) = match side {
        Side::Server => (&v.server.peer, &v.client.peer),
        Side::Client => (&v.client.peer, &v.server.peer),
    };
    let this = this.as_ref()?;
    let (ns, name) = (this.namespace.as_deref()?, this.pod.as_deref()?);
    let pod = inventory
        .find_pod(Some(ns), name)
        .into_iter()
        .next()?
        .clone();
    let peer = other
        .as_ref()
        .and_then(|p| p.workload.clone().or_else(|| p.pod.clone()))
        .unwrap_or_else(|| other_addr(v, side));
    let key = EventKey {
        namespace: pod.namespace.clone(),
        pod: pod.name.clone(),
        reason: reason(v),
        peer,
        port: dialled(v).port,
    };
    Some((key, pod))
}

fn other_addr(v: &Verdict, side: Side) -> String {
    match side {
        Side::Server => v.client.addr.to_string(),
        Side::Client => dialled(v).addr.to_string(),
    }
}

/// The address and port the client dialled (a ClusterIP before DNAT, else the server).
fn dialled(v: &Verdict) -> &crate::model::Endpoint {
    v.dialed.as_ref().unwrap_or(&v.server)
}

/// The Event reason of a failed verdict.
pub fn reason(v: &Verdict) -> &'static str {
    if v.udp.as_ref().is_some_and(|u| u.dns.is_some()) {
        return "DNSLookupFailed";
    }
    match v.outcome {
        Outcome::RefusedNoListener | Outcome::RefusedByRule => "ConnectionRefused",
        Outcome::DroppedByRule | Outcome::DroppedInNetfilter | Outcome::DroppedByKernel => {
            "ConnectionDropped"
        }
        Outcome::ResetByPeer | Outcome::ResetAfterEstablished => "ConnectionReset",
        Outcome::Unreachable => "ConnectionUnreachable",
        Outcome::MtuBlackhole => "PathMTUBlackhole",
        Outcome::Stalled => "ConnectionStalled",
        Outcome::Aborted => "ConnectionAborted",
        _ => "ConnectionTimedOut",
    }
}

/// The Event's note: one line naming who decided (policy or rule, with its chain and position)
/// and both sides, then the verdict's explanation.
pub fn note(v: &Verdict) -> String {
    let flow = flow(v);
    let line = match &v.netfilter {
        Some(nf) => {
            let at = match (nf.position, nf.handle) {
                (Some(n), _) => format!("rule {n}"),
                (None, Some(h)) => format!("handle {h}"),
                (None, None) => "chain policy".into(),
            };
            format!("{} {flow} ({} {at})", decision(nf), nf.chain)
        }
        None => format!("{flow}: {}", v.outcome.headline()),
    };
    let note = format!("{line}. {}", v.explanation);
    note.chars().take(NOTE_MAX_CHARS).collect()
}

/// "Calico policy ns/p denies", "kube-proxy rule kube-proxy-no-endpoints rejects", "user rule
/// drops".
fn decision(nf: &crate::attribution::Netfilter) -> String {
    let system = match nf.owner.system {
        OwnerSystem::Cni(Cni::Calico) => "Calico".into(),
        s => s.name().into_owned(),
    };
    if !nf.owner.policies.is_empty() {
        let (noun, verb) = match nf.owner.policies.len() {
            1 => ("policy", "denies"),
            _ => ("policies", "deny"),
        };
        return format!("{system} {noun} {} {verb}", nf.owner.policies.join(", "));
    }
    let verb = match nf.action {
        crate::model::NfAction::Drop => "drops",
        crate::model::NfAction::Reject => "rejects",
    };
    match (nf.owner.system, nf.owner.kind.as_str()) {
        (OwnerSystem::User, "chain-policy-drop") => format!("chain policy {verb}"),
        (OwnerSystem::User, _) => format!("user rule {verb}"),
        (_, kind) => format!("{system} rule {kind} {verb}"),
    }
}

/// "client → server:port via Service ns/name", or for DNS "client DNS A name → server:53".
fn flow(v: &Verdict) -> String {
    let (c, s) = (v.client.peer.as_ref(), v.server.peer.as_ref());
    let namespaces = (
        c.and_then(|p| p.namespace.as_ref()),
        s.and_then(|p| p.namespace.as_ref()),
    );
    let qualify = matches!(namespaces, (Some(a), Some(b)) if a != b);
    let client = short(c, qualify).unwrap_or_else(|| v.client.addr.to_string());
    let target = dialled(v);
    let server = short(s, qualify).unwrap_or_else(|| target.addr.to_string());
    let service = super::prometheus::failed::service(v)
        .map(|s| format!(" via Service {s}"))
        .unwrap_or_default();
    let lookup = v
        .udp
        .as_ref()
        .and_then(|u| u.dns.as_ref())
        .map(|d| {
            format!(
                " DNS {} {}",
                d.qtype.as_deref().unwrap_or("?"),
                d.name.as_deref().unwrap_or("?")
            )
        })
        .unwrap_or_default();
    format!("{client}{lookup} → {server}:{}{service}", target.port)
}

/// A pod's workload name (`baseline-predictor` of `Deployment/baseline-predictor`), else its
/// name; `namespace/` first when the two sides' namespaces are known and differ.
fn short(p: Option<&Peer>, qualify: bool) -> Option<String> {
    let p = p?;
    let name = p
        .workload
        .as_deref()
        .and_then(|w| w.split_once('/').map(|(_, n)| n))
        .or(p.pod.as_deref())?;
    Some(match (&p.namespace, qualify) {
        (Some(ns), true) => format!("{ns}/{name}"),
        _ => name.to_string(),
    })
}

/// The Event (events.k8s.io/v1) about `pod`, the other side's pod as `related`.
fn event(v: &Verdict, pod: &PodEntry, side: Side, instance: &str, seq: u64) -> K8sEvent {
    let now = Utc::now();
    let other = match side {
        Side::Server => &v.client.peer,
        Side::Client => &v.server.peer,
    };
    K8sEvent {
        metadata: ObjectMeta {
            name: Some(format!(
                "{}.{:x}.{seq:x}",
                pod.name,
                now.timestamp_nanos_opt().unwrap_or_default()
            )),
            namespace: Some(pod.namespace.clone()),
            ..Default::default()
        },
        event_time: Some(MicroTime(now)),
        type_: Some("Warning".into()),
        reason: Some(reason(v).into()),
        action: Some("Connect".into()),
        note: Some(note(v)),
        regarding: Some(pod_ref(&pod.namespace, &pod.name, Some(pod.uid.clone()))),
        related: other
            .as_ref()
            .and_then(|p| Some(pod_ref(p.namespace.as_deref()?, p.pod.as_deref()?, None))),
        reporting_controller: Some("netprobe".into()),
        reporting_instance: Some(instance.into()),
        ..Default::default()
    }
}

fn pod_ref(namespace: &str, name: &str, uid: Option<String>) -> ObjectReference {
    ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Pod".into()),
        name: Some(name.into()),
        namespace: Some(namespace.into()),
        uid,
        ..Default::default()
    }
}

/// What to send the API server.
#[derive(Debug, Clone)]
pub enum Publish {
    Create(K8sEvent),
    /// The same Event with its series: every failure of the key so far.
    Update(K8sEvent),
}

impl Publish {
    pub fn event(&self) -> &K8sEvent {
        match self {
            Self::Create(e) | Self::Update(e) => e,
        }
    }

    fn result(&self) -> &'static str {
        match self {
            Self::Create(_) => "created",
            Self::Update(_) => "updated",
        }
    }

    async fn send(&self, client: kube::Client) -> Result<(), kube::Error> {
        use kube::api::{Api, Patch, PatchParams, PostParams};
        let e = self.event();
        let ns = e.metadata.namespace.as_deref().unwrap_or("default");
        let api: Api<K8sEvent> = Api::namespaced(client, ns);
        match self {
            Self::Create(_) => api.create(&PostParams::default(), e).await.map(drop),
            Self::Update(_) => {
                let name = e.metadata.name.as_deref().unwrap_or_default();
                api.patch(name, &PatchParams::default(), &Patch::Merge(e))
                    .await
                    .map(drop)
            }
        }
    }
}

/// One key's Event and how many failures it has seen.
struct Slot {
    event: K8sEvent,
    count: i32,
    /// `count` when the Event was last sent.
    sent_count: i32,
    sent: Instant,
    seen: Instant,
}

impl Slot {
    fn update(&mut self, now: Instant) -> Publish {
        self.sent = now;
        self.sent_count = self.count;
        self.event.series = Some(EventSeries {
            count: self.count,
            last_observed_time: MicroTime(Utc::now()),
        });
        Publish::Update(self.event.clone())
    }

    fn due(&self, now: Instant) -> bool {
        self.count > self.sent_count && now.duration_since(self.sent) >= EVENT_INTERVAL
    }
}

/// The Events' rate limit: per key, one new Event, then at most one update per
/// [`EVENT_INTERVAL`] carrying the count of failures; at most [`MAX_KEYS`] keys.
#[derive(Default)]
pub struct EventRateLimit {
    slots: HashMap<EventKey, Slot>,
    /// Keys evicted for new ones (the bound).
    pub evicted: u64,
}

impl EventRateLimit {
    /// A failure of `key`: the Event to send now (made by `make` for a new key), or None when
    /// it is held back (counted into the next update).
    pub fn observe(
        &mut self,
        key: EventKey,
        now: Instant,
        make: impl FnOnce() -> K8sEvent,
    ) -> Option<Publish> {
        if let Some(slot) = self.slots.get_mut(&key)
            && now.duration_since(slot.seen) < SERIES_IDLE
        {
            slot.count += 1;
            slot.seen = now;
            return slot.due(now).then(|| slot.update(now));
        }
        if !self.slots.contains_key(&key) && self.slots.len() >= MAX_KEYS {
            self.evict_least_recently_seen();
        }
        let event = make();
        let slot = Slot {
            event: event.clone(),
            count: 1,
            sent_count: 1,
            sent: now,
            seen: now,
        };
        self.slots.insert(key, slot);
        Some(Publish::Create(event))
    }

    fn evict_least_recently_seen(&mut self) {
        if let Some(k) = self
            .slots
            .iter()
            .min_by_key(|(_, s)| s.seen)
            .map(|(k, _)| k.clone())
        {
            self.slots.remove(&k);
            self.evicted += 1;
        }
    }

    /// Updates owed to keys with failures held back for an interval; keys quiet for
    /// [`SERIES_IDLE`] are forgotten.
    pub fn due(&mut self, now: Instant) -> Vec<Publish> {
        self.slots
            .retain(|_, s| now.duration_since(s.seen) < SERIES_IDLE || s.count > s.sent_count);
        self.slots
            .values_mut()
            .filter(|s| s.due(now))
            .map(|s| s.update(now))
            .collect()
    }

    /// Forgets the keys of pods `alive` says are gone: returns the last updates owed (held
    /// repeats, sent now whatever the interval) and how many keys were released.
    pub fn release(
        &mut self,
        alive: impl Fn(&str, &str) -> bool,
        now: Instant,
    ) -> (Vec<Publish>, usize) {
        let before = self.slots.len();
        let mut last = Vec::new();
        self.slots.retain(|k, s| {
            if alive(&k.namespace, &k.pod) {
                return true;
            }
            if s.count > s.sent_count {
                last.push(s.update(now));
            }
            false
        });
        (last, before - self.slots.len())
    }

    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sinks::prometheus::failed::testing::{
        kube_proxy_reject, refused_no_listener, s1_calico,
    };

    /// The note of `v` begins with `prefix`.
    fn assert_note_starts(v: &Verdict, prefix: &str) {
        let n = note(v);
        assert!(n.starts_with(prefix), "{n}");
    }

    #[test]
    fn the_note_names_the_policy_both_sides_and_the_rule() {
        let v = s1_calico();
        assert_eq!(reason(&v), "ConnectionDropped");
        assert_note_starts(
            &v,
            "Calico policy financial-inference/scheduler-allow-xds denies baseline-predictor → seldon-scheduler:9004 via Service financial-inference/seldon-scheduler (cali-tw-cali7bd050dc983 rule 5). Calico network policies select this workload",
        );
        assert!(!note(&v).contains('\n'));
    }

    #[test]
    fn a_reject_and_a_refusal_are_named_in_their_own_words() {
        let v = kube_proxy_reject();
        assert_eq!(reason(&v), "ConnectionRefused");
        assert_note_starts(
            &v,
            "kube-proxy rule kube-proxy-no-endpoints rejects baseline-predictor → 10.43.51.131:9004 via Service financial-inference/seldon-scheduler (KUBE-SERVICES rule 1). Service financial-inference/seldon-scheduler:xds has no ready endpoints",
        );
        let v = refused_no_listener();
        assert_eq!(reason(&v), "ConnectionRefused");
        assert_eq!(sides(&v), [Side::Server], "one pod: one Event");
        assert_eq!(sides(&s1_calico()), [Side::Server, Side::Client]);
        assert_note_starts(
            &v,
            "mlserver → mlserver:9500: refused: nothing listens there. ",
        );
        let mut dns = refused_no_listener();
        dns.udp = serde_json::from_value(serde_json::json!({"requests": 1, "replied": false,
            "dns": {"id": 7, "name": "seldon-scheduler.financial-inference.svc.cluster.local",
                    "type": "A", "rcode": null}}))
        .unwrap();
        assert_eq!(reason(&dns), "DNSLookupFailed");
        assert_note_starts(
            &dns,
            "mlserver DNS A seldon-scheduler.financial-inference.svc.cluster.local → mlserver:9500",
        );
        let mut user = s1_calico();
        let nf = user.netfilter.as_mut().unwrap();
        nf.owner = crate::attribution::Owner::new(OwnerSystem::User, "user-rule", String::new());
        nf.chain = "FORWARD".into();
        nf.position = Some(1);
        assert_note_starts(
            &user,
            "user rule drops baseline-predictor → seldon-scheduler:9004 via Service financial-inference/seldon-scheduler (FORWARD rule 1). ",
        );
        let mut timeout = refused_no_listener();
        timeout.outcome = Outcome::TimedOut;
        assert_eq!(reason(&timeout), "ConnectionTimedOut");
        timeout.outcome = Outcome::ResetByPeer;
        assert_eq!(reason(&timeout), "ConnectionReset");
    }

    /// This node's inventory: the scheduler pod only (the client is on another node).
    fn inventory() -> Inventory {
        let pod: k8s_openapi::api::core::v1::Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "seldon-scheduler-0", "namespace": "financial-inference", "uid": "u-s"},
            "spec": {"containers": [{"name": "s"}]},
            "status": {"podIP": "10.42.0.30"}
        }))
        .unwrap();
        Inventory::build(&[pod], &[], &[])
    }

    #[test]
    fn events_go_to_this_nodes_pods_with_the_other_side_related() {
        let v = s1_calico();
        let inv = inventory();
        assert!(
            side_of(&v, Side::Client, &inv).is_none(),
            "the client's pod is another node's"
        );
        let (key, pod) = side_of(&v, Side::Server, &inv).unwrap();
        assert_eq!(
            key,
            EventKey {
                namespace: "financial-inference".into(),
                pod: "seldon-scheduler-0".into(),
                reason: "ConnectionDropped",
                peer: "Deployment/baseline-predictor".into(),
                port: 9004,
            }
        );
        let e = event(&v, &pod, Side::Server, "netprobe-node-a", 1);
        let regarding = e.regarding.as_ref().unwrap();
        assert_eq!(
            (regarding.name.as_deref(), regarding.uid.as_deref()),
            (Some("seldon-scheduler-0"), Some("u-s"))
        );
        assert_eq!(
            e.related.as_ref().and_then(|r| r.name.as_deref()),
            Some("baseline-predictor-7d9f8b6c5-x2x9z")
        );
        assert_eq!(
            (e.type_.as_deref(), e.reason.as_deref()),
            (Some("Warning"), Some("ConnectionDropped"))
        );
        assert_eq!(e.metadata.namespace.as_deref(), Some("financial-inference"));
    }

    fn key(peer: &str) -> EventKey {
        EventKey {
            namespace: "fi".into(),
            pod: "s-0".into(),
            reason: "ConnectionDropped",
            peer: peer.into(),
            port: 9004,
        }
    }

    fn series(p: &Publish) -> Option<i32> {
        p.event().series.as_ref().map(|s| s.count)
    }

    #[test]
    fn repeats_are_held_and_counted_into_the_next_update() {
        let mut l = EventRateLimit::default();
        let t0 = Instant::now();
        let first = l.observe(key("Deployment/a"), t0, K8sEvent::default);
        assert!(matches!(first, Some(Publish::Create(_))));
        for i in 1..=5 {
            let held = l.observe(key("Deployment/a"), t0 + Duration::from_secs(i), || {
                unreachable!("the key's Event exists")
            });
            assert!(held.is_none(), "within the minute: held");
        }
        assert!(
            l.observe(key("Deployment/b"), t0, K8sEvent::default)
                .is_some(),
            "another peer workload is another key"
        );
        let update = l
            .observe(key("Deployment/a"), t0 + EVENT_INTERVAL, K8sEvent::default)
            .unwrap();
        assert!(matches!(update, Publish::Update(_)));
        assert_eq!(series(&update), Some(7), "the first, five held, this one");
        // Held repeats with no later failure: the tick sends them once the interval is over.
        l.observe(
            key("Deployment/a"),
            t0 + EVENT_INTERVAL * 2 - Duration::from_secs(1),
            K8sEvent::default,
        );
        assert!(
            l.due(t0 + EVENT_INTERVAL + Duration::from_secs(1))
                .is_empty()
        );
        let due = l.due(t0 + EVENT_INTERVAL * 2);
        assert_eq!(due.iter().map(series).collect::<Vec<_>>(), [Some(8)]);
        assert!(l.due(t0 + EVENT_INTERVAL * 3).is_empty(), "sent once");
        // Quiet for long: forgotten; the next failure is a new Event.
        assert_eq!(l.len(), 2);
        assert!(l.due(t0 + EVENT_INTERVAL * 2 + SERIES_IDLE).is_empty());
        assert!(l.is_empty());
        let again = l.observe(key("Deployment/a"), t0 + SERIES_IDLE * 3, K8sEvent::default);
        assert!(matches!(again, Some(Publish::Create(_))));
    }

    #[test]
    fn the_limiter_is_bounded_and_counts_its_evictions() {
        let mut l = EventRateLimit::default();
        let t0 = Instant::now();
        for i in 0..MAX_KEYS + 3 {
            let t = t0 + Duration::from_millis(i as u64);
            assert!(
                l.observe(key(&format!("Pod/p-{i}")), t, K8sEvent::default)
                    .is_some()
            );
        }
        assert_eq!((l.len(), l.evicted), (MAX_KEYS, 3));
        assert!(
            l.observe(
                key("Pod/p-0"),
                t0 + Duration::from_secs(1),
                K8sEvent::default
            )
            .is_some_and(|p| matches!(p, Publish::Create(_))),
            "the oldest went first"
        );
    }

    #[test]
    fn a_deleted_pods_keys_are_released_after_its_held_repeats_are_sent() {
        let mut l = EventRateLimit::default();
        let t0 = Instant::now();
        let on = |pod: &str| EventKey {
            pod: pod.into(),
            ..key("Deployment/a")
        };
        l.observe(on("gone-0"), t0, K8sEvent::default);
        l.observe(on("gone-0"), t0, K8sEvent::default);
        l.observe(on("gone-1"), t0, K8sEvent::default);
        l.observe(on("alive-0"), t0, K8sEvent::default);
        let (last, released) = l.release(|_, pod| pod.starts_with("alive"), t0);
        assert_eq!(released, 2);
        assert_eq!(
            last.iter().map(series).collect::<Vec<_>>(),
            [Some(2)],
            "gone-0's held repeat, in a last update"
        );
        assert_eq!(l.len(), 1);
    }

    /// Creation and update go through the real kube-rs client to the API stand-in (loopback).
    #[tokio::test]
    async fn an_event_is_created_then_updated_with_its_series() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let kube = netprobe_lab::kubeapi::FakeKube::start(
            std::net::TcpListener::bind("127.0.0.1:0").unwrap(),
        );
        let kubeconfig = kube::config::Kubeconfig::from_yaml(&kube.kubeconfig()).unwrap();
        let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
            .await
            .unwrap();
        let client = kube::Client::try_from(config).unwrap();
        let (_, pod) = side_of(&s1_calico(), Side::Server, &inventory()).unwrap();
        let mut l = EventRateLimit::default();
        let t0 = Instant::now();
        let make = || event(&s1_calico(), &pod, Side::Server, "netprobe-node-a", 1);
        let create = l.observe(key("Deployment/a"), t0, make).unwrap();
        create.send(client.clone()).await.unwrap();
        l.observe(key("Deployment/a"), t0, make);
        let update = l
            .observe(key("Deployment/a"), t0 + EVENT_INTERVAL, make)
            .unwrap();
        update.send(client).await.unwrap();
        let posted = kube.posted();
        assert_eq!(posted.len(), 2, "{posted:#?}");
        assert_eq!(posted[0]["metadata"]["name"], posted[1]["metadata"]["name"]);
        assert_eq!(posted[0]["reason"], "ConnectionDropped");
        assert_eq!(posted[0]["reportingController"], "netprobe");
        assert!(posted[0]["series"].is_null());
        assert_eq!(posted[1]["series"]["count"], 3, "{:#}", posted[1]);
    }
}

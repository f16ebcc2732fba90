//! Kubernetes Events, the cluster-wide record of failures: every failed verdict becomes a
//! `Warning` Event on the server pod and on the client pod (those of this node: each agent
//! speaks for its own pods), reason by outcome (`ConnectionDropped`, `ConnectionRefused`,
//! `ConnectionTimedOut`, `ConnectionReset`, `ConnectionUnreachable`, `PathMTUBlackhole`,
//! `ConnectionStalled`, `ConnectionAborted`, `DNSLookupFailed`), the note one line naming the
//! rule or policy and both sides, the structured details in `netprobe.io/…` annotations
//! ([`record`], what `kubectl netprobe failures` reads). Raw drops get none: a dropped SYN or
//! DNS query is explained by its attempt's verdict, and a drop that belongs to no attempt is
//! only counted (`/metrics`).
//!
//! Bounded three ways, because the traffic that makes Events is anyone's (a port scan, spoofed
//! SYNs against a protected pod):
//! - **Keys.** One Event per (pod, reason, peer, port): the peer is the other side's workload
//!   (else its pod or the Service dialled), never an address — a side the agent cannot name is
//!   [`record::EXTERNAL`]; the port is the one dialled when it is known to matter (declared by
//!   this pod, or dialled at a named peer), else 0 ("other ports"). At most [`MAX_KEYS`] keys,
//!   the least recently seen evicted (counted, with the failures it still owed).
//! - **Per key:** one Event, then at most one update per [`EVENT_INTERVAL`] whose
//!   `series.count` includes the repeats held back meanwhile (sent on a tick when no further
//!   failure comes). A key quiet for [`SERIES_IDLE`] is forgotten; the keys of a pod deleted
//!   from the inventory are released (its owed write sent first).
//! - **Per agent:** every write (creation or update) takes a token of one [`TokenBucket`]
//!   (default 10/s, burst 50), and at most `in_flight` requests are open at once. A write that
//!   does not fit waits, its failures counted in its Event's series
//!   (`netprobe_kube_events_suppressed_total{cause}`); it is sent once the budget allows.
//!   Failures of the API are logged and counted, never fatal.

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
use tokio::sync::OwnedSemaphorePermit;

use super::{Sink, prometheus::SharedMetrics};
use crate::{
    enrich::{
        names::PodContext,
        pods::{Inventory, PodEntry},
    },
    model::{Cni, Named, Outcome, OwnerSystem, Peer},
    verdict::Verdict,
};

mod bucket;
pub mod record;

pub use bucket::{Budget, DEFAULT_BURST, DEFAULT_RATE, TokenBucket, Wait};

/// At most one Event (new or updated) per key and interval.
pub const EVENT_INTERVAL: Duration = Duration::from_secs(60);
/// A key quiet this long is forgotten: its next failure starts a new Event.
pub const SERIES_IDLE: Duration = Duration::from_secs(600);
/// Keys the limiter remembers; the least recently seen is evicted for a new one.
pub const MAX_KEYS: usize = 1024;
/// Requests to the API server open at once, by default.
pub const DEFAULT_IN_FLIGHT: usize = 4;
/// A write the API server has not answered by then is given up (counted `failed`), so that a
/// hung server cannot hold the in-flight slots.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often keys of deleted pods are looked for.
const RELEASE_EVERY: Duration = Duration::from_secs(1);
/// The API server's limit on a note is 1 kB.
const NOTE_MAX_CHARS: usize = 1000;

/// The agent's budget of Event writes (`--events-rate`, `--events-burst`,
/// `--events-in-flight`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventsOptions {
    /// Writes per second (token bucket refill).
    pub rate: u32,
    /// Writes at once after a quiet while (token bucket size).
    pub burst: u32,
    /// Requests open at once.
    pub in_flight: usize,
}

impl Default for EventsOptions {
    fn default() -> Self {
        Self {
            rate: DEFAULT_RATE,
            burst: DEFAULT_BURST,
            in_flight: DEFAULT_IN_FLIGHT,
        }
    }
}

/// Posts Events through the API client the inventory uses.
pub struct KubeEventsSink {
    client: kube::Client,
    names: Rc<RefCell<PodContext>>,
    /// `netprobe-<node>`: the reporting instance.
    instance: String,
    node: Option<String>,
    limit: EventRateLimit,
    budget: Budget,
    metrics: Option<SharedMetrics>,
    /// Makes Event names unique within one nanosecond.
    seq: u64,
    released_at: Instant,
}

impl KubeEventsSink {
    pub fn new(names: Rc<RefCell<PodContext>>, node: Option<String>) -> Self {
        let client = names.borrow().kube.client();
        let opts = EventsOptions::default();
        Self {
            client,
            names,
            instance: node
                .as_ref()
                .map_or_else(|| "netprobe".into(), |n| format!("netprobe-{n}")),
            node,
            limit: EventRateLimit::default(),
            budget: Budget::new(opts.rate, opts.burst, opts.in_flight, Instant::now()),
            metrics: None,
            seq: 0,
            released_at: Instant::now(),
        }
    }

    /// With the agent's budget of writes.
    pub fn with_options(mut self, opts: EventsOptions) -> Self {
        self.budget = Budget::new(opts.rate, opts.burst, opts.in_flight, Instant::now());
        self
    }

    /// Counts Events created, updated, held back, suppressed, failed and limiter evictions in
    /// `/metrics`.
    pub fn with_metrics(mut self, metrics: SharedMetrics) -> Self {
        self.metrics = Some(metrics);
        self
    }

    fn count(&self, result: &'static str, n: u64) {
        count(self.metrics.as_ref(), result, n);
    }

    fn count_suppressed(&self, wait: Wait) {
        if let Some(m) = &self.metrics {
            *m.lock()
                .expect("metrics lock")
                .kube_events_suppressed
                .entry(wait.label())
                .or_default() += 1;
        }
    }

    /// The Event for one side of a failed verdict: counted into its key, written now when it
    /// is owed and the budget allows.
    fn observe(&mut self, v: &Verdict, side: Side, inventory: &Inventory, now: Instant) {
        let Some((key, pod)) = side_of(v, side, inventory) else {
            return;
        };
        self.seq += 1;
        let seq = self.seq;
        let (instance, node) = (&self.instance, self.node.as_deref());
        let before = (self.limit.evicted, self.limit.lost);
        let seen = self.limit.observe(key.clone(), now, || {
            event(v, &pod, side, instance, node, seq)
        });
        self.count("evicted", self.limit.evicted - before.0);
        self.count("lost", self.limit.lost - before.1);
        match seen {
            Seen::Held => self.count("held", 1),
            Seen::Owed => {
                if let Err(wait) = self.write(&key, now) {
                    self.count_suppressed(wait);
                }
            }
        }
    }

    /// Writes `key`'s owed Event if the budget allows; else says why it waits.
    fn write(&mut self, key: &EventKey, now: Instant) -> Result<(), Wait> {
        let permit = self.budget.admit(now)?;
        if let Some(p) = self.limit.write(key, now) {
            self.publish(p, permit);
        }
        Ok(())
    }

    /// Writes owed (new keys the budget held back, held repeats whose interval is over),
    /// oldest first, as far as the budget goes.
    fn write_owed(&mut self, now: Instant) {
        for key in self.limit.owed(now) {
            if self.write(&key, now).is_err() {
                break;
            }
        }
    }

    /// Forgets the keys of pods gone from the inventory (after their owed write).
    fn release_deleted_pods(&mut self) {
        let pods = self.names.borrow().inventory.pod_names();
        let released = self
            .limit
            .release(|ns, pod| pods.contains(&crate::sinks::prometheus::pods::qualified(ns, pod)));
        self.count("released", released as u64);
    }

    fn publish(&self, p: Publish, permit: OwnedSemaphorePermit) {
        let (client, metrics) = (self.client.clone(), self.metrics.clone());
        tokio::spawn(async move {
            let result = tokio::time::timeout(WRITE_TIMEOUT, p.send(client)).await;
            drop(permit);
            match result {
                Ok(Ok(())) => count(metrics.as_ref(), p.result(), 1),
                Ok(Err(err)) => {
                    log::warn!("publishing a Kubernetes Event failed: {err}");
                    count(metrics.as_ref(), "failed", 1);
                }
                Err(_) => {
                    log::warn!(
                        "publishing a Kubernetes Event failed: no answer in {WRITE_TIMEOUT:?}"
                    );
                    count(metrics.as_ref(), "failed", 1);
                }
            }
        });
    }

    fn gauges(&self) {
        if let Some(m) = &self.metrics {
            let mut m = m.lock().expect("metrics lock");
            m.kube_event_keys = self.limit.len();
            m.kube_events_in_flight = self.budget.in_flight();
        }
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

    /// Owed writes go out as the budget allows, without waiting for another failure; keys of
    /// deleted pods are released.
    fn tick(&mut self) -> io::Result<()> {
        let now = Instant::now();
        self.write_owed(now);
        if now.duration_since(self.released_at) >= RELEASE_EVERY {
            self.released_at = now;
            self.release_deleted_pods();
        }
        self.gauges();
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

/// What the limiter counts by: the pod, the reason, the other side (its workload, else its pod
/// or the Service dialled, else [`record::EXTERNAL`]) and the port (0: other ports).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EventKey {
    pub namespace: String,
    pub pod: String,
    pub reason: &'static str,
    pub peer: String,
    pub port: u16,
}

/// The other side as the key names it: never an address.
fn peer_name(other: Option<&Peer>, service: Option<String>) -> Option<String> {
    let p = other?;
    p.workload
        .clone()
        .or_else(|| p.pod.as_ref().map(|pod| format!("Pod/{pod}")))
        .or_else(|| service.map(|s| format!("Service/{s}")))
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
    let service = match side {
        Side::Client => super::prometheus::failed::service(v),
        Side::Server => None,
    };
    let peer = peer_name(other.as_ref(), service);
    let port = dialled(v).port;
    // A port this pod declares, or one dialled at a peer the cluster names, is its own key;
    // every other port shares one, so a scan of ports mints no keys.
    let port = match side {
        Side::Server if pod.ports.iter().any(|(_, p)| *p == v.server.port) => port,
        Side::Client if peer.is_some() => port,
        _ => 0,
    };
    let key = EventKey {
        namespace: pod.namespace.clone(),
        pod: pod.name.clone(),
        reason: reason(v),
        peer: peer.unwrap_or_else(|| record::EXTERNAL.into()),
        port,
    };
    Some((key, pod))
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

/// The Event (events.k8s.io/v1) about `pod`, the other side's pod as `related`, the details
/// as annotations.
fn event(
    v: &Verdict,
    pod: &PodEntry,
    side: Side,
    instance: &str,
    node: Option<&str>,
    seq: u64,
) -> K8sEvent {
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
            annotations: Some(record::annotations(v, side, node)),
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
        reporting_controller: Some(record::CONTROLLER.into()),
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
    /// `count` when the Event was last sent (0: not created yet).
    sent_count: i32,
    /// When it was last sent (None: not created yet).
    sent: Option<Instant>,
    seen: Instant,
    /// Its pod is gone: forgotten once its owed write is sent.
    released: bool,
}

impl Slot {
    /// Is a write owed now? A creation at once, an update once the interval has passed (at
    /// once for a released pod's last one).
    fn owed(&self, now: Instant) -> bool {
        match self.sent {
            None => true,
            Some(sent) => {
                self.count > self.sent_count
                    && (self.released || now.duration_since(sent) >= EVENT_INTERVAL)
            }
        }
    }

    fn write(&mut self, now: Instant) -> Publish {
        let create = self.sent.is_none();
        self.sent = Some(now);
        self.sent_count = self.count;
        if self.count > 1 {
            self.event.series = Some(EventSeries {
                count: self.count,
                last_observed_time: MicroTime(Utc::now()),
            });
        }
        match create {
            true => Publish::Create(self.event.clone()),
            false => Publish::Update(self.event.clone()),
        }
    }
}

/// What became of a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    /// Its key owes a write now (a new Event, or an update whose interval is over).
    Owed,
    /// Held back within the key's interval; counted into its next update.
    Held,
}

/// The Events' rate limit per key: one new Event, then at most one update per
/// [`EVENT_INTERVAL`] carrying the count of failures; at most [`MAX_KEYS`] keys. Whether an
/// owed write goes out now is the agent's budget's call ([`KubeEventsSink`]).
#[derive(Default)]
pub struct EventRateLimit {
    slots: HashMap<EventKey, Slot>,
    /// Keys evicted for new ones (the bound).
    pub evicted: u64,
    /// Failures evicted keys had not written yet.
    pub lost: u64,
}

impl EventRateLimit {
    /// A failure of `key` (its Event made by `make` for a new key).
    pub fn observe(
        &mut self,
        key: EventKey,
        now: Instant,
        make: impl FnOnce() -> K8sEvent,
    ) -> Seen {
        if let Some(slot) = self.slots.get_mut(&key)
            && (now.duration_since(slot.seen) < SERIES_IDLE || slot.owed(now))
        {
            slot.count += 1;
            slot.seen = now;
            return match slot.owed(now) {
                true => Seen::Owed,
                false => Seen::Held,
            };
        }
        if !self.slots.contains_key(&key) && self.slots.len() >= MAX_KEYS {
            self.evict_least_recently_seen();
        }
        let slot = Slot {
            event: make(),
            count: 1,
            sent_count: 0,
            sent: None,
            seen: now,
            released: false,
        };
        self.slots.insert(key, slot);
        Seen::Owed
    }

    fn evict_least_recently_seen(&mut self) {
        if let Some(k) = self
            .slots
            .iter()
            .min_by_key(|(_, s)| s.seen)
            .map(|(k, _)| k.clone())
            && let Some(s) = self.slots.remove(&k)
        {
            self.evicted += 1;
            self.lost += u64::try_from(s.count - s.sent_count).unwrap_or_default();
        }
    }

    /// The write `key` owes, marked sent (None: nothing owed). A released key is forgotten
    /// with it.
    pub fn write(&mut self, key: &EventKey, now: Instant) -> Option<Publish> {
        let slot = self.slots.get_mut(key).filter(|s| s.owed(now))?;
        let p = slot.write(now);
        if slot.released {
            self.slots.remove(key);
        }
        Some(p)
    }

    /// Keys owing a write now, those waiting longest first (creations before updates); keys
    /// quiet for [`SERIES_IDLE`] with nothing owed are forgotten.
    pub fn owed(&mut self, now: Instant) -> Vec<EventKey> {
        self.slots
            .retain(|_, s| now.duration_since(s.seen) < SERIES_IDLE || s.owed(now));
        let mut owed: Vec<(&EventKey, &Slot)> =
            self.slots.iter().filter(|(_, s)| s.owed(now)).collect();
        owed.sort_by_key(|(k, s)| (s.sent.is_some(), s.sent.unwrap_or(s.seen), *k));
        owed.into_iter().map(|(k, _)| k.clone()).collect()
    }

    /// Releases the keys of pods `alive` says are gone: those with nothing owed are forgotten
    /// now, the others once their last write is sent. Returns how many were released.
    pub fn release(&mut self, alive: impl Fn(&str, &str) -> bool) -> usize {
        let mut released = 0;
        self.slots.retain(|k, s| {
            if s.released || alive(&k.namespace, &k.pod) {
                return true;
            }
            released += 1;
            s.released = true;
            s.sent.is_none() || s.count > s.sent_count
        });
        released
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
            "spec": {"containers": [{"name": "s", "ports": [{"containerPort": 9004}]}]},
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
        let e = event(&v, &pod, Side::Server, "netprobe-node-a", Some("node-a"), 1);
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

    /// Observes `key` at `t` and writes what it owes at once (no budget).
    fn observe_write(l: &mut EventRateLimit, k: EventKey, t: Instant) -> Option<Publish> {
        match l.observe(k.clone(), t, K8sEvent::default) {
            Seen::Owed => l.write(&k, t),
            Seen::Held => None,
        }
    }

    #[test]
    fn repeats_are_held_and_counted_into_the_next_update() {
        let mut l = EventRateLimit::default();
        let t0 = Instant::now();
        let first = observe_write(&mut l, key("Deployment/a"), t0);
        assert!(matches!(first, Some(Publish::Create(_))));
        assert_eq!(
            series(first.as_ref().unwrap()),
            None,
            "one failure: no series"
        );
        for i in 1..=5 {
            let held = l.observe(key("Deployment/a"), t0 + Duration::from_secs(i), || {
                unreachable!("the key's Event exists")
            });
            assert_eq!(held, Seen::Held, "within the minute: held");
        }
        assert!(
            observe_write(&mut l, key("Deployment/b"), t0).is_some(),
            "another peer workload is another key"
        );
        let update = observe_write(&mut l, key("Deployment/a"), t0 + EVENT_INTERVAL).unwrap();
        assert!(matches!(update, Publish::Update(_)));
        assert_eq!(series(&update), Some(7), "the first, five held, this one");
        // Held repeats with no later failure: owed once the interval is over.
        l.observe(
            key("Deployment/a"),
            t0 + EVENT_INTERVAL * 2 - Duration::from_secs(1),
            K8sEvent::default,
        );
        assert!(
            l.owed(t0 + EVENT_INTERVAL + Duration::from_secs(1))
                .is_empty()
        );
        let t = t0 + EVENT_INTERVAL * 2;
        let owed = l.owed(t);
        assert_eq!(owed, [key("Deployment/a")]);
        assert_eq!(series(&l.write(&owed[0], t).unwrap()), Some(8));
        assert!(l.owed(t0 + EVENT_INTERVAL * 3).is_empty(), "sent once");
        // Quiet for long: forgotten; the next failure is a new Event.
        assert_eq!(l.len(), 2);
        assert!(l.owed(t0 + EVENT_INTERVAL * 2 + SERIES_IDLE).is_empty());
        assert!(l.is_empty());
        let again = observe_write(&mut l, key("Deployment/a"), t0 + SERIES_IDLE * 3);
        assert!(matches!(again, Some(Publish::Create(_))));
    }

    #[test]
    fn a_creation_the_budget_held_back_carries_every_failure_since_in_its_series() {
        let mut l = EventRateLimit::default();
        let t0 = Instant::now();
        // Not written: the budget said no three times.
        for i in 0..3 {
            let t = t0 + Duration::from_secs(i);
            assert_eq!(
                l.observe(key("Deployment/a"), t, K8sEvent::default),
                Seen::Owed
            );
        }
        observe_write(&mut l, key("Deployment/b"), t0 + Duration::from_secs(1));
        l.observe(
            key("Deployment/c"),
            t0 + Duration::from_secs(2),
            K8sEvent::default,
        );
        // Waiting longest first: a's creation, then c's; b is written.
        let t = t0 + Duration::from_secs(5);
        assert_eq!(l.owed(t), [key("Deployment/a"), key("Deployment/c")]);
        let create = l.write(&key("Deployment/a"), t).unwrap();
        assert!(matches!(create, Publish::Create(_)));
        assert_eq!(series(&create), Some(3), "nothing the budget held is lost");
        assert_eq!(l.owed(t), [key("Deployment/c")]);
        assert!(l.write(&key("Deployment/a"), t).is_none(), "nothing owed");
    }

    #[test]
    fn the_limiter_is_bounded_and_counts_its_evictions_and_what_they_owed() {
        let mut l = EventRateLimit::default();
        let t0 = Instant::now();
        for i in 0..MAX_KEYS + 3 {
            let t = t0 + Duration::from_millis(i as u64);
            assert!(observe_write(&mut l, key(&format!("Pod/p-{i}")), t).is_some());
        }
        assert_eq!((l.len(), l.evicted, l.lost), (MAX_KEYS, 3, 0));
        // p-3 is the least recently seen now; its repeat is held, then it is evicted.
        l.observe(
            key("Pod/p-3"),
            t0 + Duration::from_millis(3),
            K8sEvent::default,
        );
        l.observe(
            key("Pod/new"),
            t0 + Duration::from_secs(1),
            K8sEvent::default,
        );
        assert_eq!(
            (l.evicted, l.lost),
            (4, 1),
            "the held repeat is counted lost"
        );
        assert!(
            observe_write(&mut l, key("Pod/p-0"), t0 + Duration::from_secs(1))
                .is_some_and(|p| matches!(p, Publish::Create(_))),
            "the oldest went first"
        );
    }

    /// The scheduler's side of a SYN from `client` to its `port`, the client unknown.
    fn scanned(client: std::net::IpAddr, port: u16) -> Verdict {
        let mut v = refused_no_listener();
        v.client = crate::model::Endpoint::at(client, 40000);
        v.server = crate::model::Endpoint::at("10.42.0.30".parse().unwrap(), port);
        v.server.peer = Some(Peer {
            namespace: Some("financial-inference".into()),
            pod: Some("seldon-scheduler-0".into()),
            ..Default::default()
        });
        v.dialed = None;
        v
    }

    /// A SYN scan from spoofed addresses against a pod: every port it does not declare and
    /// every address it cannot name share one key, so 5000 failures are one write.
    #[test]
    fn a_scan_from_spoofed_addresses_makes_one_key_and_one_write() {
        let inv = inventory();
        let mut l = EventRateLimit::default();
        let t0 = Instant::now();
        let (mut writes, mut held) = (0, 0);
        for i in 0..5000u32 {
            let from = std::net::Ipv4Addr::from(0xc000_0200 + i).into();
            let v = scanned(from, 1 + (i % 9000) as u16);
            let t = t0 + Duration::from_millis(u64::from(i));
            let (k, _) = side_of(&v, Side::Server, &inv).unwrap();
            assert_eq!((k.peer.as_str(), k.port), (record::EXTERNAL, 0));
            match l.observe(k.clone(), t, K8sEvent::default) {
                Seen::Owed => writes += usize::from(l.write(&k, t).is_some()),
                Seen::Held => held += 1,
            }
        }
        assert_eq!((l.len(), writes, held), (1, 1, 4999));
        // The declared port is a key of its own; a named peer's port is the one dialled.
        let (k, _) = side_of(
            &scanned("198.51.100.1".parse().unwrap(), 9004),
            Side::Server,
            &inv,
        )
        .unwrap();
        assert_eq!((k.peer.as_str(), k.port), (record::EXTERNAL, 9004));
        let (k, _) = side_of(&s1_calico(), Side::Server, &inv).unwrap();
        assert_eq!(
            (k.peer.as_str(), k.port),
            ("Deployment/baseline-predictor", 9004)
        );
    }

    #[test]
    fn a_deleted_pods_keys_are_released_after_their_owed_write() {
        let mut l = EventRateLimit::default();
        let t0 = Instant::now();
        let on = |pod: &str| EventKey {
            pod: pod.into(),
            ..key("Deployment/a")
        };
        observe_write(&mut l, on("gone-0"), t0);
        l.observe(on("gone-0"), t0, K8sEvent::default);
        observe_write(&mut l, on("gone-1"), t0);
        observe_write(&mut l, on("alive-0"), t0);
        assert_eq!(l.release(|_, pod| pod.starts_with("alive")), 2);
        assert_eq!(l.len(), 2, "gone-0 owes its held repeat");
        assert_eq!(l.owed(t0), [on("gone-0")], "at once, whatever the interval");
        let last = l.write(&on("gone-0"), t0).unwrap();
        assert_eq!(series(&last), Some(2));
        assert_eq!(l.len(), 1, "forgotten once written");
        assert_eq!(l.release(|_, pod| pod.starts_with("alive")), 0);
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
        let make = || {
            event(
                &s1_calico(),
                &pod,
                Side::Server,
                "netprobe-node-a",
                Some("node-a"),
                1,
            )
        };
        l.observe(key("Deployment/a"), t0, make);
        let create = l.write(&key("Deployment/a"), t0).unwrap();
        create.send(client.clone()).await.unwrap();
        l.observe(key("Deployment/a"), t0, make);
        l.observe(key("Deployment/a"), t0 + EVENT_INTERVAL, make);
        let update = l.write(&key("Deployment/a"), t0 + EVENT_INTERVAL).unwrap();
        update.send(client).await.unwrap();
        let posted = kube.posted();
        assert_eq!(posted.len(), 2, "{posted:#?}");
        assert_eq!(posted[0]["metadata"]["name"], posted[1]["metadata"]["name"]);
        assert_eq!(posted[0]["reason"], "ConnectionDropped");
        assert_eq!(posted[0]["reportingController"], "netprobe.io/agent");
        assert_eq!(
            posted[0]["metadata"]["annotations"]["netprobe.io/outcome"],
            "dropped_by_rule"
        );
        assert!(posted[0]["series"].is_null());
        assert_eq!(posted[1]["series"]["count"], 3, "{:#}", posted[1]);
    }
}

//! `Trace` objects answered by the agent in its own session (issue #24): no child process and
//! no second probe set. Every agent watches Trace objects cluster-wide and takes those whose
//! pod runs on its node; a running trace is a subscription on the session
//! ([`crate::sinks::trace_status`]): the session's verdicts (and, with `spec.events`, its events)
//! that have an address of the pod as one endpoint and the traced port, written into the
//! object's status subresource as they come, a few writes a second at most.
//!
//! The life of an object on its node: Pending (the node runs `max_running` traces already:
//! its message says so) → Running (`node`, `startTime`) → Completed at the end of
//! `spec.duration` (`completionTime`, `summary`), or Failed: the pod does not exist in the
//! object's namespace, the spec cannot be traced, the agent stopped (SIGTERM) or restarted
//! mid-trace. A deleted object stops its trace at once. Finished objects are deleted
//! `ttlSecondsAfterFinished` after their completion by the agent of their node.

use std::{
    collections::{HashMap, VecDeque},
    net::IpAddr,
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use futures::{StreamExt, future::LocalBoxFuture};
use k8s_openapi::chrono::{self, DateTime, Utc};
use k8s_openapi::{api::core::v1::Pod, apimachinery::pkg::apis::meta::v1::Time};
use kube::{
    Api, Client, ResourceExt,
    api::{Patch, PatchParams},
    runtime::{WatchStreamExt, watcher},
};
use serde_json::json;

use crate::{
    error::Result,
    model::{
        Protocol,
        trace::{Trace, TracePhase, TraceProtocol, TraceStatus, TraceTarget},
    },
    session::{Input, Source},
    sinks::{
        Summary,
        trace_status::{Subscription, Subscriptions, TraceKey, TraceRecord},
    },
    sources::nftrace::armed::Arming,
};

/// Traces running at once per node, by default (`--max-traces`).
pub const DEFAULT_MAX_RUNNING: usize = 4;

/// Status writes of one trace are at least this far apart: verdicts that come faster are
/// written together.
const WRITE_EVERY: Duration = Duration::from_millis(250);

/// How often objects that wait (for room, for their pod's address) are looked at again.
const RECHECK_EVERY: Duration = Duration::from_secs(2);

/// Objects waiting on this node, at most; more are looked at again when they change.
const MAX_WAITING: usize = 256;

/// The field manager of the agent's status writes.
const MANAGER: &str = "netprobe-agent";

/// One trace running on this node.
struct Running {
    status: TraceStatus,
    deadline: Instant,
    dirty: bool,
    last_write: Option<Instant>,
    /// What the session could not hand over (counted by the sink).
    lost: Arc<(std::sync::atomic::AtomicU64, std::sync::atomic::AtomicU64)>,
    failed: u64,
}

/// Why an object cannot start now.
enum NotNow {
    /// Failed for good, with this message.
    Fail(String),
    /// Stays Pending: this message (None: written by no one, e.g. its pod is another node's).
    Wait(Option<String>),
    /// Another node's pod: nothing to do here.
    Elsewhere,
}

/// The controller: watches Trace objects and keeps the subscriptions and statuses of this
/// node's. Runs as its own task; [`TraceHandle`] stops it.
pub struct TraceController {
    client: Client,
    node: String,
    max_running: usize,
    subs: Subscriptions,
    records: tokio::sync::mpsc::Receiver<(TraceKey, TraceRecord)>,
    stopped: tokio::sync::mpsc::UnboundedSender<Vec<IpAddr>>,
    running: HashMap<TraceKey, Running>,
    /// Objects of this node (or of no node yet) waiting, oldest first.
    waiting: VecDeque<Trace>,
    /// Finished objects this agent deletes, and when.
    expiring: HashMap<TraceKey, DateTime<Utc>>,
}

/// The agent's side: stops the controller (marking running traces Failed) and waits for it.
pub struct TraceHandle {
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl TraceHandle {
    /// Marks every running trace Failed ("the agent stopped") and ends the watch; gives up
    /// after `limit` (an API server that does not answer must not hold the agent's exit).
    pub async fn shutdown(self, limit: Duration) {
        let _ = self.stop.send(true);
        let task = self.task;
        if tokio::time::timeout(limit, task).await.is_err() {
            eprintln!(
                "netprobe agent: WARNING: running Trace objects not marked Failed within {limit:?} (API server slow?)"
            );
        }
    }
}

impl TraceController {
    /// Starts watching Trace objects for `node`. Returns the subscriptions (for the session's
    /// sink), the source that lets go of what stopped traces leave in the session, and the
    /// handle that stops the controller.
    pub fn start(
        client: Client,
        node: String,
        max_running: usize,
        arming: Arming,
    ) -> (Subscriptions, TraceStops, TraceHandle) {
        let (subs, records) = Subscriptions::new();
        let (stopped, stops) = tokio::sync::mpsc::unbounded_channel();
        let controller = Self {
            client,
            node,
            max_running: max_running.max(1),
            subs: subs.clone(),
            records,
            stopped,
            running: HashMap::new(),
            waiting: VecDeque::new(),
            expiring: HashMap::new(),
        };
        let (stop, stop_rx) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(controller.run(stop_rx));
        (
            subs,
            TraceStops { stops, arming },
            TraceHandle { stop, task },
        )
    }

    async fn run(mut self, mut stop: tokio::sync::watch::Receiver<bool>) {
        let api: Api<Trace> = Api::all(self.client.clone());
        let mut objects = watcher(api, watcher::Config::default())
            .default_backoff()
            .boxed();
        let mut tick = tokio::time::interval(WRITE_EVERY);
        let mut recheck = tokio::time::interval(RECHECK_EVERY);
        let mut failing = false;
        loop {
            tokio::select! {
                ev = objects.next() => match ev {
                    Some(Ok(ev)) => {
                        if std::mem::take(&mut failing) {
                            eprintln!("netprobe agent: watching Trace objects again");
                        }
                        self.on_watch(ev).await
                    }
                    // Once per episode (the watcher retries with backoff), e.g. a cluster
                    // without the CRD installed.
                    Some(Err(e)) if !failing => {
                        failing = true;
                        eprintln!("netprobe agent: cannot watch Trace objects (retrying): {e}");
                    }
                    Some(Err(_)) => {}
                    None => break,
                },
                Some((key, record)) = self.records.recv() => self.on_record(key, record).await,
                _ = tick.tick() => self.on_tick().await,
                _ = recheck.tick() => self.recheck().await,
                _ = stop.changed() => {
                    self.stop_all("the netprobe agent stopped (SIGTERM) mid-trace").await;
                    break;
                }
            }
        }
    }

    async fn on_watch(&mut self, ev: watcher::Event<Trace>) {
        match ev {
            watcher::Event::Apply(t) | watcher::Event::InitApply(t) => self.on_object(t).await,
            watcher::Event::Delete(t) => self.forget(&key_of(&t)),
            watcher::Event::Init | watcher::Event::InitDone => {}
        }
    }

    /// An object as it is now.
    async fn on_object(&mut self, t: Trace) {
        let key = key_of(&t);
        if t.metadata.deletion_timestamp.is_some() {
            self.forget(&key);
            return;
        }
        let status = t.status.clone().unwrap_or_default();
        let ours = status.node.as_deref() == Some(self.node.as_str());
        match status.phase {
            TracePhase::Running if ours && !self.running.contains_key(&key) => {
                // Running here, by an agent of this node that is no more.
                self.finish_other(&t, "the netprobe agent restarted mid-trace")
                    .await;
            }
            TracePhase::Running => {}
            TracePhase::Pending => {
                if !self.running.contains_key(&key) {
                    self.consider(t).await;
                }
            }
            TracePhase::Completed | TracePhase::Failed => {
                // Failed before any node took it (no pod): every agent may delete it.
                if ours || status.node.is_none() {
                    self.expire_later(&t, &status);
                }
            }
        }
    }

    /// A Pending object: start it, leave it waiting (with a message), fail it, or leave it to
    /// another node.
    async fn consider(&mut self, t: Trace) {
        let key = key_of(&t);
        self.waiting.retain(|w| key_of(w) != key);
        match self.start_trace(&t).await {
            Ok(()) => {}
            Err(NotNow::Elsewhere) => {}
            Err(NotNow::Fail(message)) => self.finish_other(&t, &message).await,
            Err(NotNow::Wait(message)) => {
                let current = t.status.as_ref().and_then(|s| s.message.clone());
                if let Some(m) = message.filter(|m| Some(m) != current.as_ref()) {
                    let patch = json!({"status": {"phase": "Pending", "message": m}});
                    self.patch(&key, &patch).await;
                }
                if self.waiting.len() < MAX_WAITING {
                    self.waiting.push_back(t);
                }
            }
        }
    }

    /// Starts `t` if its pod is on this node and there is room.
    async fn start_trace(&mut self, t: &Trace) -> std::result::Result<(), NotNow> {
        let key = key_of(t);
        let pod = self.pod_of(t).await?;
        let target = t.spec.target().map_err(|e| NotNow::Fail(e.to_string()))?;
        let duration = t.spec.duration().map_err(|e| NotNow::Fail(e.to_string()))?;
        if pod.spec.as_ref().and_then(|s| s.host_network) == Some(true) {
            return Err(NotNow::Fail(format!(
                "pod {} uses the node's network (hostNetwork): its addresses are the node's, so a trace scoped to them would show every host process's flows; not traced",
                t.spec.pod
            )));
        }
        let addrs = pod_addrs(&pod);
        if addrs.is_empty() {
            return Err(NotNow::Wait(Some(format!(
                "waiting for pod {} to get an address",
                t.spec.pod
            ))));
        }
        if self.running.len() >= self.max_running {
            return Err(NotNow::Wait(Some(format!(
                "waiting: node {} runs {} traces already, at most {} at once (the agent's --max-traces)",
                self.node,
                self.running.len(),
                self.max_running
            ))));
        }
        let (port, protocol) = match target {
            TraceTarget::Port { port, protocol } => (
                port,
                match protocol {
                    TraceProtocol::Tcp => Protocol::Tcp,
                    TraceProtocol::Udp => Protocol::Udp,
                },
            ),
            TraceTarget::Dns => (netprobe_common::DNS_PORT, Protocol::Udp),
        };
        let lost = Arc::default();
        self.subs.add(Subscription {
            key: key.clone(),
            addrs,
            port,
            protocol,
            events: t.spec.events,
            lost: Arc::clone(&lost),
        });
        let status = TraceStatus {
            phase: TracePhase::Running,
            node: Some(self.node.clone()),
            message: Some(format!(
                "tracing pod {} port {port}/{protocol:?} on node {}",
                t.spec.pod, self.node
            )),
            start_time: Some(Time(Utc::now())),
            ..TraceStatus::default()
        };
        let patch = json!({"status": {
            "phase": "Running", "node": status.node, "message": status.message,
            "startTime": status.start_time,
        }});
        self.running.insert(
            key.clone(),
            Running {
                status,
                deadline: Instant::now() + duration,
                dirty: false,
                last_write: Some(Instant::now()),
                lost,
                failed: 0,
            },
        );
        self.patch(&key, &patch).await;
        Ok(())
    }

    /// The traced pod, if it runs on this node.
    async fn pod_of(&self, t: &Trace) -> std::result::Result<Pod, NotNow> {
        let ns = t.namespace().unwrap_or_default();
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &ns);
        let pod = match pods.get_opt(&t.spec.pod).await {
            Ok(Some(p)) => p,
            Ok(None) => {
                return Err(NotNow::Fail(format!(
                    "pod {} not found in namespace {ns} (a Trace traces a pod of its own namespace)",
                    t.spec.pod
                )));
            }
            Err(e) => {
                eprintln!("netprobe agent: reading pod {ns}/{}: {e}", t.spec.pod);
                return Err(NotNow::Wait(None));
            }
        };
        match pod.spec.as_ref().and_then(|s| s.node_name.as_deref()) {
            Some(n) if n == self.node => Ok(pod),
            Some(_) => Err(NotNow::Elsewhere),
            // Not scheduled yet: looked at again.
            None => Err(NotNow::Wait(None)),
        }
    }

    /// Objects that wait get another look (room freed, address assigned).
    async fn recheck(&mut self) {
        let waiting: Vec<Trace> = self.waiting.drain(..).collect();
        for t in waiting {
            self.consider(t).await;
        }
    }

    async fn on_record(&mut self, key: TraceKey, record: TraceRecord) {
        let Some(r) = self.running.get_mut(&key) else {
            return;
        };
        match record {
            TraceRecord::Verdict(v) => {
                if v.is_failure() {
                    r.failed += 1;
                }
                r.status.push_verdict(*v);
            }
            TraceRecord::Event(e) => {
                r.status.push_event(*e);
            }
        }
        r.dirty = true;
        // The first verdict goes out at once; the ones that follow it closely are coalesced.
        if r.last_write.is_none_or(|at| at.elapsed() >= WRITE_EVERY) {
            self.write_progress(&key).await;
        }
    }

    async fn on_tick(&mut self) {
        let now = Instant::now();
        let keys: Vec<TraceKey> = self.running.keys().cloned().collect();
        for key in keys {
            let Some(r) = self.running.get(&key) else {
                continue;
            };
            if now >= r.deadline {
                self.complete(&key).await;
            } else if r.dirty {
                self.write_progress(&key).await;
            }
        }
        self.delete_expired().await;
    }

    /// The verdicts and events so far.
    async fn write_progress(&mut self, key: &TraceKey) {
        let Some(r) = self.running.get_mut(key) else {
            return;
        };
        r.dirty = false;
        r.last_write = Some(Instant::now());
        let patch = progress_patch(r);
        self.patch(key, &patch).await;
    }

    /// The end of `duration`: Completed, with the summary.
    async fn complete(&mut self, key: &TraceKey) {
        if let Some(r) = self.end(key) {
            self.write_end(key, r, TracePhase::Completed, None).await;
        }
    }

    /// Stops a running trace: no more records, and the session lets go of what it holds for
    /// the pod's flows.
    fn end(&mut self, key: &TraceKey) -> Option<Running> {
        if let Some(addrs) = self.subs.remove(key) {
            let _ = self.stopped.send(addrs);
        }
        self.running.remove(key)
    }

    async fn write_end(
        &mut self,
        key: &TraceKey,
        mut r: Running,
        phase: TracePhase,
        message: Option<&str>,
    ) {
        let mut summary = Summary::new();
        summary.attempts = r.status.verdicts.len() as u64 + r.status.verdicts_dropped;
        summary.failed = r.failed;
        summary.events = r.status.events.len() as u64 + r.status.events_dropped;
        let (lost_verdicts, lost_events) = (
            r.lost.0.load(Ordering::Relaxed),
            r.lost.1.load(Ordering::Relaxed),
        );
        if lost_verdicts + lost_events > 0 {
            summary.warnings.push(format!(
                "{lost_verdicts} verdicts and {lost_events} events lost on their way to this object (the agent was behind)"
            ));
        }
        summary.written.observed.node = Some(self.node.clone());
        let mut patch = progress_patch(&mut r);
        patch["status"]["phase"] = json!(phase);
        patch["status"]["completionTime"] = json!(Time(Utc::now()));
        patch["status"]["summary"] = json!(summary);
        if let Some(m) = message {
            patch["status"]["message"] = json!(m);
        }
        self.patch(key, &patch).await;
    }

    /// A deleted object: its trace stops at once.
    fn forget(&mut self, key: &TraceKey) {
        self.end(key);
        self.waiting.retain(|w| key_of(w) != *key);
        self.expiring.remove(key);
    }

    async fn stop_all(&mut self, message: &str) {
        let keys: Vec<TraceKey> = self.running.keys().cloned().collect();
        for key in keys {
            if let Some(r) = self.end(&key) {
                self.write_end(&key, r, TracePhase::Failed, Some(message))
                    .await;
            }
        }
    }

    /// Fails an object this agent does not run (no pod, a bad spec, a previous agent's).
    async fn finish_other(&mut self, t: &Trace, message: &str) {
        // A previous agent's trace keeps its node; a trace no node took has none.
        let node = t.status.as_ref().and_then(|s| s.node.clone());
        let patch = json!({"status": {
            "phase": "Failed", "message": message, "node": node,
            "completionTime": Time(Utc::now()),
        }});
        self.patch(&key_of(t), &patch).await;
    }

    fn expire_later(&mut self, t: &Trace, status: &TraceStatus) {
        let Some(done) = &status.completion_time else {
            return;
        };
        let ttl = chrono::TimeDelta::seconds(i64::from(t.spec.ttl_seconds_after_finished));
        if let Some(due) = done.0.checked_add_signed(ttl) {
            self.expiring.insert(key_of(t), due);
        }
    }

    async fn delete_expired(&mut self) {
        let now = Utc::now();
        let due: Vec<TraceKey> = self
            .expiring
            .iter()
            .filter(|(_, at)| **at <= now)
            .map(|(k, _)| k.clone())
            .collect();
        for key in due {
            self.expiring.remove(&key);
            let api: Api<Trace> = Api::namespaced(self.client.clone(), &key.namespace);
            let pre = kube::api::Preconditions {
                uid: Some(key.uid.clone()),
                resource_version: None,
            };
            let params = kube::api::DeleteParams {
                preconditions: Some(pre),
                ..Default::default()
            };
            match api.delete(&key.name, &params).await {
                Ok(_) => {}
                Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => {}
                Err(e) => eprintln!(
                    "netprobe agent: deleting finished Trace {}/{}: {e}",
                    key.namespace, key.name
                ),
            }
        }
    }

    /// A merge patch of the status subresource. A failed write is said and the trace goes on:
    /// the next write carries everything again.
    async fn patch(&self, key: &TraceKey, patch: &serde_json::Value) {
        let api: Api<Trace> = Api::namespaced(self.client.clone(), &key.namespace);
        let params = PatchParams::apply(MANAGER);
        match api
            .patch_status(&key.name, &params, &Patch::Merge(patch))
            .await
        {
            Ok(_) => {}
            // Deleted meanwhile: the watch says so next.
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => eprintln!(
                "netprobe agent: writing the status of Trace {}/{}: {e}",
                key.namespace, key.name
            ),
        }
    }
}

/// The status fields a running trace rewrites: its records and what was dropped.
fn progress_patch(r: &mut Running) -> serde_json::Value {
    let s = &r.status;
    json!({"status": {
        "verdicts": s.verdicts,
        "verdictsDropped": s.verdicts_dropped + r.lost.0.load(Ordering::Relaxed),
        "events": s.events,
        "eventsDropped": s.events_dropped + r.lost.1.load(Ordering::Relaxed),
        "outcome": s.outcome,
    }})
}

fn key_of(t: &Trace) -> TraceKey {
    TraceKey {
        namespace: t.namespace().unwrap_or_default(),
        name: t.name_any(),
        uid: t.uid().unwrap_or_default(),
    }
}

/// The pod's own addresses (`status.podIPs`, else `status.podIP`).
fn pod_addrs(pod: &Pod) -> Vec<IpAddr> {
    let Some(st) = &pod.status else {
        return Vec::new();
    };
    let mut addrs: Vec<IpAddr> = st
        .pod_ips
        .iter()
        .flatten()
        .filter_map(|p| p.ip.parse().ok())
        .collect();
    if let Some(ip) = st.pod_ip.as_deref().and_then(|ip| ip.parse().ok())
        && !addrs.contains(&ip)
    {
        addrs.push(ip);
    }
    addrs
}

/// The session's side of stopped traces: what the agent armed for the pod's flows (the
/// nftables trace of a dropped flow) goes at once, not at the arming's expiry.
pub struct TraceStops {
    stops: tokio::sync::mpsc::UnboundedReceiver<Vec<IpAddr>>,
    arming: Arming,
}

impl Source for TraceStops {
    fn next(&mut self) -> LocalBoxFuture<'_, Result<Input>> {
        Box::pin(async move {
            // recv is cancel-safe: a stop is never half taken.
            match self.stops.recv().await {
                Some(addrs) => {
                    self.arming.disarm_addrs(&addrs);
                    Ok(Input::Events(Vec::new()))
                }
                // The controller is gone (the agent is stopping).
                None => std::future::pending().await,
            }
        })
    }
}

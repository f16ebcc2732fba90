//! Kubernetes Events: a drop that hits a known pod becomes a `Warning PacketDropped` Event on
//! that pod, at most one per pod and reason per minute, so a storm never turns into an API
//! storm. Published in the background; a failure is logged, never fatal.

use std::{cell::RefCell, io, rc::Rc};

use kube::runtime::events::Recorder;

use super::Sink;
use crate::{
    enrich::{names::PodContext, pods::Inventory},
    events::Event,
};

/// Posts Events through the API client the inventory uses.
pub struct KubeEventsSink {
    recorder: Recorder,
    names: Rc<RefCell<PodContext>>,
    node: Option<String>,
    limit: EventRateLimit,
}

impl KubeEventsSink {
    pub fn new(names: Rc<RefCell<PodContext>>, node: Option<String>) -> Self {
        let recorder = names.borrow().kube.recorder(node.as_deref());
        Self {
            recorder,
            names,
            node,
            limit: EventRateLimit::default(),
        }
    }
}

impl Sink for KubeEventsSink {
    fn event(&mut self, e: &Event) -> io::Result<()> {
        let names = self.names.borrow();
        if let Some((ev, reference, key)) = pod_event(e, &names.inventory, self.node.as_deref())
            && self.limit.admit(key, std::time::Instant::now())
        {
            let rec = self.recorder.clone();
            tokio::spawn(async move {
                if let Err(err) = rec.publish(&ev, &reference).await {
                    log::warn!("publishing a Kubernetes Event failed: {err}");
                }
            });
        }
        Ok(())
    }
}

/// Kubernetes Events for drops that hit a known pod: at most one per (pod, reason) per minute,
/// so a storm never turns into an API storm.
#[derive(Default)]
pub struct EventRateLimit {
    last: std::collections::HashMap<(String, String, String), std::time::Instant>,
}

impl EventRateLimit {
    fn admit(&mut self, key: (String, String, String), now: std::time::Instant) -> bool {
        match self.last.get(&key) {
            Some(t) if now.duration_since(*t) < std::time::Duration::from_secs(60) => false,
            _ => {
                self.last.insert(key, now);
                true
            }
        }
    }
}

/// The Kubernetes Event for a drop that hit a known pod (the destination if known, else the
/// source), with the key it is rate-limited by.
fn pod_event(
    e: &Event,
    inventory: &Inventory,
    node: Option<&str>,
) -> Option<(
    kube::runtime::events::Event,
    k8s_openapi::api::core::v1::ObjectReference,
    (String, String, String),
)> {
    let d = e.drop.as_ref()?;
    let peer = [&e.destination, &e.source]
        .into_iter()
        .flatten()
        .find(|p| p.pod.is_some())?;
    let (ns, name) = (peer.namespace.clone()?, peer.pod.clone()?);
    let pod = inventory.find_pod(Some(&ns), &name).into_iter().next()?;
    let note = format!(
        "netprobe: {} {}:{} > {}:{} dropped by the kernel: {} at {}{}",
        e.protocol,
        e.src,
        e.sport,
        e.dst,
        e.dport,
        d.reason,
        d.location,
        node.map(|n| format!(" on node {n}")).unwrap_or_default()
    );
    let reference = k8s_openapi::api::core::v1::ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Pod".into()),
        name: Some(name.clone()),
        namespace: Some(ns.clone()),
        uid: Some(pod.uid.clone()),
        ..Default::default()
    };
    let ev = kube::runtime::events::Event {
        type_: kube::runtime::events::EventType::Warning,
        reason: "PacketDropped".into(),
        note: Some(note.chars().take(1000).collect()),
        action: "Drop".into(),
        secondary: None,
    };
    Some((ev, reference, (ns, name, d.reason.clone())))
}

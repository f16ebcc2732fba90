//! Names for what the kernel saw: this node's pods and Services from the Kubernetes API, bound
//! to the network namespaces behind its veths, applied to events (verdicts are named by `session::judge`).

use std::net::IpAddr;

use crate::{
    enrich::{
        kube::{self, KubeSource},
        pods::{Inventory, cgroup_of},
    },
    error::Result,
    netlink,
    netns::{self, NetnsRef},
};

/// Pods and Services from the API, bound to this node's network namespaces.
pub struct PodContext {
    pub kube: KubeSource,
    pub inventory: Inventory,
    /// netns inode → its addresses (pods are bound to namespaces by IP).
    addrs: Vec<(u64, Vec<IpAddr>)>,
    /// netns name → inode (verdicts carry names).
    inodes: std::collections::HashMap<String, u64>,
    /// `--from-pod`: (namespace, name) of the only client pod of interest.
    from_pod: Option<(Option<String>, String)>,
}

impl PodContext {
    pub fn refresh(&mut self) {
        let mut inv = self.kube.inventory();
        for (ino, a) in &self.addrs {
            inv.bind_netns(*ino, a);
        }
        self.inventory = inv;
    }

    /// Re-reads which namespaces hang off this node and their addresses (a recreated pod has a
    /// new namespace and IP), then the API's view. Returns namespaces not seen before.
    pub fn rescan(&mut self, current: &NetnsRef) -> Vec<NetnsRef> {
        let mut fresh = Vec::new();
        let mut candidates = vec![current.clone()];
        let peers = netns::veth_peers();
        candidates.extend(peers.as_ref().cloned().unwrap_or_default());
        let mut addrs = Vec::new();
        for ns in &candidates {
            if let Ok(Ok(a)) = ns.run(netlink::addresses) {
                addrs.push((ns.inode, a));
            }
            if self.inodes.insert(ns.name.clone(), ns.inode).is_none() {
                fresh.push(ns.clone());
            }
        }
        // Deleted pods' namespaces are forgotten (only from a complete list).
        if peers.is_ok() {
            self.inodes
                .retain(|name, _| candidates.iter().any(|c| &c.name == name));
        }
        self.addrs = addrs;
        self.refresh();
        fresh
    }

    pub fn annotate_event(&self, e: &mut crate::events::Event) {
        let ns = e.netns.as_ref().map(|n| n.inode);
        // The process is only meaningful in process context (connect() → SYN_SENT): its cgroup
        // names the container. Elsewhere (softirq) it is whoever ran; no /proc read per event.
        let cgroup = (e.kind == crate::events::Kind::StateChange)
            .then(|| e.process.as_ref().and_then(|p| cgroup_of(p.pid)))
            .flatten();
        e.source = Some(self.inventory.peer(e.src, e.sport, ns, cgroup.as_deref()));
        e.destination = Some(self.inventory.peer(e.dst, e.dport, ns, None));
        e.to_service_endpoint = self.inventory.is_service_endpoint(e.dst);
    }

    /// The inode of a traced namespace, by the name events and verdicts carry.
    pub fn netns_inode(&self, name: &str) -> Option<u64> {
        self.inodes.get(name).copied()
    }

    /// `--from-pod`: (namespace, name) of the only client pod of interest.
    pub fn from_pod(&self) -> Option<(Option<&str>, &str)> {
        self.from_pod
            .as_ref()
            .map(|(ns, name)| (ns.as_deref(), name.as_str()))
    }
}

/// How long a trace with `--pod` waits for the first lists (it needs the pod's namespace).
const REQUIRED_WAIT: std::time::Duration = std::time::Duration::from_secs(15);
/// How long the agent (or a trace without `--pod`) waits before it goes on without names; the
/// watchers keep trying in the background and names appear once they are in.
const OPTIONAL_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Starts the inventory when a pod is traced or an API server is configured. Without a pod, an
/// unreachable API only costs the names until it answers (a warning), never the trace or the
/// agent: the inventory is kept and keeps listing and watching with backoff.
pub async fn pod_context(
    required: bool,
    node_name: Option<&str>,
    from_pod: Option<&str>,
    current: &NetnsRef,
) -> Result<Option<PodContext>> {
    if !required && !kube::configured() {
        return Ok(None);
    }
    let source = match KubeSource::start(node_name).await {
        Ok(s) => s,
        Err(e) if !required => {
            eprintln!("netprobe: WARNING: no pod names: {e}");
            return Ok(None);
        }
        Err(e) => return Err(e),
    };
    let wait = if required {
        REQUIRED_WAIT
    } else {
        OPTIONAL_WAIT
    };
    match source.wait_ready(wait).await {
        Ok(()) => {}
        Err(e) if !required => {
            eprintln!("netprobe: WARNING: no pod names yet ({e}); retrying in the background")
        }
        Err(e) => return Err(e),
    }
    let mut candidates = vec![current.clone()];
    candidates.extend(netns::veth_peers()?);
    let mut addrs = Vec::new();
    let mut inodes = std::collections::HashMap::new();
    for ns in &candidates {
        inodes.insert(ns.name.clone(), ns.inode);
        if let Ok(Ok(a)) = ns.run(netlink::addresses) {
            addrs.push((ns.inode, a));
        }
    }
    let from_pod = from_pod.map(|f| match f.split_once('/') {
        Some((ns, name)) => (Some(ns.to_string()), name.to_string()),
        None => (None, f.to_string()),
    });
    let mut ctx = PodContext {
        kube: source,
        inventory: Inventory::default(),
        addrs,
        inodes,
        from_pod,
    };
    ctx.refresh();
    Ok(Some(ctx))
}

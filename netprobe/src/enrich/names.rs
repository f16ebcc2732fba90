//! Names for what the kernel saw: this node's pods and Services from the Kubernetes API, bound
//! to the network namespaces behind its veths, applied to events and verdicts.

use std::net::IpAddr;

use crate::{
    enrich::{
        kube::{self, KubeSource},
        pods::{Inventory, cgroup_of},
    },
    error::{Error, Result},
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
        candidates.extend(netns::veth_peers().unwrap_or_default());
        let mut addrs = Vec::new();
        for ns in &candidates {
            if let Ok(Ok(a)) = ns.run(netlink::addresses) {
                addrs.push((ns.inode, a));
            }
            if self.inodes.insert(ns.name.clone(), ns.inode).is_none() {
                fresh.push(ns.clone());
            }
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
    }

    /// Is this verdict about the client pod asked for (if any)?
    pub fn wanted(&self, v: &crate::verdict::Verdict) -> bool {
        let Some((ns, name)) = &self.from_pod else {
            return true;
        };
        let Some(peer) = &v.client.peer else {
            return false;
        };
        peer.pod.as_deref() == Some(name.as_str())
            && ns
                .as_ref()
                .is_none_or(|n| peer.namespace.as_ref() == Some(n))
    }

    pub fn annotate_verdict(&self, v: &mut crate::verdict::Verdict) {
        let inode = |n: &Option<String>| n.as_ref().and_then(|n| self.inodes.get(n)).copied();
        let cgroup = v.client.pid.and_then(cgroup_of);
        v.client.peer = Some(self.inventory.peer(
            v.client.addr,
            v.client.port,
            inode(&v.client.netns),
            cgroup.as_deref(),
        ));
        v.server.peer =
            Some(
                self.inventory
                    .peer(v.server.addr, v.server.port, inode(&v.server.netns), None),
            );
        if let Some(d) = &mut v.dialed {
            d.peer = Some(self.inventory.peer(d.addr, d.port, None, None));
        }
        if let Some(iface) = v
            .netfilter
            .as_ref()
            .and_then(|nf| nf.owner.interface.as_ref())
            && let Some(pod) = self.inventory.pod_of_calico_iface(iface)
        {
            v.name_rule_workload(format!("{}/{}", pod.namespace, pod.name));
        }
        let server_ns = inode(&v.server.netns);
        for l in &mut v.listeners {
            let cg = l.pid.and_then(cgroup_of);
            l.container = self
                .inventory
                .peer(l.addr, l.port, server_ns, cg.as_deref())
                .container;
        }
        // What the pod declares versus what listens: the classic S2 misconfiguration.
        if v.outcome == crate::verdict::Outcome::RefusedNoListener
            && let Some(peer) = &v.server.peer
            && let (Some(ns), Some(name)) = (&peer.namespace, &peer.pod)
            && let Some(pod) = self.inventory.find_pod(Some(ns), name).first()
        {
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
    }
}

/// Starts the inventory when a pod is traced or an API server is configured. Without a pod, an
/// unreachable API only costs the names (a warning), never the trace.
pub async fn pod_context(
    required: bool,
    node_name: Option<&str>,
    from_pod: Option<&str>,
    current: &NetnsRef,
) -> Result<Option<PodContext>> {
    if !required && !kube::configured() {
        return Ok(None);
    }
    let started = async {
        let source = KubeSource::start(node_name).await?;
        source
            .wait_ready(std::time::Duration::from_secs(15))
            .await?;
        Ok::<_, Error>(source)
    }
    .await;
    let source = match started {
        Ok(s) => s,
        Err(e) if !required => {
            eprintln!("netprobe: WARNING: no pod names: {e}");
            return Ok(None);
        }
        Err(e) => return Err(e),
    };
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

//! The node inventory, as pure data: pods (with their namespace on this node, IPs and
//! containers), Services and their endpoints. Built from Kubernetes objects plus what the node
//! itself says (which network namespace holds which IP, which cgroup a process is in), and
//! queried by address to say which pod, container or Service a packet belongs to.

use std::{collections::HashMap, net::IpAddr};

use k8s_openapi::api::{
    core::v1::{Pod, Service},
    discovery::v1::EndpointSlice,
};

use crate::attribution::cni::calico;
pub use crate::model::Peer;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodEntry {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub node: Option<String>,
    pub ips: Vec<IpAddr>,
    pub host_network: bool,
    /// container id (without the runtime prefix) → name
    pub containers: HashMap<String, String>,
    /// Declared containerPorts: (container, port).
    pub ports: Vec<(String, u16)>,
    /// `Kind/name` of the workload that owns the pod ([`workload_of`]).
    pub workload: String,
}

#[derive(Debug, Clone, Default)]
pub struct Inventory {
    pub pods: Vec<PodEntry>,
    /// (ClusterIP, port) → `namespace/name:portname`
    services: HashMap<(IpAddr, u16), String>,
    /// ClusterIP → `namespace/name` (any port)
    service_ips: HashMap<IpAddr, String>,
    /// netns inode → pod index
    netns_pod: HashMap<u64, usize>,
    /// pod index → netns inode
    pod_netns: HashMap<usize, u64>,
    /// Pods of other nodes, known as Service endpoints (the pod watch is this node's only):
    /// a backend on another node still gets its name and node.
    endpoints: HashMap<IpAddr, Peer>,
}

impl Inventory {
    pub fn build(pods: &[Pod], services: &[Service], slices: &[EndpointSlice]) -> Self {
        let mut inv = Self::default();
        for p in pods {
            let (Some(name), Some(namespace)) =
                (p.metadata.name.clone(), p.metadata.namespace.clone())
            else {
                continue;
            };
            let spec = p.spec.as_ref();
            let status = p.status.as_ref();
            let mut ips: Vec<IpAddr> = status
                .and_then(|s| s.pod_ips.as_ref())
                .map(|v| v.iter().filter_map(|i| i.ip.parse().ok()).collect())
                .unwrap_or_default();
            if let Some(ip) = status
                .and_then(|s| s.pod_ip.as_ref())
                .and_then(|i| i.parse().ok())
                && !ips.contains(&ip)
            {
                ips.push(ip);
            }
            let containers = status
                .and_then(|s| s.container_statuses.as_ref())
                .map(|cs| {
                    cs.iter()
                        .filter_map(|c| {
                            let id = c.container_id.as_ref()?;
                            let id = id.split_once("://").map_or(id.as_str(), |(_, i)| i);
                            Some((id.to_string(), c.name.clone()))
                        })
                        .collect()
                })
                .unwrap_or_default();
            let ports = spec
                .map(|s| {
                    s.containers
                        .iter()
                        .flat_map(|c| {
                            c.ports
                                .iter()
                                .flatten()
                                .map(|p| (c.name.clone(), p.container_port as u16))
                        })
                        .collect()
                })
                .unwrap_or_default();
            inv.pods.push(PodEntry {
                workload: workload_of(&p.metadata, &name),
                namespace,
                name,
                uid: p.metadata.uid.clone().unwrap_or_default(),
                node: spec.and_then(|s| s.node_name.clone()),
                ips,
                host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
                containers,
                ports,
            });
        }
        for s in services {
            let (Some(name), Some(ns)) = (s.metadata.name.clone(), s.metadata.namespace.clone())
            else {
                continue;
            };
            let Some(spec) = &s.spec else { continue };
            let ips: Vec<IpAddr> = spec
                .cluster_ips
                .iter()
                .flatten()
                .chain(spec.cluster_ip.iter())
                .filter_map(|i| i.parse().ok())
                .collect();
            for ip in ips {
                inv.service_ips.insert(ip, format!("{ns}/{name}"));
                for p in spec.ports.iter().flatten() {
                    let port_name = p.name.clone().unwrap_or_else(|| p.port.to_string());
                    inv.services
                        .insert((ip, p.port as u16), format!("{ns}/{name}:{port_name}"));
                }
            }
        }
        for ep in slices.iter().flat_map(|s| s.endpoints.iter()) {
            let Some(r) = pod_ref(ep) else { continue };
            for ip in ep.addresses.iter().filter_map(|a| a.parse().ok()) {
                inv.endpoints.insert(
                    ip,
                    Peer {
                        namespace: r.namespace.clone(),
                        pod: r.name.clone(),
                        node: ep.node_name.clone(),
                        ..Default::default()
                    },
                );
            }
        }
        inv
    }

    /// Records which network namespace holds which addresses (from the node).
    pub fn bind_netns(&mut self, netns: u64, addrs: &[IpAddr]) {
        for (i, p) in self.pods.iter().enumerate() {
            if !p.host_network && p.ips.iter().any(|ip| addrs.contains(ip)) {
                self.netns_pod.insert(netns, i);
                self.pod_netns.insert(i, netns);
            }
        }
    }

    /// The pod behind a Calico workload interface (Calico's naming: [`calico::iface_is_pods`]).
    pub fn pod_of_calico_iface(&self, iface: &str) -> Option<&PodEntry> {
        self.pods
            .iter()
            .find(|p| calico::iface_is_pods(iface, &p.namespace, &p.name))
    }

    pub fn find_pod(&self, namespace: Option<&str>, name: &str) -> Vec<&PodEntry> {
        self.pods
            .iter()
            .filter(|p| p.name == name && namespace.is_none_or(|n| p.namespace == n))
            .collect()
    }

    pub fn netns_of(&self, pod: &PodEntry) -> Option<u64> {
        let i = self.pods.iter().position(|p| p == pod)?;
        self.pod_netns.get(&i).copied()
    }

    /// The pod whose network namespace has inode `netns`.
    pub fn pod_in_netns(&self, netns: u64) -> Option<&PodEntry> {
        self.netns_pod.get(&netns).map(|i| &self.pods[*i])
    }

    /// Services with port `port`: `namespace/name:portname` and the ClusterIP, sorted.
    pub fn services_on_port(&self, port: u16) -> Vec<(String, IpAddr)> {
        let mut out: Vec<(String, IpAddr)> = self
            .services
            .iter()
            .filter(|((_, p), _)| *p == port)
            .map(|((ip, _), name)| (name.clone(), *ip))
            .collect();
        out.sort();
        out
    }

    /// Whether `ip` is an endpoint of a Service (a connection to it may have been DNAT'd from a
    /// ClusterIP).
    pub fn is_service_endpoint(&self, ip: IpAddr) -> bool {
        self.endpoints.contains_key(&ip)
    }

    pub fn service_at(&self, ip: IpAddr, port: u16) -> Option<String> {
        self.services
            .get(&(ip, port))
            .cloned()
            .or_else(|| self.service_ips.get(&ip).cloned())
    }

    /// Who `ip` is, seen from namespace `netns` (loopback addresses belong to that namespace's
    /// pod); `cgroup` (of a process, when known) names the container.
    pub fn peer(&self, ip: IpAddr, port: u16, netns: Option<u64>, cgroup: Option<&str>) -> Peer {
        if let Some(svc) = self.service_at(ip, port) {
            let ns = svc.split('/').next().map(str::to_string);
            return Peer {
                namespace: ns,
                service: Some(svc),
                ..Default::default()
            };
        }
        let pod = if ip.is_loopback() {
            netns
                .and_then(|n| self.netns_pod.get(&n))
                .map(|i| &self.pods[*i])
        } else {
            self.pods
                .iter()
                .find(|p| !p.host_network && p.ips.contains(&ip))
        };
        let Some(pod) = pod else {
            return if ip.is_loopback() {
                Peer::default()
            } else {
                self.endpoints.get(&ip).cloned().unwrap_or_default()
            };
        };
        let container = cgroup
            .and_then(container_of_cgroup)
            .and_then(|(_, id)| pod.containers.get(&id).cloned());
        Peer {
            namespace: Some(pod.namespace.clone()),
            pod: Some(pod.name.clone()),
            container,
            node: pod.node.clone(),
            service: None,
            workload: Some(pod.workload.clone()),
        }
    }

    /// `namespace/Kind/name` of every workload with a pod in the inventory (metrics of the
    /// others expire).
    pub fn workloads(&self) -> std::collections::HashSet<String> {
        self.pods
            .iter()
            .map(|p| format!("{}/{}", p.namespace, p.workload))
            .collect()
    }

    /// `namespace/name` of every pod the inventory names: this node's, and other nodes' known
    /// as Service endpoints (per-pod state of the others is released).
    pub fn pod_names(&self) -> std::collections::HashSet<String> {
        let endpoints = self
            .endpoints
            .values()
            .filter_map(|p| Some(format!("{}/{}", p.namespace.as_ref()?, p.pod.as_ref()?)));
        self.pods
            .iter()
            .map(|p| format!("{}/{}", p.namespace, p.name))
            .chain(endpoints)
            .collect()
    }
}

/// `Kind/name` of the workload a pod belongs to, from its controller's ownerReference: a
/// ReplicaSet made by a Deployment (named `<deployment>-<pod-template-hash>`, the hash also a
/// label of the pod) is that Deployment, so a rollout or a restarted pod keeps the name;
/// StatefulSet, DaemonSet, Job and others as they are; no controller: the pod itself.
pub fn workload_of(
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    pod: &str,
) -> String {
    let Some(owner) = meta
        .owner_references
        .iter()
        .flatten()
        .find(|o| o.controller == Some(true))
    else {
        return format!("Pod/{pod}");
    };
    if owner.kind == "ReplicaSet"
        && let Some(deployment) = deployment_of_replicaset(meta, &owner.name)
    {
        return format!("Deployment/{deployment}");
    }
    format!("{}/{}", owner.kind, owner.name)
}

/// The Deployment behind ReplicaSet `rs`: its name less the `-<pod-template-hash>` suffix,
/// when the pod carries that hash as its `pod-template-hash` label.
fn deployment_of_replicaset<'a>(
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    rs: &'a str,
) -> Option<&'a str> {
    let hash = meta.labels.as_ref()?.get("pod-template-hash")?;
    rs.strip_suffix(hash.as_str())?
        .strip_suffix('-')
        .filter(|d| !d.is_empty())
}

/// The pod an EndpointSlice endpoint is (not a node or another kind).
fn pod_ref(
    ep: &k8s_openapi::api::discovery::v1::Endpoint,
) -> Option<&k8s_openapi::api::core::v1::ObjectReference> {
    ep.target_ref
        .as_ref()
        .filter(|r| r.kind.as_deref() == Some("Pod"))
}

/// A pod behind a destination address (cluster mode: which other node to trace too).
#[derive(Debug, Clone, PartialEq)]
pub struct Backend {
    /// NAMESPACE/NAME.
    pub pod: String,
    /// Empty when the EndpointSlice does not say (the pod does).
    pub node: String,
    pub ip: IpAddr,
    /// The port the pod receives on (a Service's targetPort).
    pub port: u16,
}

/// The Service (namespace, name) whose ClusterIP is `addr`, as the inventory resolves it.
pub fn service_at_ip(services: &[Service], addr: IpAddr) -> Option<(String, String)> {
    let inv = Inventory::build(&[], services, &[]);
    let (ns, name) = inv.service_ips.get(&addr)?.split_once('/')?;
    Some((ns.into(), name.into()))
}

/// The pods behind `addr:port`: the endpoints of the Service with that ClusterIP (from its
/// `slices`), or the pod (of `pods`) with that IP.
pub fn backends(
    services: &[Service],
    slices: &[EndpointSlice],
    pods: &[Pod],
    addr: IpAddr,
    port: u16,
) -> Vec<Backend> {
    let inv = Inventory::build(pods, services, slices);
    if let Some(svc) = inv.service_ips.get(&addr) {
        let service = services.iter().find(|s| {
            let m = &s.metadata;
            svc.split_once('/') == m.namespace.as_deref().zip(m.name.as_deref())
        });
        return service.map_or_else(Vec::new, |s| slice_backends(s, slices, port));
    }
    inv.pods
        .iter()
        .filter(|p| !p.host_network && p.ips.contains(&addr))
        .filter_map(|p| {
            Some(Backend {
                pod: format!("{}/{}", p.namespace, p.name),
                node: p.node.clone()?,
                ip: addr,
                port,
            })
        })
        .collect()
}

/// The Service's pods in its EndpointSlices, each with the port it receives `port` on.
fn slice_backends(service: &Service, slices: &[EndpointSlice], port: u16) -> Vec<Backend> {
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    let ns = service.metadata.namespace.clone().unwrap_or_default();
    let sport = service
        .spec
        .as_ref()
        .and_then(|s| s.ports.as_ref())
        .and_then(|ps| ps.iter().find(|p| p.port == i32::from(port)));
    let mut out = Vec::new();
    for slice in slices {
        // The slice's port of the Service port (same name), else the targetPort number.
        let target = slice
            .ports
            .iter()
            .flatten()
            .find(|p| p.name == sport.and_then(|s| s.name.clone()))
            .and_then(|p| p.port)
            .or(match sport.and_then(|s| s.target_port.as_ref()) {
                Some(IntOrString::Int(n)) => Some(*n),
                _ => None,
            })
            .and_then(|p| u16::try_from(p).ok())
            .unwrap_or(port);
        for ep in &slice.endpoints {
            let Some(r) = pod_ref(ep) else { continue };
            let (Some(name), Some(ip)) =
                (&r.name, ep.addresses.first().and_then(|a| a.parse().ok()))
            else {
                continue;
            };
            out.push(Backend {
                pod: format!("{}/{name}", r.namespace.as_deref().unwrap_or(&ns)),
                node: ep.node_name.clone().unwrap_or_default(),
                ip,
                port: target,
            });
        }
    }
    out
}

/// (pod uid, container id) from a kubelet cgroup path, for the cgroupfs and systemd drivers:
/// `…/kubepods/besteffort/pod<uid>/<cid>` and
/// `…/kubepods-besteffort-pod<uid_with_underscores>.slice/cri-containerd-<cid>.scope`.
pub fn container_of_cgroup(path: &str) -> Option<(String, String)> {
    let parts: Vec<&str> = path.trim_end_matches('/').split('/').collect();
    let last = *parts.last()?;
    let parent = *parts.get(parts.len().checked_sub(2)?)?;
    let uid = if let Some(u) = parent.strip_prefix("pod") {
        u.to_string()
    } else {
        let i = parent.find("-pod")?;
        parent[i + 4..].strip_suffix(".slice")?.replace('_', "-")
    };
    let cid = last
        .strip_suffix(".scope")
        .map(|s| s.rsplit('-').next().unwrap_or(s))
        .unwrap_or(last)
        .to_string();
    (cid.len() >= 12 && cid.bytes().all(|b| b.is_ascii_hexdigit())).then_some((uid, cid))
}

/// The cgroup v2 path (or the v1 `name=systemd`/`pids` one) of a process.
pub fn cgroup_of(pid: u32) -> Option<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    text.lines()
        .filter_map(|l| l.splitn(3, ':').nth(2))
        .find(|p| p.contains("kubepods"))
        .map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroup_paths_of_both_drivers() {
        let cid = "4f1c2b3a5d6e7f8091a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f7a8";
        assert_eq!(
            container_of_cgroup(&format!(
                "/kubepods/besteffort/pod1b2c3d4e-0000-4000-8000-000000000001/{cid}"
            )),
            Some(("1b2c3d4e-0000-4000-8000-000000000001".into(), cid.into()))
        );
        assert_eq!(
            container_of_cgroup(&format!(
                "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1b2c3d4e_0000_4000_8000_000000000001.slice/cri-containerd-{cid}.scope"
            )),
            Some(("1b2c3d4e-0000-4000-8000-000000000001".into(), cid.into()))
        );
        assert_eq!(
            container_of_cgroup("/user.slice/user-0.slice/session-1.scope"),
            None
        );
        assert_eq!(container_of_cgroup("/"), None);
    }

    fn inventory_pods() -> Vec<Pod> {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "mlserver-0", "namespace": "financial-ml", "uid": "u1"},
            "spec": {"nodeName": "node-a", "containers": [
                {"name": "mlserver", "ports": [{"containerPort": 9000}]},
                {"name": "agent"}]},
            "status": {"podIP": "10.42.0.10", "containerStatuses": [
                {"name": "agent", "containerID": "containerd://aaaaaaaaaaaaaaaa", "image": "", "imageID": "", "ready": true, "restartCount": 0}]}
        }))
        .unwrap();
        vec![pod]
    }

    fn inventory() -> Inventory {
        let svc: Service = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "seldon-scheduler", "namespace": "financial-inference"},
            "spec": {"clusterIP": "10.43.51.131", "ports": [{"name": "xds", "port": 9004}]}
        }))
        .unwrap();
        let slice: EndpointSlice = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "seldon-scheduler-x", "namespace": "financial-inference"},
            "addressType": "IPv4",
            "endpoints": [{"addresses": ["10.42.1.7"], "nodeName": "node-b",
                           "targetRef": {"kind": "Pod", "namespace": "financial-inference", "name": "seldon-scheduler-0"}}]
        }))
        .unwrap();
        let mut inv = Inventory::build(&inventory_pods(), &[svc], &[slice]);
        inv.bind_netns(4026532000, &["10.42.0.10".parse().unwrap()]);
        inv
    }

    #[test]
    fn a_services_backends_come_with_their_node_and_target_port() {
        let svc: Service = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "sched", "namespace": "fi"},
            "spec": {"clusterIP": "10.43.51.131", "ports": [{"name": "xds", "port": 9004, "targetPort": 9005}]}
        }))
        .unwrap();
        let slice: EndpointSlice = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "sched-x", "namespace": "fi"},
            "addressType": "IPv4",
            "ports": [{"name": "xds", "port": 9006}],
            "endpoints": [
                {"addresses": ["10.42.1.7"], "nodeName": "node-b", "targetRef": {"kind": "Pod", "name": "sched-0"}},
                {"addresses": ["10.42.0.8"], "targetRef": {"kind": "Pod", "namespace": "fi", "name": "sched-1"}},
                {"addresses": ["10.42.0.9"], "targetRef": {"kind": "Node", "name": "n"}}]
        }))
        .unwrap();
        let cluster_ip = "10.43.51.131".parse().unwrap();
        assert_eq!(
            service_at_ip(std::slice::from_ref(&svc), cluster_ip),
            Some(("fi".into(), "sched".into()))
        );
        let b = backends(&[svc], &[slice], &[], cluster_ip, 9004);
        assert_eq!(
            b,
            [
                Backend {
                    pod: "fi/sched-0".into(),
                    node: "node-b".into(),
                    ip: "10.42.1.7".parse().unwrap(),
                    port: 9006
                },
                Backend {
                    pod: "fi/sched-1".into(),
                    node: String::new(),
                    ip: "10.42.0.8".parse().unwrap(),
                    port: 9006
                }
            ]
        );
        // A pod IP: that pod.
        let pods = &inventory_pods();
        let ip = "10.42.0.10".parse().unwrap();
        let b = backends(&[], &[], pods, ip, 9000);
        assert_eq!(b.len(), 1);
        assert_eq!(
            (b[0].pod.as_str(), b[0].node.as_str()),
            ("financial-ml/mlserver-0", "node-a")
        );
    }

    fn meta(owner: Option<(&str, &str, bool)>, hash: Option<&str>) -> serde_json::Value {
        let mut m = serde_json::json!({"name": "p-0", "namespace": "fi"});
        if let Some((kind, name, controller)) = owner {
            m["ownerReferences"] = serde_json::json!([{"apiVersion": "apps/v1", "kind": kind,
                "name": name, "uid": "u", "controller": controller}]);
        }
        if let Some(h) = hash {
            m["labels"] = serde_json::json!({"pod-template-hash": h});
        }
        m
    }

    fn workload(owner: Option<(&str, &str, bool)>, hash: Option<&str>) -> String {
        workload_of(&serde_json::from_value(meta(owner, hash)).unwrap(), "p-0")
    }

    #[test]
    fn a_pods_workload_comes_from_its_controller() {
        let rs = Some(("ReplicaSet", "predictor-7d9f8b6c5", true));
        assert_eq!(
            workload(rs, Some("7d9f8b6c5")),
            "Deployment/predictor",
            "a Deployment's ReplicaSet: the Deployment"
        );
        assert_eq!(
            workload(rs, None),
            "ReplicaSet/predictor-7d9f8b6c5",
            "no pod-template-hash: a bare ReplicaSet"
        );
        assert_eq!(
            workload(rs, Some("other")),
            "ReplicaSet/predictor-7d9f8b6c5"
        );
        assert_eq!(
            workload(Some(("ReplicaSet", "7d9f8b6c5", true)), Some("7d9f8b6c5")),
            "ReplicaSet/7d9f8b6c5",
            "nothing left of the name: kept"
        );
        assert_eq!(
            workload(Some(("StatefulSet", "seldon-scheduler", true)), None),
            "StatefulSet/seldon-scheduler"
        );
        assert_eq!(
            workload(Some(("DaemonSet", "calico-node", true)), None),
            "DaemonSet/calico-node"
        );
        assert_eq!(
            workload(Some(("Job", "backfill-29123456", true)), None),
            "Job/backfill-29123456",
            "a CronJob's Job stays a Job"
        );
        assert_eq!(
            workload(Some(("StatefulSet", "s", false)), None),
            "Pod/p-0",
            "an owner that is not the controller"
        );
        assert_eq!(workload(None, None), "Pod/p-0");
    }

    #[test]
    fn a_pods_peer_names_its_workload_and_the_inventory_lists_them() {
        let mut pod = inventory_pods().remove(0);
        pod.metadata = serde_json::from_value(serde_json::json!({
            "name": "mlserver-0", "namespace": "financial-ml", "uid": "u1",
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "StatefulSet",
                "name": "mlserver", "uid": "s", "controller": true}]}))
        .unwrap();
        let inv = Inventory::build(&[pod], &[], &[]);
        let p = inv.peer("10.42.0.10".parse().unwrap(), 9000, None, None);
        assert_eq!(p.workload.as_deref(), Some("StatefulSet/mlserver"));
        assert_eq!(
            inv.workloads(),
            ["financial-ml/StatefulSet/mlserver".to_string()].into()
        );
    }

    #[test]
    fn a_backend_on_another_node_is_named_from_its_endpointslice() {
        let inv = inventory();
        let p = inv.peer("10.42.1.7".parse().unwrap(), 9004, None, None);
        assert_eq!(
            (p.pod.as_deref(), p.node.as_deref()),
            (Some("seldon-scheduler-0"), Some("node-b"))
        );
        assert!(p.container.is_none(), "not guessed");
        assert!(
            p.workload.is_none(),
            "no ownerReferences for pods of other nodes: not guessed"
        );
        let ns = p.namespace.clone().unwrap_or_default();
        assert!(
            inv.pod_names()
                .contains(&format!("{ns}/seldon-scheduler-0")),
            "a backend elsewhere is a pod the inventory names: {:?}",
            inv.pod_names()
        );
    }

    #[test]
    fn addresses_resolve_to_pods_services_and_containers() {
        let inv = inventory();
        let svc = inv.peer("10.43.51.131".parse().unwrap(), 9004, None, None);
        assert_eq!(
            svc.service.as_deref(),
            Some("financial-inference/seldon-scheduler:xds")
        );
        let p = inv.peer("10.42.0.10".parse().unwrap(), 9000, None, None);
        assert_eq!(
            (p.namespace.as_deref(), p.pod.as_deref()),
            (Some("financial-ml"), Some("mlserver-0"))
        );
        let lo = inv.peer(
            "127.0.0.1".parse().unwrap(),
            9500,
            Some(4026532000),
            Some("/kubepods/besteffort/podu1/aaaaaaaaaaaaaaaa"),
        );
        assert_eq!(
            lo.pod.as_deref(),
            Some("mlserver-0"),
            "loopback belongs to the namespace's pod"
        );
        assert_eq!(lo.container.as_deref(), Some("agent"));
        assert!(
            !inv.peer("127.0.0.1".parse().unwrap(), 1, Some(1), None)
                .is_known(),
            "unknown stays unknown"
        );
        assert_eq!(inv.find_pod(Some("financial-ml"), "mlserver-0").len(), 1);
        // printf %s financial-ml.mlserver-0 | sha1sum → the interface Calico would create.
        let iface = format!(
            "cali{}",
            &sha1_smol::Sha1::from("financial-ml.mlserver-0")
                .digest()
                .to_string()[..11]
        );
        assert_eq!(
            inv.pod_of_calico_iface(&iface).map(|p| p.name.as_str()),
            Some("mlserver-0")
        );
        assert!(inv.pod_of_calico_iface("cali00000000000").is_none());
        assert_eq!(
            inv.netns_of(inv.find_pod(None, "mlserver-0")[0]),
            Some(4026532000)
        );
    }
}

//! Rule sets in the exact formats Calico, kube-proxy and kube-router write (see
//! shared/reference), for labs: shared by the privileged tests and `cargo xtask demo`.

use anyhow::Result;

use crate::Lab;

/// The S1 Service: `financial-inference/seldon-scheduler` port `xds`.
pub const CLUSTER_IP: &str = "10.43.51.131";

/// kube-proxy (iptables mode) ClusterIP 10.43.51.131:9004 → the scheduler pod.
pub fn kube_proxy_dnat(server_ip: &str) -> String {
    kube_proxy_service_dnat(
        "financial-inference/seldon-scheduler:xds",
        ("tcp", CLUSTER_IP, 9004),
        ("ZX3BQVWLLXWBHK2Y", "6E7XQMQ4RAYOWTTM"),
        server_ip,
    )
}

/// A kube-proxy (iptables mode) Service port `svc` (`namespace/name:port`): `proto`
/// `cluster_ip:port` DNAT-ed to `backend_ip` on the same port, through the KUBE-SVC-/KUBE-SEP-
/// chains whose hash suffixes are `chains`.
fn kube_proxy_service_dnat(
    svc: &str,
    (proto, cluster_ip, port): (&str, &str, u16),
    (svc_hash, sep_hash): (&str, &str),
    backend_ip: &str,
) -> String {
    format!(
        "*nat
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-SVC-{svc_hash} - [0:0]
:KUBE-SEP-{sep_hash} - [0:0]
-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
-A KUBE-SERVICES -d {cluster_ip}/32 -p {proto} -m comment --comment \"{svc} cluster IP\" -m {proto} --dport {port} -j KUBE-SVC-{svc_hash}
-A KUBE-SVC-{svc_hash} -m comment --comment \"{svc} -> {backend_ip}:{port}\" -j KUBE-SEP-{sep_hash}
-A KUBE-SEP-{sep_hash} -p {proto} -m comment --comment \"{svc}\" -m {proto} -j DNAT --to-destination {backend_ip}:{port}
COMMIT
"
    )
}

/// kube-proxy (iptables mode) for the S1 Service without endpoints: new connections to
/// 10.43.51.131:9004 are REJECTed (icmp-port-unreachable, the client sees refused).
pub fn kube_proxy_no_endpoints() -> String {
    format!(
        "*filter
:FORWARD ACCEPT [0:0]
:KUBE-SERVICES - [0:0]
-A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
-A KUBE-SERVICES -d {CLUSTER_IP}/32 -p tcp -m comment --comment \"financial-inference/seldon-scheduler:xds has no endpoints\" -m tcp --dport 9004 -j REJECT --reject-with icmp-port-unreachable
COMMIT
"
    )
}

/// Calico (iptables mode, v3.2x) ingress policy for the scheduler's endpoint: a policy selects
/// the pod and admits only 9005, so 9004 reaches the end of the tier.
/// The client's endpoint has no policy: its profile admits everything (replies included).
pub fn calico_filter(iface: &str, client_iface: &str) -> String {
    format!(
        "*filter
:FORWARD ACCEPT [0:0]
:cali-FORWARD - [0:0]
:cali-to-wl-dispatch - [0:0]
:cali-tw-{client_iface} - [0:0]
:cali-pri-_kns5rT2wVbXq4Lm9f - [0:0]
:cali-tw-{iface} - [0:0]
:cali-pi-_Lc1X7Z1pBVYpIRt7Dkd - [0:0]
-A FORWARD -m comment --comment \"cali:wUHhoiAYhphO9Mso\" -j cali-FORWARD
-A cali-FORWARD -m comment --comment \"cali:vjrMJCRpqwy5oRoX\" -j MARK --set-xmark 0x0/0xe0000
-A cali-FORWARD -o cali+ -m comment --comment \"cali:8ZoYfO5HKXWbB3pk\" -j cali-to-wl-dispatch
-A cali-to-wl-dispatch -o {client_iface} -m comment --comment \"cali:QvTyIyP5N7nGNXE5\" -g cali-tw-{client_iface}
-A cali-to-wl-dispatch -o {iface} -m comment --comment \"cali:PvTyIyP5N7nGNXE4\" -g cali-tw-{iface}
-A cali-to-wl-dispatch -m comment --comment \"cali:7hQCjoCgYI1Wtsyx\" -m comment --comment \"Unknown interface\" -j DROP
-A cali-tw-{client_iface} -m comment --comment \"cali:t1\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A cali-tw-{client_iface} -m comment --comment \"cali:t2\" -j cali-pri-_kns5rT2wVbXq4Lm9f
-A cali-tw-{client_iface} -m comment --comment \"cali:t3\" -m comment --comment \"Return if profile accepted\" -m mark --mark 0x10000/0x10000 -j RETURN
-A cali-tw-{client_iface} -m comment --comment \"cali:t4\" -m comment --comment \"Drop if no profiles matched\" -j DROP
-A cali-pri-_kns5rT2wVbXq4Lm9f -m comment --comment \"cali:r1\" -m comment --comment \"Profile kns.financial-inference ingress\" -j MARK --set-xmark 0x10000/0x10000
-A cali-tw-{iface} -m comment --comment \"cali:ssg63ESdTkJdLs3t\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A cali-tw-{iface} -m comment --comment \"cali:uhsvZ4gX1hyTXc8D\" -m conntrack --ctstate INVALID -j DROP
-A cali-tw-{iface} -m comment --comment \"cali:dqWGtg_u8IuD2ITe\" -j MARK --set-xmark 0x0/0x20000
-A cali-tw-{iface} -m comment --comment \"cali:F4WoxuCYz5y3R3HX\" -m comment --comment \"Start of policies\" -j MARK --set-xmark 0x0/0x20000
-A cali-tw-{iface} -m comment --comment \"cali:4vxgGeAtzKktlGJ1\" -m mark --mark 0x0/0x20000 -j cali-pi-_Lc1X7Z1pBVYpIRt7Dkd
-A cali-tw-{iface} -m comment --comment \"cali:GN6svEb6OlGGrQcn\" -m comment --comment \"Return if policy accepted\" -m mark --mark 0x10000/0x10000 -j RETURN
-A cali-tw-{iface} -m comment --comment \"cali:8sgO4ZIfeZ3lBhMH\" -m comment --comment \"Drop if no policies passed packet\" -m mark --mark 0x0/0x20000 -j DROP
-A cali-pi-_Lc1X7Z1pBVYpIRt7Dkd -m comment --comment \"cali:oqyvZH-6l-xXFWWb\" -m comment --comment \"Policy financial-inference/knp.default.scheduler-allow-xds ingress\"
-A cali-pi-_Lc1X7Z1pBVYpIRt7Dkd -p tcp -m comment --comment \"cali:Xx2Wr3Yj0ZVtLaVq\" -m multiport --dports 9005 -j MARK --set-xmark 0x10000/0x10000
-A cali-pi-_Lc1X7Z1pBVYpIRt7Dkd -m comment --comment \"cali:k1cGSZHq6ZOhoEJ1\" -m mark --mark 0x10000/0x10000 -j RETURN
COMMIT
"
    )
}

/// kube-router (k3s's embedded network policy controller), iptables-save format: the
/// scheduler pod (10.42.0.30) is selected by `scheduler-allow-xds`, which admits TCP 9005 only,
/// so anything else to it is REJECTed (icmp-port-unreachable).
pub fn kube_router_reject() -> String {
    "*filter
:FORWARD ACCEPT [0:0]
:KUBE-ROUTER-FORWARD - [0:0]
:KUBE-POD-FW-4HZJ5VQMYRPBZKTG - [0:0]
:KUBE-NWPLCY-CIJ6BCSXSBWG6QXL - [0:0]
-A FORWARD -m comment --comment \"kube-router netpol - TEMCG2JMHZYE7H7T\" -j KUBE-ROUTER-FORWARD
-A KUBE-ROUTER-FORWARD -d 10.42.0.30/32 -m comment --comment \"rule to jump traffic destined to POD name:seldon-scheduler-0 namespace: financial-inference to chain KUBE-POD-FW-4HZJ5VQMYRPBZKTG\" -j KUBE-POD-FW-4HZJ5VQMYRPBZKTG
-A KUBE-POD-FW-4HZJ5VQMYRPBZKTG -m comment --comment \"rule for stateful firewall for pod\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A KUBE-POD-FW-4HZJ5VQMYRPBZKTG -d 10.42.0.30/32 -m comment --comment \"run through nw policy scheduler-allow-xds\" -j KUBE-NWPLCY-CIJ6BCSXSBWG6QXL
-A KUBE-POD-FW-4HZJ5VQMYRPBZKTG -m comment --comment \"rule to log dropped traffic POD name:seldon-scheduler-0 namespace: financial-inference\" -m mark ! --mark 0x10000/0x10000 -m limit --limit 10/min --limit-burst 10 -j NFLOG --nflog-group 100
-A KUBE-POD-FW-4HZJ5VQMYRPBZKTG -m comment --comment \"rule to REJECT traffic destined for POD name:seldon-scheduler-0 namespace: financial-inference\" -m mark ! --mark 0x10000/0x10000 -j REJECT --reject-with icmp-port-unreachable
-A KUBE-NWPLCY-CIJ6BCSXSBWG6QXL -p tcp -m comment --comment \"rule to ACCEPT traffic from all sources to dest pods selected by policy name: scheduler-allow-xds namespace financial-inference\" -m tcp --dport 9005 -j MARK --set-xmark 0x10000/0x10000
COMMIT
".into()
}

/// The cluster DNS Service `kube-system/kube-dns` (k3s's default ClusterIP).
pub const KUBE_DNS_IP: &str = "10.43.0.10";

/// kube-proxy (iptables mode) ClusterIP 10.43.0.10:53/udp (port `dns`) → the CoreDNS pod.
pub fn kube_dns_dnat(coredns_ip: &str) -> String {
    kube_proxy_service_dnat(
        "kube-system/kube-dns:dns",
        ("udp", KUBE_DNS_IP, 53),
        ("TCOU7JCQXEZGVUNU", "2CVH3XBRR7WDPAVK"),
        coredns_ip,
    )
}

/// Calico (iptables mode, v3.2x) egress policy on the client's endpoint (`cali-fw-<iface>`,
/// reached through `cali-from-wl-dispatch`): a Kubernetes NetworkPolicy
/// `financial-inference/client-egress` admits TCP 9004 and, when `allow_dns`, UDP 53; anything
/// else reaches "Drop if no policies passed packet". The server's endpoint (`server_iface`) has
/// no policy: its replies pass as ESTABLISHED.
pub fn calico_egress_filter(client_iface: &str, server_iface: &str, allow_dns: bool) -> String {
    let dns_rule = if allow_dns {
        "-A cali-po-_rBbcmGd2jTnKVqUxcT0 -p udp -m comment --comment \"cali:Dn5aLw0Pp1QeZ3rT\" -m multiport --dports 53 -j MARK --set-xmark 0x10000/0x10000\n"
    } else {
        ""
    };
    format!(
        "*filter
:FORWARD ACCEPT [0:0]
:cali-FORWARD - [0:0]
:cali-from-wl-dispatch - [0:0]
:cali-fw-{client_iface} - [0:0]
:cali-fw-{server_iface} - [0:0]
:cali-po-_rBbcmGd2jTnKVqUxcT0 - [0:0]
-A FORWARD -m comment --comment \"cali:wUHhoiAYhphO9Mso\" -j cali-FORWARD
-A cali-FORWARD -m comment --comment \"cali:vjrMJCRpqwy5oRoX\" -j MARK --set-xmark 0x0/0xe0000
-A cali-FORWARD -i cali+ -m comment --comment \"cali:A_sPAO0mcxbT9mOV\" -j cali-from-wl-dispatch
-A cali-from-wl-dispatch -i {client_iface} -m comment --comment \"cali:Xa2q1Hj5kq7BrW3c\" -g cali-fw-{client_iface}
-A cali-from-wl-dispatch -i {server_iface} -m comment --comment \"cali:Ub2wl0Zc9S1yJ8dK\" -g cali-fw-{server_iface}
-A cali-from-wl-dispatch -m comment --comment \"cali:zTj6P0TIgYvgz-md\" -m comment --comment \"Unknown interface\" -j DROP
-A cali-fw-{server_iface} -m comment --comment \"cali:s1\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A cali-fw-{server_iface} -m comment --comment \"cali:s2\" -m conntrack --ctstate INVALID -j DROP
-A cali-fw-{server_iface} -m comment --comment \"cali:s3\" -m comment --comment \"Drop if no profiles matched\" -j DROP
-A cali-fw-{client_iface} -m comment --comment \"cali:f1\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A cali-fw-{client_iface} -m comment --comment \"cali:f2\" -m conntrack --ctstate INVALID -j DROP
-A cali-fw-{client_iface} -m comment --comment \"cali:f3\" -j MARK --set-xmark 0x0/0x10000
-A cali-fw-{client_iface} -p udp -m comment --comment \"cali:f4\" -m comment --comment \"Drop VXLAN encapped packets originating in workloads\" -m multiport --dports 4789 -j DROP
-A cali-fw-{client_iface} -p ipencap -m comment --comment \"cali:f5\" -m comment --comment \"Drop IPinIP encapped packets originating in workloads\" -j DROP
-A cali-fw-{client_iface} -m comment --comment \"cali:f6\" -m comment --comment \"Start of policies\" -j MARK --set-xmark 0x0/0x20000
-A cali-fw-{client_iface} -m comment --comment \"cali:f7\" -m mark --mark 0x0/0x20000 -j cali-po-_rBbcmGd2jTnKVqUxcT0
-A cali-fw-{client_iface} -m comment --comment \"cali:f8\" -m comment --comment \"Return if policy accepted\" -m mark --mark 0x10000/0x10000 -j RETURN
-A cali-fw-{client_iface} -m comment --comment \"cali:f9\" -m comment --comment \"Drop if no policies passed packet\" -m mark --mark 0x0/0x20000 -j DROP
-A cali-po-_rBbcmGd2jTnKVqUxcT0 -m comment --comment \"cali:p1\" -m comment --comment \"Policy financial-inference/knp.default.client-egress egress\"
-A cali-po-_rBbcmGd2jTnKVqUxcT0 -p tcp -m comment --comment \"cali:p2\" -m multiport --dports 9004 -j MARK --set-xmark 0x10000/0x10000
{dns_rule}-A cali-po-_rBbcmGd2jTnKVqUxcT0 -m comment --comment \"cali:p3\" -m mark --mark 0x10000/0x10000 -j RETURN
COMMIT
"
    )
}

/// Loads an `iptables-restore` file into the node (`restore` is `iptables-restore` or
/// `iptables-legacy-restore`), keeping what is there.
pub fn restore(lab: &Lab, restore: &str, rules: &str) -> Result<()> {
    let path = std::env::temp_dir().join(format!(
        "netprobe-rules-{}-{}",
        std::process::id(),
        lab.node()
    ));
    std::fs::write(&path, rules)?;
    let r = lab.sh(
        lab.node(),
        &format!("{restore} --noflush < {}", path.display()),
    );
    let _ = std::fs::remove_file(path);
    r.map(drop)
}

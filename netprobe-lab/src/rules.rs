//! Rule sets in the exact formats Calico, kube-proxy and kube-router write (see
//! shared/reference), for labs: shared by the privileged tests and `cargo xtask demo`.

use anyhow::Result;

use crate::Lab;

/// The S1 Service: `financial-inference/seldon-scheduler` port `xds`.
pub const CLUSTER_IP: &str = "10.43.51.131";

/// kube-proxy (iptables mode) ClusterIP 10.43.51.131:9004 → the scheduler pod.
pub fn kube_proxy_dnat(server_ip: &str) -> String {
    format!(
        "*nat
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-SVC-ZX3BQVWLLXWBHK2Y - [0:0]
:KUBE-SEP-6E7XQMQ4RAYOWTTM - [0:0]
-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
-A KUBE-SERVICES -d {CLUSTER_IP}/32 -p tcp -m comment --comment \"financial-inference/seldon-scheduler:xds cluster IP\" -m tcp --dport 9004 -j KUBE-SVC-ZX3BQVWLLXWBHK2Y
-A KUBE-SVC-ZX3BQVWLLXWBHK2Y -m comment --comment \"financial-inference/seldon-scheduler:xds -> {server_ip}:9004\" -j KUBE-SEP-6E7XQMQ4RAYOWTTM
-A KUBE-SEP-6E7XQMQ4RAYOWTTM -p tcp -m comment --comment \"financial-inference/seldon-scheduler:xds\" -m tcp -j DNAT --to-destination {server_ip}:9004
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

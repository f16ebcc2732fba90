//! Privileged end-to-end tests: the real binary, real kernel programs, real traffic in netns
//! labs. Run as root by `cargo xtask test` (CI is root); they fail, never skip, without it.

mod support;

use std::{net::SocketAddr, time::Duration};

use netprobe_lab::{Connect, Lab, netns_inode};
use support::start_trace;

/// S2: a SYN to a closed port on lo inside a pod → RST sent, `NO_SOCKET` drop in that netns,
/// and the application sees ECONNREFUSED.
#[test]
fn s2_closed_port_on_lo_is_a_no_socket_drop_in_the_pod_netns() {
    let mut lab = Lab::new("s2").unwrap();
    let pod = lab
        .add_pod("financial-ml", "mlserver-0", "10.42.0.10".parse().unwrap())
        .unwrap();
    // The server listens, but on 9000, not on 9500.
    let listener = lab
        .listen(&pod.netns, "127.0.0.1:9000".parse().unwrap())
        .unwrap();
    let trace = start_trace(
        lab.node(),
        &["--port", "9500", "--netns", &pod.netns, "--duration", "3s"],
    );
    let addr: SocketAddr = "127.0.0.1:9500".parse().unwrap();
    assert_eq!(
        lab.connect(&pod.netns, addr, Duration::from_secs(2)),
        Connect::Refused
    );
    let out = trace.finish();
    drop(listener);

    let pod_ino = netns_inode(&pod.netns).unwrap();
    let drops = out.of_kind("drop");
    let d = drops
        .iter()
        .find(|d| d["drop"]["reason"] == "NO_SOCKET")
        .unwrap_or_else(|| panic!("no NO_SOCKET drop in:\n{}", out.dump()));
    assert_eq!(d["netns"]["inode"], pod_ino);
    assert_eq!(d["netns"]["name"], pod.netns.as_str());
    assert_eq!(d["interface"]["name"], "lo");
    assert_eq!(d["dst"], "127.0.0.1");
    assert_eq!(d["dport"], 9500);
    assert!(d["tcp_flags"].as_array().unwrap().contains(&"SYN".into()));
    assert!(
        d["drop"]["location"]
            .as_str()
            .unwrap()
            .starts_with("tcp_v4_rcv"),
        "{d}"
    );

    let rst = out.of_kind("send_reset");
    assert!(
        rst.iter()
            .any(|r| r["dport"] == 9500 && r["netns"]["inode"] == pod_ino),
        "{}",
        out.dump()
    );
    let rst_pkts: Vec<_> = out
        .of_kind("packet")
        .into_iter()
        .filter(|p| {
            p["sport"] == 9500 && p["tcp_flags"].as_array().unwrap().contains(&"RST".into())
        })
        .collect();
    assert!(
        !rst_pkts.is_empty(),
        "RST seen by tc on lo:\n{}",
        out.dump()
    );
    assert!(
        out.of_kind("socket_error")
            .iter()
            .any(|e| e["error"]["name"] == "ECONNREFUSED"),
        "application error ECONNREFUSED:\n{}",
        out.dump()
    );
    assert_eq!(out.summary["lost"], 0);
    assert!(out.summary["drops_matched"]["NO_SOCKET"].as_u64().unwrap() >= 1);
}

/// The same over IPv6 loopback.
#[test]
fn s2_over_ipv6_loopback() {
    let mut lab = Lab::new("s2v6").unwrap();
    let pod = lab
        .add_pod("financial-ml", "mlserver-0", "10.42.0.11".parse().unwrap())
        .unwrap();
    let trace = start_trace(
        lab.node(),
        &["--port", "9500", "--netns", &pod.netns, "--duration", "3s"],
    );
    assert_eq!(
        lab.connect(
            &pod.netns,
            "[::1]:9500".parse().unwrap(),
            Duration::from_secs(2)
        ),
        Connect::Refused
    );
    let out = trace.finish();
    let d = out
        .of_kind("drop")
        .into_iter()
        .find(|d| d["drop"]["reason"] == "NO_SOCKET")
        .unwrap_or_else(|| panic!("no NO_SOCKET drop in:\n{}", out.dump()))
        .clone();
    assert_eq!(d["family"], "ipv6");
    assert_eq!(d["dst"], "::1");
    assert!(
        d["drop"]["location"]
            .as_str()
            .unwrap()
            .starts_with("tcp_v6_rcv"),
        "{d}"
    );
}

/// Pod A → pod B through the node, dropped by an iptables rule in FORWARD: `NETFILTER_DROP`
/// with the right tuple, arriving on A's veth, and the client's SYN retransmits.
#[test]
fn forward_drop_is_netfilter_drop_on_the_clients_veth_with_syn_retransmits() {
    let mut lab = Lab::new("fwd").unwrap();
    let client = lab
        .add_pod(
            "financial-inference",
            "client-0",
            "10.42.0.20".parse().unwrap(),
        )
        .unwrap();
    let server = lab
        .add_pod(
            "financial-inference",
            "seldon-scheduler-0",
            "10.42.0.30".parse().unwrap(),
        )
        .unwrap();
    let server_addr: SocketAddr = "10.42.0.30:9004".parse().unwrap();
    let _l = lab.listen(&server.netns, server_addr).unwrap();
    lab.sh(
        lab.node(),
        "iptables -A FORWARD -p tcp --dport 9004 -j DROP",
    )
    .unwrap();

    let trace = start_trace(lab.node(), &["--port", "9004", "--duration", "5s"]);
    assert_eq!(
        lab.connect(&client.netns, server_addr, Duration::from_secs(3)),
        Connect::TimedOut
    );
    let out = trace.finish();

    let node_ino = netns_inode(lab.node()).unwrap();
    let client_ino = netns_inode(&client.netns).unwrap();
    let d = out
        .of_kind("drop")
        .into_iter()
        .find(|d| d["drop"]["reason"] == "NETFILTER_DROP")
        .unwrap_or_else(|| panic!("no NETFILTER_DROP in:\n{}", out.dump()))
        .clone();
    assert_eq!(d["src"], "10.42.0.20");
    assert_eq!(d["dst"], "10.42.0.30");
    assert_eq!(d["dport"], 9004);
    assert_eq!(d["protocol"], "tcp");
    assert_eq!(d["netns"]["inode"], node_ino);
    assert_eq!(
        d["interface"]["name"],
        client.host_if.as_str(),
        "dropped on arrival from A's veth"
    );
    // iptables here is iptables-nft: the drop happens inside nf_tables.
    assert!(
        d["drop"]["location"]
            .as_str()
            .unwrap()
            .starts_with("nft_do_chain"),
        "{d}"
    );

    let retrans: Vec<_> = out
        .of_kind("retransmit")
        .into_iter()
        .filter(|r| r["tcp_flags"].as_array().unwrap().contains(&"SYN".into()))
        .collect();
    assert!(
        !retrans.is_empty(),
        "SYN retransmits from the client:\n{}",
        out.dump()
    );
    assert!(retrans.iter().all(|r| r["netns"]["inode"] == client_ino));
    assert!(
        out.of_kind("packet")
            .iter()
            .any(|p| p["interface"]["name"] == client.host_if.as_str()
                && p["direction"] == "ingress"
                && p["tcp_flags"] == serde_json::json!(["SYN"])),
        "SYN seen arriving on A's veth:\n{}",
        out.dump()
    );
    assert!(
        out.summary["drops_matched"]["NETFILTER_DROP"]
            .as_u64()
            .unwrap()
            >= 2,
        "first SYN + retransmits"
    );
    assert_eq!(out.summary["lost"], 0);
}

/// A plain success: SYN and SYN-ACK on both veths, and no drop of this flow.
#[test]
fn successful_connect_shows_syn_and_syn_ack_on_both_veths_and_no_drop() {
    let mut lab = Lab::new("ok").unwrap();
    let client = lab
        .add_pod("default", "client-0", "10.42.0.21".parse().unwrap())
        .unwrap();
    let server = lab
        .add_pod("default", "server-0", "10.42.0.31".parse().unwrap())
        .unwrap();
    let server_addr: SocketAddr = "10.42.0.31:9005".parse().unwrap();
    let l = lab.listen(&server.netns, server_addr).unwrap();
    netprobe_lab::serve(l);
    let trace = start_trace(lab.node(), &["--port", "9005", "--duration", "3s"]);
    assert_eq!(
        lab.connect(&client.netns, server_addr, Duration::from_secs(2)),
        Connect::Connected
    );
    let out = trace.finish();

    let seen = |iface: &str, dir: &str, flags: serde_json::Value| {
        out.of_kind("packet").iter().any(|p| {
            p["interface"]["name"] == iface && p["direction"] == dir && p["tcp_flags"] == flags
        })
    };
    let syn = serde_json::json!(["SYN"]);
    let syn_ack = serde_json::json!(["SYN", "ACK"]);
    assert!(
        seen(&client.host_if, "ingress", syn.clone()),
        "SYN in from A:\n{}",
        out.dump()
    );
    assert!(
        seen(&server.host_if, "egress", syn),
        "SYN out to B:\n{}",
        out.dump()
    );
    assert!(
        seen(&server.host_if, "ingress", syn_ack.clone()),
        "SYN-ACK in from B:\n{}",
        out.dump()
    );
    assert!(
        seen(&client.host_if, "egress", syn_ack),
        "SYN-ACK out to A:\n{}",
        out.dump()
    );
    // Closing may purge queued segments (QUEUE_PURGE), and the kernel may free an answered SYN
    // with NOT_SPECIFIED after creating the request socket; a real handshake drop has a reason.
    let real_drops: Vec<_> = out
        .of_kind("drop")
        .into_iter()
        .filter(|d| d["tcp_flags"].as_array().unwrap().contains(&"SYN".into()))
        .filter(|d| d["drop"]["reason"] != "NOT_SPECIFIED")
        .collect();
    assert!(real_drops.is_empty(), "no handshake drop:\n{}", out.dump());
    assert!(
        out.of_kind("retransmit").is_empty(),
        "no retransmit:\n{}",
        out.dump()
    );
    assert!(
        out.of_kind("state_change")
            .iter()
            .any(|s| s["state"]["new"] == "ESTABLISHED"),
        "{}",
        out.dump()
    );
}

/// Tracepoints are global: traffic of other namespaces (the host's own loopback, an unrelated
/// namespace) on the same port must not leak into a trace filtered to one pod.
#[test]
fn events_from_other_namespaces_never_leak_into_a_filtered_trace() {
    let mut lab = Lab::new("leak").unwrap();
    let pod = lab
        .add_pod("default", "traced-0", "10.42.0.12".parse().unwrap())
        .unwrap();
    let other = lab
        .add_pod("default", "other-0", "10.42.0.13".parse().unwrap())
        .unwrap();
    let trace = start_trace(
        lab.node(),
        &["--port", "9500", "--netns", &pod.netns, "--duration", "3s"],
    );
    let addr: SocketAddr = "127.0.0.1:9500".parse().unwrap();
    // The host's own loopback (this test process runs in the root namespace), then another pod.
    assert_eq!(
        std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1))
            .map_err(|e| e.kind())
            .err(),
        Some(std::io::ErrorKind::ConnectionRefused)
    );
    assert_eq!(
        lab.connect(&other.netns, addr, Duration::from_secs(1)),
        Connect::Refused
    );
    // And the traced pod, so the trace demonstrably worked.
    assert_eq!(
        lab.connect(&pod.netns, addr, Duration::from_secs(1)),
        Connect::Refused
    );
    let out = trace.finish();

    let pod_ino = netns_inode(&pod.netns).unwrap();
    assert!(
        !out.of_kind("drop").is_empty(),
        "the traced pod's own drop is there:\n{}",
        out.dump()
    );
    for e in &out.events {
        if let Some(ino) = e["netns"]["inode"].as_u64() {
            assert_eq!(ino, pod_ino, "event from another namespace leaked: {e}");
        }
    }
    assert_eq!(
        out.summary["drops_matched"]["NO_SOCKET"], 1,
        "exactly the traced pod's drop"
    );
}

/// Bad input: an unknown namespace is a clear error with exit code 2, not a crash or a hang.
#[test]
fn unknown_netns_is_a_clear_error() {
    netprobe_lab::require_root();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_netprobe"))
        .args([
            "trace",
            "--port",
            "1",
            "--netns",
            "np-does-not-exist",
            "--duration",
            "1s",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("network namespace `np-does-not-exist` not found"),
        "{err}"
    );
}

/// `check` loads and attaches everything for real and says tracing can work here.
#[test]
fn check_reports_required_hooks_available() {
    netprobe_lab::require_root();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_netprobe"))
        .args(["check", "-o", "json"])
        .output()
        .unwrap();
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(out.status.code(), Some(0), "{report:#}");
    for f in report["features"].as_array().unwrap() {
        if f["required"] == true {
            assert_eq!(f["available"], true, "required feature missing: {f}");
        }
    }
    let names: Vec<&str> = report["features"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["name"].as_str().unwrap())
        .collect();
    assert!(
        names.contains(&"tp_btf/kfree_skb") && names.contains(&"tc tcx"),
        "{names:?}"
    );
}

/// What netprobe left in `netns`: its nft tables and the BPF tc filters on any interface.
fn netprobe_leftovers(lab: &Lab, netns: &str) -> Vec<String> {
    let mut left = support::netprobe_tables(lab, netns);
    left.extend(support::bpf_filters(lab, netns));
    left
}

/// Installation steps of a `trace --pod` in clsact mode (filters outlive the process) at which
/// the test interrupts it: the condition that says the step is reached.
enum Step {
    /// Still waiting for the inventory (the API server answers nothing).
    Inventory,
    /// The first tc filter is attached (node namespace), no table yet.
    FirstFilter,
    /// The rule-trace table is in the node namespace.
    NodeTable,
    /// The rule-trace table is in the pod namespace too.
    PodTable,
}

/// SIGINT or SIGTERM while `trace --pod` is still installing (issue #15 point 3): it stops
/// promptly — also while it waits for the API server — and leaves no nft table and no tc filter
/// in the node's or the pod's namespace, whichever step it was at. Exit 130 when interrupted
/// before the trace was in place (3 when it was just in place: no attempt seen).
#[test]
fn a_signal_during_installation_removes_everything_in_every_namespace() {
    use std::os::unix::process::CommandExt;

    use netprobe_lab::process::{Signal, signal};
    let mut lab = Lab::new("siginst").unwrap();
    let (p, kube, kubeconfig) = support::published_pod(&mut lab, "sig-0", "10.42.0.91");
    // (step, signal, to the whole process group as a terminal's Ctrl-C: nft children too)
    let steps = [
        (Step::Inventory, Signal::Int, false),
        (Step::FirstFilter, Signal::Int, false),
        (Step::NodeTable, Signal::Term, false),
        (Step::PodTable, Signal::Int, false),
        (Step::FirstFilter, Signal::Int, true),
        (Step::NodeTable, Signal::Int, true),
    ];
    for (step, sig, group) in steps {
        kube.set_down(matches!(step, Step::Inventory));
        let mut child = std::process::Command::new("ip")
            .args(["netns", "exec", lab.node()])
            .arg(support::netprobe_bin())
            .args(["trace", "--pod", "sig-0", "-n", "default", "--port", "9500"])
            .args(["--node-name", "lab-node", "--duration", "60s", "-o", "json"])
            .env("KUBECONFIG", &kubeconfig)
            .env("NETPROBE_TC_MODE", "clsact")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .process_group(0)
            .spawn()
            .unwrap();
        let reached = |lab: &Lab| match step {
            Step::Inventory => true,
            Step::FirstFilter => !netprobe_leftovers(lab, lab.node()).is_empty(),
            Step::NodeTable => lab
                .sh(lab.node(), "nft list tables")
                .unwrap()
                .contains("netprobe"),
            Step::PodTable => lab
                .sh(&p.netns, "nft list tables")
                .unwrap()
                .contains("netprobe"),
        };
        let start = std::time::Instant::now();
        if matches!(step, Step::Inventory) {
            std::thread::sleep(Duration::from_millis(1500));
        }
        while !reached(&lab) {
            assert!(
                start.elapsed() < Duration::from_secs(30) && child.try_wait().unwrap().is_none(),
                "step never reached"
            );
        }
        if group {
            netprobe_lab::process::signal_group(child.id(), sig).unwrap();
        } else {
            signal(child.id(), sig).unwrap();
        }
        let sent = std::time::Instant::now();
        let status = loop {
            if let Some(st) = child.try_wait().unwrap() {
                break st;
            }
            assert!(
                sent.elapsed() < Duration::from_secs(5),
                "still running 5 s after the signal"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut stderr = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
        assert!(
            matches!(status.code(), Some(130) | Some(3)),
            "exit {status}: {stderr}"
        );
        if matches!(step, Step::Inventory) {
            assert_eq!(
                status.code(),
                Some(130),
                "interrupted while installing: {stderr}"
            );
        }
        for ns in [lab.node(), p.netns.as_str()] {
            let left = netprobe_leftovers(&lab, ns);
            assert!(left.is_empty(), "left in {ns}: {left:?}\n{stderr}");
        }
    }
    kube.set_down(false);
    let _ = std::fs::remove_file(kubeconfig);
}

//! The lab itself behaves like a node: pods reach each other through it (IPv4 and IPv6), closed
//! ports refuse, a FORWARD DROP times out, and everything is gone after drop. Root only: these
//! tests fail (never skip) otherwise.

use std::{net::SocketAddr, path::Path, process::Command, time::Duration};

use netprobe_lab::{Connect, Lab, netns_inode, require_root, serve};

fn exists(netns: &str) -> bool {
    Path::new(&format!("/run/netns/{netns}")).exists()
}

fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

#[test]
fn pods_talk_through_the_node_and_the_lab_cleans_up() {
    require_root();
    let names;
    let sleeper;
    {
        let mut lab = Lab::new("self").unwrap();
        let a = lab
            .add_pod("default", "a-0", "10.42.9.1".parse().unwrap())
            .unwrap();
        let b = lab
            .add_pod("default", "b-0", "10.42.9.2".parse().unwrap())
            .unwrap();
        assert_eq!(b.host_if, netprobe_lab::calico_iface("default", "b-0"));
        assert!(
            lab.sh(lab.node(), "ip -o link show")
                .unwrap()
                .contains(&b.host_if)
        );
        assert!(
            lab.sh(&b.netns, "ip -o addr show dev eth0")
                .unwrap()
                .contains("10.42.9.2/32")
        );
        netns_inode(&a.netns).unwrap();

        serve(
            lab.listen(&b.netns, "10.42.9.2:8080".parse().unwrap())
                .unwrap(),
        );
        let v6: SocketAddr = format!("[{}]:8080", b.ip6).parse().unwrap();
        serve(lab.listen(&b.netns, v6).unwrap());
        let t = Duration::from_secs(2);
        assert_eq!(
            lab.connect(&a.netns, "10.42.9.2:8080".parse().unwrap(), t),
            Connect::Connected
        );
        assert_eq!(lab.connect(&a.netns, v6, t), Connect::Connected, "IPv6");
        assert_eq!(
            lab.connect(&a.netns, "10.42.9.2:8081".parse().unwrap(), t),
            Connect::Refused
        );
        lab.sh(
            lab.node(),
            "iptables -A FORWARD -p tcp --dport 8080 -j DROP",
        )
        .unwrap();
        assert_eq!(
            lab.connect(&a.netns, "10.42.9.2:8080".parse().unwrap(), t),
            Connect::TimedOut
        );

        sleeper = lab.spawn(&a.netns, &["sleep", "1000"]).unwrap();
        assert!(alive(sleeper));
        names = vec![lab.node().to_string(), a.netns.clone(), b.netns.clone()];
        assert_eq!(lab.namespaces(), names.as_slice());
    }
    for n in names {
        assert!(!exists(&n), "{n} left behind");
    }
    assert!(!alive(sleeper), "spawned process {sleeper} left running");
}

#[test]
fn a_recreated_pod_gets_a_new_namespace_and_its_veth_goes() {
    require_root();
    let mut lab = Lab::new("recreate").unwrap();
    let a = lab
        .add_pod("default", "a-0", "10.42.9.11".parse().unwrap())
        .unwrap();
    let pid = lab.spawn(&a.netns, &["sleep", "1000"]).unwrap();
    lab.remove_pod(&a).unwrap();
    assert!(!exists(&a.netns));
    assert!(!alive(pid), "the pod's processes are killed");
    assert!(
        !lab.sh(lab.node(), "ip -o link show")
            .unwrap()
            .contains(&a.host_if),
        "node-side veth removed"
    );
    let again = lab
        .add_pod("default", "a-0", "10.42.9.12".parse().unwrap())
        .unwrap();
    assert_ne!(again.netns, a.netns);
    assert_eq!(again.host_if, a.host_if);
    let b = lab
        .add_pod("default", "b-0", "10.42.9.13".parse().unwrap())
        .unwrap();
    serve(
        lab.listen(&b.netns, "10.42.9.13:80".parse().unwrap())
            .unwrap(),
    );
    assert_eq!(
        lab.connect(
            &again.netns,
            "10.42.9.13:80".parse().unwrap(),
            Duration::from_secs(2)
        ),
        Connect::Connected
    );
}

#[test]
fn two_labs_with_one_tag_do_not_collide() {
    require_root();
    let one = Lab::new("twin").unwrap();
    let two = Lab::new("twin").unwrap();
    assert_ne!(one.node(), two.node());
    assert!(exists(one.node()) && exists(two.node()));
}

#[test]
fn leftovers_of_dead_processes_are_removed() {
    require_root();
    // A pid that is certainly gone: a child that has exited and been reaped.
    let mut child = Command::new("true").spawn().unwrap();
    let dead = child.id();
    child.wait().unwrap();
    let stale = format!("np-stale-{dead}-node");
    let live = format!("np-stale-{}-node", std::process::id());
    let foreign = format!("np-stale-x-{dead}");
    struct Gone(Vec<String>);
    impl Drop for Gone {
        fn drop(&mut self) {
            for n in &self.0 {
                let _ = Command::new("ip")
                    .args(["netns", "del", n])
                    .stderr(std::process::Stdio::null())
                    .status();
            }
        }
    }
    let _gone = Gone(vec![stale.clone(), live.clone(), foreign.clone()]);
    for n in [&stale, &live, &foreign] {
        assert!(
            Command::new("ip")
                .args(["netns", "add", n])
                .status()
                .unwrap()
                .success()
        );
    }
    let removed = Lab::cleanup_stale("np-");
    assert!(removed.contains(&stale), "{removed:?}");
    assert!(!exists(&stale));
    assert!(exists(&live), "this process's namespaces are kept");
    assert!(exists(&foreign), "names of another shape are kept");
}

#[test]
fn cgroups_the_lab_creates_are_removed() {
    require_root();
    let dir;
    {
        let mut lab = Lab::new("cg").unwrap();
        let pod = lab
            .add_pod("default", "a-0", "10.42.9.21".parse().unwrap())
            .unwrap();
        let pid = lab.spawn(&pod.netns, &["sleep", "1000"]).unwrap();
        let uid = format!("np-lab-test-{}", std::process::id());
        dir = lab
            .join_cgroup(pid, &format!("kubepods/besteffort/pod{uid}/c0ffee"))
            .unwrap();
        let cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
        assert!(
            cg.contains(&format!("0::/kubepods/besteffort/pod{uid}/c0ffee")),
            "{cg}"
        );
        assert!(lab.join_cgroup(pid, "../escape").is_err());
    }
    assert!(!dir.exists(), "{} left behind", dir.display());
    assert!(!dir.parent().unwrap().exists());
}

/// An agent-like endpoint in a lab node: ports from `ports::free_tcp` differ and bind there, and
/// `metrics::scrape` reads what is served on one over the namespace's loopback.
#[test]
fn a_free_port_in_a_lab_node_serves_metrics_that_scrape_and_sum() {
    use std::io::{Read, Write};
    require_root();
    let lab = Lab::new("ports").unwrap();
    let port = netprobe_lab::ports::free_tcp(lab.node()).unwrap();
    assert_ne!(port, netprobe_lab::ports::free_tcp(lab.node()).unwrap());
    let listener = lab
        .listen(lab.node(), SocketAddr::from(([127, 0, 0, 1], port)))
        .unwrap();
    std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let _ = s.read(&mut [0u8; 1024]);
        s.write_all(
            b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n\
              netprobe_drops_total{reason=\"NETFILTER_DROP\",pod=\"a-0\"} 2\n\
              netprobe_drops_total{reason=\"NO_SOCKET\",pod=\"a-0\"} 5\n",
        )
        .unwrap();
    });
    let body = netprobe_lab::metrics::scrape(lab.node(), port).unwrap();
    let nf = &[("reason", "NETFILTER_DROP")];
    assert_eq!(
        netprobe_lab::metrics::sum(&body, "netprobe_drops_total", nf),
        2,
        "{body}"
    );
    assert_eq!(
        netprobe_lab::metrics::sum(&body, "netprobe_drops_total", &[]),
        7
    );
}

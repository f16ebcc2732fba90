//! Privileged tests of issue #16 items 3 and 4: a drop by a tc program names the program that
//! returned it (name, id, tag, tcx or clsact, owner), read from the interface's attachments at
//! the drop; a drop of a packet whose source address is not a pod IP (strict rp_filter) names
//! the pod from its network namespace, the rp_filter sysctls that apply and the route back.
//! Real netns labs, real kernel programs, the real binary.

mod support;

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    path::{Path, PathBuf},
    time::Duration,
};

use aya::programs::{LinkOrder, SchedClassifier, TcAttachType, tc::TcAttachOptions};
use netprobe_lab::{Connect, Lab, Pod};
use serde_json::{Value, json};
use support::{TraceOutput, start_verdict_trace_env};

/// The only verdict of a trace (panics with the trace's output otherwise).
fn only_verdict(out: &TraceOutput) -> Value {
    let v = out.verdicts();
    assert_eq!(v.len(), 1, "one verdict:\n{}\n{}", out.dump(), out.stderr);
    v[0].clone()
}

fn strings(v: &Value) -> Vec<&str> {
    v.as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect()
}

/// A tc program `name` that drops every IPv4 packet (TC_ACT_SHOT, also TCX_DROP) and lets the
/// rest pass (ARP must, or the SYN never leaves), no map, assembled with llvm-mc into `dir`.
fn dropping_tc_object(dir: &Path, name: &str) -> PathBuf {
    support::assemble_bpf(
        dir,
        name,
        &format!(
            "\t.section \"classifier\",\"ax\"\n\t.globl {name}\n\t.type {name},@function\n\
             {name}:\n\tr2 = *(u32 *)(r1 + 16)\n\tr0 = -1\n\tif r2 != 8 goto done\n\tr0 = 2\n\
             done:\n\texit\n\t.size {name}, .-{name}\n\
             \t.section \"license\",\"aw\"\n_license:\n\t.asciz \"GPL\"\n"
        ),
    )
}

/// A scratch directory or file removed at the end of the test.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("netprobe-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The two-pod lab (client 10.42.0.20, server 10.42.0.30 listening on 9004) and the trace of
/// one attempt from the client to the server's 9004, which times out.
fn traced_timeout(lab: &Lab, client: &Pod, env: &[(&str, &str)]) -> Value {
    let trace = start_verdict_trace_env(
        lab.node(),
        &["--port", "9004", "--duration", "8s", "--count", "1"],
        env,
    );
    assert_eq!(
        lab.connect(
            &client.netns,
            "10.42.0.30:9004".parse().unwrap(),
            Duration::from_secs(2)
        ),
        Connect::TimedOut
    );
    only_verdict(&trace.finish_with_code(1))
}

/// `id N` and `tag T` of the bpf filter on `dev`'s `hook`, as `tc filter show` prints them.
fn filter_id_and_tag(lab: &Lab, dev: &str, hook: &str) -> (u64, String) {
    let out = lab
        .sh(lab.node(), &format!("tc filter show dev {dev} {hook}"))
        .unwrap();
    let line = out.lines().find(|l| l.contains(" id ")).expect(&out);
    let after = |key: &str| -> String {
        let mut words = line.split_whitespace();
        words.find(|w| *w == key);
        words.next().expect(line).to_string()
    };
    (after("id").parse().unwrap(), after("tag"))
}

/// Item 3's clsact lab: the S1 pods, the server listening on 9004, and a program named like
/// Calico's (`cali_tc_drop`) in a `bpf` filter on the egress hook of the server pod's
/// node-side veth, dropping the SYN. Its id and tag as `tc` shows them.
struct ClsactLab {
    s1: support::S1,
    _listener: std::net::TcpListener,
    _dir: Scratch,
    id: u64,
    tag: String,
}

fn clsact_lab(tag: &str) -> ClsactLab {
    netprobe_lab::require_root();
    let s1 = support::s1_lab(tag);
    let (lab, server) = (&s1.lab, &s1.server);
    let listener = lab
        .listen(&server.netns, "10.42.0.30:9004".parse().unwrap())
        .unwrap();
    let dir = Scratch::new(tag);
    let obj = dropping_tc_object(&dir.0, "cali_tc_drop");
    let dev = &server.host_if;
    lab.sh(
        lab.node(),
        &format!(
            "tc qdisc add dev {dev} clsact\n\
             tc filter add dev {dev} egress pref 7 bpf da obj {} sec classifier",
            obj.display()
        ),
    )
    .unwrap();
    let (id, tag) = filter_id_and_tag(lab, dev, "egress");
    ClsactLab {
        s1,
        _listener: listener,
        _dir: dir,
        id,
        tag,
    }
}

/// A kernel drop whose verdict names `program` (netprobe's own left out) in its headline and
/// its `drop`.
fn assert_the_only_program(v: &Value, program: Value) {
    assert_eq!(v["outcome"], "dropped_by_kernel", "{v:#}");
    let headline = format!(
        "dropped by tc program {} ({})",
        program["name"].as_str().unwrap(),
        program["owner"].as_str().unwrap()
    );
    assert_eq!(v["headline"], headline.as_str(), "{v:#}");
    assert_eq!(v["drop"]["tc_programs"], json!([program]), "{v:#}");
}

/// The verdict names the program, its id and tag, clsact, egress, Calico, with commands that
/// show it.
fn assert_names_the_calico_program(v: &Value, c: &ClsactLab) {
    let (lab, dev, id, tag) = (&c.s1.lab, &c.s1.server.host_if, c.id, &c.tag);
    let program = json!({"name": "cali_tc_drop", "id": id, "tag": tag, "mode": "clsact",
        "hook": "egress", "owner": "Calico"});
    assert_the_only_program(v, program);
    let why = v["explanation"].as_str().unwrap();
    assert!(
        why.starts_with(&format!(
            "The tc program cali_tc_drop (id {id}, tag {tag}, clsact egress, Calico) on egress of {dev} in {} dropped the SYN",
            lab.node()
        )) && why.contains("Calico's eBPF dataplane")
            && why.contains("(TC_EGRESS)"),
        "{why}"
    );
    let next = strings(&v["next_steps"]);
    let show = format!("bpftool prog show id {id}");
    let net = format!("ip netns exec {} bpftool net show dev {dev}", lab.node());
    for cmd in [show.as_str(), net.as_str()] {
        assert!(next.contains(&cmd), "{cmd}: {next:#?}");
    }
    assert!(
        next.iter()
            .any(|n| n.contains(&format!("calico-node -bpf policy dump {dev} all"))),
        "{next:#?}"
    );
}

/// Item 3, clsact, `trace`.
#[test]
fn a_drop_by_a_clsact_program_names_the_program_and_calico() {
    let c = clsact_lab("dgcls");
    let v = traced_timeout(&c.s1.lab, &c.s1.client, &[]);
    assert_names_the_calico_program(&v, &c);
}

/// Item 3, clsact, the always-on agent alone.
#[test]
fn the_agent_names_the_clsact_program_that_dropped() {
    let c = clsact_lab("dgclsa");
    let agent = support::start_agent(c.s1.lab.node(), &[], &[], true);
    assert_eq!(
        c.s1.lab.connect(
            &c.s1.client.netns,
            "10.42.0.30:9004".parse().unwrap(),
            Duration::from_secs(2)
        ),
        Connect::TimedOut
    );
    std::thread::sleep(Duration::from_millis(600));
    let v = agent_verdict(agent);
    assert_names_the_calico_program(&v, &c);
}

/// Stops the agent; its only verdict (its records schema-checked).
fn agent_verdict(agent: netprobe_lab::process::Agent) -> Value {
    let out = support::stop(agent);
    let records = support::ndjson(&out.stdout);
    support::assert_schema_valid(&records);
    let v: Vec<&Value> = records.iter().filter(|r| r["kind"] == "verdict").collect();
    assert_eq!(v.len(), 1, "{records:#?}\n{}", out.stderr);
    v[0].clone()
}

/// Item 3, tcx: a program named like Cilium's (`cil_tc_drop`) linked with tcx on the ingress
/// hook of the client pod's node-side veth drops the SYN as it leaves the pod.
#[test]
fn a_drop_by_a_tcx_program_names_the_program_and_cilium() {
    netprobe_lab::require_root();
    let s1 = support::s1_lab("dgtcx");
    let (lab, client, server) = (&s1.lab, &s1.client, &s1.server);
    let _listener = lab
        .listen(&server.netns, "10.42.0.30:9004".parse().unwrap())
        .unwrap();
    let dir = Scratch::new("tcx");
    let obj = dropping_tc_object(&dir.0, "cil_tc_drop");
    let mut ebpf = aya::Ebpf::load_file(&obj).unwrap();
    let prog: &mut SchedClassifier = ebpf.program_mut("cil_tc_drop").unwrap().try_into().unwrap();
    prog.load().unwrap();
    let info = prog.info().unwrap();
    let (id, tag) = (info.id(), format!("{:016x}", info.tag()));
    let dev = client.host_if.clone();
    // The link lives as long as `ebpf` (the test), in the node's namespace.
    netprobe_lab::in_netns(lab.node(), || {
        prog.attach_with_options(
            &dev,
            TcAttachType::Ingress,
            TcAttachOptions::TcxOrder(LinkOrder::default()),
        )
        .map(|_| ())
    })
    .unwrap()
    .unwrap();

    let v = traced_timeout(lab, client, &[]);
    let program = json!({"name": "cil_tc_drop", "id": id, "tag": tag, "mode": "tcx",
        "hook": "ingress", "owner": "Cilium"});
    assert_the_only_program(&v, program);
    let why = v["explanation"].as_str().unwrap();
    assert!(
        why.contains(&format!(
            "cil_tc_drop (id {id}, tag {tag}, tcx ingress, Cilium) on ingress of {dev}"
        )) && why.contains("(TC_INGRESS)"),
        "{why}"
    );
    assert!(
        strings(&v["next_steps"])
            .iter()
            .any(|n| n.contains("cilium-dbg monitor --type drop")),
        "{v:#}"
    );
    drop(ebpf);
}

/// Connects from `src` (bound) to `dst` inside `netns`; what happened.
fn connect_from(netns: &str, src: Ipv4Addr, dst: SocketAddrV4, timeout: Duration) -> Connect {
    netprobe_lab::in_netns(netns, || {
        let sockaddr = |a: SocketAddrV4| libc::sockaddr_in {
            sin_family: libc::AF_INET as u16,
            sin_port: a.port().to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from(*a.ip()).to_be(),
            },
            sin_zero: [0; 8],
        };
        let len = std::mem::size_of::<libc::sockaddr_in>() as u32;
        let tv = libc::timeval {
            tv_sec: timeout.as_secs() as i64,
            tv_usec: 0,
        };
        // SAFETY: plain socket calls on a descriptor this function owns, with valid pointers.
        unsafe {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
            assert!(fd >= 0);
            let tvp = &tv as *const libc::timeval as *const libc::c_void;
            let tvl = std::mem::size_of::<libc::timeval>() as u32;
            // A blocking connect gives up after SO_SNDTIMEO.
            libc::setsockopt(fd, libc::SOL_SOCKET, libc::SO_SNDTIMEO, tvp, tvl);
            let s = sockaddr(SocketAddrV4::new(src, 0));
            assert_eq!(
                libc::bind(fd, &s as *const _ as *const libc::sockaddr, len),
                0
            );
            let d = sockaddr(dst);
            let r = libc::connect(fd, &d as *const _ as *const libc::sockaddr, len);
            let err = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
            libc::close(fd);
            match (r, err) {
                (0, _) => Connect::Connected,
                (_, libc::ECONNREFUSED) => Connect::Refused,
                (_, libc::EINPROGRESS | libc::ETIMEDOUT | libc::EAGAIN) => Connect::TimedOut,
                (_, e) => Connect::Other(e),
            }
        }
    })
    .unwrap()
}

/// Item 4's lab: pod `default/rp-client` (10.42.0.21) sends from a secondary address,
/// 10.42.9.9; the node routes 10.42.9.0/24 through another device (a spare veth) and the pod's
/// veth filters strictly (all=0, the veth's=1). Pods published in the API stand-in.
struct RpLab {
    lab: Lab,
    client: Pod,
    _listener: std::net::TcpListener,
    _kube: netprobe_lab::kubeapi::FakeKube,
    /// Removed at the end of the test.
    kubeconfig: Scratch,
}

fn rp_lab(tag: &str) -> RpLab {
    netprobe_lab::require_root();
    let mut lab = Lab::new(tag).unwrap();
    let client = lab
        .add_pod("default", "rp-client", "10.42.0.21".parse().unwrap())
        .unwrap();
    let server = lab
        .add_pod("default", "rp-server", "10.42.0.30".parse().unwrap())
        .unwrap();
    let listener = lab
        .listen(&server.netns, "10.42.0.30:9004".parse().unwrap())
        .unwrap();
    let (kube, kubeconfig) = support::kube_api(&lab);
    for p in [&client, &server] {
        support::publish_pod(&kube, p);
    }
    let dev = &client.host_if;
    // The gateway's MAC is known (Calico's ee:ee:…): an ARP request from 10.42.9.9 would fail
    // the same reverse-path check, and the SYN would never leave the pod.
    lab.sh(
        &client.netns,
        "ip addr add 10.42.9.9/32 dev eth0\n\
         ip neigh replace 169.254.1.1 lladdr ee:ee:ee:ee:ee:ee dev eth0 nud permanent",
    )
    .unwrap();
    lab.sh(
        lab.node(),
        &format!(
            "sysctl -qw net.ipv4.conf.all.rp_filter=0\n\
             sysctl -qw net.ipv4.conf.{dev}.rp_filter=1\n\
             ip link add nprpf0 type veth peer name nprpf1\n\
             ip link set nprpf1 up\n\
             ip link set nprpf0 up\n\
             ip route add 10.42.9.0/24 dev nprpf0"
        ),
    )
    .unwrap();
    RpLab {
        lab,
        client,
        _listener: listener,
        _kube: kube,
        kubeconfig: Scratch(kubeconfig),
    }
}

impl RpLab {
    /// The client dials the server from 10.42.9.9 and times out.
    fn dial_from_the_secondary_address(&self) {
        let got = connect_from(
            &self.client.netns,
            "10.42.9.9".parse().unwrap(),
            "10.42.0.30:9004".parse().unwrap(),
            Duration::from_secs(2),
        );
        assert_eq!(got, Connect::TimedOut);
    }
}

/// The verdict names the pod from its namespace, says 10.42.9.9 is not its IP, gives the
/// rp_filter sysctls that apply and the route back, with commands.
fn assert_names_the_pod_and_the_route_back(v: &Value, r: &RpLab) {
    let (lab, dev) = (&r.lab, &r.client.host_if);
    assert_eq!(v["outcome"], "dropped_by_kernel", "{v:#}");
    assert_eq!(
        v["headline"], "dropped by reverse-path filtering (rp_filter)",
        "{v:#}"
    );
    assert_eq!(v["client"]["addr"], "10.42.9.9", "{v:#}");
    assert_eq!(v["client"]["peer"]["pod"], "rp-client", "{v:#}");
    assert_eq!(v["client"]["peer"]["namespace"], "default", "{v:#}");
    let rp = &v["drop"]["rp_filter"];
    assert_eq!(rp["interface"], dev.as_str(), "{v:#}");
    assert_eq!(
        (&rp["all"], &rp["iface"]),
        (&Value::from(0), &Value::from(1)),
        "{v:#}"
    );
    assert_eq!(rp["route_back"], "nprpf0", "{v:#}");
    let why = v["explanation"].as_str().unwrap();
    for must in [
        format!(
            "Reverse-path filtering dropped the SYN on {dev} in {} (IP_RPFILTER).",
            lab.node()
        ),
        format!(
            "rp_filter is strict on {dev} (net.ipv4.conf.all.rp_filter=0, net.ipv4.conf.{dev}.rp_filter=1; the higher applies)"
        ),
        "routes 10.42.9.9 back through nprpf0, not".to_string(),
        "The source address 10.42.9.9 is not the IP of pod default/rp-client (10.42.0.21)"
            .to_string(),
    ] {
        assert!(why.contains(&must), "{must}\n{why}");
    }
    let next = strings(&v["next_steps"]);
    let node = lab.node();
    let sysctl = format!(
        "ip netns exec {node} sysctl net.ipv4.conf.all.rp_filter net.ipv4.conf.{dev}.rp_filter"
    );
    let route = format!("ip netns exec {node} ip route get 10.42.9.9");
    for cmd in [sysctl.as_str(), route.as_str()] {
        assert!(next.contains(&cmd), "{cmd}: {next:#?}");
    }
    assert!(
        next.iter()
            .any(|n| n.contains("pod default/rp-client sends from 10.42.9.9")),
        "{next:#?}"
    );
}

/// Item 4, `trace`.
#[test]
fn an_rp_filter_drop_from_a_secondary_address_names_the_pod_and_the_route_back() {
    let r = rp_lab("dgrpf");
    let trace = start_verdict_trace_env(
        r.lab.node(),
        &["--port", "9004", "--duration", "8s", "--count", "1"],
        &support::kube_env(&r.kubeconfig.0),
    );
    r.dial_from_the_secondary_address();
    let v = only_verdict(&trace.finish_with_code(1));
    assert_names_the_pod_and_the_route_back(&v, &r);
}

/// Item 4, the always-on agent alone.
#[test]
fn the_agent_names_the_pod_behind_an_rp_filter_drop() {
    let r = rp_lab("dgrpfa");
    let agent = support::start_agent(r.lab.node(), &[], &support::kube_env(&r.kubeconfig.0), true);
    r.dial_from_the_secondary_address();
    std::thread::sleep(Duration::from_millis(600));
    assert_names_the_pod_and_the_route_back(&agent_verdict(agent), &r);
}

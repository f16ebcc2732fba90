//! `cargo xtask demo`: k3s-node-shaped labs (netprobe-lab), traced by the real binary, which
//! prints what it saw. One function per scenario; each returns a [`Report`].

use std::{
    process::ExitStatus,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use netprobe_lab::{Connect, Lab, process::Spawn, rules, serve};

use crate::build::netprobe_bin;

/// How long `netprobe trace` may take to attach its probes.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long it may run past its own `--duration`.
const EXIT_GRACE: Duration = Duration::from_secs(30);

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    /// S2: connection refused on localhost (server on 127.0.0.1:9000, client dials 9500).
    S2,
    /// Pod → pod through the node, dropped by `iptables -A FORWARD … -j DROP`.
    ForwardDrop,
    /// S1: Service (kube-proxy DNAT) → pod, dropped by a Calico ingress policy.
    S1,
    /// S1 across nodes: the scheduler on another node, VXLAN between the nodes blocked by a
    /// firewall; cluster-mode trace through both nodes' agents.
    S1AcrossNodes,
}

impl Scenario {
    fn title(self) -> &'static str {
        match self {
            Self::S2 => "S2: connection refused on localhost",
            Self::ForwardDrop => "FORWARD DROP: pod → pod dropped by an iptables rule on the node",
            Self::S1 => "S1: i/o timeout to a Service after a Flannel→Calico migration",
            Self::S1AcrossNodes => {
                "S1 across nodes: the scheduler runs on node-b, a firewall between the nodes drops VXLAN (UDP 8472)"
            }
        }
    }

    fn run(self, lab: &mut Lab) -> Result<Report> {
        match self {
            Self::S2 => s2(lab),
            Self::ForwardDrop => forward_drop(lab),
            Self::S1 => s1(lab),
            Self::S1AcrossNodes => s1_across_nodes(),
        }
    }
}

/// What a scenario did and what netprobe printed.
pub struct Report {
    /// The client's attempt, in words.
    pub attempt: String,
    pub got: Connect,
    pub expected: Connect,
    pub trace: TraceOutput,
}

pub struct TraceOutput {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `ip netns exec NETNS netprobe trace --ready-file F ARGS…`, waits until its probes are
/// attached, runs `traffic`, then waits for the trace to end (`--duration` in ARGS) and
/// returns both.
pub fn traced<T>(
    netns: &str,
    args: &[&str],
    duration: Duration,
    traffic: impl FnOnce() -> T,
) -> Result<(T, TraceOutput)> {
    let bin = netprobe_bin(false);
    if !bin.exists() {
        bail!("{} is missing: run `cargo xtask build`", bin.display());
    }
    println!(
        "$ ip netns exec {netns} {} trace {}",
        bin.display(),
        args.join(" ")
    );
    let start = Instant::now();
    let trace = Spawn::trace(&bin, netns)
        .args(args)
        .ready_limit(READY_TIMEOUT)
        .start()?;
    println!(
        "  (probes attached after {:.1}s)",
        start.elapsed().as_secs_f64()
    );

    let what = traffic();
    let t = trace.wait_output(duration + EXIT_GRACE)?;
    if t.timed_out {
        bail!(
            "netprobe trace did not exit within {:?} of its --duration; killed:\n{}{}",
            EXIT_GRACE,
            t.stderr,
            t.stdout
        );
    }
    let trace = TraceOutput {
        status: t.status,
        stdout: t.stdout,
        stderr: t.stderr,
    };
    Ok((what, trace))
}

/// S2: in `financial-ml/mlserver-0` the server listens on 127.0.0.1:9000; a client in the same
/// pod dials 127.0.0.1:9500 and is refused. Traced from the node with `--netns <pod>`.
pub fn s2(lab: &mut Lab) -> Result<Report> {
    let pod = lab.add_pod("financial-ml", "mlserver-0", "10.42.0.10".parse()?)?;
    let _server = lab.listen(&pod.netns, "127.0.0.1:9000".parse()?)?;
    let duration = Duration::from_secs(4);
    let (got, trace) = traced(
        lab.node(),
        &[
            "--port",
            "9500",
            "--netns",
            &pod.netns,
            "--duration",
            "4s",
            "-o",
            "text",
        ],
        duration,
        || {
            lab.connect(
                &pod.netns,
                "127.0.0.1:9500".parse().expect("addr"),
                Duration::from_secs(2),
            )
        },
    )?;
    Ok(Report {
        attempt: "financial-ml/mlserver-0 → 127.0.0.1:9500 (the server listens on 127.0.0.1:9000)"
            .into(),
        got,
        expected: Connect::Refused,
        trace,
    })
}

/// FORWARD DROP: `financial-inference/client-0` (10.42.0.20) → `seldon-scheduler-0`
/// (10.42.0.30:9004, listening) while the node has `iptables -A FORWARD -p tcp --dport 9004
/// -j DROP`; the client times out. Traced in the node namespace.
pub fn forward_drop(lab: &mut Lab) -> Result<Report> {
    let client = lab.add_pod("financial-inference", "client-0", "10.42.0.20".parse()?)?;
    let server = lab.add_pod(
        "financial-inference",
        "seldon-scheduler-0",
        "10.42.0.30".parse()?,
    )?;
    serve(lab.listen(&server.netns, "10.42.0.30:9004".parse()?)?);
    lab.sh(
        lab.node(),
        "iptables -A FORWARD -p tcp --dport 9004 -j DROP",
    )?;
    let (got, trace) = traced(
        lab.node(),
        &["--port", "9004", "--duration", "5s", "-o", "text"],
        Duration::from_secs(5),
        || {
            lab.connect(
                &client.netns,
                "10.42.0.30:9004".parse().expect("addr"),
                Duration::from_secs(3),
            )
        },
    )?;
    Ok(Report {
        attempt: "financial-inference/client-0 → seldon-scheduler-0 10.42.0.30:9004 \
                  (node: iptables -A FORWARD -p tcp --dport 9004 -j DROP)"
            .into(),
        got,
        expected: Connect::TimedOut,
        trace,
    })
}

/// S1: client-0 → the seldon-scheduler Service (kube-proxy DNAT to 10.42.0.30:9004), dropped
/// by Calico's ingress policy for the scheduler (admits 9005 only).
pub fn s1(lab: &mut Lab) -> Result<Report> {
    let client = lab.add_pod("financial-inference", "client-0", "10.42.0.20".parse()?)?;
    let server = lab.add_pod(
        "financial-inference",
        "seldon-scheduler-0",
        "10.42.0.30".parse()?,
    )?;
    serve(lab.listen(&server.netns, "10.42.0.30:9004".parse()?)?);
    rules::restore(
        lab,
        "iptables-restore",
        &rules::kube_proxy_dnat("10.42.0.30"),
    )?;
    rules::restore(
        lab,
        "iptables-restore",
        &rules::calico_filter(&server.host_if, &client.host_if),
    )?;
    let service = format!("{}:9004", rules::CLUSTER_IP);
    let (got, trace) = traced(
        lab.node(),
        &["--port", "9004", "--duration", "5s", "-o", "text"],
        Duration::from_secs(5),
        || {
            lab.connect(
                &client.netns,
                service.parse().expect("addr"),
                Duration::from_secs(3),
            )
        },
    )?;
    Ok(Report {
        attempt: format!(
            "financial-inference/client-0 → seldon-scheduler Service {service} (kube-proxy DNAT, Calico policy admits 9005 only)"
        ),
        got,
        expected: Connect::TimedOut,
        trace,
    })
}

/// S1 across nodes: two node namespaces joined by a Flannel-style VXLAN underlay, an agent on
/// each (with the Kubernetes API stand-in of the tests playing the API server), and the
/// cluster-mode CLI run as an unprivileged user on node-a, as from a laptop.
pub fn s1_across_nodes() -> Result<Report> {
    use netprobe_lab::{
        two_nodes::TwoNodes,
        underlay::{Overlay, VXLAN_PORT},
    };
    let bin = netprobe_bin(false);
    let nodes = TwoNodes::new("demox", Overlay::Vxlan, &bin)?;
    nodes
        .underlay
        .block(&nodes.labs[0], &format!("udp dport {VXLAN_PORT}"))?;
    println!(
        "$ kubectl netprobe trace --pod client-0 -n financial-inference --port 9004 --addr {} --count 1",
        rules::CLUSTER_IP
    );
    let t = nodes.trace(&bin, "text")?;
    Ok(Report {
        attempt: format!(
            "financial-inference/client-0 (node-a) → seldon-scheduler Service {}:9004 → pod on node-b",
            rules::CLUSTER_IP
        ),
        got: t.client,
        expected: Connect::TimedOut,
        trace: TraceOutput {
            status: std::os::unix::process::ExitStatusExt::from_raw(t.code.max(0) << 8),
            stdout: t.stdout,
            stderr: t.stderr,
        },
    })
}

pub fn run(skip_setup: bool, only: &[Scenario]) -> Result<()> {
    if !netprobe_lab::is_root() {
        bail!("the demo builds network-namespace labs and loads eBPF programs: run it as root");
    }
    if !skip_setup {
        crate::setup::run()?;
    }
    crate::build::build(false)?;
    let scenarios = if only.is_empty() {
        vec![
            Scenario::S2,
            Scenario::ForwardDrop,
            Scenario::S1,
            Scenario::S1AcrossNodes,
        ]
    } else {
        only.to_vec()
    };
    let mut unexpected = Vec::new();
    for scenario in scenarios {
        println!("\n===== {} =====", scenario.title());
        // A fresh lab per scenario, torn down (processes, namespaces) when it goes out of scope.
        let mut lab = Lab::new("demo")?;
        let r = scenario
            .run(&mut lab)
            .with_context(|| format!("scenario {scenario:?}"))?;
        drop(lab);
        let verdict = if r.got == r.expected {
            "as expected".to_string()
        } else {
            unexpected.push(scenario);
            format!("UNEXPECTED: the lab should give `{}`", r.expected)
        };
        println!("client: {}: {} ({verdict})", r.attempt, r.got);
        println!("--- netprobe ({}) ---", r.trace.status);
        if !r.trace.stderr.trim().is_empty() {
            println!("{}", r.trace.stderr.trim_end());
        }
        println!("{}", r.trace.stdout.trim_end());
    }
    if !unexpected.is_empty() {
        bail!("the lab misbehaved in {unexpected:?} (see above)");
    }
    Ok(())
}

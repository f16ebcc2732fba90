//! Privileged tests: every filter configuration the CLI and the agent can produce loads into the
//! kernel and attaches. The filter is a constant the verifier sees at load time, so each
//! configuration is a different program to the verifier: one that loads without `--addr` can
//! still be refused with it ("BPF program is too large", issue 28). Each test loads through
//! netprobe's own loading code (the trace's filter, the agent's loader), attaches every
//! tracepoint and the tc programs in a lab namespace, and prints each program's verified
//! instruction count against the verifier's limit.

mod support;

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use netprobe::{
    agent,
    netns::NetnsRef,
    probes::{Probes, VERIFIER_INSN_LIMIT, always_on_tracepoints, btf::KernelBtf},
    trace,
};
use netprobe_common::{DNS_PORT, Filter, MAX_NETNS_FILTER, RING_BYTES};
use netprobe_lab::{Connect, Lab};

/// Every program of the object: each configuration must load all of them.
const PROGRAMS: usize = netprobe::probes::TRACEPOINTS.len() + 2;

/// The address of the README's example (a ClusterIP) and an IPv6 one.
const ADDR_V4: &str = "10.43.51.131";
const ADDR_V6: &str = "fd00:10:43::51:131";

/// Every program costs the verifier a few thousand instructions: one past a tenth of the limit
/// is a program whose cost grows with something it should not (the filter's constants).
const BUDGET: u32 = VERIFIER_INSN_LIMIT / 10;

/// Asserts every program of `probes` is loaded within [`BUDGET`], prints their verifier costs
/// under `config`; returns them (program, instructions).
fn assert_all_verified(config: &str, probes: &Probes, expected: usize) -> Vec<(String, u32)> {
    let costs = probes.verifier_costs().unwrap();
    let mut out = Vec::new();
    for c in &costs {
        let n = c
            .verified_insns
            .unwrap_or_else(|| panic!("{config}: {} has no verified_insns", c.program));
        eprintln!(
            "{config:<28} {:<22} {n:>8} insns ({:.1} % of the limit)",
            c.program,
            f64::from(n) * 100.0 / f64::from(VERIFIER_INSN_LIMIT)
        );
        assert!(n < BUDGET, "{config}: {c:?} over {BUDGET}");
        out.push((c.program.clone(), n));
    }
    assert_eq!(costs.len(), expected, "{config}: loaded {costs:?}");
    out
}

/// Loads `filter` the way a trace does, attaches every tracepoint and the tc programs on the
/// lab node's interfaces: any refusal fails the test with the kernel's reason. Returns the
/// verifier's cost of each program.
fn loads_and_attaches(config: &str, filter: Filter) -> Vec<(String, u32)> {
    netprobe_lab::require_root();
    let lab = Lab::new("loadcfg").unwrap();
    let node = NetnsRef::resolve(lab.node()).unwrap();
    let kbtf = KernelBtf::load().unwrap();
    let mut probes = Probes::load(&kbtf, filter).unwrap_or_else(|e| fail(config, &e));
    if filter.netns_enabled != 0 {
        probes.set_netns_filter(&[node.inode]).unwrap();
    }
    let missing = probes
        .attach_tracepoints(kbtf.aya())
        .unwrap_or_else(|e| fail(config, &e));
    assert!(missing.is_empty(), "{config}: refused {missing:?}");
    let attached = probes
        .attach_tc(&node, |_| true)
        .unwrap_or_else(|e| fail(config, &e));
    assert!(
        attached.len() >= 3,
        "{config}: lo, npgw0, npgw1: {attached:?}"
    );
    assert_all_verified(config, &probes, PROGRAMS)
}

fn fail(config: &str, e: &netprobe::error::Error) -> ! {
    let mut msg = format!("{config}: {e}");
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        msg.push_str(&format!(": {s}"));
        source = s.source();
    }
    panic!("{msg}")
}

fn addr(s: &str) -> Option<IpAddr> {
    Some(s.parse().unwrap())
}

/// `--netns`-less filters as `netprobe check` loads them: no namespace filter.
fn without_netns(mut f: Filter) -> Filter {
    f.netns_enabled = 0;
    f
}

#[test]
fn trace_port_only_loads() {
    loads_and_attaches("--port", trace::kernel_filter(9004, false, None));
}

/// The README's address and the one of the report: the verifier's cost does not depend on
/// which address is filtered.
#[test]
fn trace_ipv4_address_loads() {
    let readme = loads_and_attaches(
        "--port --addr v4",
        trace::kernel_filter(9004, false, addr(ADDR_V4)),
    );
    let other = loads_and_attaches(
        "--port --addr 10.42.0.7",
        trace::kernel_filter(9004, false, addr("10.42.0.7")),
    );
    assert_eq!(readme, other);
}

#[test]
fn trace_ipv6_address_loads() {
    loads_and_attaches(
        "--port --addr v6",
        trace::kernel_filter(9004, false, addr(ADDR_V6)),
    );
}

#[test]
fn trace_udp_loads() {
    loads_and_attaches("--proto udp", trace::kernel_filter(9004, true, None));
    loads_and_attaches(
        "--proto udp --addr v6",
        trace::kernel_filter(9004, true, addr(ADDR_V6)),
    );
}

#[test]
fn trace_dns_loads() {
    loads_and_attaches("--dns", trace::kernel_filter(DNS_PORT, true, None));
    loads_and_attaches(
        "--dns --addr v4",
        trace::kernel_filter(DNS_PORT, true, addr("10.43.0.10")),
    );
}

#[test]
fn without_namespace_filter_loads() {
    loads_and_attaches("check (no filter)", Filter::default());
    loads_and_attaches(
        "--addr v4, netns off",
        without_netns(trace::kernel_filter(9004, false, addr(ADDR_V4))),
    );
    loads_and_attaches(
        "--addr v6, netns off",
        without_netns(trace::kernel_filter(9004, false, addr(ADDR_V6))),
    );
}

/// The agent's always-on mode: failure signals only, quiet drop reasons set, its own
/// tracepoints (the trace-only ones left out); none may be missing.
#[test]
fn agent_always_on_loads() {
    netprobe_lab::require_root();
    let lab = Lab::new("loadcfg").unwrap();
    let node = NetnsRef::resolve(lab.node()).unwrap();
    let kbtf = KernelBtf::load().unwrap();
    let mut probes = agent::load_probes(&kbtf, RING_BYTES, MAX_NETNS_FILTER)
        .unwrap_or_else(|e| fail("agent", &e));
    probes.set_netns_filter(&[node.inode]).unwrap();
    let tracepoints = always_on_tracepoints();
    let missing = probes
        .attach_tracepoints_degradable(kbtf.aya(), &tracepoints)
        .unwrap_or_else(|e| fail("agent", &e));
    assert!(missing.is_empty(), "agent: refused {missing:?}");
    probes
        .attach_tc(&node, |_| true)
        .unwrap_or_else(|e| fail("agent", &e));
    assert_all_verified("agent (failures only)", &probes, tracepoints.len() + 2);
}

/// The command of the report, end to end: `netprobe trace --port 9004 --addr 10.43.51.131`
/// gets its probes in place (the helper panics with netprobe's stderr if it exits instead).
#[test]
fn the_readme_address_trace_starts() {
    netprobe_lab::require_root();
    let lab = Lab::new("loadcfg").unwrap();
    let run = support::start_verdict_trace(
        lab.node(),
        &["--port", "9004", "--addr", ADDR_V4, "--duration", "1s"],
    );
    // No attempt in a second: exit 3, a summary and no verdict.
    let out = run.finish_with_code(3);
    assert!(out.verdicts().is_empty(), "{}", out.dump());
}

/// The folded comparison still filters: two pods refuse the same port, a trace with `--addr` of
/// one (IPv4, then IPv6) reports that one's attempt and nothing of the other's.
#[test]
fn the_address_filter_keeps_its_address_only() {
    netprobe_lab::require_root();
    let mut lab = Lab::new("addrfilter").unwrap();
    let client = lab
        .add_pod("default", "client", "10.42.0.20".parse().unwrap())
        .unwrap();
    let wanted = lab
        .add_pod("default", "wanted", "10.42.0.21".parse().unwrap())
        .unwrap();
    let other = lab
        .add_pod("default", "other", "10.42.0.22".parse().unwrap())
        .unwrap();
    let pairs: [(IpAddr, IpAddr); 2] = [
        (wanted.ip.into(), other.ip.into()),
        (wanted.ip6.into(), other.ip6.into()),
    ];
    for (want, not) in pairs {
        let trace = support::start_trace(
            lab.node(),
            &[
                "--port",
                "9005",
                "--addr",
                &want.to_string(),
                "--duration",
                "3s",
            ],
        );
        for ip in [not, want] {
            let to = SocketAddr::new(ip, 9005);
            let outcome = lab.connect(&client.netns, to, Duration::from_secs(2));
            assert_eq!(outcome, Connect::Refused, "{to}");
        }
        let out = trace.finish();
        let mentions = |e: &serde_json::Value, a: &IpAddr| {
            let a = a.to_string();
            e["src"] == a.as_str() || e["dst"] == a.as_str()
        };
        assert!(
            out.events.iter().any(|e| mentions(e, &want)),
            "nothing of {want}:\n{}",
            out.dump()
        );
        assert!(
            !out.events.iter().any(|e| mentions(e, &not)),
            "{not} passed the filter of {want}:\n{}",
            out.dump()
        );
    }
}

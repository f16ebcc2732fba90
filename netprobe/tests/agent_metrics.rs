//! Privileged tests of what the always-on agent tells an operator about failed connections:
//! `/metrics` by workload and Kubernetes Events on both pods. The S1 lab (Calico end-of-tier
//! deny behind a kube-proxy ClusterIP), the real kube-rs client against the API stand-in, the
//! agent alone (no trace running).

mod support;

use std::time::{Duration, Instant};

use netprobe_lab::{
    Connect, Lab, Pod,
    kubeapi::{FakeKube, Kind, endpoint_slice, of_deployment, owned_by, pod, service},
    metrics::{self, Sample},
    process::Agent,
    rules::CLUSTER_IP,
};
use serde_json::Value;

const NODE: &str = "lab-node";
const NS: &str = "financial-inference";
const CLIENT: &str = "baseline-predictor-7d9f8b6c5-x2x9z";
const SERVER: &str = "seldon-scheduler-0";

/// S1 with a Deployment's pod as the client and a StatefulSet's as the server.
struct S1Workloads {
    lab: Lab,
    client: Pod,
    kube: FakeKube,
    kubeconfig: std::path::PathBuf,
}

fn s1_workloads(tag: &str) -> S1Workloads {
    let mut lab = Lab::new(tag).unwrap();
    let client = lab
        .add_pod(NS, CLIENT, "10.42.0.20".parse().unwrap())
        .unwrap();
    let server = lab
        .add_pod(NS, SERVER, "10.42.0.30".parse().unwrap())
        .unwrap();
    netprobe_lab::serve(
        lab.listen(&server.netns, "10.42.0.30:9004".parse().unwrap())
            .unwrap(),
    );
    support::s1_rules(&lab, &server, &client);
    let (kube, kubeconfig) = support::kube_api(&lab);
    let c = pod(
        NS,
        CLIENT,
        NODE,
        "10.42.0.20",
        &[("predictor", "c0c0c0c0c0c0c0c0", &[])],
    );
    kube.apply(
        Kind::Pod,
        of_deployment(c, "baseline-predictor", "7d9f8b6c5"),
    );
    let s = pod(
        NS,
        SERVER,
        NODE,
        "10.42.0.30",
        &[("scheduler", "5e5e5e5e5e5e5e5e", &[9004])],
    );
    kube.apply(Kind::Pod, owned_by(s, "StatefulSet", "seldon-scheduler"));
    kube.apply(
        Kind::Service,
        service(NS, "seldon-scheduler", CLUSTER_IP, &[("xds", 9004, 9004)]),
    );
    kube.apply(
        Kind::EndpointSlice,
        endpoint_slice(
            NS,
            "seldon-scheduler",
            &[("10.42.0.30", SERVER)],
            &[("xds", 9004)],
        ),
    );
    S1Workloads {
        lab,
        client,
        kube,
        kubeconfig,
    }
}

fn start_agent(s1: &S1Workloads, extra: &[&str]) -> Agent {
    support::start_agent(
        s1.lab.node(),
        extra,
        &[
            ("KUBECONFIG", s1.kubeconfig.to_str().unwrap()),
            ("NODE_NAME", NODE),
        ],
        false,
    )
}

/// The samples of `name` in `/metrics`, polled until there is one (at most `limit`).
fn samples_within(agent: &Agent, name: &str, limit: Duration) -> (Vec<Sample>, String) {
    let t = Instant::now();
    loop {
        let (_, body) = support::get(agent, "/metrics");
        let found: Vec<Sample> = metrics::parse(&body)
            .into_iter()
            .filter(|s| s.name == name)
            .collect();
        if !found.is_empty() || t.elapsed() > limit {
            return (found, body);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn label<'a>(s: &'a Sample, name: &str) -> &'a str {
    s.labels
        .iter()
        .find(|(k, _)| k == name)
        .map_or("", |(_, v)| v.as_str())
}

/// The Events posted about `pod` with `reason` (creations and their updates).
fn events_on<'a>(posted: &'a [Value], pod: &str, reason: &str) -> Vec<&'a Value> {
    posted
        .iter()
        .filter(|e| e["regarding"]["name"] == pod && e["reason"] == reason)
        .collect()
}

/// Done-when of issue #14 §4 and §5: the S1 drop is counted by workload with its rule owner,
/// policy and Service, and explained in an Event on the server pod and on the client pod.
#[test]
fn s1_failure_is_counted_by_workload_and_posted_on_both_pods() {
    netprobe_lab::require_root();
    let s1 = s1_workloads("agentmet");
    let agent = start_agent(&s1, &["--metrics-pod-labels"]);
    let cluster_ip = format!("{CLUSTER_IP}:9004").parse().unwrap();
    for _ in 0..2 {
        assert_eq!(
            s1.lab
                .connect(&s1.client.netns, cluster_ip, Duration::from_secs(3)),
            Connect::TimedOut
        );
    }

    let (_, body) = support::get(&agent, "/metrics");
    assert!(
        !body.contains("rule_owner=\"\""),
        "rule_owner is never empty:\n{body}"
    );
    let (failed, body) = samples_within(
        &agent,
        "netprobe_failed_connections_total",
        Duration::from_secs(5),
    );
    let s1_series: Vec<&Sample> = failed
        .iter()
        .filter(|s| label(s, "src_workload") == "Deployment/baseline-predictor")
        .collect();
    assert_eq!(s1_series.len(), 1, "one series for both attempts:\n{body}");
    let s = s1_series[0];
    assert_eq!(s.value, 2.0, "{body}");
    let expected = [
        ("outcome", "dropped_by_rule"),
        ("rule_owner", "calico"),
        ("service", "financial-inference/seldon-scheduler"),
        ("src_namespace", NS),
        ("dst_namespace", NS),
        ("dst_workload", "StatefulSet/seldon-scheduler"),
        ("src_pod", CLIENT),
        ("dst_pod", SERVER),
    ];
    for (k, v) in expected {
        assert_eq!(label(s, k), v, "{k}:\n{body}");
    }
    assert!(
        label(s, "policy").starts_with("financial-inference/"),
        "the Calico policy in force:\n{body}"
    );
    let held = metrics::sum(&body, "netprobe_kube_events_total", &[("result", "held")]);
    let _ = agent.stop();

    let posted = s1.kube.posted();
    let on_server = events_on(&posted, SERVER, "ConnectionDropped");
    let on_client = events_on(&posted, CLIENT, "ConnectionDropped");
    assert_eq!(
        (on_server.len(), on_client.len()),
        (1, 1),
        "one Event per pod for two failed attempts (the second held): {posted:#?}"
    );
    assert_eq!(held, 2, "the second attempt, on both pods:\n{body}");
    assert!(
        !posted.iter().any(|e| e["reason"] == "PacketDropped"),
        "raw drops are explained by the attempt's Event: {posted:#?}"
    );
    for (e, other) in [(on_server[0], CLIENT), (on_client[0], SERVER)] {
        assert_eq!(e["type"], "Warning");
        assert_eq!(e["related"]["name"], other, "{e:#}");
        let note = e["note"].as_str().unwrap();
        assert!(
            note.starts_with("Calico policy financial-inference/")
                && note.contains("baseline-predictor → seldon-scheduler:9004")
                && note.contains("(cali-tw-"),
            "{note}"
        );
    }
    let _ = std::fs::remove_file(&s1.kubeconfig);
}

/// The Event writes so far: (POSTs, PATCHes).
fn event_writes(kube: &FakeKube) -> (usize, usize) {
    let times = write_times(kube);
    let posts = times.iter().filter(|(m, _)| m == "POST").count();
    (posts, times.len() - posts)
}

/// When each Event write (POST or PATCH) arrived, in order.
fn write_times(kube: &FakeKube) -> Vec<(String, Instant)> {
    kube.requests()
        .into_iter()
        .filter(|r| {
            ["POST", "PATCH"].contains(&r.method.as_str())
                && r.target.contains("/apis/events.k8s.io/v1/")
        })
        .map(|r| (r.method, r.at))
        .collect()
}

/// Writes that outran a token bucket of `burst`, refilled at `rate` a second: within any
/// stretch of time, at most `burst + rate × its length` (one more for arrival jitter).
fn over_budget(times: &[(String, Instant)], rate: f64, burst: f64) -> Option<String> {
    for (i, (_, from)) in times.iter().enumerate() {
        for (j, (_, to)) in times.iter().enumerate().skip(i) {
            let allowed = burst + rate * to.duration_since(*from).as_secs_f64() + 1.0;
            if (j - i + 1) as f64 > allowed {
                return Some(format!(
                    "writes {i}..={j} within {:?}",
                    to.duration_since(*from)
                ));
            }
        }
    }
    None
}

/// The latest version of each Event written about `pod`: name → its failures (series.count,
/// else 1).
fn event_counts(posted: &[Value], pod: &str) -> std::collections::BTreeMap<String, u64> {
    let mut latest = std::collections::BTreeMap::new();
    for e in posted.iter().filter(|e| e["regarding"]["name"] == pod) {
        let count = e["series"]["count"].as_u64().unwrap_or(1);
        let name = e["metadata"]["name"].as_str().unwrap().to_string();
        latest.insert(name, count);
    }
    latest
}

/// Issue #24: a SYN scan from spoofed addresses against the NetworkPolicy-protected scheduler
/// (S1's Calico policy allows 9005 only): 1000 undeclared ports from 1000 addresses, and 60 of
/// the ports the pod declares from 3 addresses each. The addresses the agent cannot name fold
/// into one peer (`external`), the undeclared ports into one port: 61 keys, whatever the
/// addresses. The writes never outrun the token bucket (burst 5, 5/s); the failures whose
/// write waited are counted (`netprobe_kube_events_suppressed_total`) and in the series.count of
/// their Event, so the Events' counts add up to every failure /metrics counted.
#[test]
fn a_syn_scan_of_a_protected_pod_writes_no_more_than_the_budget_and_loses_no_count() {
    netprobe_lab::require_root();
    let s1 = s1_workloads("agentscan");
    const DECLARED: std::ops::Range<u16> = 10000..10060;
    let declared: Vec<u16> = DECLARED.collect();
    let s = pod(
        NS,
        SERVER,
        NODE,
        "10.42.0.30",
        &[("scheduler", "5e5e5e5e5e5e5e5e", declared.as_slice())],
    );
    s1.kube
        .apply(Kind::Pod, owned_by(s, "StatefulSet", "seldon-scheduler"));
    let agent = start_agent(
        &s1,
        &[
            "--metrics-pod-labels",
            "--events-rate",
            "5",
            "--events-burst",
            "5",
        ],
    );
    // The inventory has the pod's ports (rescanned every second).
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(event_writes(&s1.kube), (0, 0));

    let spoofed = |i: u32| std::net::Ipv4Addr::from(0x6440_0000 + i);
    let undeclared = (1..=1000u16).map(|p| (spoofed(u32::from(p)), p));
    let on_declared =
        DECLARED.flat_map(|p| (0..3).map(move |k| (spoofed(5000 + 3 * u32::from(p) + k), p)));
    let start = Instant::now();
    let sent = netprobe_lab::scan::syn_scan(
        &s1.client.netns,
        "10.42.0.30".parse().unwrap(),
        undeclared.chain(on_declared),
    )
    .unwrap();
    assert_eq!(sent, 1180);

    // Judged (the count by pod stops growing), while the writes keep within the budget.
    let failed = |body: &str| {
        metrics::sum(
            body,
            "netprobe_failed_connections_total",
            &[("dst_pod", SERVER)],
        )
    };
    let mut last = (0, Instant::now());
    let body = loop {
        let (_, body) = support::get(&agent, "/metrics");
        let (posts, _) = event_writes(&s1.kube);
        assert!(
            metrics::sum(&body, "netprobe_kube_events_in_flight", &[]) <= 4,
            "{body}"
        );
        let n = failed(&body);
        let keys = metrics::sum(&body, "netprobe_kube_event_keys", &[]) as usize;
        if n != last.0 {
            last = (n, Instant::now());
        } else if n > 0 && last.1.elapsed() > Duration::from_secs(5) && posts >= keys {
            break body;
        }
        assert!(
            start.elapsed() < Duration::from_secs(90),
            "judged and written:\n{body}"
        );
        std::thread::sleep(Duration::from_millis(250));
    };
    let failures = failed(&body);
    assert!(
        failures >= 1000,
        "most SYNs judged as failures: {failures}\n{body}"
    );
    let keys = metrics::sum(&body, "netprobe_kube_event_keys", &[]);
    assert!(
        keys <= 61,
        "one key per declared port and one for every other port: {keys}"
    );
    assert_eq!(
        metrics::sum(
            &body,
            "netprobe_kube_events_total",
            &[("result", "evicted")]
        ),
        0,
        "{body}"
    );
    // A creation waits for a request slot (the session writes before its requests run) or a
    // token: either way counted once, and the creations take the bucket's time.
    let waited = metrics::sum(&body, "netprobe_kube_events_suppressed_total", &[]);
    assert!(waited > 0, "the budget held writes back:\n{body}");
    let times = write_times(&s1.kube);
    assert_eq!(over_budget(&times, 5.0, 5.0), None, "{times:?}");
    let creating = times[times.len() - 1].1 - times[0].1;
    assert!(
        creating.as_secs_f64() >= (keys as f64 - 5.0) / 5.0 - 0.5,
        "{keys} creations at 5/s after a burst of 5 took {creating:?}"
    );
    eprintln!(
        "scan: {failures} failures, {keys} keys, {waited} waited, creations over {creating:?}"
    );
    let posted = s1.kube.posted();
    let created = event_counts(&posted, SERVER);
    assert_eq!(created.len(), keys as usize, "one Event per key");
    let external: Vec<&Value> = posted
        .iter()
        .filter(|e| e["metadata"]["annotations"]["netprobe.io/client"] == "external")
        .collect();
    assert_eq!(external.len(), posted.len(), "no address names a peer");
    assert!(
        posted
            .iter()
            .any(|e| e["series"]["count"].as_u64() == Some(3)),
        "an Event created after the bucket emptied carries the failures that waited"
    );

    // The held repeats go out in updates a minute after their creation: then the Events'
    // counts are every failure.
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let counted: u64 = event_counts(&s1.kube.posted(), SERVER).values().sum();
        if counted == failures {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the Events count {counted} failures, /metrics {failures}"
        );
        std::thread::sleep(Duration::from_secs(1));
    }
    let (_, body) = support::get(&agent, "/metrics");
    assert_eq!(failed(&body), failures, "no later failure");
    assert_eq!(
        over_budget(&write_times(&s1.kube), 5.0, 5.0),
        None,
        "updates too"
    );
    assert!(
        metrics::sum(&body, "netprobe_kube_event_keys", &[]) <= keys,
        "nothing grew:\n{body}"
    );
    let _ = agent.stop();
    let _ = std::fs::remove_file(&s1.kubeconfig);
}

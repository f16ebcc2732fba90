//! Privileged tests of the always-on agent explaining failed connections by itself (no trace
//! running): one `netprobe.verdict/v1` record per failed attempt, with the rule, the policy or
//! Service, the listeners and both pods — the S1 and S2 incidents in real netns labs, the real
//! binary, the Kubernetes API stand-in for names.

mod support;

use std::{path::Path, time::Duration};

use netprobe_lab::{
    Connect, Lab, Pod,
    kubeapi::{FakeKube, Kind, pod},
    process::Agent,
};
use serde_json::Value;

const NODE: &str = "lab-node";

fn publish(kube: &FakeKube, p: &Pod, containers: &[(&str, &str, &[u16])]) {
    kube.apply(
        Kind::Pod,
        pod(&p.namespace, &p.name, NODE, &p.ip.to_string(), containers),
    );
}

/// The agent in the lab's node namespace, naming pods through the API stand-in.
fn start_agent(lab: &Lab, kubeconfig: &Path) -> Agent {
    support::start_agent(
        lab.node(),
        &[],
        &[
            ("KUBECONFIG", kubeconfig.to_str().unwrap()),
            ("NODE_NAME", NODE),
        ],
        true,
    )
}

/// Stops the agent; its NDJSON records (schema-checked) and stderr.
fn records(agent: Agent) -> (Vec<Value>, String) {
    let out = support::stop(agent);
    let records = support::ndjson(&out.stdout);
    support::assert_schema_valid(&records);
    (records, out.stderr)
}

fn verdicts(records: &[Value]) -> Vec<&Value> {
    records.iter().filter(|r| r["kind"] == "verdict").collect()
}

/// Done-when of #14, S2: a refusal on 127.0.0.1:9500 inside the pod is explained with what
/// listens there and what the pod declares, by the agent alone.
#[test]
fn s2_the_agent_alone_explains_a_refusal_with_listeners_and_declared_ports() {
    let mut lab = Lab::new("avs2").unwrap();
    let p = lab
        .add_pod("financial-ml", "mlserver-0", "10.42.0.10".parse().unwrap())
        .unwrap();
    let _l = lab
        .listen(&p.netns, "127.0.0.1:9000".parse().unwrap())
        .unwrap();
    let (kube, kubeconfig) = support::kube_api(&lab);
    publish(
        &kube,
        &p,
        &[
            ("mlserver", "3a3a3a3a3a3a3a3a", &[9500]),
            ("agent", "a9e1a9e1a9e1a9e1", &[]),
        ],
    );
    let agent = start_agent(&lab, &kubeconfig);
    assert_eq!(
        lab.connect(
            &p.netns,
            "127.0.0.1:9500".parse().unwrap(),
            Duration::from_secs(2)
        ),
        Connect::Refused
    );
    std::thread::sleep(Duration::from_millis(600));
    let (records, stderr) = records(agent);
    let v = verdicts(&records);
    assert_eq!(v.len(), 1, "{records:#?}\n{stderr}");
    let v = v[0];
    assert_eq!(v["outcome"], "refused_no_listener", "{v:#}");
    assert_eq!(v["server"]["addr"], "127.0.0.1");
    assert_eq!(v["server"]["port"], 9500);
    assert_eq!(v["server"]["peer"]["pod"], "mlserver-0", "{v:#}");
    assert!(
        v["listeners"]
            .as_array()
            .is_some_and(|l| l.iter().any(|l| l["port"] == 9000)),
        "{v:#}"
    );
    let why = v["explanation"].as_str().unwrap();
    assert!(why.contains("Nothing listens on 127.0.0.1:9500"), "{why}");
    assert!(
        why.contains(
            "declares containerPort 9500 in container mlserver, but nothing listens on it"
        ),
        "{why}"
    );
    let _ = std::fs::remove_file(kubeconfig);
}

//! deploy/ is checked like code: every manifest parses into the Kubernetes API types, the
//! DaemonSet keeps its least-privilege promises (each capability justified in a comment), RBAC
//! only reads, and every agent flag or environment variable the manifests use exists in
//! `netprobe agent --help` (the manifests cannot drift from the binary).

use std::path::{Path, PathBuf};

use k8s_openapi::api::{
    apps::v1::DaemonSet,
    core::v1::{ConfigMap, Namespace, ServiceAccount},
    rbac::v1::{ClusterRole, ClusterRoleBinding},
};
use serde::Deserialize;

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/kustomize")
}

fn docs(path: &Path) -> Vec<serde_yaml::Value> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| serde_yaml::Value::deserialize(d).unwrap())
        .collect()
}

fn resources(kustomization: &Path) -> Vec<PathBuf> {
    let k = &docs(kustomization)[0];
    let dir = kustomization.parent().unwrap();
    let mut out: Vec<PathBuf> = k["resources"]
        .as_sequence()
        .into_iter()
        .flatten()
        .map(|r| dir.join(r.as_str().unwrap()))
        .collect();
    out.extend(
        k["patches"]
            .as_sequence()
            .into_iter()
            .flatten()
            .map(|p| dir.join(p["path"].as_str().unwrap())),
    );
    out
}

#[test]
fn every_manifest_parses_into_its_kubernetes_type() {
    let mut kinds = Vec::new();
    for file in resources(&deploy().join("base/kustomization.yaml")) {
        for doc in docs(&file) {
            let kind = doc["kind"].as_str().unwrap().to_string();
            let json = serde_json::to_value(&doc).unwrap();
            let ok = match kind.as_str() {
                "DaemonSet" => serde_json::from_value::<DaemonSet>(json).is_ok(),
                "ServiceAccount" => serde_json::from_value::<ServiceAccount>(json).is_ok(),
                "ClusterRole" => serde_json::from_value::<ClusterRole>(json).is_ok(),
                "ClusterRoleBinding" => serde_json::from_value::<ClusterRoleBinding>(json).is_ok(),
                "ConfigMap" => serde_json::from_value::<ConfigMap>(json).is_ok(),
                "Namespace" => serde_json::from_value::<Namespace>(json).is_ok(),
                other => panic!("unexpected kind {other} in {}", file.display()),
            };
            assert!(ok, "{kind} in {} does not parse", file.display());
            kinds.push(kind);
        }
    }
    for k in [
        "DaemonSet",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "ConfigMap",
        "Namespace",
    ] {
        assert!(kinds.iter().any(|x| x == k), "{k} missing from the base");
    }
    for file in resources(&deploy().join("overlays/k3s/kustomization.yaml")) {
        assert!(
            file.exists(),
            "{} referenced by the k3s overlay",
            file.display()
        );
    }
}

#[test]
fn the_daemonset_keeps_least_privilege_and_justifies_each_capability() {
    let path = deploy().join("base/daemonset.yaml");
    let ds: DaemonSet =
        serde_json::from_value(serde_json::to_value(&docs(&path)[0]).unwrap()).unwrap();
    let pod = ds.spec.unwrap().template.spec.unwrap();
    let c = &pod.containers[0];
    let sc = c.security_context.as_ref().unwrap();
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    assert_ne!(sc.privileged, Some(true));
    let caps = sc.capabilities.as_ref().unwrap();
    assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_string()][..]));
    let added = caps.add.clone().unwrap();
    let allowed = [
        "BPF",
        "PERFMON",
        "NET_ADMIN",
        "SYS_ADMIN",
        "SYS_PTRACE",
        "SYS_RESOURCE",
    ];
    let text = std::fs::read_to_string(&path).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    for cap in &added {
        assert!(
            allowed.contains(&cap.as_str()),
            "capability {cap} is not in the reviewed set"
        );
        let i = lines
            .iter()
            .position(|l| l.trim() == format!("- {cap}"))
            .unwrap();
        assert!(
            lines[i - 1].trim().starts_with('#'),
            "capability {cap} has no justification comment"
        );
    }
    // Metrics on loopback only (hostNetwork): nothing unauthenticated on the node network.
    let cm = docs(&deploy().join("base/configmap.yaml"));
    assert!(
        cm[0]["data"]["METRICS_ADDR"]
            .as_str()
            .unwrap()
            .starts_with("127.0.0.1:")
    );
}

#[test]
fn rbac_only_reads_and_writes_events() {
    for doc in docs(&deploy().join("base/rbac.yaml")) {
        if doc["kind"] == "ClusterRole" {
            let role: ClusterRole =
                serde_json::from_value(serde_json::to_value(&doc).unwrap()).unwrap();
            for rule in role.rules.unwrap() {
                // Reads everywhere; writes only Events (the agent reports drops on pods).
                let events = rule.resources.as_deref() == Some(&["events".to_string()][..]);
                for verb in rule.verbs {
                    let ok = ["get", "list", "watch"].contains(&verb.as_str())
                        || (events && ["create", "patch"].contains(&verb.as_str()));
                    assert!(ok, "verb {verb} on {:?}", rule.resources);
                }
            }
        }
    }
}

#[test]
fn manifests_use_only_flags_and_variables_the_agent_has() {
    let help = std::process::Command::new(env!("CARGO_BIN_EXE_netprobe"))
        .args(["agent", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8(help.stdout).unwrap();
    let ds = &docs(&deploy().join("base/daemonset.yaml"))[0];
    let c = &ds["spec"]["template"]["spec"]["containers"][0];
    let args: Vec<&str> = c["args"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert_eq!(args[0], "agent");
    for a in args.iter().filter(|a| a.starts_with("--")) {
        assert!(help.contains(a), "flag {a} not in `netprobe agent --help`");
    }
    let mut vars: Vec<String> = c["env"]
        .as_sequence()
        .into_iter()
        .flatten()
        .map(|e| e["name"].as_str().unwrap().to_string())
        .collect();
    let cm = docs(&deploy().join("base/configmap.yaml"));
    vars.extend(
        cm[0]["data"]
            .as_mapping()
            .unwrap()
            .keys()
            .map(|k| k.as_str().unwrap().to_string())
            .filter(|k| k != "RUST_LOG"),
    );
    for v in vars {
        assert!(
            help.contains(&format!("env: {v}")),
            "variable {v} not read by the agent:\n{help}"
        );
    }
}

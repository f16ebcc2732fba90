//! deploy/ is checked like code: every manifest parses into the Kubernetes API types, the
//! DaemonSet keeps its least-privilege promises (each capability justified in a comment), RBAC
//! is exactly the reviewed least-privilege set, only the TLS kube-rbac-proxy listens off loopback
//! and it forwards /metrics only, the Helm chart (rendered and linted by the real Helm engine)
//! produces the same objects as the kustomize base, and every agent flag or environment variable
//! the manifests use exists in `netprobe agent --help` (the manifests cannot drift from the
//! binary).

use std::{
    collections::BTreeSet,
    net::SocketAddr,
    path::{Path, PathBuf},
};

use k8s_openapi::{
    api::{
        apps::v1::DaemonSet,
        core::v1::{ConfigMap, Container, Namespace, ServiceAccount},
        rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding},
    },
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
};
use kube::CustomResourceExt;
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
                "Role" => serde_json::from_value::<Role>(json).is_ok(),
                "ConfigMap" => serde_json::from_value::<ConfigMap>(json).is_ok(),
                "Namespace" => serde_json::from_value::<Namespace>(json).is_ok(),
                "CustomResourceDefinition" => {
                    serde_json::from_value::<CustomResourceDefinition>(json).is_ok()
                }
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
        "Role",
        "ConfigMap",
        "Namespace",
        "CustomResourceDefinition",
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

/// Every object of the kustomize base, in file order.
fn base_objects() -> Vec<serde_yaml::Value> {
    resources(&deploy().join("base/kustomization.yaml"))
        .iter()
        .flat_map(|f| docs(f))
        .collect()
}

fn find<'a>(objs: &'a [serde_yaml::Value], kind: &str, name: &str) -> &'a serde_yaml::Value {
    objs.iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

fn typed<T: serde::de::DeserializeOwned>(v: &serde_yaml::Value) -> T {
    serde_json::from_value(serde_json::to_value(v).unwrap()).unwrap()
}

fn pod_containers(objs: &[serde_yaml::Value]) -> Vec<Container> {
    let ds: DaemonSet = typed(find(objs, "DaemonSet", "netprobe"));
    ds.spec.unwrap().template.spec.unwrap().containers
}

/// The agent's container keeps least privilege; each capability it adds is in the reviewed set
/// and has a justification comment on the line above it in `source` (the manifest's text).
fn check_agent_container(c: &Container, source: &Path) {
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
    let text = std::fs::read_to_string(source).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    for cap in &added {
        assert!(
            allowed.contains(&cap.as_str()),
            "capability {cap} is not in the reviewed set"
        );
        let i = lines
            .iter()
            .position(|l| l.trim() == format!("- {cap}"))
            .unwrap_or_else(|| panic!("{cap} not listed in {}", source.display()));
        assert!(
            lines[i - 1].trim().starts_with('#'),
            "capability {cap} has no justification comment in {}",
            source.display()
        );
    }
}

#[test]
fn the_daemonset_keeps_least_privilege_and_justifies_each_capability() {
    let path = deploy().join("base/daemonset.yaml");
    let containers = pod_containers(&base_objects());
    let agent = containers.iter().find(|c| c.name == "agent").unwrap();
    check_agent_container(agent, &path);
    // The Helm template carries the same comments (its rendering is compared in
    // `the_helm_chart_renders_the_kustomize_objects`).
    check_agent_container(agent, &chart().join("templates/daemonset.yaml"));
    // Metrics on loopback only (hostNetwork): nothing unauthenticated on the node network.
    let cm = docs(&deploy().join("base/configmap.yaml"));
    assert!(
        cm[0]["data"]["METRICS_ADDR"]
            .as_str()
            .unwrap()
            .starts_with("127.0.0.1:")
    );
}

/// (apiGroup, resource, verb) of every resource rule; panics on wildcards, resourceNames and
/// non-resource URLs (asserted separately where they belong).
fn grants(rules: &[PolicyRule]) -> BTreeSet<(String, String, String)> {
    for r in rules {
        assert!(r.resource_names.is_none(), "resourceNames in {r:?}");
    }
    named_grants(rules)
}

/// [`grants`], resourceNames allowed (checked by the caller).
fn named_grants(rules: &[PolicyRule]) -> BTreeSet<(String, String, String)> {
    let mut out = BTreeSet::new();
    for r in rules {
        assert!(r.non_resource_urls.is_none(), "nonResourceURLs in {r:?}");
        for g in r.api_groups.as_deref().unwrap_or_default() {
            for res in r.resources.as_deref().unwrap_or_default() {
                for v in &r.verbs {
                    assert!(
                        !(g == "*" || res.contains('*') || v == "*"),
                        "wildcard in {r:?}"
                    );
                    out.insert((g.clone(), res.clone(), v.clone()));
                }
            }
        }
    }
    out
}

fn set(items: &[(&str, &str, &str)]) -> BTreeSet<(String, String, String)> {
    items
        .iter()
        .map(|(g, r, v)| (g.to_string(), r.to_string(), v.to_string()))
        .collect()
}

/// The reviewed least-privilege RBAC (deploy/SECURITY.md), exactly: the agent reads pods,
/// services and endpointslices, writes only Events, and (for its own trace and failures
/// requests and for kube-rbac-proxy) creates TokenReviews and SubjectAccessReviews; the tracer
/// may find pods, create traces.netprobe.io and list failures.netprobe.io (the virtual
/// resources the agents check), and find and port-forward to the agent pods in `namespace`;
/// the token requester may create tokens of the netprobe-tracer ServiceAccount only; the
/// metrics reader may GET /metrics. Bound: the agent, and the tracer ServiceAccount
/// (cluster-wide tracer), nobody else.
fn check_rbac(objs: &[serde_yaml::Value], namespace: &str) {
    check_agent_and_tracer_roles(objs, namespace);
    check_metrics_reader(objs);
    check_bindings(objs, namespace);
}

/// The metrics reader may GET /metrics, nothing else.
fn check_metrics_reader(objs: &[serde_yaml::Value]) {
    let reader: ClusterRole = typed(find(objs, "ClusterRole", "netprobe-metrics-reader"));
    let rules = reader.rules.unwrap();
    assert_eq!(rules.len(), 1);
    assert_eq!(
        rules[0].non_resource_urls.as_deref(),
        Some(&["/metrics".to_string()][..])
    );
    assert_eq!(rules[0].verbs, ["get"]);
    assert!(rules[0].resources.is_none() && rules[0].api_groups.is_none());
}

fn check_agent_and_tracer_roles(objs: &[serde_yaml::Value], namespace: &str) {
    let read = ["get", "list", "watch"];
    let mut agent = Vec::new();
    for (g, r) in [
        ("", "pods"),
        ("", "services"),
        ("discovery.k8s.io", "endpointslices"),
    ] {
        agent.extend(read.iter().map(|v| (g, r, *v)));
    }
    agent.extend([
        ("events.k8s.io", "events", "create"),
        ("events.k8s.io", "events", "patch"),
        ("authentication.k8s.io", "tokenreviews", "create"),
        ("authorization.k8s.io", "subjectaccessreviews", "create"),
        ("netprobe.io", "traces/status", "patch"),
        ("netprobe.io", "traces", "delete"),
    ]);
    agent.extend(read.iter().map(|v| ("netprobe.io", "traces", *v)));
    let role: ClusterRole = typed(find(objs, "ClusterRole", "netprobe-agent"));
    assert_eq!(grants(&role.rules.unwrap()), set(&agent), "netprobe-agent");

    let tracer: ClusterRole = typed(find(objs, "ClusterRole", "netprobe-tracer"));
    assert_eq!(
        grants(&tracer.rules.unwrap()),
        set(&[
            ("", "pods", "get"),
            ("", "pods", "list"),
            ("netprobe.io", "traces", "create"),
            ("netprobe.io", "traces", "get"),
            ("netprobe.io", "traces", "list"),
            ("netprobe.io", "traces", "watch"),
            ("netprobe.io", "traces", "delete"),
            ("netprobe.io", "failures", "list"),
        ]),
        "ClusterRole netprobe-tracer"
    );
    let tracer: Role = typed(find(objs, "Role", "netprobe-tracer"));
    assert_eq!(tracer.metadata.namespace.as_deref(), Some(namespace));
    assert_eq!(
        grants(&tracer.rules.unwrap()),
        set(&[
            ("", "pods", "get"),
            ("", "pods", "list"),
            ("", "pods/portforward", "create"),
            ("", "pods/portforward", "get"),
        ]),
        "Role netprobe-tracer"
    );
    let requester: Role = typed(find(objs, "Role", "netprobe-token-requester"));
    assert_eq!(requester.metadata.namespace.as_deref(), Some(namespace));
    let rules = requester.rules.unwrap();
    assert_eq!(
        named_grants(&rules),
        set(&[("", "serviceaccounts/token", "create")]),
        "Role netprobe-token-requester"
    );
    assert!(
        rules
            .iter()
            .all(|r| r.resource_names.as_deref() == Some(&["netprobe-tracer".to_string()][..])),
        "tokens of the tracer ServiceAccount only: {rules:?}"
    );
    let sa = find(objs, "ServiceAccount", "netprobe-tracer");
    assert_eq!(sa["metadata"]["namespace"].as_str(), Some(namespace));
}

fn check_bindings(objs: &[serde_yaml::Value], namespace: &str) {
    let mut roles = Vec::new();
    let mut bindings = Vec::new();
    for o in objs {
        match o["kind"].as_str().unwrap() {
            "ClusterRole" | "Role" => roles.push(o["metadata"]["name"].as_str().unwrap()),
            "ClusterRoleBinding" => {
                let b: ClusterRoleBinding = typed(o);
                bindings.push((b.role_ref, b.subjects.unwrap_or_default()));
            }
            "RoleBinding" => {
                let b: RoleBinding = typed(o);
                bindings.push((b.role_ref, b.subjects.unwrap_or_default()));
            }
            _ => {}
        }
    }
    roles.sort();
    assert_eq!(
        roles,
        [
            "netprobe-agent",
            "netprobe-metrics-reader",
            "netprobe-token-requester",
            "netprobe-tracer",
            "netprobe-tracer"
        ],
        "no other role"
    );
    // No person is bound to the tracer, token-requester or metrics-reader roles by default.
    let bound: BTreeSet<(String, String, String, String)> = bindings
        .iter()
        .flat_map(|(r, subjects)| {
            subjects.iter().map(|s| {
                (
                    format!("{}/{}", r.kind, r.name),
                    s.kind.clone(),
                    s.name.clone(),
                    s.namespace.clone().unwrap_or_default(),
                )
            })
        })
        .collect();
    let sa = |role: &str, name: &str| {
        (
            role.to_string(),
            "ServiceAccount".to_string(),
            name.to_string(),
            namespace.to_string(),
        )
    };
    assert_eq!(
        bound,
        BTreeSet::from([
            sa("ClusterRole/netprobe-agent", "netprobe"),
            sa("ClusterRole/netprobe-tracer", "netprobe-tracer"),
        ]),
        "only the agent and the tracer ServiceAccount are bound"
    );
}

#[test]
fn rbac_is_the_reviewed_least_privilege_set() {
    check_rbac(&base_objects(), "netprobe");
}

/// Where the agent listens: `--metrics-addr` in its args, else METRICS_ADDR from its env or the
/// ConfigMap it reads (the manifests set it explicitly; the binary's default is 127.0.0.1:19965).
fn agent_listen_addr(objs: &[serde_yaml::Value], agent: &Container) -> SocketAddr {
    let args = agent.args.clone().unwrap_or_default();
    if let Some(a) = args.iter().find_map(|a| a.strip_prefix("--metrics-addr=")) {
        return a.parse().unwrap();
    }
    assert!(
        !args.iter().any(|a| a == "--metrics-addr"),
        "use --metrics-addr=ADDR"
    );
    if let Some(e) = agent
        .env
        .iter()
        .flatten()
        .find(|e| e.name == "METRICS_ADDR")
    {
        return e.value.as_deref().unwrap().parse().unwrap();
    }
    let cm_name = agent
        .env_from
        .iter()
        .flatten()
        .find_map(|e| e.config_map_ref.as_ref())
        .expect("the agent reads its ConfigMap")
        .name
        .clone();
    let cm: ConfigMap = typed(find(objs, "ConfigMap", &cm_name));
    cm.data.unwrap()["METRICS_ADDR"]
        .parse()
        .expect("METRICS_ADDR set in the ConfigMap")
}

/// kube-rbac-proxy forwards /metrics only, to the agent's loopback address, and is the only
/// listener off loopback: TLS, no insecure listener, no capability, non-root, read-only root.
/// `proxy_port` is its node port.
fn check_listeners(objs: &[serde_yaml::Value], proxy_port: u16) {
    let ds: DaemonSet = typed(find(objs, "DaemonSet", "netprobe"));
    let pod = ds.spec.unwrap().template.spec.unwrap();
    assert_eq!(pod.host_network, Some(true));
    let agent = pod.containers.iter().find(|c| c.name == "agent").unwrap();
    let addr = agent_listen_addr(objs, agent);
    assert!(addr.ip().is_loopback(), "the agent listens on {addr}");
    for probe in [&agent.liveness_probe, &agent.readiness_probe] {
        let get = probe.as_ref().unwrap().http_get.as_ref().unwrap();
        assert_eq!(get.host.as_deref(), Some("127.0.0.1"));
        assert_eq!(
            get.port,
            k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(addr.port().into())
        );
    }
    assert!(
        agent.ports.is_none(),
        "hostNetwork: a containerPort is a node port"
    );

    let proxy = pod
        .containers
        .iter()
        .find(|c| c.name == "kube-rbac-proxy")
        .expect("kube-rbac-proxy sidecar");
    assert!(
        proxy
            .image
            .as_deref()
            .unwrap()
            .starts_with("quay.io/brancz/kube-rbac-proxy:v0.18.")
    );
    let args: BTreeSet<String> = proxy.args.clone().unwrap().into_iter().collect();
    let expected: BTreeSet<String> = [
        format!("--secure-listen-address=0.0.0.0:{proxy_port}"),
        format!("--upstream=http://{addr}/"),
        "--allow-paths=/metrics,/readyz".to_string(),
    ]
    .into_iter()
    .collect();
    // Exactly these: no --insecure-listen-address, no --ignore-paths (which skip authorization),
    // no static authorization config, no other path (/readyz: for `helm test`, authorized too).
    assert_eq!(args, expected);
    assert!(proxy.command.is_none(), "the image's entrypoint");
    let ports: Vec<i32> = proxy
        .ports
        .iter()
        .flatten()
        .map(|p| p.container_port)
        .collect();
    assert_eq!(ports, [i32::from(proxy_port)]);
    let sc = proxy.security_context.as_ref().unwrap();
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    assert_eq!(sc.run_as_non_root, Some(true));
    assert_eq!(sc.run_as_user, Some(65534));
    assert_ne!(sc.privileged, Some(true));
    let caps = sc.capabilities.as_ref().unwrap();
    assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_string()][..]));
    assert!(caps.add.as_deref().unwrap_or_default().is_empty());

    // No other container, and no init container, declares or opens a port.
    for c in pod
        .containers
        .iter()
        .chain(pod.init_containers.iter().flatten())
    {
        assert!(
            ["agent", "kube-rbac-proxy"].contains(&c.name.as_str()),
            "unreviewed container {}",
            c.name
        );
    }
}

/// Ports of common CNIs and node agents (hostNetwork, so a collision is a failed bind on the
/// node): Cilium (agent, operator, Envoy, Hubble metrics 9962-9966; health 4240, Hubble 4244,
/// relay 4245), Calico (BGP 179, Typha 5473, metrics 9091-9094), kube-proxy, kubelet and
/// the k3s/kubeadm control plane (10248-10260, 6443), node-exporter (9100), kube-router
/// (20244/20245, 8080), CoreDNS (9153, 8080, 8181), MetalLB (7472, 7946), Retina (10093),
/// Tetragon (2112), Linkerd (4140-4191), Istio (15000-15090); and the Prometheus exporter
/// range 9100-9999, allocated in full.
fn taken(port: u16) -> bool {
    matches!(
        port,
        179 | 2112 | 4240 | 4244 | 4245 | 5473 | 6443 | 7472 | 7946 | 8080 | 8181 | 9153
            | 9100..=9999 | 10093 | 10248..=10260 | 20244 | 20245 | 4140..=4191 | 15000..=15090
    )
}

/// What `netprobe <args>` prints as `[default: X]` for the flag `flag`.
fn help_default(args: &[&str], flag: &str) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_netprobe"))
        .args(args)
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8(out.stdout).unwrap();
    let at = help.find(flag).unwrap_or_else(|| panic!("{flag}: {help}"));
    let rest = &help[at..];
    let d = rest.find("[default: ").expect("a default") + "[default: ".len();
    rest[d..rest[d..].find(']').unwrap() + d].to_string()
}

#[test]
fn the_default_ports_are_no_common_node_agents() {
    let binary: SocketAddr = help_default(&["agent"], "--metrics-addr").parse().unwrap();
    assert!(
        binary.ip().is_loopback() && !taken(binary.port()),
        "{binary}"
    );
    let port: u16 = help_default(&["trace"], "--agent-port").parse().unwrap();
    assert_eq!(port, binary.port(), "trace --agent-port");
    for objs in [base_objects(), helm(serde_json::json!({})).objects] {
        let ds: DaemonSet = typed(find(&objs, "DaemonSet", "netprobe"));
        let containers = ds.spec.unwrap().template.spec.unwrap().containers;
        let agent = containers.iter().find(|c| c.name == "agent").unwrap();
        assert_eq!(agent_listen_addr(&objs, agent), binary);
        let proxy = containers
            .iter()
            .find(|c| c.name == "kube-rbac-proxy")
            .unwrap();
        let port = proxy.ports.as_ref().unwrap()[0].container_port;
        assert!(
            !taken(u16::try_from(port).unwrap()),
            "kube-rbac-proxy on {port}"
        );
    }
}

#[test]
fn only_the_tls_proxy_listens_off_loopback_and_it_forwards_only_metrics() {
    check_listeners(&base_objects(), 19966);
}

fn chart() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/helm/netprobe")
}

/// Renders and lints the chart with the real Helm engine (Helm's Go SDK in `libhelm_c`, shipped
/// by the PyPI wheel `helm-python-sdk`; no helm binary or Go toolchain is needed).
const HELM_SCRIPT: &str = r#"
import json, sys
import helm_python as helm
chart, values = sys.argv[1], json.loads(sys.argv[2])
lint = helm.lint(chart, values, strict=True, namespace="netprobe")
try:
    with helm.Chart.load(chart) as c:
        out = {"manifests": c.render(values, name="netprobe", namespace="netprobe")}
except helm.HelmError as e:
    out = {"error": str(e)}
out["lint"] = lint
print(json.dumps(out))
"#;

const HELM_INSTALL: &str =
    "python3 -m pip install --no-deps --target .tools/helm-python helm-python-sdk==0.2.2";

struct Rendered {
    /// What `helm install` applies.
    objects: Vec<serde_yaml::Value>,
    /// Hooks (`helm test`'s objects): created by Helm when they run, not installed.
    hooks: Vec<serde_yaml::Value>,
    error: Option<String>,
    lint: serde_json::Value,
}

fn helm(values: serde_json::Value) -> Rendered {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let pythonpath = std::env::var_os("NETPROBE_HELM_PYTHONPATH")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join(".tools/helm-python"));
    assert!(
        pythonpath.join("helm_python").is_dir(),
        "the Helm engine is not installed at {}: run `{HELM_INSTALL}` in the repository root \
         (or set NETPROBE_HELM_PYTHONPATH)",
        pythonpath.display()
    );
    let out = std::process::Command::new("python3")
        .env("PYTHONPATH", &pythonpath)
        .args(["-c", HELM_SCRIPT])
        .arg(chart())
        .arg(values.to_string())
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "helm: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut objects = Vec::new();
    let mut hooks = Vec::new();
    if let Some(m) = v["manifests"].as_object() {
        let mut files: Vec<_> = m.iter().filter(|(k, _)| k.ends_with(".yaml")).collect();
        files.sort_by_key(|(k, _)| k.as_str());
        for (_, text) in files {
            for d in serde_yaml::Deserializer::from_str(text.as_str().unwrap()) {
                let d = serde_yaml::Value::deserialize(d).unwrap();
                if d["metadata"]["annotations"]["helm.sh/hook"].is_string() {
                    hooks.push(d);
                } else if !d.is_null() {
                    objects.push(d);
                }
            }
        }
    }
    Rendered {
        objects,
        hooks,
        error: v["error"].as_str().map(str::to_string),
        lint: v["lint"].clone(),
    }
}

/// What may differ between the chart and kustomize: labels, annotations (Helm's standard
/// labels, the config checksum), the selector (Helm adds the instance label) and pull policies.
fn comparable(o: &serde_yaml::Value) -> serde_json::Value {
    let mut v = serde_json::to_value(o).unwrap();
    for m in [v.pointer_mut("/metadata")].into_iter().flatten() {
        let m = m.as_object_mut().unwrap();
        m.remove("labels");
        m.remove("annotations");
    }
    if let Some(spec) = v.pointer_mut("/spec").and_then(|s| s.as_object_mut()) {
        spec.remove("selector");
        if let Some(t) = spec.get_mut("template").and_then(|t| t.as_object_mut()) {
            t.remove("metadata");
            for c in t["spec"]["containers"].as_array_mut().unwrap() {
                c.as_object_mut().unwrap().remove("imagePullPolicy");
            }
        }
    }
    v
}

#[test]
fn the_helm_chart_renders_the_kustomize_objects() {
    let r = helm(serde_json::json!({"namespace": {"create": true}}));
    assert_eq!(r.error, None);
    // `helm lint --strict`: no warning, no error (info such as "icon is recommended" allowed).
    for m in r.lint["messages"].as_array().unwrap() {
        assert!(m["severity"].as_i64().unwrap() < 2, "helm lint: {m}");
    }
    assert!(
        r.lint["errors"].as_array().unwrap().is_empty(),
        "{}",
        r.lint
    );

    // Each rendered object parses into its Kubernetes type...
    for o in &r.objects {
        let json = serde_json::to_value(o).unwrap();
        let kind = o["kind"].as_str().unwrap();
        let ok = match kind {
            "DaemonSet" => serde_json::from_value::<DaemonSet>(json).is_ok(),
            "ServiceAccount" => serde_json::from_value::<ServiceAccount>(json).is_ok(),
            "ClusterRole" => serde_json::from_value::<ClusterRole>(json).is_ok(),
            "ClusterRoleBinding" => serde_json::from_value::<ClusterRoleBinding>(json).is_ok(),
            "Role" => serde_json::from_value::<Role>(json).is_ok(),
            "ConfigMap" => serde_json::from_value::<ConfigMap>(json).is_ok(),
            "Namespace" => serde_json::from_value::<Namespace>(json).is_ok(),
            other => panic!("unexpected kind {other} rendered by the chart"),
        };
        assert!(ok, "rendered {kind} does not parse");
    }
    // ...and is the kustomize base's object: same kinds, names, namespaces, security context,
    // capabilities, probes, volumes, RBAC rules, configuration (labels aside). Helm installs
    // the CRDs of crds/ itself, unrendered (`the_trace_crd_is_the_one_the_code_generates`).
    let base: Vec<_> = base_objects()
        .into_iter()
        .filter(|o| o["kind"] != "CustomResourceDefinition")
        .collect();
    let key = |o: &serde_yaml::Value| {
        format!(
            "{}/{}/{}",
            o["kind"].as_str().unwrap(),
            o["metadata"]["namespace"].as_str().unwrap_or(""),
            o["metadata"]["name"].as_str().unwrap()
        )
    };
    let mut a: Vec<String> = base.iter().map(key).collect();
    let mut b: Vec<String> = r.objects.iter().map(key).collect();
    a.sort();
    b.sort();
    assert_eq!(
        a, b,
        "the chart renders the same objects as the kustomize base"
    );
    for o in &base {
        let h = r.objects.iter().find(|h| key(h) == key(o)).unwrap();
        assert_eq!(comparable(h), comparable(o), "{} differs", key(o));
    }
    // The same properties, checked on the rendering itself.
    check_rbac(&r.objects, "netprobe");
    check_listeners(&r.objects, 19966);
    let containers = pod_containers(&r.objects);
    check_agent_container(
        containers.iter().find(|c| c.name == "agent").unwrap(),
        &chart().join("templates/daemonset.yaml"),
    );
}

/// The Trace CRD in deploy/ (the chart's crds/, which `helm install` applies before the
/// templates, and the kustomize base) is what `Trace::crd()` generates from the Rust types.
/// `NETPROBE_BLESS=1 cargo test -p netprobe --test deploy trace_crd` writes it.
#[test]
fn the_trace_crd_is_the_one_the_code_generates() {
    let generated = serde_json::to_value(netprobe::model::trace::Trace::crd()).unwrap();
    let text = format!(
        "# Generated from netprobe/src/model/trace.rs (Trace::crd()); do not edit. Regenerate with\n\
         # NETPROBE_BLESS=1 cargo test -p netprobe --test deploy trace_crd\n{}",
        serde_yaml::to_string(&generated).unwrap()
    );
    let files = [
        chart().join("crds/traces.netprobe.io.yaml"),
        deploy().join("base/traces.netprobe.io.yaml"),
    ];
    for path in &files {
        if std::env::var_os("NETPROBE_BLESS").is_some() {
            std::fs::write(path, &text).unwrap();
        }
        let on_disk = docs(path);
        assert_eq!(on_disk.len(), 1, "{}", path.display());
        assert_eq!(
            serde_json::to_value(&on_disk[0]).unwrap(),
            generated,
            "{} is not what Trace::crd() generates: NETPROBE_BLESS=1 cargo test -p netprobe --test deploy trace_crd",
            path.display()
        );
    }
    assert!(
        base_objects()
            .iter()
            .any(|o| o["kind"] == "CustomResourceDefinition"
                && o["metadata"]["name"] == "traces.netprobe.io"),
        "the kustomize base lists the CRD"
    );
}

#[test]
fn the_helm_chart_values_change_only_what_they_name() {
    // Defaults: no Namespace object (helm install --create-namespace + a label, see README).
    let r = helm(serde_json::json!({}));
    assert_eq!(r.error, None);
    assert!(!r.objects.iter().any(|o| o["kind"] == "Namespace"));

    let r = helm(serde_json::json!({
        "image": {"repository": "registry.local/netprobe", "tag": "dev"},
        "nodeSelector": {"kubernetes.io/os": "linux"},
        "tolerations": [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "resources": {"limits": {"memory": "512Mi"}},
        "rateLimit": 5,
        "programStats": true,
        "logLevel": "info",
        "metrics": {"address": "127.0.0.1:29965", "rbacProxy": {"port": 29966},
                    "podLabels": true, "maxSeries": 100, "seriesGrace": 60},
        "maxNamespaces": 512,
        "kubeEvents": {"rate": 3, "burst": 7, "inFlight": 2},
    }));
    assert_eq!(r.error, None);
    let cm: ConfigMap = typed(find(&r.objects, "ConfigMap", "netprobe"));
    let data = cm.data.unwrap();
    assert_eq!(data["RATE_LIMIT"], "5");
    assert_eq!(data["NETPROBE_PROGRAM_STATS"], "true");
    assert_eq!(data["RUST_LOG"], "info");
    assert_eq!(data["METRICS_ADDR"], "127.0.0.1:29965");
    assert_eq!(data["NETPROBE_METRICS_POD_LABELS"], "true");
    assert_eq!(data["NETPROBE_METRICS_MAX_SERIES"], "100");
    assert_eq!(data["NETPROBE_METRICS_SERIES_GRACE"], "60");
    assert_eq!(data["NETPROBE_MAX_NAMESPACES"], "512");
    assert_eq!(
        (
            &data["NETPROBE_EVENTS_RATE"],
            &data["NETPROBE_EVENTS_BURST"],
            &data["NETPROBE_EVENTS_IN_FLIGHT"]
        ),
        (&"3".to_string(), &"7".to_string(), &"2".to_string())
    );
    let ds: DaemonSet = typed(find(&r.objects, "DaemonSet", "netprobe"));
    let pod = ds.spec.unwrap().template.spec.unwrap();
    assert_eq!(
        pod.containers[0].image.as_deref(),
        Some("registry.local/netprobe:dev")
    );
    assert_eq!(pod.node_selector.unwrap()["kubernetes.io/os"], "linux");
    assert_eq!(pod.tolerations.unwrap()[0].key.as_deref(), Some("gpu"));
    check_listeners(&r.objects, 29966);
    check_rbac(&r.objects, "netprobe");

    // A metrics address off loopback is refused: it would be unauthenticated on the node network.
    for addr in ["0.0.0.0:9965", "10.0.0.1:9965", ":9965"] {
        let r = helm(serde_json::json!({"metrics": {"address": addr}}));
        let err = r.error.unwrap_or_else(|| panic!("{addr} accepted"));
        assert!(err.contains("must be 127.x.x.x:PORT"), "{err}");
    }

    // Without the proxy: no sidecar, no metrics-reader role; the review rights stay (the agent
    // authorises trace and failures requests itself); still loopback.
    let r = helm(
        serde_json::json!({"metrics": {"rbacProxy": {"enabled": false}},
                                    "rbac": {"tracer": {"create": false}}}),
    );
    assert_eq!(r.error, None);
    let containers = pod_containers(&r.objects);
    assert_eq!(containers.len(), 1);
    let role: ClusterRole = typed(find(&r.objects, "ClusterRole", "netprobe-agent"));
    let g = grants(&role.rules.unwrap());
    assert!(g.contains(&(
        "authentication.k8s.io".into(),
        "tokenreviews".into(),
        "create".into()
    )));
    assert!(g.contains(&(
        "authorization.k8s.io".into(),
        "subjectaccessreviews".into(),
        "create".into()
    )));
    assert!(r.objects.iter().all(
        |o| !o["metadata"]["name"].as_str().unwrap().contains("tracer")
            && o["metadata"]["name"] != "netprobe-token-requester"
    ));
    assert!(
        !r.objects
            .iter()
            .any(|o| o["metadata"]["name"] == "netprobe-metrics-reader")
    );
    assert!(
        agent_listen_addr(&r.objects, &containers[0])
            .ip()
            .is_loopback()
    );
}

#[test]
fn manifests_use_only_flags_and_variables_the_agent_has() {
    let help = std::process::Command::new(env!("CARGO_BIN_EXE_netprobe"))
        .args(["agent", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8(help.stdout).unwrap();
    let base = base_objects();
    let rendered = helm(serde_json::json!({})).objects;
    for objs in [&base, &rendered] {
        let agent = pod_containers(objs)
            .into_iter()
            .find(|c| c.name == "agent")
            .unwrap();
        let args = agent.args.clone().unwrap_or_default();
        assert_eq!(args[0], "agent");
        for a in args.iter().filter(|a| a.starts_with("--")) {
            let flag = a.split('=').next().unwrap();
            assert!(
                help.contains(flag),
                "flag {flag} not in `netprobe agent --help`"
            );
        }
        let mut vars: Vec<String> = agent.env.iter().flatten().map(|e| e.name.clone()).collect();
        let cm: ConfigMap = typed(find(objs, "ConfigMap", "netprobe"));
        vars.extend(cm.data.unwrap().into_keys().filter(|k| k != "RUST_LOG"));
        assert!(vars.iter().any(|v| v == "METRICS_ADDR"));
        for v in vars {
            assert!(
                help.contains(&format!("env: {v}")),
                "variable {v} not read by the agent:\n{help}"
            );
        }
    }
}

/// The monitoring objects the chart renders when asked (issue #17 §2): a Service in front of
/// kube-rbac-proxy, a ServiceMonitor and a PodMonitor that verify the proxy's certificate (CA +
/// server name, never `insecureSkipVerify`) and send the token of a ServiceAccount that may only
/// `get /metrics`, the PrometheusRule and dashboard of deploy/ (the chart's copies are equal).
#[test]
fn the_monitoring_objects_verify_tls_send_a_metrics_only_token_and_ship_deploys_rules_and_dashboard()
 {
    let all_on = serde_json::json!({"monitoring": {
        "serviceMonitor": {"enabled": true, "labels": {"release": "kube-prometheus-stack"}},
        "podMonitor": {"enabled": true},
        "prometheusRule": {"enabled": true, "serviceFailingFor": "15m"},
        "dashboard": {"enabled": true},
        "tls": {"certManager": {"enabled": true, "issuerRef": {"name": "netprobe-ca"}}},
    }});
    let r = helm(all_on);
    assert_eq!(r.error, None);
    let objs = &r.objects;
    for m in r.lint["messages"].as_array().unwrap() {
        assert!(m["severity"].as_i64().unwrap() < 2, "helm lint: {m}");
    }
    check_metrics_service(objs);
    let cert = find(objs, "Certificate", "netprobe-metrics");
    let secret_name = cert["spec"]["secretName"].as_str().unwrap();
    let server_name = cert["spec"]["dnsNames"][0].as_str().unwrap();
    assert_eq!(server_name, "netprobe-metrics.netprobe.svc");
    for (kind, endpoints) in [
        ("ServiceMonitor", "endpoints"),
        ("PodMonitor", "podMetricsEndpoints"),
    ] {
        let m = find(objs, kind, "netprobe");
        assert_eq!(m["apiVersion"], "monitoring.coreos.com/v1");
        let e = &m["spec"][endpoints][0];
        assert_eq!(
            (e["port"].as_str(), e["scheme"].as_str()),
            (Some("https-metrics"), Some("https")),
            "{kind}"
        );
        assert_eq!(
            e["tlsConfig"]["ca"]["secret"]["name"].as_str(),
            Some(secret_name),
            "{kind}"
        );
        assert_eq!(
            e["tlsConfig"]["serverName"].as_str(),
            Some(server_name),
            "{kind}"
        );
        assert_eq!(
            e["authorization"]["credentials"]["name"],
            "netprobe-scraper-token"
        );
        let text = serde_yaml::to_string(m).unwrap();
        assert!(!text.contains("insecureSkipVerify"), "{text}");
    }
    assert_eq!(
        find(objs, "ServiceMonitor", "netprobe")["metadata"]["labels"]["release"],
        "kube-prometheus-stack"
    );
    check_scraper(objs);
    check_proxy_serves(objs, secret_name);
    check_rules_and_dashboard(objs);

    // Without a certificate to verify, a monitor is refused rather than rendered insecure.
    let r = helm(serde_json::json!({"monitoring": {"serviceMonitor": {"enabled": true}}}));
    assert!(
        r.error
            .as_deref()
            .unwrap_or_default()
            .contains("no insecureSkipVerify"),
        "{:?}",
        r.error
    );
    // A named Secret (e.g. from your own CA) works without cert-manager.
    let r = helm(
        serde_json::json!({"monitoring": {"podMonitor": {"enabled": true},
        "tls": {"secretName": "proxy-tls", "ca": {"secretName": "my-ca", "key": "ca.pem"}}}}),
    );
    assert_eq!(r.error, None);
    let e = &find(&r.objects, "PodMonitor", "netprobe")["spec"]["podMetricsEndpoints"][0];
    assert_eq!(e["tlsConfig"]["ca"]["secret"]["name"], "my-ca");
    assert!(!r.objects.iter().any(|o| o["kind"] == "Certificate"));
    check_proxy_serves(&r.objects, "proxy-tls");
}

/// `<fullname>-metrics`, port `https-metrics`, selects the agent pods (the chart's helm test
/// expects exactly that name and port).
fn check_metrics_service(objs: &[serde_yaml::Value]) {
    let svc: k8s_openapi::api::core::v1::Service = typed(find(objs, "Service", "netprobe-metrics"));
    let spec = svc.spec.unwrap();
    let port = &spec.ports.unwrap()[0];
    assert_eq!(
        (port.name.as_deref(), port.port),
        (Some("https-metrics"), 19966)
    );
    assert_eq!(
        spec.selector
            .unwrap()
            .get("app.kubernetes.io/name")
            .map(String::as_str),
        Some("netprobe")
    );
}

/// The scraper's ServiceAccount is bound to the metrics reader and nothing else; its token
/// Secret is the one the monitors send.
fn check_scraper(objs: &[serde_yaml::Value]) {
    let b: ClusterRoleBinding = typed(find(objs, "ClusterRoleBinding", "netprobe-scraper"));
    assert_eq!(b.role_ref.name, "netprobe-metrics-reader");
    let subjects = b.subjects.unwrap();
    assert_eq!(subjects.len(), 1);
    assert_eq!(
        (subjects[0].name.as_str(), subjects[0].namespace.as_deref()),
        ("netprobe-scraper", Some("netprobe"))
    );
    let _: ServiceAccount = typed(find(objs, "ServiceAccount", "netprobe-scraper"));
    let s: k8s_openapi::api::core::v1::Secret =
        typed(find(objs, "Secret", "netprobe-scraper-token"));
    assert_eq!(
        s.type_.as_deref(),
        Some("kubernetes.io/service-account-token")
    );
    assert_eq!(
        s.metadata.annotations.unwrap()["kubernetes.io/service-account.name"],
        "netprobe-scraper"
    );
    check_metrics_reader(objs);
}

/// kube-rbac-proxy serves the certificate of `secret` (mounted read-only).
fn check_proxy_serves(objs: &[serde_yaml::Value], secret: &str) {
    let ds: DaemonSet = typed(find(objs, "DaemonSet", "netprobe"));
    let pod = ds.spec.unwrap().template.spec.unwrap();
    let proxy = pod
        .containers
        .iter()
        .find(|c| c.name == "kube-rbac-proxy")
        .unwrap();
    let args = proxy.args.clone().unwrap();
    assert!(
        args.contains(&"--tls-cert-file=/etc/kube-rbac-proxy/tls/tls.crt".to_string()),
        "{args:?}"
    );
    let mount = &proxy.volume_mounts.as_ref().unwrap()[0];
    assert_eq!(
        (mount.name.as_str(), mount.read_only),
        ("metrics-tls", Some(true))
    );
    let volume = pod
        .volumes
        .unwrap()
        .into_iter()
        .find(|v| v.name == "metrics-tls")
        .unwrap();
    assert_eq!(volume.secret.unwrap().secret_name.as_deref(), Some(secret));
}

/// The chart's rules and dashboard are deploy/'s (its files/ copies are byte-equal), with the
/// chart's `for`.
fn check_rules_and_dashboard(objs: &[serde_yaml::Value]) {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    for (copy, original) in [
        (
            "files/netprobe-rules.yaml",
            "deploy/prometheus/netprobe-rules.yaml",
        ),
        ("files/netprobe.json", "deploy/grafana/netprobe.json"),
    ] {
        assert_eq!(
            std::fs::read_to_string(chart().join(copy)).unwrap(),
            std::fs::read_to_string(repo.join(original)).unwrap(),
            "cp {original} deploy/helm/netprobe/{copy}"
        );
    }
    let plain = &docs(&repo.join("deploy/prometheus/netprobe-rules.yaml"))[0];
    let mut expected = plain["spec"].clone();
    expected["groups"][0]["rules"][0]["for"] = "15m".into();
    let rule = find(objs, "PrometheusRule", "netprobe");
    assert_eq!(rule["spec"], expected);
    let cm: ConfigMap = typed(find(objs, "ConfigMap", "netprobe-dashboard"));
    assert_eq!(cm.metadata.labels.unwrap()["grafana_dashboard"], "1");
    let dashboard: serde_json::Value =
        serde_json::from_str(&cm.data.unwrap()["netprobe.json"]).unwrap();
    let original: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo.join("deploy/grafana/netprobe.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(dashboard, original);
}

/// kustomize's monitoring component (deploy/kustomize/components/monitoring) holds the chart's
/// monitoring objects for a Secret `netprobe-metrics-tls` (labels aside).
#[test]
fn the_kustomize_monitoring_component_matches_the_chart() {
    let r = helm(serde_json::json!({"monitoring": {
        "serviceMonitor": {"enabled": true},
        "tls": {"secretName": "netprobe-metrics-tls"},
    }}));
    assert_eq!(r.error, None);
    let component = deploy().join("components/monitoring");
    let kustomization = &docs(&component.join("kustomization.yaml"))[0];
    assert_eq!(kustomization["kind"], "Component");
    for file in [
        "service-metrics.yaml",
        "servicemonitor.yaml",
        "scraper.yaml",
    ] {
        for o in docs(&component.join(file)) {
            let (kind, name) = (
                o["kind"].as_str().unwrap(),
                o["metadata"]["name"].as_str().unwrap(),
            );
            assert_eq!(
                comparable(find(&r.objects, kind, name)),
                comparable(&o),
                "{kind} {name}"
            );
        }
    }
    let patch = &docs(&component.join("daemonset-tls.yaml"))[0];
    let chart_ds: DaemonSet = typed(find(&r.objects, "DaemonSet", "netprobe"));
    let pod = chart_ds.spec.unwrap().template.spec.unwrap();
    let proxy = pod
        .containers
        .into_iter()
        .find(|c| c.name == "kube-rbac-proxy")
        .unwrap();
    let (args, mounts) = (proxy.args, proxy.volume_mounts);
    let patched = &patch["spec"]["template"]["spec"];
    assert_eq!(
        serde_json::to_value(args).unwrap(),
        serde_json::to_value(&patched["containers"][0]["args"]).unwrap()
    );
    assert_eq!(
        serde_json::to_value(mounts).unwrap(),
        serde_json::to_value(&patched["containers"][0]["volumeMounts"]).unwrap()
    );
}

/// `kubectl kustomize DIR`: what `kubectl apply -k DIR` applies.
fn kustomize(dir: &Path) -> Vec<serde_yaml::Value> {
    let out = std::process::Command::new("kubectl")
        .arg("kustomize")
        .arg(dir)
        .output()
        .expect("kubectl (kubectl kustomize renders offline)");
    assert!(
        out.status.success(),
        "kubectl kustomize {}: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_yaml::Deserializer::from_slice(&out.stdout)
        .map(|d| serde_yaml::Value::deserialize(d).unwrap())
        .collect()
}

/// The agent pod as a typed PodSpec, and the DaemonSet's rolling update bound.
fn agent_pod(
    objs: &[serde_yaml::Value],
) -> (
    k8s_openapi::api::core::v1::PodSpec,
    Option<k8s_openapi::apimachinery::pkg::util::intstr::IntOrString>,
) {
    let ds: DaemonSet = typed(find(objs, "DaemonSet", "netprobe"));
    let spec = ds.spec.unwrap();
    let max_unavailable = spec
        .update_strategy
        .and_then(|u| u.rolling_update)
        .and_then(|r| r.max_unavailable);
    (spec.template.spec.unwrap(), max_unavailable)
}

/// The DaemonSet settings of #17, in every rendering: one agent replaced at a time, Linux nodes
/// only, the runtime's default seccomp profile, a type on every hostPath, system-node-critical.
fn check_daemonset_settings(objs: &[serde_yaml::Value], what: &str) {
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    let (pod, max_unavailable) = agent_pod(objs);
    assert_eq!(max_unavailable, Some(IntOrString::Int(1)), "{what}");
    assert_eq!(
        pod.node_selector.as_ref().unwrap()["kubernetes.io/os"],
        "linux",
        "{what}"
    );
    let seccomp = pod.security_context.unwrap().seccomp_profile.unwrap();
    assert_eq!(seccomp.type_, "RuntimeDefault", "{what}");
    assert_eq!(
        pod.priority_class_name.as_deref(),
        Some("system-node-critical"),
        "{what}"
    );
    let volumes = pod.volumes.unwrap();
    assert!(!volumes.is_empty());
    for v in volumes {
        let hp = v
            .host_path
            .unwrap_or_else(|| panic!("{what}: {} not hostPath", v.name));
        let expected = match hp.path.as_str() {
            "/sys/kernel/btf" => "Directory",
            "/run/netns" => "DirectoryOrCreate",
            other => panic!("{what}: unreviewed hostPath {other}"),
        };
        assert_eq!(hp.type_.as_deref(), Some(expected), "{what}: {}", hp.path);
    }
}

/// `kubectl kustomize` renders the base and the k3s overlay. The base is the files' objects
/// (namespaced as the kustomization says); the k3s overlay keeps system-node-critical (Kubernetes
/// admits it outside kube-system since 1.17, k3s included).
#[test]
fn kubectl_kustomize_renders_the_base_and_the_k3s_overlay() {
    let rendered = kustomize(&deploy().join("base"));
    let key = |o: &serde_yaml::Value| {
        format!(
            "{}/{}",
            o["kind"].as_str().unwrap(),
            o["metadata"]["name"].as_str().unwrap()
        )
    };
    let mut files: Vec<String> = base_objects().iter().map(key).collect();
    let mut out: Vec<String> = rendered.iter().map(key).collect();
    files.sort();
    out.sort();
    assert_eq!(files, out);
    let ds = find(&rendered, "DaemonSet", "netprobe");
    assert_eq!(
        comparable(ds),
        comparable(find(&base_objects(), "DaemonSet", "netprobe"))
    );
    check_daemonset_settings(&rendered, "kustomize base");
    let k3s = kustomize(&deploy().join("overlays/k3s"));
    check_daemonset_settings(&k3s, "k3s overlay");
    check_listeners(&k3s, 19966);
    check_rbac(&k3s, "netprobe");
}

#[test]
fn the_daemonset_settings_render_in_the_chart_and_are_values() {
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    check_daemonset_settings(&base_objects(), "kustomize files");
    check_daemonset_settings(&helm(serde_json::json!({})).objects, "chart defaults");

    let r = helm(serde_json::json!({
        "updateStrategy": {"rollingUpdate": {"maxUnavailable": "10%"}},
        "podAnnotations": {"example.com/team": "network"},
        "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [{"matchExpressions": [
                {"key": "pool", "operator": "NotIn", "values": ["gpu"]}]}]}}},
        "extraArgs": ["--ring-buffer-kib=8192"],
        "extraEnv": [{"name": "NETPROBE_EXTRA", "value": "1"}],
        "priorityClassQuota": {"create": true},
    }));
    assert_eq!(r.error, None);
    let (pod, max_unavailable) = agent_pod(&r.objects);
    assert_eq!(max_unavailable, Some(IntOrString::String("10%".into())));
    let ds = find(&r.objects, "DaemonSet", "netprobe");
    let annotations = &ds["spec"]["template"]["metadata"]["annotations"];
    assert_eq!(annotations["example.com/team"], "network");
    assert!(annotations["checksum/config"].is_string());
    let terms = &pod.affinity.unwrap().node_affinity.unwrap();
    assert!(
        terms
            .required_during_scheduling_ignored_during_execution
            .is_some()
    );
    let agent = pod.containers.iter().find(|c| c.name == "agent").unwrap();
    assert_eq!(
        agent.args.as_deref().unwrap(),
        ["agent", "--ring-buffer-kib=8192"]
    );
    let env = agent.env.as_deref().unwrap();
    assert_eq!(env[0].name, "NODE_NAME");
    assert_eq!(env[1].name, "NETPROBE_EXTRA");
    assert_eq!(env[1].value.as_deref(), Some("1"));
    // The ResourceQuota some clusters (GKE) require for system-node-critical pods.
    let quota: k8s_openapi::api::core::v1::ResourceQuota =
        typed(find(&r.objects, "ResourceQuota", "netprobe-critical-pods"));
    let scope = quota.spec.unwrap().scope_selector.unwrap();
    let m = &scope.match_expressions.unwrap()[0];
    assert_eq!(
        (m.scope_name.as_str(), m.operator.as_str()),
        ("PriorityClass", "In")
    );
    assert_eq!(m.values.as_deref().unwrap(), ["system-node-critical"]);
    check_listeners(&r.objects, 19966);
    check_rbac(&r.objects, "netprobe");
}

/// values.schema.json: a wrong value fails `helm template` and `helm lint` (the real engine)
/// instead of crash-looping the agent; every value of values.yaml is described.
#[test]
fn the_chart_schema_rejects_bad_values() {
    for (values, at) in [
        (serde_json::json!({"rateLimit": "abc"}), "/rateLimit"),
        (serde_json::json!({"rateLimt": 5}), "rateLimt"),
        (serde_json::json!({"rateLimit": -1}), "/rateLimit"),
        (serde_json::json!({"maxNamespaces": 1}), "/maxNamespaces"),
        (
            serde_json::json!({"kubeEvents": {"rate": 0}}),
            "/kubeEvents/rate",
        ),
        (
            serde_json::json!({"metrics": {"rbacProxy": {"port": 70000}}}),
            "/metrics/rbacProxy/port",
        ),
        (
            serde_json::json!({"metrics": {"seriesGrace": "5m"}}),
            "/metrics/seriesGrace",
        ),
        (
            serde_json::json!({"updateStrategy": {"rollingUpdate": {"maxUnavailable": "all"}}}),
            "/updateStrategy/rollingUpdate/maxUnavailable",
        ),
        (
            serde_json::json!({"image": {"pullPolicy": "Sometimes"}}),
            "/image/pullPolicy",
        ),
        (serde_json::json!({"extraArgs": ["agent"]}), "/extraArgs/0"),
        (
            serde_json::json!({"extraEnv": [{"value": "x"}]}),
            "/extraEnv/0",
        ),
        (
            serde_json::json!({"tolerations": [{"operator": "exists"}]}),
            "/tolerations/0/operator",
        ),
        (serde_json::json!({"programStats": "yes"}), "/programStats"),
        (
            serde_json::json!({"monitoring": {"serviceMonitor": {"enabeld": true}}}),
            "enabeld",
        ),
        (
            serde_json::json!({"monitoring": {"prometheusRule": {"serviceFailingFor": "ten"}}}),
            "/monitoring/prometheusRule/serviceFailingFor",
        ),
    ] {
        let r = helm(values.clone());
        let err = r
            .error
            .unwrap_or_else(|| panic!("{values} rendered: the schema must refuse it"));
        assert!(err.contains(at), "{values}: {err}");
        assert!(
            !r.lint["errors"].as_array().unwrap().is_empty(),
            "helm lint accepts {values}"
        );
    }
    // A valid monitoring block renders.
    assert_eq!(
        helm(serde_json::json!({"monitoring": {"serviceMonitor": {"enabled": false}}})).error,
        None
    );

    // Every value of values.yaml has a schema entry (and nothing else does).
    let schema: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(chart().join("values.schema.json")).unwrap())
            .unwrap();
    let values: serde_json::Value =
        serde_yaml::from_str(&std::fs::read_to_string(chart().join("values.yaml")).unwrap())
            .unwrap();
    assert_described(&schema, &schema, &values, "");
}

/// Every key of `values` (a values.yaml map) is a property of `schema`, recursively.
fn assert_described(
    root: &serde_json::Value,
    schema: &serde_json::Value,
    values: &serde_json::Value,
    at: &str,
) {
    let schema = match schema["$ref"].as_str() {
        Some(r) => root.pointer(r.trim_start_matches('#')).unwrap(),
        None => schema,
    };
    let Some(map) = values.as_object() else {
        return;
    };
    let free = schema["properties"].is_null();
    for (k, v) in map {
        if free {
            // A free-form map (nodeSelector, podAnnotations): typed by additionalProperties.
            continue;
        }
        let sub = &schema["properties"][k];
        assert!(!sub.is_null(), "{at}/{k} is not in values.schema.json");
        assert!(
            schema["additionalProperties"] == false,
            "{at}: a typo must fail"
        );
        assert_described(root, sub, v, &format!("{at}/{k}"));
    }
}

/// `helm test`: a Pod asks /readyz through the Service `<fullname>-metrics` (kube-rbac-proxy)
/// with its own ServiceAccount's token; only hooks, never installed; no RBAC of its own.
#[test]
fn helm_test_asks_readyz_through_the_metrics_service() {
    let r = helm(serde_json::json!({"monitoring": {"service": {"enabled": true}}}));
    let kinds: BTreeSet<(String, String)> = r
        .hooks
        .iter()
        .map(|h| {
            assert_eq!(
                h["metadata"]["annotations"]["helm.sh/hook"], "test",
                "{h:?}"
            );
            (
                h["kind"].as_str().unwrap().to_string(),
                h["metadata"]["name"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        kinds,
        BTreeSet::from([
            ("Pod".to_string(), "netprobe-test-readyz".to_string()),
            ("ServiceAccount".to_string(), "netprobe-test".to_string()),
        ]),
        "no role or binding: /readyz is open to authenticated callers as on the API server"
    );
    let pod: k8s_openapi::api::core::v1::Pod = typed(find(&r.hooks, "Pod", "netprobe-test-readyz"));
    let spec = pod.spec.unwrap();
    assert_eq!(spec.service_account_name.as_deref(), Some("netprobe-test"));
    assert_eq!(spec.restart_policy.as_deref(), Some("Never"));
    let c = &spec.containers[0];
    let url = c.env.as_deref().unwrap()[0].value.clone().unwrap();
    assert_eq!(
        url, "https://netprobe-metrics.netprobe.svc:19966/readyz",
        "the Service in front of kube-rbac-proxy's https-metrics port"
    );
    let script = c.command.as_deref().unwrap().join(" ");
    assert!(script.contains("--oauth2-bearer"), "{script}");
    assert!(script.contains("serviceaccount/token"), "{script}");
    assert!(script.contains("ready*) exit 0"), "{script}");
    let sc = c.security_context.as_ref().unwrap();
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    assert_eq!(spec.security_context.unwrap().run_as_non_root, Some(true));
    // The proxy lets /readyz through (authorized), and nothing more than before.
    check_listeners(&r.objects, 19966);

    // Without the proxy, or without the Service in front of it, there is nothing to test through.
    let r = helm(
        serde_json::json!({"metrics": {"rbacProxy": {"enabled": false}},
        "monitoring": {"service": {"enabled": true}}}),
    );
    assert!(r.hooks.is_empty());
    assert!(helm(serde_json::json!({})).hooks.is_empty());
}

/// The image recipe: its build context (the repository root) leaves target/ and the local
/// tools out, its base images are exact versions, and it builds for amd64 and arm64.
#[test]
fn the_image_recipe_pins_its_bases_and_keeps_target_out_of_the_context() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let ignore = std::fs::read_to_string(root.join(".dockerignore")).unwrap();
    let rules: Vec<&str> = ignore
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    for out in ["target/", "**/target/", ".tools/", ".git/"] {
        assert!(rules.contains(&out), "{out} in the build context");
    }
    for needed in [
        "Cargo.toml",
        "Cargo.lock",
        "netprobe",
        "netprobe-common",
        "netprobe-ebpf",
        "xtask",
        "*",
        "**",
    ] {
        assert!(
            !rules.iter().any(|r| r.trim_end_matches('/') == needed),
            "{needed} is needed by the build"
        );
    }

    let recipe = std::fs::read_to_string(root.join("deploy/image/Containerfile")).unwrap();
    let args: std::collections::BTreeMap<&str, &str> = recipe
        .lines()
        .filter_map(|l| l.strip_prefix("ARG "))
        .filter_map(|a| a.split_once('='))
        .collect();
    let froms: Vec<String> = recipe
        .lines()
        .filter_map(|l| l.strip_prefix("FROM "))
        .map(|f| {
            let image = f.split_whitespace().next().unwrap();
            match image.strip_prefix("${").and_then(|i| i.strip_suffix('}')) {
                Some(arg) => args[arg].to_string(),
                None => image.to_string(),
            }
        })
        .collect();
    assert_eq!(froms.len(), 2, "a build stage and the runtime");
    for image in &froms {
        let (_, tag) = image.split_once(':').expect("a tag");
        let version = tag.split(['-', '@']).next().unwrap();
        assert!(
            version.split('.').count() >= 2 && version.split('.').all(|p| p.parse::<u32>().is_ok()),
            "{image}: not an exact version (a moving tag like latest or bookworm)"
        );
    }
    assert!(recipe.contains("--platform linux/amd64,linux/arm64"));
}

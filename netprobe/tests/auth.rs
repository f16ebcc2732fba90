//! Privileged tests of who may drive an agent (issue #15, point 1) and of the agent's SIGTERM
//! with traces running: a real agent in a lab node, the Kubernetes API stand-in (TokenReview,
//! SubjectAccessReview, TokenRequest, port-forward), the real CLI as nobody ("the laptop").

mod support;

use std::{
    net::TcpStream,
    path::PathBuf,
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use netprobe_lab::{
    Lab, Pod,
    kubeapi::{FakeKube, Kind, pod},
    process::Agent,
    two_nodes::agent_pod,
};
use serde_json::Value;

const NODE: &str = "lab-node";
/// Whom the tracer ServiceAccount's tokens name.
const TRACER_SA: &str = "system:serviceaccount:netprobe:netprobe-tracer";

/// A node with pods team-a/api-0, team-b/db-0 and team-c/cache-0 (nothing listens on 9500 in
/// any), the API stand-in, and an agent reached through `pods/portforward` of
/// netprobe/netprobe-x1.
struct Setup {
    lab: Lab,
    kube: FakeKube,
    agent: Option<Agent>,
    api: Pod,
    db: Pod,
    cache: Pod,
    files: Vec<PathBuf>,
}

impl Setup {
    fn new(tag: &str) -> Self {
        netprobe_lab::require_root();
        let mut lab = Lab::new(tag).unwrap();
        let api = lab
            .add_pod("team-a", "api-0", "10.42.0.10".parse().unwrap())
            .unwrap();
        let db = lab
            .add_pod("team-b", "db-0", "10.42.0.11".parse().unwrap())
            .unwrap();
        let cache = lab
            .add_pod("team-c", "cache-0", "10.42.0.12".parse().unwrap())
            .unwrap();
        let kube = FakeKube::start(
            lab.listen(lab.node(), "127.0.0.1:0".parse().unwrap())
                .unwrap(),
        );
        let ids = [
            (&api, "4a4a4a4a4a4a4a4a"),
            (&db, "4b4b4b4b4b4b4b4b"),
            (&cache, "4c4c4c4c4c4c4c4c"),
        ];
        for (p, id) in ids {
            let ip = p.ip.to_string();
            let containers: &[(&str, &str, &[u16])] = &[("main", id, &[9500])];
            kube.apply(Kind::Pod, pod(&p.namespace, &p.name, NODE, &ip, containers));
        }
        kube.apply(Kind::Pod, agent_pod("netprobe-x1", NODE));
        let mut me = Self {
            lab,
            kube,
            agent: None,
            api,
            db,
            cache,
            files: Vec::new(),
        };
        // The agent reviews with the lab's admin credentials (its ServiceAccount in a cluster).
        let admin = me.kubeconfig("agent", &me.kube.kubeconfig());
        let agent = support::start_agent(
            me.lab.node(),
            &[],
            &[("KUBECONFIG", &admin), ("NODE_NAME", NODE)],
            false,
        );
        let node = me.lab.node().to_string();
        me.kube.port_forward("netprobe", "netprobe-x1", move |p| {
            netprobe_lab::in_netns(&node, || TcpStream::connect(("127.0.0.1", p)))
                .map_err(std::io::Error::other)?
        });
        me.agent = Some(agent);
        me
    }

    fn port(&self) -> u16 {
        self.agent.as_ref().unwrap().port
    }

    /// Writes a kubeconfig readable by nobody; its path.
    fn kubeconfig(&mut self, name: &str, text: &str) -> String {
        let path = std::env::temp_dir().join(format!(
            "netprobe-auth-{}-{name}.kubeconfig",
            std::process::id()
        ));
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o644))
            .unwrap();
        self.files.push(path.clone());
        path.to_str().unwrap().to_string()
    }

    /// `netprobe ARGS --agent-port P` as nobody in the node namespace ("the laptop").
    fn laptop(
        &self,
        kubeconfig: &str,
        args: &[impl AsRef<std::ffi::OsStr>],
    ) -> std::process::Child {
        let mut c = support::laptop(self.lab.node(), kubeconfig, support::netprobe_bin());
        c.args(args);
        // `trace` reaches the agent; `failures` only the API server.
        if args.first().is_some_and(|a| a.as_ref() == "trace") {
            c.args(["--agent-port", &self.port().to_string()]);
        }
        c.spawn().unwrap()
    }

    /// The laptop's command to its end: (exit code, stdout, stderr).
    fn run(&self, kubeconfig: &str, args: &[impl AsRef<std::ffi::OsStr>]) -> (i32, String, String) {
        let child = self.laptop(kubeconfig, args);
        let out = netprobe_lab::process::wait_output(child, Duration::from_secs(60)).unwrap();
        (out.code(), out.stdout, out.stderr)
    }

    /// One raw HTTP request to the agent's loopback port, as root or as `uid`, from the node
    /// namespace: the first 400 bytes of the answer.
    fn raw(&self, uid: Option<u32>, path: &str, token: Option<&str>) -> String {
        let auth = token.map_or(String::new(), |t| {
            format!("Authorization: Bearer {t}\\r\\n")
        });
        let who = uid.map_or(String::new(), |u| {
            format!("setpriv --reuid={u} --regid={u} --clear-groups ")
        });
        let script = format!(
            "{who}python3 -c \"import socket; s=socket.create_connection(('127.0.0.1',{})); s.sendall(b'GET {path} HTTP/1.1\\r\\nHost: x\\r\\n{auth}\\r\\n'); print(s.recv(400))\"",
            self.port()
        );
        self.lab.sh(self.lab.node(), &script).unwrap()
    }

    fn tables(&self, netns: &str) -> String {
        self.lab.sh(netns, "nft list tables").unwrap()
    }

    /// SIGTERM: the agent's exit status and stderr.
    fn stop_agent(&mut self) -> (bool, String) {
        let out = support::stop(self.agent.take().unwrap());
        (out.status.success(), out.stderr)
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        for f in &self.files {
            let _ = std::fs::remove_file(f);
        }
    }
}

/// Connection attempts from `pod` to the closed port 9500 of `to` until `stop` is set.
fn knock(pod: &Pod, to: &str, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    let ns = pod.netns.clone();
    let to: std::net::SocketAddr = format!("{to}:9500").parse().unwrap();
    std::thread::spawn(move || {
        while !stop.load(Relaxed) {
            let _ = netprobe_lab::in_netns(&ns, || {
                TcpStream::connect_timeout(&to, Duration::from_millis(300))
            });
            std::thread::sleep(Duration::from_millis(400));
        }
    })
}

fn children(pid: u32) -> String {
    let out = Command::new("pgrep")
        .args(["-P", &pid.to_string()])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn the_kubelet_probe_request_and_other_local_users_get_401_and_start_nothing() {
    let mut s = Setup::new("authprobe");
    let probe = "/v1/trace?pod=team-a/api-0&port=9500";
    // Exactly what a pod's livenessProbe.httpGet makes the kubelet send: root, node loopback,
    // no credentials.
    let root = s.raw(None, probe, None);
    assert!(root.contains("401 Unauthorized"), "{root}");
    assert!(root.contains("www-authenticate: Bearer"), "{root}");
    let nobody = s.raw(Some(65534), probe, None);
    assert!(nobody.contains("401 Unauthorized"), "{nobody}");
    let forged = s.raw(Some(65534), probe, Some("not-a-token"));
    assert!(forged.contains("401 Unauthorized"), "{forged}");
    let failures = s.raw(Some(65534), "/v1/failures", None);
    assert!(failures.contains("401 Unauthorized"), "{failures}");
    // Nothing ran: no trace child, no trace table, no authorisation asked.
    std::thread::sleep(Duration::from_millis(500));
    let agent_pid = s.agent.as_ref().unwrap().id();
    assert_eq!(children(agent_pid), "", "a trace child of the agent");
    for ns in [s.lab.node(), &s.api.netns] {
        let tables = s.tables(ns);
        assert!(!tables.contains("netprobe"), "{ns}: {tables}");
    }
    assert_eq!(
        s.kube.reviews().1,
        0,
        "no SubjectAccessReview for the anonymous"
    );
    let (ok, err) = s.stop_agent();
    assert!(ok, "{err}");
    let refusals: Vec<&str> = err.lines().filter(|l| l.contains(" audit ")).collect();
    assert_eq!(refusals.len(), 4, "one audit line per request:\n{err}");
    assert!(
        refusals.iter().all(|l| l.contains("user=anonymous")
            && l.contains("decision=refused")
            && !l.contains("not-a-token")),
        "{refusals:#?}"
    );
}

/// The tracer ServiceAccount may trace in team-a; `user` may request its tokens (a kubeconfig
/// without a token, as k3s's client certificates) and list team-a's Events (what `failures`
/// reads). Returns that kubeconfig.
fn team_a_tracer(s: &mut Setup, user: &str) -> String {
    let kc = s
        .kube
        .kubeconfig_without_token(user, &["system:authenticated"]);
    s.kube.allow(
        user,
        "create",
        "",
        "serviceaccounts/token",
        Some("netprobe"),
    );
    s.kube
        .allow(TRACER_SA, "create", "netprobe.io", "traces", Some("team-a"));
    s.kube
        .allow(user, "list", "events.k8s.io", "events", Some("team-a"));
    s.kubeconfig(user, &kc)
}

/// A 20 s cluster-mode trace of `ns/pod` port 9500 that ends at its first verdict.
fn trace_args(pod: &str, ns: &str) -> Vec<String> {
    format!("trace --cluster --via-agent --pod {pod} -n {ns} --port 9500 --duration 20s --count 1 -o json")
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

/// The failures answer `kubeconfig`'s user gets for `scope` (`-A`, `-n NS`), asked until
/// `done` or 30 s.
fn failures_until(
    s: &Setup,
    kubeconfig: &str,
    scope: &[&str],
    done: impl Fn(&Value) -> bool,
) -> Value {
    let start = Instant::now();
    loop {
        let (code, out, err) = s.run(kubeconfig, &[&["failures", "-o", "json"], scope].concat());
        assert_eq!(code, 0, "{out}\n{err}");
        let a: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}\n{err}"));
        if done(&a) || start.elapsed() > Duration::from_secs(30) {
            return a;
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

fn namespaces_of(a: &Value) -> Vec<String> {
    let groups = a["groups"].as_array().unwrap();
    let sides = groups
        .iter()
        .flat_map(|g| [&g["client"], &g["destination"]]);
    sides
        .filter_map(|p| Some(p["namespace"].as_str()?.to_string()))
        .collect()
}

#[test]
fn a_tracer_of_one_namespace_traces_there_with_a_requested_token_and_nowhere_else() {
    let mut s = Setup::new("authns");
    let alice = team_a_tracer(&mut s, "alice");
    let stop = Arc::new(AtomicBool::new(false));
    let mut knocks = vec![knock(&s.api, "127.0.0.1", stop.clone())];

    // team-b: refused by the agent, naming the permission; nothing starts.
    let (code, out, err) = s.run(&alice, &trace_args("db-0", "team-b"));
    assert_eq!(code, 2, "{out}\n{err}");
    assert!(
        err.contains("403")
            && err.contains(&format!(
                "{TRACER_SA} may not create traces.netprobe.io in namespace team-b"
            )),
        "{err}"
    );
    // team-a: a real trace, end to end, with a token the CLI requested (the kubeconfig has none).
    let (code, out, err) = s.run(&alice, &trace_args("api-0", "team-a"));
    assert_eq!(code, 1, "a diagnosed failure is exit 1:\n{out}\n{err}");
    let verdict: Value = out
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|l| l["kind"] == "verdict")
        .unwrap_or_else(|| panic!("no verdict:\n{out}\n{err}"));
    assert_eq!(verdict["outcome"], "refused_no_listener", "{verdict:#}");
    assert_eq!(verdict["server"]["peer"]["pod"], "api-0", "{verdict:#}");
    let requests = s.kube.token_requests();
    assert!(!requests.is_empty());
    for r in &requests {
        assert_eq!(
            r["spec"]["audiences"],
            serde_json::json!(["netprobe"]),
            "{r}"
        );
        assert_eq!(r["spec"]["expirationSeconds"], 600, "{r}");
    }

    // Failures, from the agent's Events: everything for the admin, team-a's only for alice,
    // whom RBAC lets list team-a's Events. Attempts team-a → team-b (alice's) and
    // team-b → team-c (not alice's).
    knocks.push(knock(&s.api, &s.db.ip.to_string(), stop.clone()));
    knocks.push(knock(&s.db, &s.cache.ip.to_string(), stop.clone()));
    let admin = s.kubeconfig("admin", &s.kube.kubeconfig());
    let all = failures_until(&s, &admin, &["-A"], |a| {
        let ns = namespaces_of(a);
        ns.iter().any(|n| n == "team-a") && ns.iter().any(|n| n == "team-c")
    });
    let ns = namespaces_of(&all);
    assert!(ns.iter().any(|n| n == "team-c"), "{all:#}");
    let mine = failures_until(&s, &alice, &["-n", "team-a"], |a| {
        namespaces_of(a).iter().any(|n| n == "team-a")
    });
    let ns = namespaces_of(&mine);
    assert!(ns.iter().any(|n| n == "team-a"), "{mine:#}");
    assert!(!ns.iter().any(|n| n == "team-c"), "{mine:#}");
    let groups = mine["groups"].as_array().unwrap();
    assert!(
        groups
            .iter()
            .all(|g| g["client"]["namespace"] == "team-a"
                || g["destination"]["namespace"] == "team-a"),
        "{mine:#}"
    );
    for scope in [&["-A"][..], &["-n", "team-c"]] {
        let (code, _, err) = s.run(&alice, &[&["failures"][..], scope].concat());
        assert_eq!(code, 2, "{err}");
        assert!(err.contains("forbidden") && err.contains("alice"), "{err}");
    }
    stop.store(true, Relaxed);
    for k in knocks {
        k.join().unwrap();
    }

    // Someone who may not request tokens, with no token of their own: told what to do.
    let bob = s.kube.kubeconfig_without_token("bob", &[]);
    let bob = s.kubeconfig("bob", &bob);
    let (code, _, err) = s.run(&bob, &trace_args("api-0", "team-a"));
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("ServiceAccount netprobe/netprobe-tracer")
            && err.contains("netprobe-token-requester")
            && err.contains("--as-service-account"),
        "{err}"
    );

    let (ok, err) = s.stop_agent();
    assert!(ok, "{err}");
    let audit = |needle: &str| {
        err.lines()
            .any(|l| l.contains(" audit ") && l.contains(needle))
    };
    assert!(
        audit(&format!(
            "user=\"{TRACER_SA}\" groups=\"system:serviceaccounts,system:serviceaccounts:netprobe,system:authenticated\" request=trace namespace=team-a pod=api-0 port=9500"
        )),
        "{err}"
    );
    assert!(
        audit("request=trace namespace=team-b pod=db-0 port=9500"),
        "{err}"
    );
    assert!(
        audit("decision=allowed") && audit("decision=refused"),
        "{err}"
    );
}

#[test]
fn agent_sigterm_stops_its_pod_traces_and_their_tables_go() {
    let mut s = Setup::new("authterm");
    let admin = s.kubeconfig("admin", &s.kube.kubeconfig());
    let cli = s.laptop(
        &admin,
        &[
            "trace",
            "--cluster",
            "--via-agent",
            "--pod",
            "api-0",
            "-n",
            "team-a",
            "--port",
            "9500",
            "--duration",
            "60s",
        ],
    );
    // The trace installs its rule-trace table in the node and in the pod's namespace.
    let start = Instant::now();
    let installed = loop {
        let (node, pod) = (s.tables(s.lab.node()), s.tables(&s.api.netns));
        if node.contains("netprobe_") && pod.contains("netprobe_") {
            break true;
        }
        if start.elapsed() > Duration::from_secs(60) {
            break false;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let agent_pid = s.agent.as_ref().unwrap().id();
    assert!(installed, "the trace never installed its tables");
    assert_ne!(
        children(agent_pid),
        "",
        "the trace runs as the agent's child"
    );
    let stopped = Instant::now();
    let (ok, err) = s.stop_agent();
    assert!(ok, "the agent exits 0 after its traces: {err}");
    eprintln!("agent stopped with its trace in {:?}", stopped.elapsed());
    assert!(
        stopped.elapsed() < Duration::from_secs(15),
        "{:?}",
        stopped.elapsed()
    );
    for ns in [s.lab.node().to_string(), s.api.netns.clone()] {
        let tables = s.tables(&ns);
        assert!(!tables.contains("netprobe"), "{ns}: {tables}");
    }
    let _ = netprobe_lab::process::wait_output(cli, Duration::from_secs(20)).unwrap();
}

/// Cross-node: the client's token goes to both agents; the server node's agent refuses the
/// scheduler pod to a caller allowed to trace the client pod only, the CLI says so and still
/// prints the client node's verdict.
#[test]
fn a_cross_node_trace_refused_on_the_server_node_keeps_the_client_side() {
    use netprobe_lab::{
        rules::CLUSTER_IP,
        two_nodes::TwoNodes,
        underlay::{NODE_IPS, Overlay},
    };
    netprobe_lab::require_root();
    let lab = TwoNodes::new("authx", Overlay::Routed, support::netprobe_bin()).unwrap();
    lab.kube.add_token("carol-token", "carol", &[]);
    let ns = Some("financial-inference");
    lab.kube
        .allow("carol", "create", "netprobe.io", "traces", ns);
    lab.kube.only_named("client-0");
    let text = lab
        .kube
        .kubeconfig_with("{token: carol-token}")
        .replace("http://127.0.0.1:", &format!("http://{}:", NODE_IPS[0]));
    let kubeconfig = std::env::temp_dir().join(format!("netprobe-authx-{}", std::process::id()));
    std::fs::write(&kubeconfig, text).unwrap();
    std::fs::set_permissions(
        &kubeconfig,
        std::os::unix::fs::PermissionsExt::from_mode(0o644),
    )
    .unwrap();
    let args = format!(
        "trace --cluster --via-agent --agent-port {} --pod client-0 -n financial-inference --port 9004 --addr {CLUSTER_IP} --duration 30s --count 1 -o json",
        lab.port
    );
    let child = lab
        .laptop(support::netprobe_bin())
        .env("KUBECONFIG", &kubeconfig)
        .args(args.split_whitespace())
        .spawn()
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let dials = {
        let (ns, stop) = (lab.client.netns.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Relaxed) {
                let to = format!("{CLUSTER_IP}:9004").parse().unwrap();
                let _ = netprobe_lab::in_netns(&ns, || {
                    TcpStream::connect_timeout(&to, Duration::from_secs(3))
                });
                std::thread::sleep(Duration::from_secs(1));
            }
        })
    };
    let out = netprobe_lab::process::wait_output(child, Duration::from_secs(90)).unwrap();
    stop.store(true, Relaxed);
    dials.join().unwrap();
    let _ = std::fs::remove_file(&kubeconfig);
    let err = &out.stderr;
    assert!(
        err.contains("[node-b] netprobe: agent: ")
            && err.contains("agent answered 403: ")
            && err.contains(
                "carol may not create traces.netprobe.io in namespace financial-inference"
            ),
        "{err}"
    );
    assert!(
        err.contains("you may not trace pod financial-inference/seldon-scheduler-0 on node node-b: the verdicts below are the client side's only"),
        "{err}"
    );
    let verdict = out
        .stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|l| l["kind"] == "verdict")
        .unwrap_or_else(|| panic!("no client-side verdict:\n{}\n{err}", out.stdout));
    assert_eq!(verdict["client"]["peer"]["pod"], "client-0", "{verdict:#}");
    assert!([0, 1].contains(&out.code()), "{}: {err}", out.code());
}

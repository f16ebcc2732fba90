//! Trace objects (`traces.netprobe.io`) through the real kube-rs client (`Api<Trace>`,
//! `runtime::watcher`) against the Kubernetes API stand-in with the CRD deploy/ installs:
//! admission (defaults, pruning, the schema's bounds with the server's 422 message), generateName,
//! list by label, the watch protocol (resume from a resourceVersion, bookmarks, 410 Gone and the
//! watcher's relist), the status subresource kept apart from the spec, delete, RBAC per verb and
//! namespace. Then `kubectl netprobe trace`: it creates the object, prints the verdicts its status
//! shows, deletes it (or keeps it), and talks to nothing but the traces API; this test writes the
//! status as the node's agent would (a client of the API, not a stand-in for the agent).
//! No root needed.

use std::{
    net::TcpListener,
    path::Path,
    process::{Child, Command, Stdio},
    time::Duration,
};

use futures::{StreamExt, TryStreamExt};
use kube::{
    Api, CustomResourceExt, ResourceExt,
    api::{
        ApiResource, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams,
        WatchEvent, WatchParams,
    },
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{WatchStreamExt, watcher},
};
use netprobe::{
    model::{
        Outcome,
        trace::{MAX_VERDICTS, Trace, TracePhase, TraceSpec, TraceStatus},
    },
    sinks::Summary,
};
use netprobe_lab::{kubeapi::FakeKube, scratch::Scratch};
use serde_json::{Value, json};

const TRACES: &str = "netprobe.io/traces";

fn api_server() -> FakeKube {
    let kube = FakeKube::start(TcpListener::bind("127.0.0.1:0").expect("bind loopback"));
    kube.install_crd(&serde_json::to_value(Trace::crd()).unwrap());
    kube
}

async fn client_of(kubeconfig: &str) -> kube::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let kc = Kubeconfig::from_yaml(kubeconfig).unwrap();
    let config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .unwrap();
    kube::Client::try_from(config).unwrap()
}

async fn admin(kube: &FakeKube) -> kube::Client {
    client_of(&kube.kubeconfig()).await
}

fn api_error(e: kube::Error) -> kube::core::ErrorResponse {
    match e {
        kube::Error::Api(ae) => ae,
        other => panic!("not an API error: {other}"),
    }
}

/// Creates `spec` as raw JSON (values the typed spec cannot hold); the API's answer.
async fn create_raw(client: &kube::Client, name: &str, spec: Value) -> kube::Result<DynamicObject> {
    let api = Api::<DynamicObject>::namespaced_with(
        client.clone(),
        "team-a",
        &ApiResource::erase::<Trace>(&()),
    );
    let mut obj = DynamicObject::new(name, &ApiResource::erase::<Trace>(&()));
    obj.data = json!({"spec": spec, "status": {"phase": "Completed"}});
    api.create(&PostParams::default(), &obj).await
}

#[tokio::test]
async fn admission_defaults_prunes_and_refuses_bad_specs_as_the_api_server_does() {
    let kube = api_server();
    let client = admin(&kube).await;

    let ok = create_raw(
        &client,
        "ok",
        json!({"pod": "web-0", "port": 8080, "addr": "10.0.0.1"}),
    )
    .await
    .unwrap();
    assert_eq!(
        ok.data["spec"],
        json!({"pod": "web-0", "port": 8080, "duration": "30s", "ttlSecondsAfterFinished": 3600}),
        "defaults filled in, the unknown field pruned"
    );
    assert!(
        ok.data.get("status").is_none(),
        "status is not written on create"
    );
    assert!(ok.metadata.uid.is_some() && ok.metadata.creation_timestamp.is_some());

    let refused = |spec: Value| {
        let client = client.clone();
        async move { api_error(create_raw(&client, "bad", spec).await.unwrap_err()) }
    };
    let e = refused(json!({"pod": "web-0", "port": 70000})).await;
    assert_eq!((e.code, e.reason.as_str()), (422, "Invalid"));
    assert_eq!(
        e.message,
        "Trace.netprobe.io \"bad\" is invalid: spec.port: Invalid value: 70000: spec.port in body should be less than or equal to 65535"
    );
    let e = refused(json!({"pod": "Web_0", "port": 80, "protocol": "SCTP"})).await;
    assert!(
        e.message
            .starts_with("Trace.netprobe.io \"bad\" is invalid: ["),
        "two causes, listed: {}",
        e.message
    );
    for (spec, says) in [
        (
            json!({"pod": "web-0", "port": 0}),
            "spec.port: Invalid value: 0: spec.port in body should be greater than or equal to 1",
        ),
        (
            json!({"pod": "web-0", "port": 80, "duration": "11m"}),
            "spec.duration: Invalid value: \"11m\": spec.duration in body should match",
        ),
        (
            json!({"pod": "Web_0", "port": 80, "protocol": "SCTP"}),
            "spec.pod: Invalid value: \"Web_0\"",
        ),
        (
            json!({"pod": "Web_0", "port": 80, "protocol": "SCTP"}),
            "spec.protocol: Unsupported value: \"SCTP\": supported values: \"TCP\", \"UDP\"",
        ),
        (json!({"port": 80}), "spec.pod: Required value"),
    ] {
        let e = refused(spec).await;
        assert_eq!(e.code, 422);
        assert!(e.message.contains(says), "{}", e.message);
    }

    // Typed: generateName, and the same name twice is a conflict.
    let api = Api::<Trace>::namespaced(client.clone(), "team-a");
    let mut t = Trace::new("", TraceSpec::port("web-0", 8080));
    t.metadata.name = None;
    t.metadata.generate_name = Some("web-0-".into());
    let a = api.create(&PostParams::default(), &t).await.unwrap();
    let b = api.create(&PostParams::default(), &t).await.unwrap();
    for x in [&a, &b] {
        assert!(
            x.name_any().starts_with("web-0-") && x.name_any().len() == 11,
            "{}",
            x.name_any()
        );
    }
    assert_ne!(a.name_any(), b.name_any());
    let again = Trace::new(&a.name_any(), TraceSpec::port("web-0", 1));
    let e = api_error(
        api.create(&PostParams::default(), &again)
            .await
            .unwrap_err(),
    );
    assert_eq!((e.code, e.reason.as_str()), (409, "AlreadyExists"));
    assert_eq!(kube.custom_objects(TRACES).len(), 3);
}

#[tokio::test]
async fn status_and_spec_are_written_apart_watched_and_deleted() {
    let kube = api_server();
    let client = admin(&kube).await;
    let api = Api::<Trace>::namespaced(client.clone(), "team-a");
    let seen = tokio::spawn(
        watcher(
            Api::<Trace>::all(client.clone()),
            watcher::Config::default(),
        )
        .take_while(|e| std::future::ready(!matches!(e, Ok(watcher::Event::Delete(_)))))
        .try_collect::<Vec<_>>(),
    );

    let mut t = Trace::new("t1", TraceSpec::port("web-0", 8080));
    t.labels_mut().insert("team".into(), "a".into());
    let created = api.create(&PostParams::default(), &t).await.unwrap();
    api.create(
        &PostParams::default(),
        &Trace::new("t2", TraceSpec::port("db-0", 5432)),
    )
    .await
    .unwrap();
    let labelled = api
        .list(&ListParams::default().labels("team=a"))
        .await
        .unwrap();
    assert_eq!(labelled.items.len(), 1);
    assert_eq!(labelled.items[0].name_any(), "t1");

    // The agent's write: status only, whatever else it sends.
    let running = api
        .patch_status(
            "t1",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"spec": {"port": 1}, "status": {"phase": "Running", "node": "node-a"}}),
            ),
        )
        .await
        .unwrap();
    assert_eq!(running.spec, created.spec, "a status write leaves spec");
    assert_eq!(running.phase(), TracePhase::Running);
    // A write of the object: spec only.
    let edited = api
        .patch(
            "t1",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"events": true}, "status": {"phase": "Failed"}})),
        )
        .await
        .unwrap();
    assert!(edited.spec.events);
    assert_eq!(
        edited.phase(),
        TracePhase::Running,
        "a spec write leaves status"
    );
    assert_eq!(edited.metadata.generation, Some(2));

    // Verdicts through the helpers, written by server-side apply as the agent may.
    let mut status = running.status.clone().unwrap();
    let mut v = netprobe::verdict::classify(
        &[],
        ("10.42.0.5".parse().unwrap(), 40000),
        &Default::default(),
        &Default::default(),
    );
    v.outcome = Outcome::DroppedByRule;
    for _ in 0..MAX_VERDICTS + 2 {
        status.push_verdict(v.clone());
    }
    let applied = api
        .patch_status(
            "t1",
            &PatchParams::apply("netprobe-agent").force(),
            &Patch::Apply(json!({
                "apiVersion": "netprobe.io/v1alpha1", "kind": "Trace",
                "status": status,
            })),
        )
        .await
        .unwrap();
    let got = applied.status.unwrap();
    assert_eq!(got.verdicts.len(), MAX_VERDICTS);
    assert_eq!(got.verdicts_dropped, 2);
    assert_eq!(got.verdicts[0].outcome, Outcome::DroppedByRule);
    assert_eq!(got.outcome, Some(Outcome::DroppedByRule));
    let rv = |t: &Trace| t.resource_version().unwrap().parse::<u64>().unwrap();
    assert!(rv(&api.get("t1").await.unwrap()) > rv(&edited));

    api.delete("t1", &DeleteParams::default()).await.unwrap();
    let e = api_error(api.get("t1").await.unwrap_err());
    assert_eq!((e.code, e.reason.as_str()), (404, "NotFound"));
    assert_eq!(e.message, "traces.netprobe.io \"t1\" not found");

    let events = tokio::time::timeout(Duration::from_secs(10), seen)
        .await
        .expect("the watcher saw the delete")
        .unwrap()
        .unwrap();
    let last_t1 = events
        .iter()
        .filter_map(|e| match e {
            watcher::Event::Apply(t) if t.name_any() == "t1" => Some(t),
            _ => None,
        })
        .next_back()
        .expect("t1 watched");
    assert_eq!(
        last_t1.status.as_ref().map(|s| s.verdicts.len()),
        Some(MAX_VERDICTS),
        "the watcher got the status"
    );
}

#[tokio::test]
async fn a_watch_resumes_from_its_resource_version_and_a_compacted_one_is_gone() {
    let kube = api_server();
    let client = admin(&kube).await;
    let api = Api::<Trace>::namespaced(client.clone(), "team-a");
    api.create(
        &PostParams::default(),
        &Trace::new("a", TraceSpec::port("web-0", 80)),
    )
    .await
    .unwrap();
    let listed = api.list(&ListParams::default()).await.unwrap();
    let from = listed.metadata.resource_version.unwrap();
    api.create(
        &PostParams::default(),
        &Trace::new("b", TraceSpec::port("web-0", 81)),
    )
    .await
    .unwrap();

    // One watch of a second from `from`, whole.
    let watch_from = || async {
        let wp = WatchParams::default().timeout(1);
        let events = api.watch(&wp, &from).await.unwrap();
        events.try_collect::<Vec<_>>().await.unwrap()
    };
    let got = watch_from().await;
    let names: Vec<String> = got
        .iter()
        .filter_map(|e| match e {
            WatchEvent::Added(t) => Some(t.name_any()),
            _ => None,
        })
        .collect();
    assert_eq!(names, ["b"], "only what changed after {from}");
    assert!(
        matches!(got.last(), Some(WatchEvent::Bookmark(_))),
        "a bookmark before the timeout: {got:?}"
    );

    kube.compact_custom();
    let got = watch_from().await;
    match got.as_slice() {
        [WatchEvent::Error(e)] => assert_eq!((e.code, e.reason.as_str()), (410, "Expired")),
        other => panic!("{other:?}"),
    }

    // kube's watcher relists after a 410 and misses nothing: its watches end every second,
    // the history is compacted between them.
    let mut w = std::pin::pin!(
        watcher(api.clone(), watcher::Config::default().timeout(1))
            .default_backoff()
            .applied_objects()
    );
    let first = tokio::time::timeout(Duration::from_secs(10), w.next())
        .await
        .unwrap();
    assert!(first.is_some());
    kube.compact_custom();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    api.create(
        &PostParams::default(),
        &Trace::new("c", TraceSpec::port("web-0", 82)),
    )
    .await
    .unwrap();
    let found_c = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(t) = w.next().await {
            if t.unwrap().name_any() == "c" {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(found_c, Ok(true));
    assert!(
        kube.requests()
            .iter()
            .filter(|s| s.method == "GET" && s.target.contains("watch=true"))
            .count()
            >= 3,
        "re-watched"
    );
}

#[tokio::test]
async fn rbac_decides_who_creates_where_and_who_writes_status() {
    let kube = api_server();
    kube.add_token("alice-token", "alice", &["system:authenticated"]);
    for verb in ["create", "get", "list", "watch", "delete"] {
        kube.allow("alice", verb, "netprobe.io", "traces", Some("team-a"));
    }
    kube.add_token(
        "agent-token",
        "system:serviceaccount:netprobe:netprobe-agent",
        &[],
    );
    kube.allow(
        "system:serviceaccount:netprobe:netprobe-agent",
        "patch",
        "netprobe.io",
        "traces/status",
        None,
    );
    let alice = client_of(&kube.kubeconfig_with("{token: alice-token}")).await;
    let agent = client_of(&kube.kubeconfig_with("{token: agent-token}")).await;
    let t = Trace::new("t", TraceSpec::port("web-0", 80));
    Api::<Trace>::namespaced(alice.clone(), "team-a")
        .create(&PostParams::default(), &t)
        .await
        .unwrap();
    let e = api_error(
        Api::<Trace>::namespaced(alice.clone(), "team-b")
            .create(&PostParams::default(), &t)
            .await
            .unwrap_err(),
    );
    assert_eq!(e.code, 403);
    assert_eq!(
        e.message,
        "traces.netprobe.io is forbidden: User \"alice\" cannot create resource \"traces\" in API group \"netprobe.io\" in the namespace \"team-b\""
    );
    let running = Patch::Merge(json!({"status": {"phase": "Running"}}));
    let e = api_error(
        Api::<Trace>::namespaced(alice.clone(), "team-a")
            .patch_status("t", &PatchParams::default(), &running)
            .await
            .unwrap_err(),
    );
    assert_eq!(e.code, 403, "{}", e.message);
    let done = Api::<Trace>::namespaced(agent, "team-a")
        .patch_status("t", &PatchParams::default(), &running)
        .await
        .unwrap();
    assert_eq!(done.phase(), TracePhase::Running);
}

// --- kubectl netprobe trace ---

/// `kubectl netprobe trace` as user bob (`--as bob`, the admin kubeconfig impersonating him),
/// who may use traces in team-a and nothing else.
fn cli(kube: &FakeKube, scratch: &Path, args: &[&str]) -> Child {
    let config = scratch.join("config");
    std::fs::write(&config, kube.kubeconfig()).unwrap();
    for verb in ["create", "get", "list", "watch", "delete"] {
        kube.allow("bob", verb, "netprobe.io", "traces", Some("team-a"));
    }
    let config = config.to_str().unwrap();
    let flags = ["-n", "team-a", "--as", "bob", "--kubeconfig", config];
    netprobe(scratch, &[&flags[..], args].concat())
}

/// `netprobe trace --cluster` with these flags only to find the API: no KUBECONFIG, HOME the
/// scratch directory.
fn netprobe(scratch: &Path, args: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_netprobe"))
        .args(["trace", "--cluster"])
        .args(args)
        .env_remove("KUBECONFIG")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env("HOME", scratch)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run netprobe")
}

/// The one Trace the client created, once it exists.
async fn created(kube: &FakeKube) -> Value {
    for _ in 0..200 {
        if let [one] = kube.custom_objects(TRACES).as_slice() {
            return one.clone();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("no Trace created: {:?}", kube.requests());
}

/// What the node's agent does: marks it Running, then writes `verdicts` and ends it.
async fn answer(api: &Api<Trace>, name: &str, outcomes: &[Outcome]) {
    let mut status = TraceStatus {
        phase: TracePhase::Running,
        node: Some("node-a".into()),
        ..TraceStatus::default()
    };
    let write = |s: &TraceStatus| Patch::Merge(json!({"status": s}));
    api.patch_status(name, &PatchParams::default(), &write(&status))
        .await
        .unwrap();
    let mut summary = Summary::new();
    for o in outcomes {
        let mut v = netprobe::verdict::classify(
            &[],
            ("10.42.0.5".parse().unwrap(), 40000),
            &Default::default(),
            &Default::default(),
        );
        v.outcome = *o;
        v.headline = o.headline().into();
        summary.attempts += 1;
        summary.failed += u64::from(o.is_failure());
        status.push_verdict(v);
        api.patch_status(name, &PatchParams::default(), &write(&status))
            .await
            .unwrap();
    }
    status.phase = TracePhase::Completed;
    status.summary = Some(summary);
    api.patch_status(name, &PatchParams::default(), &write(&status))
        .await
        .unwrap();
}

async fn exited(mut child: Child) -> (i32, String, String) {
    for _ in 0..400 {
        if child.try_wait().unwrap().is_some() {
            let out = child.wait_with_output().unwrap();
            return (
                out.status.code().unwrap_or(-1),
                String::from_utf8_lossy(&out.stdout).into_owned(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = child.kill();
    panic!("netprobe did not exit: {:?}", child.wait_with_output());
}

#[tokio::test]
async fn kubectl_netprobe_trace_creates_follows_and_deletes_the_object() {
    let scratch = Scratch::new("trace-object");
    let kube = api_server();
    let api = Api::<Trace>::namespaced(admin(&kube).await, "team-a");

    let child = cli(
        &kube,
        &scratch.0,
        &[
            "--pod",
            "web-0",
            "--port",
            "8080",
            "-o",
            "json",
            "--duration",
            "20s",
        ],
    );
    let obj = created(&kube).await;
    let name = obj["metadata"]["name"].as_str().unwrap().to_string();
    assert!(name.starts_with("web-0-"), "{name}");
    assert_eq!(
        obj["spec"],
        json!({"pod": "web-0", "port": 8080, "duration": "20s", "ttlSecondsAfterFinished": 3600})
    );
    answer(&api, &name, &[Outcome::Connected, Outcome::DroppedByRule]).await;
    let (code, out, err) = exited(child).await;
    assert_eq!(code, 1, "a diagnosed failure: {err}");
    let lines: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let kinds: Vec<(&str, &str)> = lines
        .iter()
        .map(|l| {
            (
                l["schema"].as_str().unwrap(),
                l["outcome"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(
        kinds,
        [
            ("netprobe.verdict/v1", "connected"),
            ("netprobe.verdict/v1", "dropped_by_rule"),
            ("netprobe.summary/v1", "")
        ],
        "{out}"
    );
    assert!(err.contains("Running on node node-a"), "{err}");
    assert!(kube.custom_objects(TRACES).is_empty(), "deleted when done");
    // Bob's requests (the CLI's, impersonated): the traces API of team-a, nothing else (no pod,
    // no port-forward, no token request).
    let bobs: Vec<String> = kube
        .requests()
        .into_iter()
        .filter(|s| s.impersonate.as_deref() == Some("bob"))
        .map(|s| format!("{} {}", s.method, s.target.split('?').next().unwrap()))
        .collect();
    assert!(bobs.contains(&"POST /apis/netprobe.io/v1alpha1/namespaces/team-a/traces".to_string()));
    assert!(bobs.contains(&format!(
        "DELETE /apis/netprobe.io/v1alpha1/namespaces/team-a/traces/{name}"
    )));
    for b in &bobs {
        assert!(
            b.contains(" /apis/netprobe.io/v1alpha1/namespaces/team-a/traces"),
            "{bobs:?}"
        );
    }

    // Text, --keep, all connected: exit 0 and the object stays.
    let child = cli(
        &kube,
        &scratch.0,
        &["--pod", "web-0", "--port", "8080", "--keep"],
    );
    let name = created(&kube).await["metadata"]["name"]
        .as_str()
        .unwrap()
        .to_string();
    answer(&api, &name, &[Outcome::Connected]).await;
    let (code, out, err) = exited(child).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("connected"), "{out}");
    assert!(err.contains(&format!("kept trace team-a/{name}")), "{err}");
    assert_eq!(api.get(&name).await.unwrap().phase(), TracePhase::Completed);
    api.delete(&name, &DeleteParams::default()).await.unwrap();
}

#[tokio::test]
async fn a_failed_trace_is_an_error_and_ctrl_c_deletes_the_object() {
    let scratch = Scratch::new("trace-object-fail");
    let kube = api_server();
    let api = Api::<Trace>::namespaced(admin(&kube).await, "team-a");

    let child = cli(&kube, &scratch.0, &["--pod", "web-0", "--dns"]);
    let obj = created(&kube).await;
    assert_eq!(obj["spec"]["dns"], true);
    assert!(obj["spec"].get("port").is_none());
    let name = obj["metadata"]["name"].as_str().unwrap();
    let failed =
        json!({"status": {"phase": "Failed", "message": "pod team-a/web-0 does not exist"}});
    api.patch_status(name, &PatchParams::default(), &Patch::Merge(failed))
        .await
        .unwrap();
    let (code, _, err) = exited(child).await;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("pod team-a/web-0 does not exist"), "{err}");
    assert!(kube.custom_objects(TRACES).is_empty(), "deleted");

    let child = cli(&kube, &scratch.0, &["--pod", "web-0", "--port", "80"]);
    let obj = created(&kube).await;
    let name = obj["metadata"]["name"].as_str().unwrap();
    let running = json!({"status": {"phase": "Running", "node": "node-a"}});
    api.patch_status(name, &PatchParams::default(), &Patch::Merge(running))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    // SAFETY: signalling our own child.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGINT) }, 0);
    let (code, _, err) = exited(child).await;
    assert_eq!(code, 3, "no attempt seen before Ctrl-C: {err}");
    assert!(
        kube.custom_objects(TRACES).is_empty(),
        "Ctrl-C deletes it: {err}"
    );

    // A duration a Trace cannot have is refused before anything is created.
    let (code, _, err) = exited(cli(
        &kube,
        &scratch.0,
        &["--pod", "web-0", "--port", "80", "--duration", "11m"],
    ))
    .await;
    assert_eq!(code, 2);
    assert!(err.contains("at most 10m"), "{err}");
}

#[tokio::test]
async fn the_context_chooses_server_and_namespace_and_request_timeout_bounds_the_create() {
    let scratch = Scratch::new("trace-object-context");
    let (a, b) = (api_server(), api_server());
    let config = scratch.0.join("config");
    std::fs::write(
        &config,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: a\n  cluster: {{server: 'http://127.0.0.1:{}'}}\n- name: b\n  cluster: {{server: 'http://127.0.0.1:{}'}}\ncontexts:\n- name: a\n  context: {{cluster: a, user: admin}}\n- name: b\n  context: {{cluster: b, user: admin, namespace: team-b}}\ncurrent-context: a\nusers:\n- name: admin\n  user: {{token: {}}}\n",
            a.port,
            b.port,
            netprobe_lab::kubeapi::ADMIN_TOKEN
        ),
    )
    .unwrap();
    let config = config.to_str().unwrap();
    let trace = ["--pod", "web-0", "--port", "80", "--kubeconfig", config];

    let child = netprobe(&scratch.0, &[&trace[..], &["--context", "b"]].concat());
    let obj = created(&b).await;
    assert_eq!(
        obj["metadata"]["namespace"], "team-b",
        "the context's namespace"
    );
    let name = obj["metadata"]["name"].as_str().unwrap();
    let failed = json!({"status": {"phase": "Failed", "message": "no such pod"}});
    Api::<Trace>::namespaced(admin(&b).await, "team-b")
        .patch_status(name, &PatchParams::default(), &Patch::Merge(failed))
        .await
        .unwrap();
    let (code, _, err) = exited(child).await;
    assert_eq!(code, 2, "{err}");
    assert!(a.requests().is_empty(), "context b never asks server a");

    a.set_stalled(true);
    let started = std::time::Instant::now();
    let (code, _, err) = exited(netprobe(
        &scratch.0,
        &[&trace[..], &["--request-timeout", "1s"]].concat(),
    ))
    .await;
    a.set_stalled(false);
    assert_eq!(code, 2, "{err}");
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(
        err.contains("creating a Trace in namespace default")
            && err.contains("no answer within --request-timeout 1s"),
        "{err}"
    );
}

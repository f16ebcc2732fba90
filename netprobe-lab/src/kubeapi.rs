//! A small local HTTP server speaking enough of the Kubernetes API for tests: list and watch
//! (chunked streams of `{"type","object"}` lines) of pods (with `spec.nodeName` field selector),
//! services and EndpointSlices, JSON shaped like the real API. The client under test is the real
//! kube-rs path; this is the only stand-in the project allows.

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Write},
    net::{TcpListener, TcpStream},
    sync::{Arc, Condvar, Mutex},
    time::{Duration, Instant},
};

use serde_json::{Value, json};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Pod,
    Service,
    EndpointSlice,
}

impl Kind {
    fn list_meta(self) -> (&'static str, &'static str) {
        match self {
            Self::Pod => ("v1", "PodList"),
            Self::Service => ("v1", "ServiceList"),
            Self::EndpointSlice => ("discovery.k8s.io/v1", "EndpointSliceList"),
        }
    }

    fn of_path(path: &str) -> Option<Self> {
        let p = path.trim_end_matches('/');
        if p.ends_with("/pods") {
            Some(Self::Pod)
        } else if p.ends_with("/services") {
            Some(Self::Service)
        } else if p.ends_with("/endpointslices") {
            Some(Self::EndpointSlice)
        } else {
            None
        }
    }
}

#[derive(Default)]
struct State {
    rv: u64,
    objects: BTreeMap<(Kind, String, String), Value>,
    /// (resourceVersion, kind, type, object) in order.
    log: Vec<(u64, Kind, &'static str, Value)>,
    /// While down, every request is answered 503 and watches end.
    down: bool,
    /// Objects POSTed or PATCHed (Kubernetes Events from the agent).
    posted: Vec<Value>,
}

#[derive(Clone)]
pub struct FakeKube {
    shared: Arc<(Mutex<State>, Condvar)>,
    pub port: u16,
}

fn key_of(kind: Kind, obj: &Value) -> (Kind, String, String) {
    let m = &obj["metadata"];
    (
        kind,
        m["namespace"].as_str().unwrap_or_default().to_string(),
        m["name"].as_str().unwrap_or_default().to_string(),
    )
}

impl FakeKube {
    /// Serves on `listener` (create it inside the namespace the client runs in).
    pub fn start(listener: TcpListener) -> Self {
        let port = listener.local_addr().expect("bound").port();
        let me = Self {
            shared: Arc::new((Mutex::new(State::default()), Condvar::new())),
            port,
        };
        let server = me.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let s = server.clone();
                std::thread::spawn(move || {
                    let _ = s.handle(conn);
                });
            }
        });
        me
    }

    fn change(&self, kind: Kind, ty: &'static str, mut obj: Value) {
        let (lock, cv) = &*self.shared;
        let mut st = lock.lock().unwrap();
        st.rv += 1;
        let rv = st.rv;
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        let key = key_of(kind, &obj);
        if ty == "DELETED" {
            st.objects.remove(&key);
        } else {
            st.objects.insert(key, obj.clone());
        }
        st.log.push((rv, kind, ty, obj));
        cv.notify_all();
    }

    /// Creates or updates an object.
    pub fn apply(&self, kind: Kind, obj: Value) {
        let exists = self
            .shared
            .0
            .lock()
            .unwrap()
            .objects
            .contains_key(&key_of(kind, &obj));
        self.change(kind, if exists { "MODIFIED" } else { "ADDED" }, obj);
    }

    pub fn delete(&self, kind: Kind, namespace: &str, name: &str) {
        let obj = self
            .shared
            .0
            .lock()
            .unwrap()
            .objects
            .get(&(kind, namespace.into(), name.into()))
            .cloned();
        if let Some(obj) = obj {
            self.change(kind, "DELETED", obj);
        }
    }

    /// Simulates the API server going away (503s, watches cut) and coming back.
    pub fn set_down(&self, down: bool) {
        self.shared.0.lock().unwrap().down = down;
        self.shared.1.notify_all();
    }

    /// What clients created (events.k8s.io Events).
    pub fn posted(&self) -> Vec<Value> {
        self.shared.0.lock().unwrap().posted.clone()
    }

    /// A kubeconfig pointing at this server (plain HTTP on loopback, no credentials).
    pub fn kubeconfig(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: lab\n  cluster:\n    server: http://127.0.0.1:{}\ncontexts:\n- name: lab\n  context:\n    cluster: lab\n    user: lab\ncurrent-context: lab\nusers:\n- name: lab\n  user: {{}}\n",
            self.port
        )
    }

    fn handle(&self, conn: TcpStream) -> std::io::Result<()> {
        let mut reader = BufReader::new(conn.try_clone()?);
        let mut out = conn;
        loop {
            let mut request = String::new();
            if reader.read_line(&mut request)? == 0 {
                return Ok(());
            }
            let mut length = 0usize;
            loop {
                let mut h = String::new();
                if reader.read_line(&mut h)? == 0 || h == "\r\n" || h == "\n" {
                    break;
                }
                if let Some((k, v)) = h.split_once(':')
                    && k.eq_ignore_ascii_case("content-length")
                {
                    length = v.trim().parse().unwrap_or(0);
                }
            }
            let mut body = vec![0u8; length];
            std::io::Read::read_exact(&mut reader, &mut body)?;
            let method = request
                .split_whitespace()
                .next()
                .unwrap_or("GET")
                .to_string();
            if method == "POST" || method == "PATCH" {
                let mut obj: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                {
                    let mut st = self.shared.0.lock().unwrap();
                    st.rv += 1;
                    if obj.is_object() {
                        obj["metadata"]["resourceVersion"] = json!(st.rv.to_string());
                    }
                    st.posted.push(obj.clone());
                }
                respond(&mut out, if method == "POST" { 201 } else { 200 }, &obj)?;
                continue;
            }
            let target = request.split_whitespace().nth(1).unwrap_or("/").to_string();
            let (path, query) = target.split_once('?').unwrap_or((&target, ""));
            let params: BTreeMap<String, String> = query
                .split('&')
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k.to_string(), percent_decode(v)))
                .collect();
            if self.shared.0.lock().unwrap().down {
                respond(
                    &mut out,
                    503,
                    &json!({"kind":"Status","apiVersion":"v1","status":"Failure","code":503,"message":"down"}),
                )?;
                continue;
            }
            let Some(kind) = Kind::of_path(path) else {
                respond(
                    &mut out,
                    404,
                    &json!({"kind":"Status","apiVersion":"v1","status":"Failure","code":404,"reason":"NotFound"}),
                )?;
                continue;
            };
            let node = params
                .get("fieldSelector")
                .and_then(|f| f.strip_prefix("spec.nodeName="))
                .map(str::to_string);
            let matches = |k: Kind, o: &Value| {
                k == kind
                    && node
                        .as_ref()
                        .is_none_or(|n| o["spec"]["nodeName"].as_str() == Some(n))
            };
            if params.get("watch").map(String::as_str) == Some("true")
                || params.get("watch").map(String::as_str) == Some("1")
            {
                let from: u64 = params
                    .get("resourceVersion")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                let timeout = params
                    .get("timeoutSeconds")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(30u64)
                    .min(30);
                return self.watch(out, from, Duration::from_secs(timeout), &matches);
            }
            let st = self.shared.0.lock().unwrap();
            let items: Vec<Value> = st
                .objects
                .iter()
                .filter(|((k, _, _), o)| matches(*k, o))
                .map(|(_, o)| o.clone())
                .collect();
            let (api, list_kind) = kind.list_meta();
            let body = json!({"apiVersion": api, "kind": list_kind, "metadata": {"resourceVersion": st.rv.to_string()}, "items": items});
            drop(st);
            respond(&mut out, 200, &body)?;
        }
    }

    fn watch(
        &self,
        mut out: TcpStream,
        from: u64,
        timeout: Duration,
        matches: &dyn Fn(Kind, &Value) -> bool,
    ) -> std::io::Result<()> {
        write!(
            out,
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        )?;
        out.flush()?;
        let deadline = Instant::now() + timeout;
        let mut sent = from;
        let (lock, cv) = &*self.shared;
        loop {
            let mut st = lock.lock().unwrap();
            if st.down {
                return Ok(()); // cut the stream without the final chunk, like a dying server
            }
            let pending: Vec<String> = st
                .log
                .iter()
                .filter(|(rv, k, _, o)| *rv > sent && matches(*k, o))
                .map(|(_, _, ty, o)| json!({"type": ty, "object": o}).to_string())
                .collect();
            let latest = st.rv;
            if pending.is_empty() {
                let now = Instant::now();
                if now >= deadline {
                    drop(st);
                    write!(out, "0\r\n\r\n")?;
                    return out.flush();
                }
                st = cv
                    .wait_timeout(st, (deadline - now).min(Duration::from_millis(500)))
                    .unwrap()
                    .0;
                drop(st);
                continue;
            }
            drop(st);
            sent = latest;
            for line in pending {
                let chunk = format!("{line}\n");
                write!(out, "{:x}\r\n{chunk}\r\n", chunk.len())?;
            }
            out.flush()?;
        }
    }
}

fn respond(out: &mut TcpStream, code: u16, body: &Value) -> std::io::Result<()> {
    let body = body.to_string();
    let reason = match code {
        200 => "OK",
        201 => "Created",
        404 => "Not Found",
        _ => "Service Unavailable",
    };
    write!(
        out,
        "HTTP/1.1 {code} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    out.flush()
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(if b[i] == b'+' { b' ' } else { b[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A Pod as the API returns it.
pub fn pod(
    namespace: &str,
    name: &str,
    node: &str,
    ip: &str,
    containers: &[(&str, &str, &[u16])],
) -> Value {
    let uid = format!(
        "{:08x}-0000-4000-8000-{:012x}",
        name.len() * 7919,
        name.bytes().map(u64::from).sum::<u64>()
    );
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "uid": uid},
        "spec": {
            "nodeName": node,
            "containers": containers.iter().map(|(c, _, ports)| json!({
                "name": c,
                "image": "example",
                "ports": ports.iter().map(|p| json!({"containerPort": p, "protocol": "TCP"})).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
        },
        "status": {
            "phase": "Running",
            "podIP": ip,
            "podIPs": [{"ip": ip}],
            "containerStatuses": containers.iter().map(|(c, id, _)| json!({
                "name": c, "containerID": format!("containerd://{id}"), "ready": true, "restartCount": 0,
                "image": "example", "imageID": "example",
            })).collect::<Vec<_>>(),
        },
    })
}

/// A ClusterIP Service.
pub fn service(namespace: &str, name: &str, cluster_ip: &str, ports: &[(&str, u16, u16)]) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "type": "ClusterIP",
            "clusterIP": cluster_ip,
            "clusterIPs": [cluster_ip],
            "ports": ports.iter().map(|(n, p, t)| json!({"name": n, "port": p, "targetPort": t, "protocol": "TCP"})).collect::<Vec<_>>(),
        },
    })
}

/// An EndpointSlice of a Service with the given (ip, pod) endpoints.
pub fn endpoint_slice(
    namespace: &str,
    service: &str,
    endpoints: &[(&str, &str)],
    ports: &[(&str, u16)],
) -> Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": format!("{service}-abcde"), "namespace": namespace, "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
        "endpoints": endpoints.iter().map(|(ip, pod)| json!({
            "addresses": [ip], "conditions": {"ready": true},
            "targetRef": {"kind": "Pod", "namespace": namespace, "name": pod},
        })).collect::<Vec<_>>(),
        "ports": ports.iter().map(|(n, p)| json!({"name": n, "port": p, "protocol": "TCP"})).collect::<Vec<_>>(),
    })
}

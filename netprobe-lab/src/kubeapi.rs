//! A small local HTTP server speaking enough of the Kubernetes API for tests: list and watch
//! (chunked streams of `{"type","object"}` lines) of pods (with `spec.nodeName` field selector),
//! services and EndpointSlices, JSON shaped like the real API; Events (module `events`: created,
//! patched, listed with field selectors in both APIs' shapes). The client under test is the real
//! kube-rs path; this is the only stand-in the project allows.

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Write},
    net::{TcpListener, TcpStream},
    sync::{Arc, Condvar, Mutex},
    time::{Duration, Instant},
};

use serde_json::{Value, json};

mod custom;
mod events;

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
    /// (namespace, pod) → how to reach its ports (port-forward targets).
    forward: BTreeMap<(String, String), Forward>,
    /// Port-forwards opened: (namespace, pod, port).
    forwarded: Vec<(String, String, u16)>,
    /// The API's authentication and authorisation (TokenReview, SubjectAccessReview,
    /// TokenRequest).
    auth: Auth,
    /// Every request, in order (what kubectl-style flags changed on the wire).
    requests: Vec<Seen>,
    /// While stalled, requests are read and never answered (a hung API server).
    stalled: bool,
    /// Events (events.k8s.io/v1, also listed as core/v1).
    events: events::Store,
    /// Custom resources and their objects.
    custom: custom::Store,
}

/// A request as the server saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Seen {
    pub method: String,
    /// The path and query.
    pub target: String,
    /// The `Impersonate-User` header (kubectl `--as`).
    pub impersonate: Option<String>,
    /// When it arrived.
    pub at: Instant,
}

/// Who a credential is.
#[derive(Clone, Debug)]
struct Identity {
    user: String,
    groups: Vec<String>,
    audiences: Vec<String>,
}

impl Identity {
    /// `user` in `groups`, for the API server's audience.
    fn of(user: &str, groups: &[&str]) -> Self {
        Self {
            user: user.into(),
            groups: groups.iter().map(|g| g.to_string()).collect(),
            audiences: vec![API_AUDIENCE.into()],
        }
    }
}

/// One RBAC grant: `subject` (a user or a group) may `verb` `resource` of API `group` in
/// `namespace` (None: every namespace and the cluster scope, as a ClusterRoleBinding).
#[derive(Clone, Debug)]
struct Grant {
    subject: String,
    verb: String,
    group: String,
    resource: String,
    namespace: Option<String>,
    /// Only this object (`resourceNames`), or all.
    name: Option<String>,
}

#[derive(Default)]
struct Auth {
    /// Bearer token → who.
    tokens: BTreeMap<String, Identity>,
    /// `Basic` credentials (base64 of user:password) → who: a kubeconfig without a token (as
    /// client certificates are, which plain HTTP cannot carry).
    basic: BTreeMap<String, Identity>,
    grants: Vec<Grant>,
    /// Counted requests: TokenReviews, SubjectAccessReviews, TokenRequests.
    token_reviews: usize,
    access_reviews: usize,
    /// The TokenRequest bodies granted, in order.
    token_requests: Vec<Value>,
}

/// The audience of tokens the API server itself accepts.
pub const API_AUDIENCE: &str = "https://kubernetes.default.svc.cluster.local";
/// The token of [`FakeKube::kubeconfig`]: a cluster admin (group `system:masters`).
pub const ADMIN_TOKEN: &str = "lab-admin-token";

impl Auth {
    fn lab() -> Self {
        let mut a = Self::default();
        a.tokens.insert(
            ADMIN_TOKEN.into(),
            Identity {
                user: "lab-admin".into(),
                groups: vec!["system:masters".into(), "system:authenticated".into()],
                audiences: vec![API_AUDIENCE.into()],
            },
        );
        a
    }

    /// Who a request with these headers acts as (None: anonymous, an unknown credential, or an
    /// impersonation the credential may not make): the `Impersonate-User` when its sender may
    /// `impersonate` `users`, as the API server does.
    fn requester(&self, headers: &BTreeMap<String, String>) -> Option<Identity> {
        let sender = self.sender(headers)?;
        let Some(user) = headers.get("impersonate-user") else {
            return Some(sender);
        };
        self.may(&sender, "impersonate", "", "users", "")
            .then(|| Identity::of(user, &["system:authenticated"]))
    }

    /// Who sent a request with these headers, by its credential.
    fn sender(&self, headers: &BTreeMap<String, String>) -> Option<Identity> {
        let (scheme, cred) = headers.get("authorization")?.split_once(' ')?;
        match scheme {
            "Bearer" => self
                .tokens
                .get(cred.trim())
                .filter(|i| i.audiences.iter().any(|a| a == API_AUDIENCE))
                .cloned(),
            "Basic" => self.basic.get(cred.trim()).cloned(),
            _ => None,
        }
    }

    fn may(&self, who: &Identity, verb: &str, group: &str, resource: &str, ns: &str) -> bool {
        self.may_named(who, verb, group, resource, ns, "")
    }

    /// [`Self::may`] for the object `name` ("" = none named: only unrestricted grants count).
    fn may_named(
        &self,
        who: &Identity,
        verb: &str,
        group: &str,
        resource: &str,
        ns: &str,
        name: &str,
    ) -> bool {
        let subjects = std::iter::once(&who.user).chain(&who.groups);
        if who.groups.iter().any(|g| g == "system:masters") {
            return true;
        }
        let subjects: Vec<&String> = subjects.collect();
        self.grants.iter().any(|g| {
            subjects.contains(&&g.subject)
                && (g.verb == verb || g.verb == "*")
                && g.group == group
                && g.resource == resource
                && g.namespace.as_ref().is_none_or(|n| n == ns)
                && g.name.as_ref().is_none_or(|n| n == name)
        })
    }
}

/// Opens a connection to a pod's port (for the stand-in's `pods/portforward`).
pub type Forward = Arc<dyn Fn(u16) -> std::io::Result<TcpStream> + Send + Sync>;

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
            shared: Arc::new((
                Mutex::new(State {
                    auth: Auth::lab(),
                    ..State::default()
                }),
                Condvar::new(),
            )),
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

    /// Makes `pods/portforward` of namespace/pod reach what `connect` opens (the kubelet's part).
    pub fn port_forward(
        &self,
        namespace: &str,
        pod: &str,
        connect: impl Fn(u16) -> std::io::Result<TcpStream> + Send + Sync + 'static,
    ) {
        self.shared
            .0
            .lock()
            .unwrap()
            .forward
            .insert((namespace.into(), pod.into()), Arc::new(connect));
    }

    /// Port-forwards clients opened: (namespace, pod, port).
    pub fn forwarded(&self) -> Vec<(String, String, u16)> {
        self.shared.0.lock().unwrap().forwarded.clone()
    }

    /// A kubeconfig pointing at this server (plain HTTP on loopback) with the cluster
    /// admin's token ([`ADMIN_TOKEN`]).
    pub fn kubeconfig(&self) -> String {
        self.kubeconfig_with(&format!("{{token: {ADMIN_TOKEN}}}"))
    }

    /// A kubeconfig whose user is `user` (YAML flow mapping, e.g. `{token: abc}`).
    pub fn kubeconfig_with(&self, user: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: lab\n  cluster:\n    server: http://127.0.0.1:{}\ncontexts:\n- name: lab\n  context:\n    cluster: lab\n    user: lab\ncurrent-context: lab\nusers:\n- name: lab\n  user: {user}\n",
            self.port
        )
    }

    /// A kubeconfig of `user` authenticated without a token (basic credentials stand for the
    /// client certificates of a real cluster): `user` is known to the server from now on.
    pub fn kubeconfig_without_token(&self, user: &str, groups: &[&str]) -> String {
        let password = format!("{user}-password");
        let identity = Identity::of(user, groups);
        let cred = base64(format!("{user}:{password}").as_bytes());
        self.shared
            .0
            .lock()
            .unwrap()
            .auth
            .basic
            .insert(cred, identity);
        self.kubeconfig_with(&format!("{{username: {user}, password: {password}}}"))
    }

    /// Makes `token` (for the API server's audience) the credential of `user` in `groups`.
    pub fn add_token(&self, token: &str, user: &str, groups: &[&str]) {
        let identity = Identity::of(user, groups);
        self.shared
            .0
            .lock()
            .unwrap()
            .auth
            .tokens
            .insert(token.into(), identity);
    }

    /// RBAC: `subject` (user or group) may `verb` `resource` of API `group` in `namespace`
    /// (a RoleBinding), or everywhere with `None` (a ClusterRoleBinding). A TokenRequest is
    /// `create` on `serviceaccounts/token` of group "".
    pub fn allow(
        &self,
        subject: &str,
        verb: &str,
        group: &str,
        resource: &str,
        namespace: Option<&str>,
    ) {
        self.shared.0.lock().unwrap().auth.grants.push(Grant {
            subject: subject.into(),
            verb: verb.into(),
            group: group.into(),
            resource: resource.into(),
            namespace: namespace.map(str::to_string),
            name: None,
        });
    }

    /// Restricts the last [`Self::allow`] to the object `name` (a rule's `resourceNames`).
    pub fn only_named(&self, name: &str) {
        let mut st = self.shared.0.lock().unwrap();
        if let Some(g) = st.auth.grants.last_mut() {
            g.name = Some(name.into());
        }
    }

    /// (TokenReviews, SubjectAccessReviews) answered so far.
    pub fn reviews(&self) -> (usize, usize) {
        let st = self.shared.0.lock().unwrap();
        (st.auth.token_reviews, st.auth.access_reviews)
    }

    /// The TokenRequests granted (their bodies: `spec.audiences`, `spec.expirationSeconds`).
    pub fn token_requests(&self) -> Vec<Value> {
        self.shared.0.lock().unwrap().auth.token_requests.clone()
    }

    /// Every request received so far, in order.
    pub fn requests(&self) -> Vec<Seen> {
        self.shared.0.lock().unwrap().requests.clone()
    }

    /// Stalls the server (requests read, never answered) or lets it answer again.
    pub fn set_stalled(&self, stalled: bool) {
        self.shared.0.lock().unwrap().stalled = stalled;
        self.shared.1.notify_all();
    }

    /// Records a request, then holds it while the server is stalled.
    fn seen(&self, method: &str, target: &str, headers: &BTreeMap<String, String>) {
        let (lock, cv) = &*self.shared;
        let mut st = lock.lock().unwrap();
        st.requests.push(Seen {
            method: method.into(),
            target: target.into(),
            impersonate: headers.get("impersonate-user").cloned(),
            at: Instant::now(),
        });
        while st.stalled {
            st = cv.wait(st).unwrap();
        }
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
            let mut headers = BTreeMap::new();
            loop {
                let mut h = String::new();
                if reader.read_line(&mut h)? == 0 || h == "\r\n" || h == "\n" {
                    break;
                }
                if let Some((k, v)) = h.split_once(':') {
                    headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
                    if k.eq_ignore_ascii_case("content-length") {
                        length = v.trim().parse().unwrap_or(0);
                    }
                }
            }
            let mut body = vec![0u8; length];
            std::io::Read::read_exact(&mut reader, &mut body)?;
            let method = request
                .split_whitespace()
                .next()
                .unwrap_or("GET")
                .to_string();
            let target = request.split_whitespace().nth(1).unwrap_or("/").to_string();
            self.seen(&method, &target, &headers);
            if let Some((code, answer)) = self.events_request(&method, &target, &headers, &body) {
                respond(&mut out, code, &answer)?;
                continue;
            }
            if let Some(served) = self.custom_request(&method, &target, &headers, &body, &mut out) {
                if served? {
                    continue;
                }
                return Ok(());
            }
            if method == "POST"
                && let Some((code, answer)) = self.authn_authz(&target, &headers, &body)
            {
                respond(&mut out, code, &answer)?;
                continue;
            }
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
            if let Some(rest) = path.strip_suffix("/portforward") {
                let (ns, pod) = namespace_and_name(rest);
                let port: u16 = params
                    .get("ports")
                    .and_then(|p| p.split(',').next()?.parse().ok())
                    .unwrap_or(0);
                return self.port_forward_session(reader, out, &headers, &ns, &pod, port);
            }
            // GET of one object: .../namespaces/NS/pods/NAME
            if Kind::of_path(path).is_none()
                && let Some((coll, name)) = path.rsplit_once('/')
                && let Some(kind) = Kind::of_path(coll)
            {
                let (ns, _) = namespace_and_name(&format!("{coll}/x"));
                let obj = self
                    .shared
                    .0
                    .lock()
                    .unwrap()
                    .objects
                    .get(&(kind, ns, name.to_string()))
                    .cloned();
                match obj {
                    Some(o) => respond(&mut out, 200, &o)?,
                    None => respond(
                        &mut out,
                        404,
                        &json!({"kind":"Status","apiVersion":"v1","status":"Failure","code":404,"reason":"NotFound","message":format!("{name} not found")}),
                    )?,
                }
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
            let label = params
                .get("labelSelector")
                .and_then(|l| l.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()));
            let namespace = path
                .split_once("/namespaces/")
                .map(|(_, r)| r.split('/').next().unwrap_or_default().to_string());
            let matches = |k: Kind, o: &Value| {
                k == kind
                    && node
                        .as_ref()
                        .is_none_or(|n| o["spec"]["nodeName"].as_str() == Some(n))
                    && label
                        .as_ref()
                        .is_none_or(|(k, v)| o["metadata"]["labels"][k].as_str() == Some(v))
                    && namespace
                        .as_ref()
                        .is_none_or(|n| o["metadata"]["namespace"].as_str() == Some(n))
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

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind":"Status","apiVersion":"v1","status":"Failure","code":code,"reason":reason,"message":message})
}

impl FakeKube {
    /// TokenReview, SubjectAccessReview and TokenRequest (None: not one of them).
    fn authn_authz(
        &self,
        target: &str,
        headers: &BTreeMap<String, String>,
        body: &[u8],
    ) -> Option<(u16, Value)> {
        let path = target.split('?').next().unwrap_or_default();
        let review: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
        let mut st = self.shared.0.lock().unwrap();
        if st.down && (path.contains(".k8s.io/") || path.ends_with("/token")) {
            return Some((503, status(503, "ServiceUnavailable", "down")));
        }
        if path == "/apis/authentication.k8s.io/v1/tokenreviews" {
            st.auth.token_reviews += 1;
            return Some((201, token_review(&st.auth, review)));
        }
        if path == "/apis/authorization.k8s.io/v1/subjectaccessreviews" {
            st.auth.access_reviews += 1;
            return Some((201, access_review(&st.auth, review)));
        }
        let rest = path.strip_prefix("/api/v1/namespaces/")?;
        let (ns, rest) = rest.split_once("/serviceaccounts/")?;
        let name = rest.strip_suffix("/token")?;
        let who = st.auth.requester(headers);
        let allowed = who
            .as_ref()
            .is_some_and(|w| st.auth.may(w, "create", "", "serviceaccounts/token", ns));
        if !allowed {
            let user = who.map_or("system:anonymous".into(), |w| w.user);
            let message = format!(
                "serviceaccounts \"{name}\" is forbidden: User \"{user}\" cannot create resource \"serviceaccounts/token\" in API group \"\" in the namespace \"{ns}\""
            );
            return Some((403, status(403, "Forbidden", &message)));
        }
        Some((201, mint_token(&mut st.auth, ns, name, review)))
    }
}

fn token_review(auth: &Auth, mut review: Value) -> Value {
    let token = review["spec"]["token"].as_str().unwrap_or_default();
    let wanted: Vec<String> = match review["spec"]["audiences"].as_array() {
        Some(a) if !a.is_empty() => a
            .iter()
            .filter_map(|v| Some(v.as_str()?.to_string()))
            .collect(),
        _ => vec![API_AUDIENCE.into()],
    };
    review["status"] = match auth.tokens.get(token) {
        Some(id) if id.audiences.iter().any(|a| wanted.contains(a)) => json!({
            "authenticated": true,
            "user": {"username": id.user, "groups": id.groups},
            "audiences": id.audiences.iter().filter(|a| wanted.contains(a)).collect::<Vec<_>>(),
        }),
        Some(_) => json!({"authenticated": false, "error": "token audiences do not match"}),
        None => json!({"authenticated": false, "error": "invalid bearer token"}),
    };
    review
}

fn access_review(auth: &Auth, mut review: Value) -> Value {
    let spec = &review["spec"];
    let who = Identity {
        user: spec["user"].as_str().unwrap_or_default().into(),
        groups: spec["groups"]
            .as_array()
            .map(|g| {
                g.iter()
                    .filter_map(|v| Some(v.as_str()?.to_string()))
                    .collect()
            })
            .unwrap_or_default(),
        audiences: Vec::new(),
    };
    let ra = &spec["resourceAttributes"];
    let field = |k: &str| ra[k].as_str().unwrap_or_default();
    let allowed = auth.may_named(
        &who,
        field("verb"),
        field("group"),
        field("resource"),
        field("namespace"),
        field("name"),
    );
    review["status"] = json!({"allowed": allowed});
    review
}

fn mint_token(auth: &mut Auth, ns: &str, name: &str, mut request: Value) -> Value {
    let token = format!("sa-token-{ns}-{name}-{}", auth.token_requests.len() + 1);
    let audiences: Vec<String> = request["spec"]["audiences"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| Some(v.as_str()?.to_string()))
                .collect()
        })
        .filter(|a: &Vec<String>| !a.is_empty())
        .unwrap_or_else(|| vec![API_AUDIENCE.into()]);
    auth.token_requests.push(request.clone());
    auth.tokens.insert(
        token.clone(),
        Identity {
            user: format!("system:serviceaccount:{ns}:{name}"),
            groups: vec![
                "system:serviceaccounts".into(),
                format!("system:serviceaccounts:{ns}"),
                "system:authenticated".into(),
            ],
            audiences,
        },
    );
    request["status"] = json!({"token": token, "expirationTimestamp": "2099-01-01T00:00:00Z"});
    request
}

/// (namespace, name) of `…/namespaces/NS/pods/NAME`.
fn namespace_and_name(path: &str) -> (String, String) {
    let mut parts = path.rsplit('/');
    let name = parts.next().unwrap_or_default().to_string();
    let _collection = parts.next();
    let ns = parts.next().unwrap_or_default().to_string();
    (ns, name)
}

fn base64(data: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::new();
    for c in data.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                s.push(A[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                s.push('=');
            }
        }
    }
    s
}

/// A server → client WebSocket frame (unmasked).
fn ws_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0x80 | opcode];
    match payload.len() {
        n if n < 126 => f.push(n as u8),
        n if n < 65536 => {
            f.push(126);
            f.extend((n as u16).to_be_bytes());
        }
        n => {
            f.push(127);
            f.extend((n as u64).to_be_bytes());
        }
    }
    f.extend(payload);
    f
}

/// Reads one client → server frame: (opcode, unmasked payload).
fn ws_read(r: &mut impl std::io::Read) -> std::io::Result<(u8, Vec<u8>)> {
    let mut h = [0u8; 2];
    r.read_exact(&mut h)?;
    let mut len = u64::from(h[1] & 0x7f);
    if len == 126 {
        let mut b = [0u8; 2];
        r.read_exact(&mut b)?;
        len = u64::from(u16::from_be_bytes(b));
    } else if len == 127 {
        let mut b = [0u8; 8];
        r.read_exact(&mut b)?;
        len = u64::from_be_bytes(b);
    }
    let mut mask = [0u8; 4];
    if h[1] & 0x80 != 0 {
        r.read_exact(&mut mask)?;
    }
    let mut payload = vec![0u8; len as usize];
    r.read_exact(&mut payload)?;
    for (i, b) in payload.iter_mut().enumerate() {
        *b ^= mask[i % 4];
    }
    Ok((h[0] & 0x0f, payload))
}

impl FakeKube {
    /// `pods/portforward` the way the API server and kubelet do it for kube-rs: a WebSocket
    /// with the `v4.channel.k8s.io` protocol; per port a data and an error channel, each opened
    /// by a frame carrying the port number (little-endian), then `[channel, bytes…]` frames.
    fn port_forward_session(
        &self,
        mut reader: BufReader<TcpStream>,
        mut out: TcpStream,
        headers: &BTreeMap<String, String>,
        namespace: &str,
        pod: &str,
        port: u16,
    ) -> std::io::Result<()> {
        let forward = {
            let mut st = self.shared.0.lock().unwrap();
            st.forwarded.push((namespace.into(), pod.into(), port));
            st.forward.get(&(namespace.into(), pod.into())).cloned()
        };
        let Some(key) = headers.get("sec-websocket-key") else {
            return respond(
                &mut out,
                400,
                &json!({"kind":"Status","code":400,"message":"upgrade required"}),
            );
        };
        let Some(forward) = forward else {
            return respond(
                &mut out,
                404,
                &json!({"kind":"Status","apiVersion":"v1","status":"Failure","code":404,"reason":"NotFound"}),
            );
        };
        let mut sha = sha1_smol::Sha1::new();
        sha.update(key.as_bytes());
        sha.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
        write!(
            out,
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\nSec-WebSocket-Protocol: v4.channel.k8s.io\r\n\r\n",
            base64(&sha.digest().bytes())
        )?;
        let p = port.to_le_bytes();
        out.write_all(&ws_frame(2, &[0, p[0], p[1]]))?;
        out.write_all(&ws_frame(2, &[1, p[0], p[1]]))?;
        let target = match forward(port) {
            Ok(t) => t,
            Err(e) => {
                let mut msg = vec![1u8];
                msg.extend(format!("error forwarding port {port}: {e}").bytes());
                out.write_all(&ws_frame(2, &msg))?;
                return out.write_all(&ws_frame(8, &[]));
            }
        };
        // pod → client
        let mut to_client = out.try_clone()?;
        let mut from_pod = target.try_clone()?;
        let pump = std::thread::spawn(move || {
            let mut buf = vec![0u8; 16384];
            loop {
                match std::io::Read::read(&mut from_pod, &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        let mut msg = vec![0u8];
                        msg.extend(&buf[..n]);
                        if to_client.write_all(&ws_frame(2, &msg)).is_err() {
                            return;
                        }
                    }
                }
            }
            let _ = to_client.write_all(&ws_frame(8, &[]));
            let _ = to_client.shutdown(std::net::Shutdown::Write);
        });
        // client → pod
        let mut to_pod = target;
        loop {
            match ws_read(&mut reader) {
                Ok((2, m)) if m.first() == Some(&0) => {
                    if to_pod.write_all(&m[1..]).is_err() {
                        break;
                    }
                }
                Ok((9, m)) => {
                    let _ = out.write_all(&ws_frame(10, &m));
                }
                Ok((8, _)) | Err(_) => break,
                Ok(_) => {}
            }
        }
        // The client went away: close the pod side too (the agent sees the disconnect).
        let _ = to_pod.shutdown(std::net::Shutdown::Both);
        let _ = pump.join();
        Ok(())
    }
}

fn respond(out: &mut TcpStream, code: u16, body: &Value) -> std::io::Result<()> {
    let body = body.to_string();
    let reason = match code {
        200 => "OK",
        201 => "Created",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        415 => "Unsupported Media Type",
        422 => "Unprocessable Entity",
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

/// A [`pod`] whose controller is `kind`/`name` (its `metadata.ownerReferences`), e.g.
/// `owned_by(pod(…), "StatefulSet", "seldon-scheduler")`. A Deployment's pod: see
/// [`of_deployment`].
pub fn owned_by(mut pod: Value, kind: &str, name: &str) -> Value {
    pod["metadata"]["ownerReferences"] = json!([{
        "apiVersion": "apps/v1", "kind": kind, "name": name,
        "uid": format!("{:08x}-0000-4000-8000-000000000000", name.len()),
        "controller": true, "blockOwnerDeletion": true,
    }]);
    pod
}

/// A [`pod`] of Deployment `deployment`, as the API shows it: owned by ReplicaSet
/// `<deployment>-<hash>`, labelled `pod-template-hash: <hash>`.
pub fn of_deployment(pod: Value, deployment: &str, hash: &str) -> Value {
    let mut pod = owned_by(pod, "ReplicaSet", &format!("{deployment}-{hash}"));
    pod["metadata"]["labels"]["pod-template-hash"] = json!(hash);
    pod
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

#[cfg(test)]
mod tests {
    #[test]
    fn websocket_accept_key_is_rfc6455s() {
        // The example of RFC 6455 section 1.3.
        let mut sha = sha1_smol::Sha1::new();
        sha.update(b"dGhlIHNhbXBsZSBub25jZQ==258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
        assert_eq!(
            super::base64(&sha.digest().bytes()),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
        assert_eq!(super::base64(b"ab"), "YWI=");
        assert_eq!(super::base64(b"a"), "YQ==");
    }
}

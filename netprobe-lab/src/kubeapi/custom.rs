//! Custom objects of the CRDs a test installs ([`FakeKube::install_crd`]), as the API server
//! serves them: create (with `metadata.generateName`), get, list (label and field selectors),
//! watch from a resourceVersion (chunked `{"type","object"}` lines, bookmarks, an `ERROR` event
//! with a 410 `Expired` Status for a compacted resourceVersion), merge and apply patches and
//! PUT on the object and on its `status` subresource (a status write leaves everything but
//! status as it was, a write of the object leaves status), delete (a `DELETED` event), and
//! admission by the CRD's OpenAPI schema (defaults, pruning of unknown fields, 422 `Invalid`
//! with the server's message shape). RBAC as the server checks it: the verb on the resource
//! (`traces`, `traces/status`) of the group in the namespace.
//!
//! Not here (what netprobe does not use): JSON patch (`application/json-patch+json`, answered
//! 415), field ownership of server-side apply (an apply merges like a merge patch: no
//! managedFields, no conflicts, fields left out are kept), finalizers and `deletionTimestamp`,
//! set-based label selectors (`in`, `notin`), field selectors other than `metadata.name` and
//! `metadata.namespace`, `limit`/`continue` (a list is whole), the 58-character cut of a
//! generateName. A watch lasts at most 60 s (its `timeoutSeconds` or less) and gets a bookmark
//! after 5 s without events when it asked for them.

use std::{
    collections::{BTreeMap, VecDeque},
    io::Write,
    net::TcpStream,
    time::{Duration, Instant, SystemTime},
};

use serde_json::{Value, json};

use super::{FakeKube, percent_decode, respond, status};

/// Changes a watch can resume from; older resourceVersions get 410 Gone.
const HISTORY: usize = 10_000;
/// Longest a watch stays open (the real server ends watches after a randomised timeout too).
const MAX_WATCH: Duration = Duration::from_secs(60);
/// A watch that asked for bookmarks gets one after this long without an event.
const BOOKMARK_EVERY: Duration = Duration::from_secs(5);

/// An installed CustomResourceDefinition.
struct Crd {
    group: String,
    plural: String,
    kind: String,
    namespaced: bool,
    /// Served version → its `openAPIV3Schema`.
    versions: BTreeMap<String, Value>,
    status: bool,
}

struct Change {
    rv: u64,
    resource: String,
    ty: &'static str,
    object: Value,
}

#[derive(Default)]
pub(super) struct Store {
    /// `group/plural` → its CRD.
    crds: BTreeMap<String, Crd>,
    /// (`group/plural`, namespace, name) → the object as stored.
    objects: BTreeMap<(String, String, String), Value>,
    history: VecDeque<Change>,
    /// The newest resourceVersion no longer in `history`.
    forgotten: u64,
    created: u64,
}

/// A request for a custom object, from its path.
struct Target {
    resource: String,
    version: String,
    namespace: Option<String>,
    name: Option<String>,
    status: bool,
}

impl Store {
    fn target(&self, path: &str) -> Option<Target> {
        let rest = path.strip_prefix("/apis/")?.trim_end_matches('/');
        let parts: Vec<&str> = rest.split('/').collect();
        let (group, version, rest) = match parts.as_slice() {
            [g, v, rest @ ..] => (*g, *v, rest),
            _ => return None,
        };
        let (namespace, rest) = match rest {
            ["namespaces", ns, rest @ ..] if !rest.is_empty() => (Some(ns.to_string()), rest),
            _ => (None, rest),
        };
        let (plural, name, status) = match rest {
            [p] => (*p, None, false),
            [p, n] => (*p, Some(n.to_string()), false),
            [p, n, "status"] => (*p, Some(n.to_string()), true),
            _ => return None,
        };
        let resource = format!("{group}/{plural}");
        let crd = self.crds.get(&resource)?;
        crd.versions.contains_key(version).then(|| Target {
            resource,
            version: version.into(),
            namespace,
            name,
            status,
        })
    }
}

/// One parsed request.
struct Call<'a> {
    method: &'a str,
    params: BTreeMap<String, String>,
    headers: &'a BTreeMap<String, String>,
    body: &'a [u8],
}

impl Call<'_> {
    fn param(&self, k: &str) -> Option<&str> {
        self.params.get(k).map(String::as_str)
    }
}

type Answer = (u16, Value);

fn not_found(crd: &Crd, name: &str) -> Answer {
    let mut s = status(
        404,
        "NotFound",
        &format!("{}.{} \"{name}\" not found", crd.plural, crd.group),
    );
    s["details"] = json!({"name": name, "group": crd.group, "kind": crd.plural});
    (404, s)
}

impl FakeKube {
    /// Installs a CustomResourceDefinition (as `kubectl apply` of its YAML would): its objects
    /// are served from now on.
    pub fn install_crd(&self, crd: &Value) {
        let spec = &crd["spec"];
        let text = |v: &Value| v.as_str().unwrap_or_default().to_string();
        let versions = spec["versions"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|v| v["served"].as_bool() != Some(false))
            .map(|v| (text(&v["name"]), v["schema"]["openAPIV3Schema"].clone()))
            .collect();
        let status = spec["versions"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|v| v["subresources"]["status"].is_object());
        let c = Crd {
            group: text(&spec["group"]),
            plural: text(&spec["names"]["plural"]),
            kind: text(&spec["names"]["kind"]),
            namespaced: spec["scope"] == "Namespaced",
            versions,
            status,
        };
        let mut st = self.shared.0.lock().unwrap();
        st.custom
            .crds
            .insert(format!("{}/{}", c.group, c.plural), c);
    }

    /// A custom object as stored (None: there is none).
    pub fn custom_object(&self, group_plural: &str, namespace: &str, name: &str) -> Option<Value> {
        let st = self.shared.0.lock().unwrap();
        st.custom
            .objects
            .get(&(group_plural.into(), namespace.into(), name.into()))
            .cloned()
    }

    /// Every custom object of `group/plural` stored now.
    pub fn custom_objects(&self, group_plural: &str) -> Vec<Value> {
        let st = self.shared.0.lock().unwrap();
        st.custom
            .objects
            .iter()
            .filter(|((r, _, _), _)| r == group_plural)
            .map(|(_, o)| o.clone())
            .collect()
    }

    /// Forgets the history of custom objects (etcd compaction): a watch from an older
    /// resourceVersion gets 410 Gone.
    pub fn compact_custom(&self) {
        let mut st = self.shared.0.lock().unwrap();
        st.custom.forgotten = st.rv;
        st.custom.history.clear();
    }

    /// Serves a request for a custom object (None: not one). True: the connection stays open.
    pub(super) fn custom_request(
        &self,
        method: &str,
        target: &str,
        headers: &BTreeMap<String, String>,
        body: &[u8],
        out: &mut TcpStream,
    ) -> Option<std::io::Result<bool>> {
        let (path, query) = target.split_once('?').unwrap_or((target, ""));
        let t = self.shared.0.lock().unwrap().custom.target(path)?;
        let call = Call {
            method,
            params: query
                .split('&')
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k.to_string(), percent_decode(v)))
                .collect(),
            headers,
            body,
        };
        let watch = matches!(call.param("watch"), Some("true" | "1"));
        if method == "GET" && t.name.is_none() && watch {
            if let Some((code, answer)) = self.refused(&t, &call, "watch") {
                return Some(respond(out, code, &answer).map(|()| true));
            }
            // The connection stays open after a watch ends, as a real server's does: the
            // client may send its next request on it.
            return Some(self.watch_custom(out, &t, &call).map(|()| true));
        }
        let (code, answer) = self.answer(&t, &call);
        Some(respond(out, code, &answer).map(|()| true))
    }

    fn answer(&self, t: &Target, call: &Call) -> Answer {
        let verb = match (call.method, &t.name) {
            ("GET", None) => "list",
            ("GET", Some(_)) => "get",
            ("POST", None) => "create",
            ("PATCH", Some(_)) => "patch",
            ("PUT", Some(_)) => "update",
            ("DELETE", Some(_)) => "delete",
            _ => {
                return (
                    405,
                    status(
                        405,
                        "MethodNotAllowed",
                        "the server does not allow this method",
                    ),
                );
            }
        };
        if let Some(refusal) = self.refused(t, call, verb) {
            return refusal;
        }
        let mut st = self.shared.0.lock().unwrap();
        let st = &mut *st;
        let now = st.rv;
        let store = &mut st.custom;
        let crd = &store.crds[&t.resource];
        let name = t.name.clone().unwrap_or_default();
        let ns = t.namespace.clone().unwrap_or_default();
        let key = (t.resource.clone(), ns.clone(), name.clone());
        let found = store.objects.get(&key).cloned();
        let answer = match verb {
            "list" => Ok((200, list(store, t, call, now))),
            "get" => match found {
                Some(o) if !t.status || crd.status => Ok((200, o)),
                _ => Err(not_found(crd, &name)),
            },
            "create" => create(store, t, call, &ns),
            "delete" => match found {
                Some(o) => {
                    st.rv += 1;
                    let mut o = o;
                    o["metadata"]["resourceVersion"] = json!(st.rv.to_string());
                    st.custom.objects.remove(&key);
                    st.custom.record(st.rv, &t.resource, "DELETED", &o);
                    self.shared.1.notify_all();
                    return (200, o);
                }
                None => Err(not_found(crd, &name)),
            },
            _ => write(store, t, call, found, &ns, &name),
        };
        match answer {
            Ok((code, obj)) if verb != "list" && verb != "get" => {
                st.rv += 1;
                let mut obj = obj;
                obj["metadata"]["resourceVersion"] = json!(st.rv.to_string());
                let ty = if code == 201 { "ADDED" } else { "MODIFIED" };
                let key = (
                    t.resource.clone(),
                    ns,
                    obj["metadata"]["name"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string(),
                );
                st.custom.objects.insert(key, obj.clone());
                st.custom.record(st.rv, &t.resource, ty, &obj);
                self.shared.1.notify_all();
                (code, obj)
            }
            Ok(a) | Err(a) => a,
        }
    }

    /// 403 when the requester may not `verb` the resource (or its status) in the namespace, 503
    /// while the server is down.
    fn refused(&self, t: &Target, call: &Call, verb: &str) -> Option<Answer> {
        let st = self.shared.0.lock().unwrap();
        if st.down {
            return Some((503, status(503, "ServiceUnavailable", "down")));
        }
        let (group, plural) = t.resource.split_once('/').unwrap_or_default();
        let resource = if t.status {
            format!("{plural}/status")
        } else {
            plural.to_string()
        };
        let ns = t.namespace.as_deref().unwrap_or_default();
        let who = st.auth.requester(call.headers);
        if who.as_ref().is_some_and(|w| {
            st.auth.may_named(
                w,
                verb,
                group,
                &resource,
                ns,
                t.name.as_deref().unwrap_or_default(),
            )
        }) {
            return None;
        }
        let user = who.map_or("system:anonymous".into(), |w| w.user);
        let whose = match &t.name {
            Some(n) => format!("{plural}.{group} \"{n}\""),
            None => format!("{plural}.{group}"),
        };
        let scope = if ns.is_empty() {
            "at the cluster scope".to_string()
        } else {
            format!("in the namespace \"{ns}\"")
        };
        let message = format!(
            "{whose} is forbidden: User \"{user}\" cannot {verb} resource \"{resource}\" in API group \"{group}\" {scope}"
        );
        Some((403, status(403, "Forbidden", &message)))
    }

    fn watch_custom(&self, out: &mut TcpStream, t: &Target, call: &Call) -> std::io::Result<()> {
        write!(
            out,
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        )?;
        let timeout = call
            .param("timeoutSeconds")
            .and_then(|v| v.parse().ok())
            .map_or(MAX_WATCH, Duration::from_secs)
            .min(MAX_WATCH);
        let bookmarks = call.param("allowWatchBookmarks") == Some("true");
        let deadline = Instant::now() + timeout;
        let send = |out: &mut TcpStream, lines: &[Value]| -> std::io::Result<()> {
            for l in lines {
                let chunk = format!("{l}\n");
                write!(out, "{:x}\r\n{chunk}\r\n", chunk.len())?;
            }
            out.flush()
        };
        let (lock, cv) = &*self.shared;
        let mut st = lock.lock().unwrap();
        let mut sent: u64 = match call.param("resourceVersion") {
            None | Some("" | "0") => {
                // "Any": the current objects as ADDED, then what changes.
                let added: Vec<Value> = st
                    .custom
                    .objects
                    .iter()
                    .filter(|((r, _, _), o)| *r == t.resource && selected(t, call, o))
                    .map(|(_, o)| json!({"type": "ADDED", "object": o}))
                    .collect();
                let now = st.rv;
                drop(st);
                send(out, &added)?;
                st = lock.lock().unwrap();
                now
            }
            Some(v) => {
                let Ok(from) = v.parse::<u64>() else {
                    drop(st);
                    let s = status(400, "BadRequest", &format!("invalid resource version: {v}"));
                    send(out, &[json!({"type": "ERROR", "object": s})])?;
                    return end(out);
                };
                if from < st.custom.forgotten {
                    let message = format!(
                        "too old resource version: {from} ({})",
                        st.custom.forgotten + 1
                    );
                    drop(st);
                    let s = status(410, "Expired", &message);
                    send(out, &[json!({"type": "ERROR", "object": s})])?;
                    return end(out);
                }
                from
            }
        };
        let mut quiet_since = Instant::now();
        loop {
            if st.down {
                return Ok(()); // cut without the final chunk, like a dying server
            }
            let lines: Vec<Value> = st
                .custom
                .history
                .iter()
                .filter(|c| c.rv > sent && c.resource == t.resource && selected(t, call, &c.object))
                .map(|c| json!({"type": c.ty, "object": c.object}))
                .collect();
            sent = st.rv;
            let crd = &st.custom.crds[&t.resource];
            let bookmark = json!({"type": "BOOKMARK", "object": {
                "apiVersion": format!("{}/{}", crd.group, t.version), "kind": crd.kind,
                "metadata": {"resourceVersion": sent.to_string()},
            }});
            let now = Instant::now();
            if !lines.is_empty() {
                drop(st);
                send(out, &lines)?;
                quiet_since = now;
            } else if now >= deadline {
                drop(st);
                if bookmarks {
                    send(out, &[bookmark])?;
                }
                return end(out);
            } else if bookmarks && now.duration_since(quiet_since) >= BOOKMARK_EVERY {
                drop(st);
                send(out, &[bookmark])?;
                quiet_since = now;
            } else {
                let wait = (deadline - now).min(Duration::from_millis(500));
                st = cv.wait_timeout(st, wait).unwrap().0;
                continue;
            }
            st = lock.lock().unwrap();
        }
    }
}

fn end(out: &mut TcpStream) -> std::io::Result<()> {
    write!(out, "0\r\n\r\n")?;
    out.flush()
}

impl Store {
    fn record(&mut self, rv: u64, resource: &str, ty: &'static str, object: &Value) {
        self.history.push_back(Change {
            rv,
            resource: resource.into(),
            ty,
            object: object.clone(),
        });
        while self.history.len() > HISTORY {
            if let Some(c) = self.history.pop_front() {
                self.forgotten = c.rv;
            }
        }
    }
}

/// Whether `o` is in the request's namespace and matches its label and field selectors.
fn selected(t: &Target, call: &Call, o: &Value) -> bool {
    let m = &o["metadata"];
    if let Some(ns) = &t.namespace
        && m["namespace"].as_str() != Some(ns)
    {
        return false;
    }
    let labels = call.param("labelSelector").unwrap_or_default();
    let fields = call.param("fieldSelector").unwrap_or_default();
    let label = |k: &str| m["labels"][k].as_str().map(str::to_string);
    let field = |k: &str| match k {
        "metadata.name" => m["name"].as_str().map(str::to_string),
        "metadata.namespace" => m["namespace"].as_str().map(str::to_string),
        _ => None,
    };
    matches_selector(labels, label) && matches_selector(fields, field)
}

/// `k=v`, `k==v`, `k!=v`, `k` and `!k`, comma-separated: all must hold.
fn matches_selector(selector: &str, value: impl Fn(&str) -> Option<String>) -> bool {
    selector.split(',').filter(|s| !s.is_empty()).all(|term| {
        if let Some((k, v)) = term.split_once("!=") {
            value(k.trim()).as_deref() != Some(v.trim())
        } else if let Some((k, v)) = term.split_once('=') {
            value(k.trim()).as_deref() == Some(v.trim_start_matches('=').trim())
        } else if let Some(k) = term.strip_prefix('!') {
            value(k.trim()).is_none()
        } else {
            value(term.trim()).is_some()
        }
    })
}

fn list(store: &Store, t: &Target, call: &Call, rv: u64) -> Value {
    let crd = &store.crds[&t.resource];
    let items: Vec<&Value> = store
        .objects
        .iter()
        .filter(|((r, _, _), o)| *r == t.resource && selected(t, call, o))
        .map(|(_, o)| o)
        .collect();
    json!({
        "apiVersion": format!("{}/{}", crd.group, t.version),
        "kind": format!("{}List", crd.kind),
        "metadata": {"resourceVersion": rv.to_string()},
        "items": items,
    })
}

fn create(store: &mut Store, t: &Target, call: &Call, ns: &str) -> Result<Answer, Answer> {
    let crd = &store.crds[&t.resource];
    let mut obj: Value =
        serde_json::from_slice(call.body).map_err(|e| bad_request(&e.to_string()))?;
    check_type(crd, t, &obj)?;
    let meta = &obj["metadata"];
    if let Some(other) = meta["namespace"].as_str()
        && other != ns
    {
        return Err(bad_request(
            "the namespace of the provided object does not match the namespace sent on the request",
        ));
    }
    let name = match (meta["name"].as_str(), meta["generateName"].as_str()) {
        (Some(n), _) if !n.is_empty() => n.to_string(),
        (_, Some(prefix)) if !prefix.is_empty() => {
            store.created += 1;
            format!("{prefix}{}", suffix(store.created))
        }
        _ => {
            return Err(invalid(
                crd,
                "",
                &[(
                    "metadata.name".into(),
                    "FieldValueRequired",
                    "Required value: name or generateName is required".into(),
                )],
            ));
        }
    };
    if store
        .objects
        .contains_key(&(t.resource.clone(), ns.into(), name.clone()))
    {
        let mut s = status(
            409,
            "AlreadyExists",
            &format!("{}.{} \"{name}\" already exists", crd.plural, crd.group),
        );
        s["details"] = json!({"name": name, "group": crd.group, "kind": crd.plural});
        return Err((409, s));
    }
    store.created += 1;
    let m = obj["metadata"]
        .as_object_mut()
        .ok_or_else(|| bad_request("metadata is not an object"))?;
    m.insert("name".into(), json!(name));
    if crd.namespaced {
        m.insert("namespace".into(), json!(ns));
    }
    m.insert("uid".into(), json!(uid(store.created)));
    m.insert("creationTimestamp".into(), json!(rfc3339_now()));
    m.insert("generation".into(), json!(1));
    m.remove("resourceVersion");
    if crd.status {
        // With a status subresource, status is not written on create.
        obj.as_object_mut().expect("an object").remove("status");
    }
    admit(crd, &t.version, &mut obj, &name)?;
    Ok((201, obj))
}

/// PATCH and PUT of the object or its status: the result of applying the change to what is
/// stored, with the other half (status or the rest) as it was.
fn write(
    store: &mut Store,
    t: &Target,
    call: &Call,
    found: Option<Value>,
    ns: &str,
    name: &str,
) -> Result<Answer, Answer> {
    let crd = &store.crds[&t.resource];
    if t.status && !crd.status {
        return Err(not_found(crd, name));
    }
    let body: Value = serde_json::from_slice(call.body).map_err(|e| bad_request(&e.to_string()))?;
    let content_type = call
        .headers
        .get("content-type")
        .map(|c| c.split(';').next().unwrap_or_default().trim())
        .unwrap_or_default();
    let apply = call.method == "PATCH" && content_type == "application/apply-patch+yaml";
    if apply && call.param("fieldManager").is_none_or(str::is_empty) {
        return Err(invalid_options(
            "fieldManager: Required value: is required for apply patch",
        ));
    }
    let Some(old) = found else {
        if apply && !t.status {
            // Server-side apply creates what does not exist.
            return create(store, t, call, ns);
        }
        return Err(not_found(crd, name));
    };
    if let Some(rv) = body["metadata"]["resourceVersion"].as_str()
        && Some(rv) != old["metadata"]["resourceVersion"].as_str()
    {
        let message = format!(
            "Operation cannot be fulfilled on {}.{} \"{name}\": the object has been modified; please apply your changes to the latest version and try again",
            crd.plural, crd.group
        );
        return Err((409, status(409, "Conflict", &message)));
    }
    let mut new = match (call.method, content_type) {
        ("PUT", _) => {
            check_type(crd, t, &body)?;
            body
        }
        (_, "application/merge-patch+json" | "application/apply-patch+yaml") => {
            if apply {
                check_type(crd, t, &body)?;
            }
            let mut new = old.clone();
            merge(&mut new, &body);
            new
        }
        _ => {
            let message = "the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml";
            return Err((415, status(415, "UnsupportedMediaType", message)));
        }
    };
    // The half this endpoint does not write stays as stored; what identifies the object too.
    if t.status {
        let written = new.get("status").cloned();
        new = with_status(old.clone(), written);
    } else if crd.status {
        new = with_status(new, old.get("status").cloned());
    }
    for k in [
        "name",
        "namespace",
        "uid",
        "creationTimestamp",
        "generation",
    ] {
        new["metadata"][k] = old["metadata"][k].clone();
    }
    if !t.status && new.get("spec") != old.get("spec") {
        let g = old["metadata"]["generation"].as_u64().unwrap_or(1);
        new["metadata"]["generation"] = json!(g + 1);
    }
    admit(crd, &t.version, &mut new, name)?;
    Ok((200, new))
}

fn with_status(mut obj: Value, status: Option<Value>) -> Value {
    let o = obj.as_object_mut().expect("an object");
    match status {
        Some(s) => o.insert("status".into(), s),
        None => o.remove("status"),
    };
    obj
}

/// `apiVersion` and `kind` of a written object must be the resource's.
fn check_type(crd: &Crd, t: &Target, obj: &Value) -> Result<(), Answer> {
    let api = format!("{}/{}", crd.group, t.version);
    if obj["apiVersion"].as_str() != Some(&api) || obj["kind"].as_str() != Some(&crd.kind) {
        return Err(bad_request(&format!(
            "the API version in the data ({}) does not match the expected API version ({api})",
            obj["apiVersion"].as_str().unwrap_or_default()
        )));
    }
    Ok(())
}

/// RFC 7386 JSON merge patch.
fn merge(target: &mut Value, patch: &Value) {
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    let t = target.as_object_mut().expect("an object");
    for (k, v) in p {
        if v.is_null() {
            t.remove(k);
        } else {
            merge(t.entry(k.clone()).or_insert(Value::Null), v);
        }
    }
}

fn bad_request(message: &str) -> Answer {
    (400, status(400, "BadRequest", message))
}

fn invalid_options(cause: &str) -> Answer {
    let message = format!("PatchOptions.meta.k8s.io \"\" is invalid: {cause}");
    (422, status(422, "Invalid", &message))
}

/// A 422 Invalid Status as the API server words it: `Kind.group "name" is invalid: field:
/// Invalid value: …` (several in brackets, comma-separated).
fn invalid(crd: &Crd, name: &str, causes: &[(String, &str, String)]) -> Answer {
    let each: Vec<String> = causes.iter().map(|(f, _, m)| format!("{f}: {m}")).collect();
    let listed = match each.as_slice() {
        [one] => one.clone(),
        many => format!("[{}]", many.join(", ")),
    };
    let message = format!("{}.{} \"{name}\" is invalid: {listed}", crd.kind, crd.group);
    let mut s = status(422, "Invalid", &message);
    s["details"] = json!({
        "name": name, "group": crd.group, "kind": crd.kind,
        "causes": causes.iter().map(|(f, r, m)| json!({"reason": r, "message": m, "field": f})).collect::<Vec<_>>(),
    });
    (422, s)
}

/// Defaults, prunes and validates `obj` by the version's schema, as admission does.
fn admit(crd: &Crd, version: &str, obj: &mut Value, name: &str) -> Result<(), Answer> {
    let schema = &crd.versions[version];
    for k in ["spec", "status"] {
        if let Some(part) = obj.get_mut(k) {
            shape(&schema["properties"][k], part);
        }
    }
    let mut causes = Vec::new();
    for k in ["spec", "status"] {
        if let Some(part) = obj.get(k) {
            check(&schema["properties"][k], part, k, &mut causes);
        } else if schema["required"]
            .as_array()
            .is_some_and(|r| r.iter().any(|x| x == k))
        {
            causes.push((k.to_string(), "FieldValueRequired", "Required value".into()));
        }
    }
    if causes.is_empty() {
        Ok(())
    } else {
        Err(invalid(crd, name, &causes))
    }
}

/// Fills in defaults and drops fields the schema does not have (unless it keeps unknown
/// fields), as the server does before validating.
fn shape(schema: &Value, v: &mut Value) {
    if schema["x-kubernetes-preserve-unknown-fields"] == true {
        return;
    }
    match v {
        Value::Object(o) => {
            let Some(props) = schema["properties"].as_object() else {
                if let Some(extra) = schema.get("additionalProperties").filter(|a| a.is_object()) {
                    o.values_mut().for_each(|x| shape(extra, x));
                }
                return;
            };
            o.retain(|k, _| props.contains_key(k));
            for (k, p) in props {
                match o.get_mut(k) {
                    Some(x) => shape(p, x),
                    None => {
                        if let Some(d) = p.get("default") {
                            o.insert(k.clone(), d.clone());
                        }
                    }
                }
            }
        }
        Value::Array(a) => a.iter_mut().for_each(|x| shape(&schema["items"], x)),
        _ => {}
    }
}

type Cause = (String, &'static str, String);

/// The value validations of a structural schema.
fn check(schema: &Value, v: &Value, path: &str, causes: &mut Vec<Cause>) {
    let bad = |m: String| (path.to_string(), "FieldValueInvalid", m);
    if v.is_null() {
        if schema["nullable"] != true {
            causes.push(bad(format!(
                "Invalid value: \"null\": {path} in body must be of type {}: \"null\"",
                schema["type"].as_str().unwrap_or("object")
            )));
        }
        return;
    }
    let ty = schema["type"].as_str().unwrap_or_default();
    let actual = match v {
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
        Value::Null => "null",
    };
    if !ty.is_empty() && ty != actual && !(ty == "number" && actual == "integer") {
        causes.push(bad(format!(
            "Invalid value: \"{actual}\": {path} in body must be of type {ty}: \"{actual}\""
        )));
        return;
    }
    if let Some(allowed) = schema["enum"].as_array()
        && !allowed.contains(v)
    {
        let list: Vec<String> = allowed.iter().map(Value::to_string).collect();
        causes.push((
            path.to_string(),
            "FieldValueNotSupported",
            format!(
                "Unsupported value: {v}: supported values: {}",
                list.join(", ")
            ),
        ));
    }
    if let Some(n) = v.as_f64() {
        if let Some(min) = schema["minimum"].as_f64()
            && n < min
        {
            causes.push(bad(format!(
                "Invalid value: {v}: {path} in body should be greater than or equal to {}",
                go_number(min)
            )));
        }
        if let Some(max) = schema["maximum"].as_f64()
            && n > max
        {
            causes.push(bad(format!(
                "Invalid value: {v}: {path} in body should be less than or equal to {}",
                go_number(max)
            )));
        }
    }
    if let Some(s) = v.as_str() {
        let chars = s.chars().count() as u64;
        if let Some(min) = schema["minLength"].as_u64()
            && chars < min
        {
            causes.push(bad(format!(
                "Invalid value: {v}: {path} in body should be at least {min} chars long"
            )));
        }
        if let Some(max) = schema["maxLength"].as_u64()
            && chars > max
        {
            causes.push((
                path.to_string(),
                "FieldValueTooLong",
                format!("Too long: may not be more than {max} bytes"),
            ));
        }
        if let Some(p) = schema["pattern"].as_str()
            && !regex::Regex::new(p).is_ok_and(|re| re.is_match(s))
        {
            causes.push(bad(format!(
                "Invalid value: {v}: {path} in body should match '{p}'"
            )));
        }
    }
    match v {
        Value::Object(o) => {
            for r in schema["required"].as_array().into_iter().flatten() {
                if let Some(k) = r.as_str()
                    && !o.contains_key(k)
                {
                    causes.push((
                        format!("{path}.{k}"),
                        "FieldValueRequired",
                        "Required value".into(),
                    ));
                }
            }
            for (k, x) in o {
                if let Some(p) = schema["properties"].get(k) {
                    check(p, x, &format!("{path}.{k}"), causes);
                }
            }
        }
        Value::Array(a) => {
            if let Some(max) = schema["maxItems"].as_u64()
                && a.len() as u64 > max
            {
                causes.push((
                    path.to_string(),
                    "FieldValueTooMany",
                    format!("Too many: {}: must have at most {max} items", a.len()),
                ));
            }
            for (i, x) in a.iter().enumerate() {
                check(&schema["items"], x, &format!("{path}[{i}]"), causes);
            }
        }
        _ => {}
    }
}

/// A schema bound as the server prints it (Go's `%v` of a float64: `65535`, `0.5`).
fn go_number(n: f64) -> String {
    if n.fract() == 0.0 && n.abs() < 1e15 {
        format!("{}", n as i64)
    } else {
        n.to_string()
    }
}

/// The 5 characters the API server appends to a generateName.
fn suffix(n: u64) -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut x = n.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x5bd1_e995;
    (0..5)
        .map(|_| {
            let c = ALPHABET[(x % ALPHABET.len() as u64) as usize] as char;
            x /= ALPHABET.len() as u64;
            c
        })
        .collect()
}

fn uid(n: u64) -> String {
    format!("7ace0000-0000-4000-8000-{n:012x}")
}

/// Now as RFC 3339 in UTC, whole seconds (how `metav1.Time` is written).
fn rfc3339_now() -> String {
    let secs = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil from days (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_patch_is_rfc7386() {
        let mut t = json!({"a": "b", "c": {"d": "e", "f": "g"}});
        merge(&mut t, &json!({"a": "z", "c": {"f": null}}));
        assert_eq!(t, json!({"a": "z", "c": {"d": "e"}}));
        let mut t = json!({"a": [1, 2]});
        merge(&mut t, &json!({"a": [3]}));
        assert_eq!(t, json!({"a": [3]}));
    }

    #[test]
    fn selectors() {
        let labels = |k: &str| (k == "app").then(|| "web".to_string());
        assert!(matches_selector("app=web", labels));
        assert!(matches_selector("app==web", labels));
        assert!(!matches_selector("app!=web", labels));
        assert!(matches_selector("app", labels));
        assert!(!matches_selector("!app", labels));
        assert!(!matches_selector("app=web,tier=db", labels));
        assert!(matches_selector("", labels));
    }

    #[test]
    fn timestamps_and_names_look_like_the_servers() {
        let now = rfc3339_now();
        assert_eq!(now.len(), 20, "{now}");
        assert!(now.starts_with("20") && now.ends_with('Z'), "{now}");
        let a = suffix(1);
        assert_eq!(a.len(), 5);
        assert_ne!(a, suffix(2));
    }
}

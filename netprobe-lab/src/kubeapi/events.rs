//! Events in the API stand-in, as the real server keeps them: created (POST) and merge-patched
//! through `events.k8s.io/v1`, validated like the server validates a new Event, listed through
//! `events.k8s.io/v1` or `core/v1` (the same objects in each API's shape) in a namespace or in
//! all, with field selectors (each API's supported fields; any other is a 400 as on the real
//! server), equality label selectors, and `limit`/`continue` pages. Every request is
//! authorised by the stand-in's RBAC (`create`/`patch`/`get`/`list` on `events` of the API
//! group, in the namespace; cluster-wide for a list of all namespaces).

use std::collections::BTreeMap;

use serde_json::{Value, json};

use super::{FakeKube, status};

/// The Events stored: (namespace, name) → the object in `events.k8s.io/v1` shape.
#[derive(Default)]
pub(super) struct Store {
    objects: BTreeMap<(String, String), Value>,
}

/// Which API a request speaks.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Api {
    /// `events.k8s.io/v1`.
    Events,
    /// `core/v1`.
    Core,
}

impl Api {
    fn group(self) -> &'static str {
        match self {
            Self::Events => "events.k8s.io",
            Self::Core => "",
        }
    }

    fn api_version(self) -> &'static str {
        match self {
            Self::Events => "events.k8s.io/v1",
            Self::Core => "v1",
        }
    }

    /// Where a field selector's field is in the stored object (None: not supported).
    fn field(self, field: &str) -> Option<Vec<&'static str>> {
        const OBJECT_REF: [&str; 7] = [
            "kind",
            "namespace",
            "name",
            "uid",
            "apiVersion",
            "resourceVersion",
            "fieldPath",
        ];
        let reference = |prefix: &str| {
            let f = field.strip_prefix(prefix)?;
            let f = OBJECT_REF.iter().find(|k| **k == f)?;
            Some(vec!["regarding", *f])
        };
        match (self, field) {
            (_, "metadata.name") => Some(vec!["metadata", "name"]),
            (_, "metadata.namespace") => Some(vec!["metadata", "namespace"]),
            (_, "reason") => Some(vec!["reason"]),
            (_, "type") => Some(vec!["type"]),
            (Self::Events, "reportingController") | (Self::Core, "reportingComponent") => {
                Some(vec!["reportingController"])
            }
            (Self::Core, "source") => Some(vec!["deprecatedSource", "component"]),
            (Self::Events, _) => reference("regarding."),
            (Self::Core, _) => reference("involvedObject."),
        }
    }

    /// The stored object as this API shows it.
    fn shape(self, stored: &Value) -> Value {
        let mut o = stored.clone();
        o["apiVersion"] = json!(self.api_version());
        o["kind"] = json!("Event");
        if self == Self::Events {
            return o;
        }
        let mut core = json!({"apiVersion": "v1", "kind": "Event"});
        for (from, to) in [
            ("metadata", "metadata"),
            ("regarding", "involvedObject"),
            ("related", "related"),
            ("reason", "reason"),
            ("note", "message"),
            ("type", "type"),
            ("eventTime", "eventTime"),
            ("action", "action"),
            ("reportingController", "reportingComponent"),
            ("reportingInstance", "reportingInstance"),
            ("series", "series"),
            ("deprecatedCount", "count"),
            ("deprecatedFirstTimestamp", "firstTimestamp"),
            ("deprecatedLastTimestamp", "lastTimestamp"),
            ("deprecatedSource", "source"),
        ] {
            if !o[from].is_null() {
                core[to] = o[from].take();
            }
        }
        core
    }
}

/// An Events request: the API, the namespace and the name in its path.
struct Target {
    api: Api,
    namespace: Option<String>,
    name: Option<String>,
}

fn target(path: &str) -> Option<Target> {
    let (api, rest) = if let Some(r) = path.strip_prefix("/apis/events.k8s.io/v1") {
        (Api::Events, r)
    } else {
        (Api::Core, path.strip_prefix("/api/v1")?)
    };
    let parts: Vec<&str> = rest.trim_matches('/').split('/').collect();
    let (namespace, name) = match parts.as_slice() {
        ["events"] => (None, None),
        ["namespaces", ns, "events"] => (Some(*ns), None),
        ["namespaces", ns, "events", name] => (Some(*ns), Some(*name)),
        _ => return None,
    };
    Some(Target {
        api,
        namespace: namespace.map(str::to_string),
        name: name.map(str::to_string),
    })
}

/// `a=b,c!=d`: (field, wanted value, equal?) each; None: not a selector.
fn requirements(selector: &str) -> Option<Vec<(String, String, bool)>> {
    selector
        .split(',')
        .filter(|r| !r.is_empty())
        .map(|r| {
            let (k, v, eq) = if let Some((k, v)) = r.split_once("!=") {
                (k, v, false)
            } else if let Some((k, v)) = r.split_once("==") {
                (k, v, true)
            } else {
                let (k, v) = r.split_once('=')?;
                (k, v, true)
            };
            Some((k.trim().to_string(), v.trim().to_string(), eq))
        })
        .collect()
}

fn at<'a>(o: &'a Value, path: &[&str]) -> &'a str {
    path.iter().fold(o, |o, k| &o[*k]).as_str().unwrap_or("")
}

/// RFC 7386 JSON merge patch.
fn merge(target: &mut Value, patch: &Value) {
    let Some(p) = patch.as_object() else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    for (k, v) in p {
        if v.is_null() {
            target.as_object_mut().expect("object").remove(k);
        } else {
            merge(&mut target[k.as_str()], v);
        }
    }
}

/// What the real server refuses in an `events.k8s.io/v1` Event (`ValidateEventCreate`/
/// `Update`, the parts a client can get wrong).
fn invalid(e: &Value, create: bool) -> Option<String> {
    let missing = |k: &str| e[k].as_str().is_none_or(str::is_empty);
    if create {
        for k in [
            "eventTime",
            "reportingController",
            "reportingInstance",
            "action",
            "reason",
        ] {
            if missing(k) {
                return Some(format!("{k}: Required value"));
            }
        }
    }
    if !matches!(e["type"].as_str(), Some("Normal" | "Warning")) {
        return Some("type: Unsupported value: must be Normal or Warning".into());
    }
    if e["note"].as_str().is_some_and(|n| n.len() > 1024) {
        return Some("note: Too long: may not be longer than 1024".into());
    }
    match &e["series"] {
        Value::Null => None,
        s if s["count"].as_i64().unwrap_or(0) < 2 => {
            Some("series.count: Invalid value: should be at least 2".into())
        }
        s if s["lastObservedTime"].is_null() => {
            Some("series.lastObservedTime: Required value".into())
        }
        _ => None,
    }
}

impl FakeKube {
    /// Answers an Events request (None: not one).
    pub(super) fn events_request(
        &self,
        method: &str,
        target_path: &str,
        headers: &BTreeMap<String, String>,
        body: &[u8],
    ) -> Option<(u16, Value)> {
        let (path, query) = target_path.split_once('?').unwrap_or((target_path, ""));
        let t = target(path)?;
        let params: BTreeMap<String, String> = query
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), super::percent_decode(v)))
            .collect();
        let mut st = self.shared.0.lock().unwrap();
        if st.down {
            return Some((503, status(503, "ServiceUnavailable", "down")));
        }
        let verb = match (method, &t.name) {
            ("POST", None) => "create",
            ("PATCH", Some(_)) => "patch",
            ("GET", Some(_)) => "get",
            ("GET", None) => "list",
            _ => return Some((405, status(405, "MethodNotAllowed", method))),
        };
        let ns = t.namespace.clone().unwrap_or_default();
        let allowed = st
            .auth
            .requester(headers)
            .is_some_and(|w| st.auth.may(&w, verb, t.api.group(), "events", &ns));
        if !allowed {
            return Some(forbidden(headers, &st.auth, verb, t.api, &ns));
        }
        let answer = match verb {
            "create" | "patch" => {
                let obj: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
                st.posted.push(obj.clone());
                st.rv += 1;
                let rv = st.rv;
                write(&mut st.events, &t, obj, rv)
            }
            "get" => {
                let key = (ns, t.name.clone().unwrap_or_default());
                match st.events.objects.get(&key) {
                    Some(e) => (200, t.api.shape(e)),
                    None => not_found(&key.1),
                }
            }
            _ => list(&st.events, &t, &params, st.rv),
        };
        Some(answer)
    }
}

fn forbidden(
    headers: &BTreeMap<String, String>,
    auth: &super::Auth,
    verb: &str,
    api: Api,
    ns: &str,
) -> (u16, Value) {
    let Some(who) = auth.requester(headers) else {
        return (401, status(401, "Unauthorized", "Unauthorized"));
    };
    let scope = match ns {
        "" => "at the cluster scope".to_string(),
        ns => format!("in the namespace \"{ns}\""),
    };
    let message = format!(
        "events{} is forbidden: User \"{}\" cannot {verb} resource \"events\" in API group \"{}\" {scope}",
        match api {
            Api::Events => ".events.k8s.io",
            Api::Core => "",
        },
        who.user,
        api.group()
    );
    (403, status(403, "Forbidden", &message))
}

fn not_found(name: &str) -> (u16, Value) {
    let message = format!("events.events.k8s.io \"{name}\" not found");
    (404, status(404, "NotFound", &message))
}

/// A creation or a merge patch.
fn write(store: &mut Store, t: &Target, obj: Value, rv: u64) -> (u16, Value) {
    let ns = t.namespace.clone().unwrap_or_default();
    if t.api != Api::Events {
        return (
            405,
            status(
                405,
                "MethodNotAllowed",
                "write Events through events.k8s.io/v1",
            ),
        );
    }
    let (code, mut stored) = match &t.name {
        None => {
            let name = obj["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            if name.is_empty() {
                return (422, status(422, "Invalid", "metadata.name: Required value"));
            }
            if store.objects.contains_key(&(ns.clone(), name.clone())) {
                let message = format!("events.events.k8s.io \"{name}\" already exists");
                return (409, status(409, "AlreadyExists", &message));
            }
            let mut o = obj;
            o["metadata"]["namespace"] = json!(ns);
            o["metadata"]["uid"] = json!(format!("e0e0e0e0-0000-4000-8000-{rv:012x}"));
            (201, o)
        }
        Some(name) => {
            let Some(existing) = store.objects.get(&(ns.clone(), name.clone())) else {
                return not_found(name);
            };
            let mut o = existing.clone();
            merge(&mut o, &obj);
            (200, o)
        }
    };
    if let Some(why) = invalid(&stored, code == 201) {
        let message = format!("Event.events.k8s.io is invalid: {why}");
        return (422, status(422, "Invalid", &message));
    }
    stored["metadata"]["resourceVersion"] = json!(rv.to_string());
    let name = stored["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    store.objects.insert((ns, name), stored.clone());
    (code, t.api.shape(&stored))
}

/// A list: selected, one page of `limit` from `continue`.
fn list(store: &Store, t: &Target, params: &BTreeMap<String, String>, rv: u64) -> (u16, Value) {
    let bad = |m: String| (400, status(400, "BadRequest", &m));
    let fields = requirements(params.get("fieldSelector").map_or("", String::as_str));
    let labels = requirements(params.get("labelSelector").map_or("", String::as_str));
    let (Some(fields), Some(labels)) = (fields, labels) else {
        return bad("unable to parse requirement".into());
    };
    let mut paths = Vec::new();
    for (f, v, eq) in fields {
        match t.api.field(&f) {
            Some(p) => paths.push((p, v, eq)),
            None => return bad(format!("field label not supported: {f}")),
        }
    }
    let selected = |e: &Value| {
        t.namespace
            .as_ref()
            .is_none_or(|n| at(e, &["metadata", "namespace"]) == n)
            && paths.iter().all(|(p, v, eq)| (at(e, p) == v) == *eq)
            && labels
                .iter()
                .all(|(k, v, eq)| (at(e, &["metadata", "labels", k]) == v) == *eq)
    };
    let from: usize = params
        .get("continue")
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let limit: usize = params
        .get("limit")
        .and_then(|l| l.parse().ok())
        .filter(|l| *l > 0)
        .unwrap_or(usize::MAX);
    let all: Vec<&Value> = store.objects.values().filter(|e| selected(e)).collect();
    let page: Vec<Value> = all
        .iter()
        .skip(from)
        .take(limit)
        .map(|e| t.api.shape(e))
        .collect();
    let mut metadata = json!({"resourceVersion": rv.to_string()});
    if from.saturating_add(limit) < all.len() {
        metadata["continue"] = json!((from + limit).to_string());
        metadata["remainingItemCount"] = json!(all.len() - from - limit);
    }
    let list = json!({
        "apiVersion": t.api.api_version(),
        "kind": "EventList",
        "metadata": metadata,
        "items": page,
    });
    (200, list)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_selectors_and_merge_patches_read_as_the_server_reads_them() {
        let t = target("/apis/events.k8s.io/v1/namespaces/a/events/e1").unwrap();
        assert!(t.api == Api::Events);
        assert_eq!(
            (t.namespace.as_deref(), t.name.as_deref()),
            (Some("a"), Some("e1"))
        );
        let t = target("/api/v1/events").unwrap();
        assert!(t.api == Api::Core && t.namespace.is_none() && t.name.is_none());
        assert!(target("/api/v1/namespaces/a/pods").is_none());
        assert_eq!(
            requirements("reason=X,type!=Normal,regarding.name==p").unwrap(),
            [
                ("reason".into(), "X".into(), true),
                ("type".into(), "Normal".into(), false),
                ("regarding.name".into(), "p".into(), true)
            ]
        );
        assert!(requirements("reason").is_none());
        assert_eq!(
            Api::Events.field("regarding.namespace").unwrap(),
            ["regarding", "namespace"]
        );
        assert_eq!(
            Api::Core.field("involvedObject.name").unwrap(),
            ["regarding", "name"]
        );
        assert!(Api::Core.field("regarding.name").is_none());
        assert!(Api::Events.field("reportingComponent").is_none());
        assert!(Api::Events.field("note").is_none());
        let mut o = json!({"a": {"b": 1, "c": 2}, "d": 3});
        merge(&mut o, &json!({"a": {"b": null, "e": 4}, "d": [1]}));
        assert_eq!(o, json!({"a": {"c": 2, "e": 4}, "d": [1]}));
    }
}

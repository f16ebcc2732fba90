//! `kubectl netprobe failures` from the API server: the agents' Events
//! ([`crate::sinks::kube_events`]) listed with a field selector (`reportingController`), in
//! one namespace or all, and grouped by their `netprobe.io/…` annotations into the
//! `netprobe.failures/v1` answer. Who sees what is the API server's RBAC on Events: `list
//! events` (events.k8s.io) in the namespace, or cluster-wide for `-A`.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    io::Write,
};

use k8s_openapi::api::events::v1::Event;
use kube::{Api, api::ListParams};

use super::{
    client::kube_err,
    failures::{
        EventsRead, FailureGroup, FailuresAnswer, FailuresQuery, GroupKey, MinuteCount, NodeReport,
        minute_of, recent,
    },
    kubeconfig::KubeOptions,
    memory::unix_now,
};
use crate::{
    error::{Error, Result},
    sinks::{
        Format,
        kube_events::{Side, record},
    },
};

/// Events asked for per page.
const PAGE: u32 = 500;
/// Events read at most: past it, what was read is answered and the rest is said to be left.
pub const MAX_EVENTS: usize = 100_000;

/// Whose Events are read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// The kubeconfig context's namespace (kubectl's default).
    Default,
    Namespace(String),
    /// Every namespace (`-A`).
    All,
}

pub struct Options {
    pub scope: Scope,
    /// `since` and `workload` (the namespace is the API's to select).
    pub query: FailuresQuery,
    pub format: Format,
    pub kube: KubeOptions,
}

/// Reads the Events, groups and prints them. Exit 0 (an API error is an error).
pub async fn run(opts: Options, stdout: &mut dyn Write, stderr: &mut dyn Write) -> Result<i32> {
    let clients = opts.kube.clients().await?;
    let namespace = match opts.scope {
        Scope::All => None,
        Scope::Namespace(ns) => Some(ns),
        Scope::Default => Some(clients.api.default_namespace().to_string()),
    };
    let what = || match &namespace {
        Some(ns) => format!("listing netprobe Events in namespace {ns}"),
        None => "listing netprobe Events in all namespaces".into(),
    };
    let (events, truncated) = opts
        .kube
        .bounded(what, list(&clients.api, namespace.as_deref(), what))
        .await?;
    if truncated {
        let _ = writeln!(
            stderr,
            "netprobe: WARNING: more than {MAX_EVENTS} netprobe Events; the answer counts the first {MAX_EVENTS} (narrow it with -n)"
        );
    }
    let answer = group(&events, namespace, &opts.query, unix_now());
    if let Some(e) = answer.events.as_ref().filter(|e| e.unreadable > 0) {
        let _ = writeln!(
            stderr,
            "netprobe: {} netprobe Event(s) without the netprobe.io annotations (an older agent) left out",
            e.unreadable
        );
    }
    let printed = match opts.format {
        Format::Json => writeln!(
            stdout,
            "{}",
            serde_json::to_string(&answer).expect("serializable")
        ),
        Format::Text => write!(stdout, "{}", super::failures::text(&answer)),
    };
    printed.map_err(|e| Error::io("writing the failures", e))?;
    Ok(0)
}

/// Every netprobe Event of `namespace` (all: None), page by page, at most [`MAX_EVENTS`];
/// and whether there were more.
async fn list(
    client: &kube::Client,
    namespace: Option<&str>,
    what: impl Fn() -> String,
) -> Result<(Vec<Event>, bool)> {
    let api: Api<Event> = match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let selector = format!("reportingController={}", record::CONTROLLER);
    let mut params = ListParams::default().fields(&selector).limit(PAGE);
    let mut events = Vec::new();
    loop {
        let page = api.list(&params).await.map_err(kube_err(what()))?;
        events.extend(page.items);
        let next = page.metadata.continue_.filter(|c| !c.is_empty());
        match next {
            Some(_) if events.len() >= MAX_EVENTS => {
                events.truncate(MAX_EVENTS);
                return Ok((events, true));
            }
            Some(token) => params = params.continue_token(&token),
            None => return Ok((events, false)),
        }
    }
}

/// What one Event says: its group, side, count and times.
struct Read {
    key: GroupKey,
    side: Option<Side>,
    count: u64,
    first: u64,
    last: u64,
    node: Option<String>,
    note: Option<String>,
}

fn unix(t: &k8s_openapi::chrono::DateTime<k8s_openapi::chrono::Utc>) -> u64 {
    u64::try_from(t.timestamp()).unwrap_or_default()
}

fn read(e: &Event) -> Option<Read> {
    let annotations = e.metadata.annotations.as_ref()?;
    let key = record::group_key(annotations)?;
    let first = e
        .event_time
        .as_ref()
        .map(|t| unix(&t.0))
        .or_else(|| e.deprecated_first_timestamp.as_ref().map(|t| unix(&t.0)))
        .unwrap_or_default();
    let last = e
        .series
        .as_ref()
        .map(|s| unix(&s.last_observed_time.0))
        .or_else(|| e.deprecated_last_timestamp.as_ref().map(|t| unix(&t.0)))
        .unwrap_or(first);
    let count = e
        .series
        .as_ref()
        .map(|s| s.count)
        .or(e.deprecated_count)
        .unwrap_or(1);
    let node = annotations.get(record::NODE).cloned().or_else(|| {
        e.reporting_instance
            .as_deref()
            .map(|i| i.strip_prefix("netprobe-").unwrap_or(i).to_string())
    });
    Some(Read {
        key,
        side: record::side(annotations),
        count: u64::try_from(count).unwrap_or(1).max(1),
        first,
        last: last.max(first),
        node,
        note: e.note.clone(),
    })
}

/// One group being summed: per side, since one failure has an Event on each side.
#[derive(Default)]
struct Sum {
    /// Failures per side (client, server, unknown) and per minute of last observation.
    sides: [BTreeMap<u64, u64>; 3],
    events: u64,
    first: u64,
    last: u64,
    nodes: BTreeSet<String>,
    /// The note of the Event last observed.
    note: Option<(u64, String)>,
}

impl Sum {
    fn add(&mut self, r: Read) {
        let side = match r.side {
            Some(Side::Client) => 0,
            Some(Side::Server) => 1,
            None => 2,
        };
        *self.sides[side].entry(minute_of(r.last)).or_default() += r.count;
        self.first = if self.events == 0 {
            r.first
        } else {
            self.first.min(r.first)
        };
        self.events += 1;
        self.last = self.last.max(r.last);
        self.nodes.extend(r.node);
        if let Some(n) = r.note
            && self.note.as_ref().is_none_or(|(t, _)| r.last >= *t)
        {
            self.note = Some((r.last, n));
        }
    }

    /// The side that counted most stands for the group: the client's and the server's Events
    /// of one failure count it once.
    fn group(self, key: GroupKey, at: u64) -> FailureGroup {
        let total = |m: &BTreeMap<u64, u64>| m.values().sum::<u64>();
        let [c, s, u] = self.sides;
        let counted = [c, s, u].into_iter().max_by_key(total).unwrap_or_default();
        let per_minute: Vec<MinuteCount> = counted
            .into_iter()
            .map(|(minute, count)| MinuteCount { minute, count })
            .collect();
        FailureGroup {
            key,
            count: per_minute.iter().map(|m| m.count).sum(),
            now: recent(&per_minute, at),
            per_minute,
            first_seen: self.first,
            last_seen: self.last,
            nodes: self.nodes.into_iter().collect(),
            example: None,
            note: self.note.map(|(_, n)| n),
            events: Some(self.events),
        }
    }
}

/// The answer of `events` (netprobe's, from `namespace`, None: all) at `at`: those last
/// observed within `query.since` and selected by its workload, grouped.
pub fn group(
    events: &[Event],
    namespace: Option<String>,
    query: &FailuresQuery,
    at: u64,
) -> FailuresAnswer {
    let from = at.saturating_sub(query.since.as_secs());
    let mut read = EventsRead {
        namespace,
        listed: events.len() as u64,
        used: 0,
        unreadable: 0,
    };
    let mut sums: HashMap<GroupKey, Sum> = HashMap::new();
    for e in events {
        let Some(r) = self::read(e) else {
            read.unreadable += 1;
            continue;
        };
        if r.last < from || !query.selects(&r.key) {
            continue;
        }
        read.used += 1;
        sums.entry(r.key.clone()).or_default().add(r);
    }
    let groups: Vec<FailureGroup> = sums.into_iter().map(|(k, s)| s.group(k, at)).collect();
    let nodes: BTreeSet<&String> = groups.iter().flat_map(|g| &g.nodes).collect();
    let nodes = nodes
        .into_iter()
        .map(|n| NodeReport {
            node: n.clone(),
            window_s: None,
            evicted: 0,
            error: None,
        })
        .collect();
    let mut answer = FailuresAnswer::new(at, query.since, nodes, groups);
    answer.events = Some(read);
    answer
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use k8s_openapi::api::events::v1::Event;
    use kube::api::PostParams;
    use serde_json::json;

    use super::*;
    use crate::model::Outcome;

    /// The start of a minute.
    const T: u64 = 1_800_000_000;

    fn time(t: u64) -> String {
        k8s_openapi::chrono::DateTime::from_timestamp(t as i64, 0)
            .unwrap()
            .to_rfc3339_opts(k8s_openapi::chrono::SecondsFormat::Micros, true)
    }

    /// A netprobe Event about `side` of client → Service seldon-scheduler:9004, dropped by a
    /// Calico rule, first at `first`, `count` failures last observed at `last`.
    fn event(name: &str, side: &str, client: &str, count: i32, first: u64, last: u64) -> Event {
        let mut e = json!({
            "metadata": {"name": name, "namespace": "financial-inference", "annotations": {
                "netprobe.io/side": side,
                "netprobe.io/outcome": "dropped_by_rule",
                "netprobe.io/client-namespace": "financial-inference",
                "netprobe.io/client": client,
                "netprobe.io/destination-namespace": "financial-inference",
                "netprobe.io/destination": "Service/seldon-scheduler",
                "netprobe.io/port": "9004",
                "netprobe.io/rule-owner": "calico",
                "netprobe.io/rule-table": "filter",
                "netprobe.io/rule-chain": "cali-tw-cali0123",
                "netprobe.io/rule-position": "5",
                "netprobe.io/policies": "financial-inference/allow-xds",
                "netprobe.io/node": format!("node-{side}"),
            }},
            "eventTime": time(first),
            "regarding": {"apiVersion": "v1", "kind": "Pod", "namespace": "financial-inference", "name": "seldon-scheduler-0"},
            "reportingController": "netprobe.io/agent",
            "reportingInstance": format!("netprobe-node-{side}"),
            "action": "Connect",
            "reason": "ConnectionDropped",
            "type": "Warning",
            "note": format!("Calico policy financial-inference/allow-xds denies {name}. The SYN was dropped. Check it."),
        });
        if count > 1 {
            e["series"] = json!({"count": count, "lastObservedTime": time(last)});
        }
        serde_json::from_value(e).unwrap()
    }

    fn query(since_s: u64, workload: Option<&str>) -> FailuresQuery {
        FailuresQuery {
            since: Duration::from_secs(since_s),
            namespace: None,
            workload: workload.map(str::to_string),
        }
    }

    #[test]
    fn a_failures_events_on_both_sides_count_once_and_old_or_unreadable_ones_are_left_out() {
        let mut unreadable = event("old-agent", "server", "Deployment/client", 1, T, T);
        unreadable.metadata.annotations = None;
        let events = [
            // One failure stream, seen on the server's and on the client's pod.
            event("s", "server", "Deployment/client", 7, T, T + 70),
            event("c", "client", "Deployment/client", 7, T + 1, T + 125),
            // Another client, once, two minutes earlier.
            event("o", "server", "Deployment/other", 1, T + 5, T + 5),
            // Last observed before the period.
            event("gone", "server", "Deployment/gone", 4, T - 2000, T - 1000),
            unreadable,
        ];
        let a = group(
            &events,
            Some("financial-inference".into()),
            &query(600, None),
            T + 130,
        );
        let read = a.events.as_ref().unwrap();
        assert_eq!((read.listed, read.used, read.unreadable), (5, 3, 1));
        assert_eq!(a.groups.len(), 2, "{:#?}", a.groups);
        let g = &a.groups[0];
        assert_eq!(g.key.client.name, "Deployment/client");
        assert_eq!(
            g.key.destination.describe(),
            "financial-inference/Service/seldon-scheduler"
        );
        assert_eq!((g.key.port, g.key.outcome), (9004, Outcome::DroppedByRule));
        let rule = g.key.rule.as_ref().unwrap();
        assert_eq!(
            rule.describe(),
            "calico cali-tw-cali0123 rule 5 (policy financial-inference/allow-xds)"
        );
        assert_eq!(
            g.count, 7,
            "both sides' Events of the same failures count once"
        );
        assert_eq!(g.events, Some(2));
        assert_eq!(g.nodes, ["node-client", "node-server"]);
        assert_eq!((g.first_seen, g.last_seen), (T, T + 125));
        assert_eq!(g.now, 7, "last observed this minute");
        assert!(
            g.note.as_ref().unwrap().contains("denies c."),
            "the latest note"
        );
        assert_eq!(a.groups[1].count, 1);
        assert_eq!(a.groups[1].now, 0, "two minutes ago");
        let nodes: Vec<&str> = a.nodes.iter().map(|n| n.node.as_str()).collect();
        assert_eq!(nodes, ["node-client", "node-server"]);
        // --workload keeps the groups the workload is a side of.
        let only = group(&events, None, &query(600, Some("other")), T + 130);
        assert_eq!(only.groups.len(), 1);
        assert_eq!(only.events.as_ref().unwrap().used, 1);
        // A longer period takes the old Event in.
        assert_eq!(
            group(&events, None, &query(3600, None), T + 130)
                .groups
                .len(),
            3
        );

        let text = crate::cluster::failures::text(&a);
        assert!(
            text.starts_with("failures in the last 10m (now = Events last observed this minute and the previous) from 3 netprobe Event(s) in namespace financial-inference, written by the agents of 2 node(s): node-client, node-server\n"),
            "{text}"
        );
        assert!(
            text.contains("\nfinancial-inference/Deployment/client\n  → financial-inference/Service/seldon-scheduler:9004  dropped_by_rule  calico cali-tw-cali0123 rule 5 (policy financial-inference/allow-xds)\n      now 7, last 10m 7; last seen 5s ago on node-client, node-server\n      e.g. Calico policy financial-inference/allow-xds denies c. The SYN was dropped.\n"),
            "{text}"
        );
        let json = serde_json::to_value(&a).unwrap();
        assert!(json["groups"][0].get("example").is_none(), "{json:#}");
        assert_eq!(json["events"]["namespace"], "financial-inference");
    }

    async fn client(kube: &netprobe_lab::kubeapi::FakeKube, user: &str) -> kube::Client {
        let kubeconfig = kube::config::Kubeconfig::from_yaml(&kube.kubeconfig_with(user)).unwrap();
        let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
            .await
            .unwrap();
        kube::Client::try_from(config).unwrap()
    }

    /// Through the real kube-rs client against the API stand-in: the field selector keeps
    /// netprobe's Events, pages are followed, and RBAC decides who reads which namespace.
    #[tokio::test]
    async fn events_are_listed_by_field_selector_page_by_page_as_rbac_allows() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let kube = netprobe_lab::kubeapi::FakeKube::start(
            std::net::TcpListener::bind("127.0.0.1:0").unwrap(),
        );
        let admin = client(
            &kube,
            &format!("{{token: {}}}", netprobe_lab::kubeapi::ADMIN_TOKEN),
        )
        .await;
        let posted: Api<Event> = Api::namespaced(admin.clone(), "financial-inference");
        let now = unix_now();
        for i in 0..(PAGE as usize + 3) {
            let e = event(&format!("e{i}"), "server", "Deployment/client", 2, now, now);
            posted.create(&PostParams::default(), &e).await.unwrap();
        }
        let mut other = event("kubelet", "server", "Deployment/client", 1, now, now);
        other.reporting_controller = Some("kubelet".into());
        posted.create(&PostParams::default(), &other).await.unwrap();
        let mut elsewhere = event("b", "server", "Deployment/b", 1, now, now);
        elsewhere.metadata.namespace = Some("team-b".into());
        elsewhere.regarding.as_mut().unwrap().namespace = Some("team-b".into());
        Api::<Event>::namespaced(admin.clone(), "team-b")
            .create(&PostParams::default(), &elsewhere)
            .await
            .unwrap();

        let what = || "listing".to_string();
        let (all, more) = list(&admin, None, what).await.unwrap();
        assert_eq!(
            (all.len(), more),
            (PAGE as usize + 4, false),
            "netprobe's only, every page"
        );
        let (team_b, _) = list(&admin, Some("team-b"), what).await.unwrap();
        assert_eq!(team_b.len(), 1);
        let a = group(&all, None, &query(600, None), now);
        assert_eq!(a.groups.len(), 2);
        assert_eq!(a.groups[0].count, 2 * (u64::from(PAGE) + 3));

        // A tracer of team-b: its namespace, not the others, not all.
        kube.add_token("team-b-token", "tracer-b", &["system:authenticated"]);
        kube.allow(
            "tracer-b",
            "list",
            "events.k8s.io",
            "events",
            Some("team-b"),
        );
        let tracer = client(&kube, "{token: team-b-token}").await;
        assert_eq!(
            list(&tracer, Some("team-b"), what).await.unwrap().0.len(),
            1
        );
        for ns in [Some("financial-inference"), None] {
            let e = list(&tracer, ns, what).await.unwrap_err().to_string();
            assert!(e.contains("forbidden") && e.contains("tracer-b"), "{e}");
        }
        // The same objects in core/v1's shape, selected by its field names.
        let core: Api<k8s_openapi::api::core::v1::Event> = Api::all(admin);
        let listed = core
            .list(
                &ListParams::default()
                    .fields("reportingComponent=netprobe.io/agent,involvedObject.namespace=team-b"),
            )
            .await
            .unwrap();
        assert_eq!(listed.items.len(), 1);
        let e = &listed.items[0];
        assert_eq!(
            e.message.as_deref().map(|m| m.starts_with("Calico policy")),
            Some(true)
        );
        assert_eq!(e.reporting_component.as_deref(), Some("netprobe.io/agent"));
        let bad = core
            .list(&ListParams::default().fields("reportingController=netprobe.io/agent"))
            .await
            .unwrap_err()
            .to_string();
        assert!(bad.contains("field label not supported"), "{bad}");
    }
}

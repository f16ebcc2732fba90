//! `kubectl netprobe failures`: failed connection attempts and DNS lookups grouped by client
//! workload → Service:port, outcome and rule. The CLI reads them from the agents' Kubernetes
//! Events ([`super::event_failures`]); an agent also answers `GET /v1/failures?…` from its own
//! memory ([`crate::cluster::memory`]). Here: the query, the typed answer
//! (`netprobe.failures/v1`) and the text rendering.

use std::{fmt::Write as _, time::Duration};

use serde::{Deserialize, Serialize};

use super::protocol::valid_name;
use crate::{model::Outcome, sinks::kube_events::record::outcome_name, verdict::Verdict};

/// The agent's HTTP path for the failures it remembers.
pub const FAILURES_PATH: &str = "/v1/failures";
pub const FAILURES_SCHEMA: &str = "netprobe.failures/v1";
/// Longest `since` an agent accepts (what it remembers is its window, shorter anyway).
pub const MAX_SINCE: Duration = Duration::from_secs(24 * 3600);
pub const DEFAULT_SINCE: Duration = Duration::from_secs(600);

/// What a client asks the agents: failures of the last `since`, optionally only those where
/// one side is in `namespace` or is `workload`.
#[derive(Clone, Debug, PartialEq)]
pub struct FailuresQuery {
    pub since: Duration,
    pub namespace: Option<String>,
    /// `Kind/name` (e.g. `Deployment/client`) or a bare name.
    pub workload: Option<String>,
}

impl Default for FailuresQuery {
    fn default() -> Self {
        Self {
            since: DEFAULT_SINCE,
            namespace: None,
            workload: None,
        }
    }
}

/// `10m`, `30s`, `2h`: whole seconds, minutes or hours, at most [`MAX_SINCE`].
pub fn parse_since(s: &str) -> Result<Duration, String> {
    let bad = || format!("invalid since `{s}` (e.g. 30s, 10m, 2h; at most 24h)");
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?);
    let n: u64 = num.parse().map_err(|_| bad())?;
    let secs = match unit {
        "s" => n,
        "m" => n.checked_mul(60).ok_or_else(bad)?,
        "h" => n.checked_mul(3600).ok_or_else(bad)?,
        _ => return Err(bad()),
    };
    let d = Duration::from_secs(secs);
    (secs > 0 && d <= MAX_SINCE).then_some(d).ok_or_else(bad)
}

/// `Kind/name` or `name`, each part a Kubernetes name.
fn valid_workload(w: &str) -> bool {
    match w.split_once('/') {
        Some((kind, name)) => {
            !kind.is_empty() && kind.bytes().all(|b| b.is_ascii_alphabetic()) && valid_name(name)
        }
        None => valid_name(w),
    }
}

impl FailuresQuery {
    pub fn to_query(&self) -> String {
        let mut q = form_urlencoded::Serializer::new(String::new());
        q.append_pair("since", &format!("{}s", self.since.as_secs()));
        if let Some(n) = &self.namespace {
            q.append_pair("namespace", n);
        }
        if let Some(w) = &self.workload {
            q.append_pair("workload", w);
        }
        q.finish()
    }

    /// Strict, as the trace request: unknown or repeated parameters are refused.
    pub fn from_query(query: &str) -> Result<Self, String> {
        let mut r = Self::default();
        let mut seen = std::collections::HashSet::new();
        for (k, v) in form_urlencoded::parse(query.as_bytes()) {
            if !seen.insert(k.clone()) {
                return Err(format!("parameter `{k}` given twice"));
            }
            match &*k {
                "since" => r.since = parse_since(&v)?,
                "namespace" if valid_name(&v) => r.namespace = Some(v.to_string()),
                "workload" if valid_workload(&v) => r.workload = Some(v.to_string()),
                "namespace" | "workload" => return Err(format!("invalid {k} `{v}`")),
                other => return Err(format!("unknown parameter `{other}`")),
            }
        }
        Ok(r)
    }

    /// Does a group concern what was asked for?
    pub fn selects(&self, key: &GroupKey) -> bool {
        let sides = [&key.client, &key.destination];
        let in_ns = |n: &String| sides.iter().any(|p| p.namespace.as_ref() == Some(n));
        self.namespace.as_ref().is_none_or(in_ns)
            && self
                .workload
                .as_ref()
                .is_none_or(|w| sides.iter().any(|p| p.is(w)))
    }
}

/// One side of a failing group, named by what tenants control (a restarted pod is the same
/// workload).
#[derive(
    Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, schemars::JsonSchema,
)]
pub struct Party {
    /// Kubernetes namespace (absent for a bare address).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// `Deployment/client`, `Pod/client-0`, `Service/seldon-scheduler`, or the address.
    pub name: String,
}

impl Party {
    pub fn describe(&self) -> String {
        match &self.namespace {
            Some(ns) => format!("{ns}/{}", self.name),
            None => self.name.clone(),
        }
    }

    /// `Kind/name` equal, or the name alone.
    fn is(&self, workload: &str) -> bool {
        self.name == workload
            || self
                .name
                .split_once('/')
                .is_some_and(|(_, n)| n == workload)
    }
}

/// The rule (and the policies or object behind it) a group's attempts died at.
#[derive(
    Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, schemars::JsonSchema,
)]
pub struct RuleRef {
    /// `calico`, `kube-proxy`, `kube-router`, `flannel`, `user`.
    pub owner: String,
    /// Policies in force (namespace/name), for a policy default deny.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub policies: Vec<String>,
    pub table: String,
    pub chain: String,
    /// 1-based position in the chain (absent when the chain's policy decided).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub position: Option<usize>,
}

impl RuleRef {
    pub fn describe(&self) -> String {
        let mut s = format!("{} {}", self.owner, self.chain);
        if let Some(p) = self.position {
            let _ = write!(s, " rule {p}");
        }
        if !self.policies.is_empty() {
            let _ = write!(s, " (policy {})", self.policies.join(", "));
        }
        s
    }
}

/// What identifies a group, the same on every node (groups merge across nodes by it).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema)]
pub struct GroupKey {
    /// The client's workload (else its pod, else its address).
    pub client: Party,
    /// The Service the client dialled, else the server's workload, pod or address.
    pub destination: Party,
    /// The port dialled (the Service port for a ClusterIP).
    pub port: u16,
    pub outcome: Outcome,
    /// The netfilter rule that dropped or rejected the attempts, when one did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<RuleRef>,
}

/// Failures in one minute.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct MinuteCount {
    /// Start of the minute, Unix seconds.
    pub minute: u64,
    pub count: u64,
}

/// Start (Unix seconds) of the minute `t` is in.
pub fn minute_of(t: u64) -> u64 {
    t - t % 60
}

/// Failures this minute and the previous one: "right now".
pub fn recent(per_minute: &[MinuteCount], at: u64) -> u64 {
    let from = minute_of(at).saturating_sub(60);
    per_minute
        .iter()
        .filter(|m| m.minute >= from)
        .map(|m| m.count)
        .sum()
}

/// Failed attempts (or lookups) of one kind, from one client to one destination.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct FailureGroup {
    #[serde(flatten)]
    pub key: GroupKey,
    /// Failures in the period asked for (`since_s`). From Events: the `series.count` of the
    /// Events last observed in the period (an Event counts all its failures, earlier ones
    /// included); the client's and the server's Events of one failure count once.
    pub count: u64,
    /// Failures this minute and the previous one (from Events: of the Events last observed
    /// then).
    pub now: u64,
    /// Counts per minute in the period, oldest first (from Events: by the minute each Event
    /// was last observed).
    pub per_minute: Vec<MinuteCount>,
    /// First and last failure (Unix seconds) the agents remember (from Events: the first
    /// Event's time, the latest observation).
    pub first_seen: u64,
    pub last_seen: u64,
    /// Nodes whose agents saw these failures.
    pub nodes: Vec<String>,
    /// The latest failure's verdict (`netprobe.verdict/v1`); only in an agent's own answer
    /// (`/v1/failures`), not from Events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub example: Option<Box<Verdict>>,
    /// The latest Event's note: who decided (policy or rule), both sides, the explanation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// Events this group was read from (absent in an agent's own answer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub events: Option<u64>,
}

/// An agent asked for its failures.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct NodeReport {
    pub node: String,
    /// How far back this agent remembers, seconds (absent when it did not answer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window_s: Option<u64>,
    /// Groups the agent forgot to stay within its bound (oldest first), since it started.
    pub evicted: u64,
    /// Why the agent did not answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// What is failing: read from the agents' Events, or one agent's own answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct FailuresAnswer {
    /// `netprobe.failures/v1`.
    pub schema: String,
    /// When the answer was made (Unix seconds).
    pub at: u64,
    /// The period asked for, seconds.
    pub since_s: u64,
    /// The agents that reported (from Events: those whose Events are in the answer).
    pub nodes: Vec<NodeReport>,
    /// Most failures first.
    pub groups: Vec<FailureGroup>,
    /// Where the groups come from (from Events: which namespace's Events were read; absent
    /// in an agent's own answer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub events: Option<EventsRead>,
}

/// The Events `failures` read from the API server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct EventsRead {
    /// The namespace listed; absent: all namespaces (`-A`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// netprobe Events listed.
    pub listed: u64,
    /// Of those, last observed within `since_s` and selected.
    pub used: u64,
    /// Events without netprobe's annotations (written by an older agent), left out.
    pub unreadable: u64,
}

impl FailuresAnswer {
    pub fn new(
        at: u64,
        since: Duration,
        nodes: Vec<NodeReport>,
        groups: Vec<FailureGroup>,
    ) -> Self {
        let mut a = Self {
            schema: FAILURES_SCHEMA.into(),
            at,
            since_s: since.as_secs(),
            nodes,
            groups,
            events: None,
        };
        a.sort();
        a
    }

    fn sort(&mut self) {
        self.groups
            .sort_by_key(|g| std::cmp::Reverse((g.count, g.last_seen)));
    }
}

/// The headline, the DNS question if any, and the first sentence of the explanation: the one
/// line a group shows.
pub fn one_line(v: &Verdict) -> String {
    let e = v.explanation.trim();
    let end = e.find(". ").map_or(e.len(), |i| i + 1);
    let dns = v.udp.as_ref().and_then(|u| u.dns.as_ref());
    let question = dns.map(|q| format!(" (DNS {})", q.describe()));
    format!(
        "{}{}: {}",
        v.headline,
        question.unwrap_or_default(),
        &e[..end]
    )
}

fn ago(at: u64, t: u64) -> String {
    let s = at.saturating_sub(t);
    if s < 120 {
        format!("{s}s ago")
    } else {
        format!("{}m ago", s / 60)
    }
}

fn span(d: u64) -> String {
    if d.is_multiple_of(3600) {
        format!("{}h", d / 3600)
    } else if d.is_multiple_of(60) {
        format!("{}m", d / 60)
    } else {
        format!("{d}s")
    }
}

/// The answer for a person: by client workload, then each destination:port, outcome and rule.
pub fn text(a: &FailuresAnswer) -> String {
    let since = span(a.since_s);
    let asked: Vec<String> = a.nodes.iter().map(node_line).collect();
    let mut s = match &a.events {
        Some(e) => format!(
            "failures in the last {since} (now = Events last observed this minute and the previous) from {} netprobe Event(s) in {}, written by the agents of {} node(s): {}\n",
            e.used,
            e.namespace
                .as_ref()
                .map_or_else(|| "all namespaces".into(), |n| format!("namespace {n}")),
            a.nodes.len(),
            asked.join(", ")
        ),
        None => format!(
            "failures in the last {since}{} (now = this minute and the previous) from {} agent(s): {}\n",
            memory_note(a),
            a.nodes.len(),
            asked.join(", ")
        ),
    };
    if a.groups.is_empty() {
        s.push_str("no failed connection attempt or DNS lookup\n");
        return s;
    }
    let mut clients: Vec<(&Party, u64)> = Vec::new();
    for g in &a.groups {
        match clients.iter_mut().find(|(c, _)| **c == g.key.client) {
            Some((_, n)) => *n += g.count,
            None => clients.push((&g.key.client, g.count)),
        }
    }
    clients.sort_by_key(|c| std::cmp::Reverse(c.1));
    for (client, _) in clients {
        let _ = writeln!(s, "\n{}", client.describe());
        for g in a.groups.iter().filter(|g| g.key.client == *client) {
            group_text(&mut s, g, a.at, &since);
        }
    }
    s
}

/// When `since` reaches further back than an agent remembers, say so.
fn memory_note(a: &FailuresAnswer) -> String {
    match a.nodes.iter().filter_map(|n| n.window_s).min() {
        Some(w) if w < a.since_s => format!(" (the agents remember {})", span(w)),
        _ => String::new(),
    }
}

fn node_line(n: &NodeReport) -> String {
    match (&n.error, n.evicted) {
        (Some(e), _) => format!("{} (NO ANSWER: {e})", n.node),
        (None, 0) => n.node.clone(),
        (None, x) => format!("{} ({x} older groups evicted)", n.node),
    }
}

fn group_text(s: &mut String, g: &FailureGroup, at: u64, since: &str) {
    let k = &g.key;
    let rule = k.rule.as_ref().map(|r| format!("  {}", r.describe()));
    let _ = writeln!(
        s,
        "  → {}:{}  {}{}",
        k.destination.describe(),
        k.port,
        outcome_name(k.outcome),
        rule.unwrap_or_default()
    );
    let _ = writeln!(
        s,
        "      now {}, last {since} {}; last seen {} on {}",
        g.now,
        g.count,
        ago(at, g.last_seen),
        g.nodes.join(", ")
    );
    let example = match (&g.example, &g.note) {
        (Some(v), _) => one_line(v),
        (None, Some(note)) => sentences(note, 2).to_string(),
        (None, None) => return,
    };
    let _ = writeln!(s, "      e.g. {example}");
}

/// The first `n` sentences of `text`.
fn sentences(text: &str, n: usize) -> &str {
    let text = text.trim();
    let mut end = 0;
    for _ in 0..n {
        match text[end..].find(". ") {
            Some(i) => end += i + 1,
            None => return text,
        }
    }
    &text[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_round_trip_and_bad_ones_are_refused() {
        let q = FailuresQuery {
            since: Duration::from_secs(600),
            namespace: Some("financial-inference".into()),
            workload: Some("Deployment/client".into()),
        };
        assert_eq!(FailuresQuery::from_query(&q.to_query()).unwrap(), q);
        assert_eq!(
            FailuresQuery::from_query("").unwrap(),
            FailuresQuery::default()
        );
        assert_eq!(
            FailuresQuery::from_query("since=2h").unwrap().since,
            Duration::from_secs(7200)
        );
        for bad in [
            "since=10m&since=1h",
            "since=25h",
            "since=0s",
            "since=10",
            "since=-1m",
            "since=99999999999999999999h",
            "namespace=..%2Fetc",
            "workload=Deploy-ment/x",
            "workload=a/b/c",
            "shell=1",
        ] {
            assert!(FailuresQuery::from_query(bad).is_err(), "{bad}");
        }
        assert!(
            FailuresQuery::from_query("namespace=a&namespace=b")
                .unwrap_err()
                .contains("twice")
        );
    }

    fn key(client: &str, ns: &str) -> GroupKey {
        GroupKey {
            client: Party {
                namespace: Some(ns.into()),
                name: client.into(),
            },
            destination: Party {
                namespace: Some("financial-inference".into()),
                name: "Service/seldon-scheduler".into(),
            },
            port: 9004,
            outcome: Outcome::DroppedByRule,
            rule: None,
        }
    }

    #[test]
    fn a_query_selects_by_either_sides_namespace_and_workload() {
        let k = key("Deployment/client", "team-a");
        let q = |s: &str| FailuresQuery::from_query(s).unwrap();
        assert!(q("").selects(&k));
        assert!(q("namespace=team-a").selects(&k));
        assert!(q("namespace=financial-inference").selects(&k));
        assert!(!q("namespace=other").selects(&k));
        assert!(q("workload=Deployment/client").selects(&k));
        assert!(q("workload=client").selects(&k));
        assert!(q("workload=seldon-scheduler").selects(&k));
        assert!(!q("workload=StatefulSet/client").selects(&k));
        assert!(!q("namespace=team-a&workload=other").selects(&k));
    }

    fn verdict(explanation: &str) -> Verdict {
        let mut v = crate::verdict::classify(
            &[],
            ("10.42.0.5".parse().unwrap(), 40000),
            &Default::default(),
            &Default::default(),
        );
        v.explanation = explanation.into();
        v
    }

    fn group(k: GroupKey, node: &str, minutes: &[(u64, u64)], example: &str) -> FailureGroup {
        let per_minute: Vec<MinuteCount> = minutes
            .iter()
            .map(|&(minute, count)| MinuteCount { minute, count })
            .collect();
        FailureGroup {
            key: k,
            count: per_minute.iter().map(|m| m.count).sum(),
            now: 0,
            first_seen: per_minute[0].minute,
            last_seen: per_minute[per_minute.len() - 1].minute + 30,
            per_minute,
            nodes: vec![node.into()],
            example: Some(Box::new(verdict(example))),
            note: None,
            events: None,
        }
    }

    #[test]
    fn an_agents_answer_renders_by_client_and_reads_back_as_it_was() {
        // The start of a minute.
        let t = 1_800_000_000;
        let mut g = group(
            key("Deployment/client", "x"),
            "node-a",
            &[(t, 3), (t + 60, 3), (t + 120, 4)],
            "new. More.",
        );
        g.now = recent(&g.per_minute, t + 130);
        assert_eq!(g.now, 7, "this minute (t+120) and the previous (t+60)");
        let other = group(key("Deployment/other", "x"), "node-a", &[(t, 1)], "other.");
        let report = NodeReport {
            node: "node-a".into(),
            window_s: Some(3600),
            evicted: 2,
            error: None,
        };
        let m = FailuresAnswer::new(t + 130, DEFAULT_SINCE, vec![report], vec![other, g]);
        assert_eq!(m.schema, FAILURES_SCHEMA);
        assert_eq!(
            m.groups[0].key.client.name, "Deployment/client",
            "most first"
        );
        let text = text(&m);
        assert!(text.starts_with("failures in the last 10m (now"), "{text}");
        assert!(text.contains("node-a (2 older groups evicted)"), "{text}");
        let mut long = m.clone();
        long.since_s = 7200;
        assert!(
            super::text(&long).starts_with("failures in the last 2h (the agents remember 1h) (now"),
            "{}",
            super::text(&long)
        );
        assert!(
            text.contains("\nx/Deployment/client\n  → financial-inference/Service/seldon-scheduler:9004  dropped_by_rule\n      now 7, last 10m 10; last seen 0s ago on node-a\n      e.g. "),
            "{text}"
        );
        assert!(text.contains(": new.\n"), "the first sentence: {text}");
        let json = serde_json::to_string(&m).unwrap();
        assert_eq!(serde_json::from_str::<FailuresAnswer>(&json).unwrap(), m);
        assert_eq!(sentences("A b. C d. E f.", 2), "A b. C d.");
        assert_eq!(sentences("A b", 2), "A b");
    }

    #[test]
    fn one_line_is_the_headline_and_the_first_sentence() {
        let v = verdict("The SYN was dropped by rule 7. Check the policy.");
        assert_eq!(
            one_line(&v),
            format!("{}: The SYN was dropped by rule 7.", v.headline)
        );
        let rule = RuleRef {
            owner: "calico".into(),
            policies: vec!["financial-inference/allow-xds".into()],
            table: "filter".into(),
            chain: "cali-tw-cali123".into(),
            position: Some(7),
        };
        assert_eq!(
            rule.describe(),
            "calico cali-tw-cali123 rule 7 (policy financial-inference/allow-xds)"
        );
    }
}

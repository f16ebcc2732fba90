//! Privileged test of what ships for Prometheus and Grafana (`deploy/prometheus/`,
//! `deploy/grafana/`): every metric name an alert expression or a dashboard query reads exists
//! in the `/metrics` of a real agent that has seen failures, and no sample of that scrape has
//! an empty label value. The S1 lab (Calico end-of-tier deny behind a kube-proxy ClusterIP),
//! a refused connection, the API stand-in, the agent alone.

mod support;

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use netprobe_lab::{Connect, metrics, rules::CLUSTER_IP};
use serde_json::Value;

/// Series Prometheus makes itself for every target (not the agent's to expose).
const PROMETHEUS_OWN: &[&str] = &["up"];

/// PromQL words that are not metric names: operators, modifiers, literals.
const KEYWORDS: &[&str] = &[
    "and", "or", "unless", "offset", "bool", "inf", "nan", "atan2",
];
/// Words followed by a list of label names.
const LABEL_LISTS: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];
/// Aggregation operators (`sum by (x) (…)`: not followed by a parenthesis).
const AGGREGATIONS: &[&str] = &[
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
    "limitk",
    "limit_ratio",
];

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The metric names `expr` reads: identifiers that are not functions, aggregations, keywords,
/// label names (in `{…}` or after `by`/`on`/…), strings, numbers, durations (`[5m]`, `offset
/// 1h`) or Grafana variables (`$job`, `${x}`, `$__rate_interval`).
fn metric_names(expr: &str) -> BTreeSet<String> {
    let c: Vec<char> = expr.chars().collect();
    let mut out = BTreeSet::new();
    let mut i = 0;
    while i < c.len() {
        i = match c[i] {
            '"' | '\'' | '`' => past_string(&c, i),
            '{' => past_closing(&c, i, '{', '}'),
            '[' => past_closing(&c, i, '[', ']'),
            '$' => past_variable(&c, i),
            ch if ch.is_ascii_digit() || ch == '.' => past_word(&c, i),
            ch if ch.is_ascii_alphabetic() || ch == '_' || ch == ':' => {
                let end = past_word(&c, i);
                let word: String = c[i..end].iter().collect();
                let next = next_char(&c, end);
                if LABEL_LISTS.contains(&word.as_str()) && next.map(|(_, ch)| ch) == Some('(') {
                    past_closing(&c, next.unwrap().0, '(', ')')
                } else {
                    let function = next.map(|(_, ch)| ch) == Some('(');
                    let keyword = KEYWORDS.contains(&word.as_str())
                        || AGGREGATIONS.contains(&word.as_str())
                        || LABEL_LISTS.contains(&word.as_str());
                    if !function && !keyword {
                        out.insert(word);
                    }
                    end
                }
            }
            _ => i + 1,
        };
    }
    out
}

fn past_word(c: &[char], i: usize) -> usize {
    let mut j = i;
    while j < c.len() && (c[j].is_ascii_alphanumeric() || matches!(c[j], '_' | ':' | '.')) {
        j += 1;
    }
    j
}

fn next_char(c: &[char], i: usize) -> Option<(usize, char)> {
    (i..c.len())
        .map(|j| (j, c[j]))
        .find(|(_, ch)| !ch.is_whitespace())
}

fn past_string(c: &[char], i: usize) -> usize {
    let quote = c[i];
    let mut j = i + 1;
    while j < c.len() && c[j] != quote {
        j += if c[j] == '\\' { 2 } else { 1 };
    }
    j + 1
}

/// Past the `close` matching the `open` at `i`, strings inside skipped.
fn past_closing(c: &[char], i: usize, open: char, close: char) -> usize {
    let (mut depth, mut j) = (0, i);
    while j < c.len() {
        match c[j] {
            '"' | '\'' | '`' => {
                j = past_string(c, j);
                continue;
            }
            ch if ch == open => depth += 1,
            ch if ch == close => {
                depth -= 1;
                if depth == 0 {
                    return j + 1;
                }
            }
            _ => {}
        }
        j += 1;
    }
    j
}

fn past_variable(c: &[char], i: usize) -> usize {
    if c.get(i + 1) == Some(&'{') {
        past_closing(c, i + 1, '{', '}')
    } else {
        past_word(c, i + 1)
    }
}

/// The names a scrape exposes: every family its `# TYPE` lines declare (histograms with their
/// `_bucket`, `_sum` and `_count` series) and every sample's name.
fn exposed(body: &str) -> BTreeSet<String> {
    let mut out: BTreeSet<String> = metrics::parse(body).into_iter().map(|s| s.name).collect();
    for line in body.lines() {
        let mut w = line.split_whitespace();
        if let (Some("#"), Some("TYPE"), Some(name), Some(kind)) =
            (w.next(), w.next(), w.next(), w.next())
        {
            out.insert(name.to_string());
            if kind == "histogram" {
                out.extend(["_bucket", "_sum", "_count"].map(|s| format!("{name}{s}")));
            }
        }
    }
    out
}

/// The names `exprs` read that `exposed` lacks (`up` aside), with the query naming them.
fn missing(exprs: &[String], exposed: &BTreeSet<String>) -> Vec<(String, String)> {
    exprs
        .iter()
        .flat_map(|e| metric_names(e).into_iter().map(move |n| (n, e.clone())))
        .filter(|(n, _)| !exposed.contains(n) && !PROMETHEUS_OWN.contains(&n.as_str()))
        .collect()
}

/// Every `expr` of the PrometheusRule's groups.
fn alert_exprs(file: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(file).unwrap();
    let rule: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
    let mut out = Vec::new();
    for g in rule["spec"]["groups"].as_sequence().expect("groups") {
        for r in g["rules"].as_sequence().expect("rules") {
            out.push(r["expr"].as_str().expect("an expr").to_string());
        }
    }
    out
}

/// Every query of the dashboard: panel targets (rows' panels too) and template variables
/// (`label_values(<selector>, label)`: the selector).
fn dashboard_exprs(file: &Path) -> Vec<String> {
    let d: Value = serde_json::from_str(&std::fs::read_to_string(file).unwrap()).unwrap();
    let mut out = Vec::new();
    let mut panels: Vec<&Value> = d["panels"].as_array().unwrap().iter().collect();
    while let Some(p) = panels.pop() {
        panels.extend(p["panels"].as_array().into_iter().flatten());
        for t in p["targets"].as_array().into_iter().flatten() {
            out.push(t["expr"].as_str().expect("a target expr").to_string());
        }
    }
    for v in d["templating"]["list"].as_array().unwrap() {
        if let Some(q) = v["query"]["query"].as_str() {
            let selector = q
                .strip_prefix("label_values(")
                .and_then(|s| s.rsplit_once(','))
                .map_or(q, |(sel, _)| sel);
            out.push(selector.to_string());
        }
    }
    out
}

#[test]
fn the_promql_reader_finds_metric_names_only() {
    let expr = r#"sum by (service, rule_owner) (rate(netprobe_failed_connections_total{service!="", job=~"$job"}[$__rate_interval])) / ignoring(x) group_left(y) clamp_min(sum(rate(netprobe_dns_queries_total[5m] offset 1h)), 1e-9) > 1/60 and on (instance) histogram_quantile(0.99, sum by (le) (rate(netprobe_dns_lookup_duration_seconds_bucket{le!="+Inf"}[${w}]))) or up{job=~".*netprobe.*"} == 0"#;
    let names: Vec<String> = metric_names(expr).into_iter().collect();
    assert_eq!(
        names,
        [
            "netprobe_dns_lookup_duration_seconds_bucket",
            "netprobe_dns_queries_total",
            "netprobe_failed_connections_total",
            "up"
        ]
    );
}

/// Done-when of issue #17: "the dashboard and alert queries reference only metric names the lab
/// agent exposes".
#[test]
fn dashboard_and_alert_queries_name_only_metrics_a_real_agent_exposes() {
    netprobe_lab::require_root();
    let s1 = support::s1_lab("monitor");
    support::load_s1_rules(&s1);
    let (kube, kubeconfig) = support::kube_api(&s1.lab);
    support::publish_seldon_scheduler(&kube);
    let agent = support::start_named_agent(s1.lab.node(), &kubeconfig, false);
    let _ = std::fs::remove_file(&kubeconfig);
    let refused = "10.42.0.30:9999".parse().unwrap();
    let timeout = Duration::from_secs(3);
    // Refused by the kernel (or dropped by the policy): a failed verdict either way.
    assert_ne!(
        s1.lab.connect(&s1.client.netns, refused, timeout),
        Connect::Connected
    );
    let s1_dial = format!("{CLUSTER_IP}:9004").parse().unwrap();
    assert_eq!(
        s1.lab.connect(&s1.client.netns, s1_dial, timeout),
        Connect::TimedOut
    );

    let body = scrape_once_failures_are_counted(&agent, 2);
    let _ = agent.stop();
    let exposed = exposed(&body);

    let rules = alert_exprs(&repo().join("deploy/prometheus/netprobe-rules.yaml"));
    let dashboard = dashboard_exprs(&repo().join("deploy/grafana/netprobe.json"));
    assert!(
        rules.len() >= 5 && dashboard.len() >= 15,
        "{rules:?} {dashboard:?}"
    );
    assert_eq!(
        missing(&rules, &exposed),
        [],
        "alert metrics missing from:\n{body}"
    );
    assert_eq!(
        missing(&dashboard, &exposed),
        [],
        "dashboard metrics missing from:\n{body}"
    );
    // The check fails on a name the agent does not expose.
    let typo = vec!["sum(rate(netprobe_failed_connection_total[5m]))".to_string()];
    assert_eq!(
        missing(&typo, &exposed).len(),
        1,
        "a misspelt name is caught"
    );

    for s in metrics::parse(&body) {
        assert!(
            s.labels.iter().all(|(_, v)| !v.is_empty()),
            "an empty label value: {s:?}"
        );
    }
    for name in [
        "netprobe_build_info",
        "netprobe_dns_lookup_duration_seconds_bucket",
        "process_resident_memory_bytes",
    ] {
        assert!(exposed.contains(name), "{name} in:\n{body}");
    }
}

/// `/metrics` once at least `n` failed verdicts are counted (at most 15 s).
fn scrape_once_failures_are_counted(agent: &netprobe_lab::process::Agent, n: usize) -> String {
    let t = Instant::now();
    loop {
        let (_, body) = support::get(agent, "/metrics");
        let failed = metrics::sum(&body, "netprobe_failed_connections_total", &[]);
        if failed >= n as u64 || t.elapsed() > Duration::from_secs(15) {
            assert!(failed >= n as u64, "{n} failures counted:\n{body}");
            return body;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

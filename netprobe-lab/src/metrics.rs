//! The agent's HTTP endpoints seen from a test or the bench: a GET over loopback inside a lab
//! namespace, and the Prometheus text format of `/metrics` parsed into samples that can be
//! summed by name and labels.

use std::{
    io::{Read, Write},
    net::TcpStream,
};

use anyhow::{Context, Result};

use crate::in_netns;

/// GET `path` from `127.0.0.1:port` inside `netns` (HTTP/1.1, the server closes): (status, body).
pub fn http_get(netns: &str, port: u16, path: &str) -> Result<(u16, String)> {
    let path = path.to_string();
    in_netns(netns, move || get_here(port, &path))?
}

/// The body of `/metrics` from the agent on `127.0.0.1:port` inside `netns`.
pub fn scrape(netns: &str, port: u16) -> Result<String> {
    Ok(http_get(netns, port, "/metrics")?.1)
}

fn get_here(port: u16, path: &str) -> Result<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port))
        .with_context(|| format!("connect to the agent on 127.0.0.1:{port}"))?;
    // One write: a server that answers after its first read must see the whole request.
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    split_response(&resp).with_context(|| format!("GET {path}: not an HTTP response: {resp:?}"))
}

/// (status, body) of a whole HTTP/1.1 response.
fn split_response(resp: &str) -> Option<(u16, String)> {
    let code = resp.split_whitespace().nth(1)?.parse().ok()?;
    let body = resp.split_once("\r\n\r\n").map(|x| x.1).unwrap_or_default();
    Some((code, body.to_string()))
}

/// One sample line: `name{label="value",…} value`.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

impl Sample {
    /// True when the sample is `name` and carries every `(label, value)` in `labels`.
    pub fn matches(&self, name: &str, labels: &[(&str, &str)]) -> bool {
        self.name == name
            && labels
                .iter()
                .all(|(k, v)| self.labels.iter().any(|(sk, sv)| sk == k && sv == v))
    }
}

/// The samples of a Prometheus text exposition (comments and malformed lines skipped).
pub fn parse(body: &str) -> Vec<Sample> {
    body.lines().filter_map(parse_line).collect()
}

fn parse_line(line: &str) -> Option<Sample> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let (series, value) = line.rsplit_once(' ')?;
    let value = value.parse().ok()?;
    let (name, labels) = match series.split_once('{') {
        Some((name, rest)) => (name, parse_labels(rest.strip_suffix('}')?)?),
        None => (series, Vec::new()),
    };
    Some(Sample {
        name: name.to_string(),
        labels,
        value,
    })
}

/// `a="x",b="y\"z"` → [(a, x), (b, y"z)].
fn parse_labels(mut s: &str) -> Option<Vec<(String, String)>> {
    let mut out = Vec::new();
    while !s.is_empty() {
        let (key, rest) = s.split_once("=\"")?;
        let (value, rest) = quoted_value(rest)?;
        out.push((key.trim().to_string(), value));
        s = rest.strip_prefix(',').unwrap_or(rest);
    }
    Some(out)
}

/// The value up to the closing quote (escapes `\\`, `\"`, `\n` undone) and what follows it.
fn quoted_value(s: &str) -> Option<(String, &str)> {
    let mut value = String::new();
    let mut chars = s.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return Some((value, &s[i + 1..])),
            '\\' => match chars.next()?.1 {
                'n' => value.push('\n'),
                other => value.push(other),
            },
            c => value.push(c),
        }
    }
    None
}

/// The value of the first sample of `name` carrying all `labels` (a gauge).
pub fn value(body: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    parse(body)
        .into_iter()
        .find(|s| s.matches(name, labels))
        .map(|s| s.value)
}

/// The sum of the samples of `name` carrying all `labels`, as a float (e.g. seconds).
pub fn sum_f64(body: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    parse(body)
        .iter()
        .filter(|s| s.matches(name, labels))
        .map(|s| s.value)
        .sum()
}

/// The sum of the samples of `name` carrying all `labels`, as a count.
pub fn sum(body: &str, name: &str, labels: &[(&str, &str)]) -> u64 {
    sum_f64(body, name, labels) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    const BODY: &str = "\
# HELP netprobe_drops_total Packets the kernel dropped.
# TYPE netprobe_drops_total counter
netprobe_drops_total{reason=\"NETFILTER_DROP\",namespace=\"default\",pod=\"a-0\",rule_owner=\"\"} 3
netprobe_drops_total{reason=\"NETFILTER_DROP\",namespace=\"default\",pod=\"b-0\",rule_owner=\"calico\"} 4
netprobe_drops_total{reason=\"NO_SOCKET\",namespace=\"\",pod=\"\",rule_owner=\"\"} 5
netprobe_lost_events_total 7
netprobe_program_run_seconds_total{program=\"tc_ingress\"} 0.25
netprobe_program_run_seconds_total{program=\"kfree_skb\"} 0.5
netprobe_odd{note=\"a \\\"quoted\\\", comma\"} 1
";

    #[test]
    fn sums_a_metric_by_labels() {
        assert_eq!(sum(BODY, "netprobe_drops_total", &[]), 12);
        let nf = [("reason", "NETFILTER_DROP")];
        assert_eq!(sum(BODY, "netprobe_drops_total", &nf), 7);
        let b = [("reason", "NETFILTER_DROP"), ("pod", "b-0")];
        assert_eq!(sum(BODY, "netprobe_drops_total", &b), 4);
        assert_eq!(sum(BODY, "netprobe_lost_events_total", &[]), 7);
    }

    #[test]
    fn names_match_whole_and_absent_metrics_sum_to_zero() {
        assert_eq!(sum(BODY, "netprobe_drops", &[]), 0);
        assert_eq!(sum(BODY, "netprobe_events_total", &[]), 0);
        assert_eq!(
            sum(BODY, "netprobe_drops_total", &[("reason", "NETFILTER")]),
            0
        );
    }

    #[test]
    fn float_values_and_escaped_labels_parse() {
        let tc = [("program", "tc_ingress")];
        assert_eq!(
            sum_f64(BODY, "netprobe_program_run_seconds_total", &tc),
            0.25
        );
        assert_eq!(
            sum_f64(BODY, "netprobe_program_run_seconds_total", &[]),
            0.75
        );
        let odd = parse(BODY)
            .into_iter()
            .find(|s| s.name == "netprobe_odd")
            .unwrap();
        assert_eq!(
            odd.labels,
            vec![("note".into(), "a \"quoted\", comma".into())]
        );
    }

    #[test]
    fn comments_and_malformed_lines_are_skipped() {
        let body = "# TYPE x counter\nx 1\nx{a=\"1\" 2\nx{a=\"1\"} nope\n\ny{a=\"2\"} 3\n";
        let names: Vec<String> = parse(body).into_iter().map(|s| s.name).collect();
        assert_eq!(names, ["x", "y"]);
    }

    #[test]
    fn an_http_response_splits_into_status_and_body() {
        let resp = "HTTP/1.1 503 Service Unavailable\r\nContent-Length: 2\r\n\r\nno";
        assert_eq!(split_response(resp), Some((503, "no".into())));
        assert_eq!(split_response("garbage"), None);
    }
}

//! deploy/logging/vector.yaml against what the agent writes. Vector is not installable from the
//! registries this project uses (no Debian, PyPI, npm or crates.io package runs it), so its own
//! parser cannot run here. Instead: a stream written by the agent's own log writer (storm
//! control, node and time stamps) from the recorded lab verdicts and events is routed with the
//! snippet's route conditions (evaluated as written: `==`, `!=`, `&&`, `||`, parentheses), and
//! every schema id and field the snippet reads exists in `netprobe schema`.

use std::{collections::BTreeSet, path::Path};

use netprobe::{
    events::Event,
    sinks::{Sink, Summary, storm::StormControlledLog},
    verdict::Verdict,
};
use serde_json::Value;

fn root() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

fn snippet() -> Value {
    let text = std::fs::read_to_string(root().join("deploy/logging/vector.yaml")).unwrap();
    serde_yaml::from_str(&text).unwrap()
}

fn schemas() -> Value {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_netprobe"))
        .arg("schema")
        .output()
        .unwrap();
    serde_json::from_slice(&out.stdout).unwrap()
}

/// What the agent writes for the recorded lab runs: their failed verdicts (DNS ones as
/// `dns_failure` records), their raw events (NETPROBE_RAW_EVENTS), and the `suppressed` counts
/// storm control makes of them at one record per key and second.
fn agent_stream() -> Vec<Value> {
    let mut buf = Vec::new();
    {
        let mut log = StormControlledLog::new(&mut buf, 1)
            .with_raw_events(true)
            .on_node("node-a");
        let src = root().join("netprobe/src/verdict");
        for entry in std::fs::read_dir(src.join("golden")).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "json") {
                for line in std::fs::read_to_string(&path).unwrap().lines() {
                    let v: Verdict = serde_json::from_str(line).unwrap();
                    log.verdict(&v).unwrap();
                }
            }
        }
        for entry in std::fs::read_dir(src.join("fixtures")).unwrap() {
            for line in std::fs::read_to_string(entry.unwrap().path())
                .unwrap()
                .lines()
            {
                let e: Event = serde_json::from_str(line).unwrap();
                log.event(&e).unwrap();
            }
        }
        log.finish(&Summary::new()).unwrap();
    }
    String::from_utf8(buf)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// A route condition of the snippet, parsed: the subset of VRL it uses.
#[derive(Debug)]
enum Cond {
    Eq(String, String, bool),
    And(Box<Cond>, Box<Cond>),
    Or(Box<Cond>, Box<Cond>),
}

impl Cond {
    fn parse(text: &str) -> Cond {
        let tokens = tokens(text);
        let mut at = 0;
        let c = Self::or(&tokens, &mut at);
        assert_eq!(at, tokens.len(), "trailing input in `{text}`");
        c
    }

    fn or(t: &[String], at: &mut usize) -> Cond {
        let mut c = Self::and(t, at);
        while t.get(*at).is_some_and(|x| x == "||") {
            *at += 1;
            c = Cond::Or(Box::new(c), Box::new(Self::and(t, at)));
        }
        c
    }

    fn and(t: &[String], at: &mut usize) -> Cond {
        let mut c = Self::atom(t, at);
        while t.get(*at).is_some_and(|x| x == "&&") {
            *at += 1;
            c = Cond::And(Box::new(c), Box::new(Self::atom(t, at)));
        }
        c
    }

    fn atom(t: &[String], at: &mut usize) -> Cond {
        if t[*at] == "(" {
            *at += 1;
            let c = Self::or(t, at);
            assert_eq!(t[*at], ")");
            *at += 1;
            return c;
        }
        let field = t[*at].strip_prefix('.').expect("a field").to_string();
        let eq = match t[*at + 1].as_str() {
            "==" => true,
            "!=" => false,
            op => panic!("operator {op} is not in the checked subset"),
        };
        let lit = t[*at + 2]
            .strip_prefix('"')
            .and_then(|l| l.strip_suffix('"'))
            .expect("a string literal")
            .to_string();
        *at += 3;
        Cond::Eq(field, lit, eq)
    }

    /// VRL: a missing field is null, never equal to a string.
    fn eval(&self, r: &Value) -> bool {
        match self {
            Cond::Eq(f, lit, eq) => (r[f].as_str() == Some(lit.as_str())) == *eq,
            Cond::And(a, b) => a.eval(r) && b.eval(r),
            Cond::Or(a, b) => a.eval(r) || b.eval(r),
        }
    }

    fn fields(&self, out: &mut BTreeSet<String>) {
        match self {
            Cond::Eq(f, ..) => {
                out.insert(f.clone());
            }
            Cond::And(a, b) | Cond::Or(a, b) => {
                a.fields(out);
                b.fields(out);
            }
        }
    }
}

fn tokens(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            ' ' => {}
            '(' | ')' => out.push(c.to_string()),
            '"' => {
                let mut s = String::from('"');
                for d in chars.by_ref() {
                    s.push(d);
                    if d == '"' {
                        break;
                    }
                }
                out.push(s);
            }
            _ => {
                let mut s = String::from(c);
                while let Some(&d) = chars.peek() {
                    if d == ' ' || d == '(' || d == ')' || d == '"' {
                        break;
                    }
                    s.push(d);
                    chars.next();
                }
                out.push(s);
            }
        }
    }
    out
}

fn routes(snippet: &Value) -> Vec<(String, Cond)> {
    snippet["transforms"]["netprobe_routes"]["route"]
        .as_object()
        .expect("a route transform")
        .iter()
        .map(|(name, c)| (name.clone(), Cond::parse(c.as_str().unwrap())))
        .collect()
}

/// Schema ids (`netprobe.<name>/v<N>`) anywhere in `text`.
fn schema_ids(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for (i, _) in text.match_indices("netprobe.") {
        let rest = &text[i..];
        let end = rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || "./_".contains(c)))
            .unwrap_or(rest.len());
        let id = rest[..end].trim_end_matches('.');
        if id.contains("/v") {
            out.insert(id.to_string());
        }
    }
    out
}

fn properties(schema: &Value) -> BTreeSet<String> {
    schema["properties"]
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect()
}

#[test]
fn the_vector_snippet_routes_verdicts_apart_from_counts() {
    let snippet = snippet();
    let routes = routes(&snippet);
    let stream = agent_stream();
    let mut seen = BTreeSet::new();
    for r in &stream {
        let hit: Vec<&str> = routes
            .iter()
            .filter(|(_, c)| c.eval(r))
            .map(|(n, _)| n.as_str())
            .collect();
        let schema = r["schema"].as_str().unwrap();
        let expected = match (schema, r["kind"].as_str().unwrap()) {
            ("netprobe.verdict/v1", _) | ("netprobe.event/v1", "dns_failure") => "verdicts",
            ("netprobe.event/v1", _) => "events",
            ("netprobe.suppressed/v1" | "netprobe.summary/v1", _) => "counts",
            other => panic!("unexpected record {other:?}"),
        };
        assert_eq!(hit, [expected], "{r}");
        seen.insert((schema.to_string(), expected));
        // The remap reads `time` (RFC 3339) for the record's timestamp, and `node` is there.
        let time = r["time"].as_str().unwrap_or_else(|| panic!("no time: {r}"));
        k8s_openapi::chrono::DateTime::parse_from_rfc3339(time).unwrap();
        assert_eq!(r["node"], "node-a");
    }
    // The recorded runs give every kind the agent writes.
    for (schema, route) in [
        ("netprobe.verdict/v1", "verdicts"),
        ("netprobe.event/v1", "verdicts"),
        ("netprobe.event/v1", "events"),
        ("netprobe.suppressed/v1", "counts"),
    ] {
        assert!(
            seen.contains(&(schema.to_string(), route)),
            "{schema} → {route} not exercised: {seen:?}"
        );
    }
}

#[test]
fn every_schema_id_and_field_the_snippet_reads_exists() {
    let snippet = snippet();
    let schemas = schemas();
    let text = std::fs::read_to_string(root().join("deploy/logging/vector.yaml")).unwrap();
    let ids = schema_ids(&text);
    assert!(ids.len() >= 4, "{ids:?}");
    for id in &ids {
        assert!(
            schemas.get(id).is_some(),
            "{id} is not a schema netprobe writes"
        );
    }
    // Fields of the route conditions: in every schema (they are compared on every record).
    let common = schemas
        .as_object()
        .unwrap()
        .iter()
        .filter(|(id, _)| ids.contains(*id))
        .map(|(_, s)| properties(s))
        .reduce(|a, b| &a & &b)
        .unwrap();
    for (name, cond) in routes(&snippet) {
        let mut fields = BTreeSet::new();
        cond.fields(&mut fields);
        for f in fields {
            assert!(
                common.contains(&f),
                "route {name} reads .{f}: not in every schema"
            );
        }
    }
    // Fields the remap reads from the record, and the sinks' templates.
    let remap = snippet["transforms"]["netprobe_records"]["source"]
        .as_str()
        .unwrap();
    let after = &remap[remap
        .find(". = record")
        .expect("the record becomes the event")..];
    let mut read = BTreeSet::new();
    for (i, _) in after.match_indices('.') {
        let name: String = after[i + 1..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        let assigned = after[i + 1 + name.len()..].trim_start().starts_with("= ");
        if !name.is_empty() && !assigned {
            read.insert(name);
        }
    }
    read.insert("schema".into()); // record.schema, before
    for sink in snippet["sinks"].as_object().unwrap().values() {
        let yaml = serde_yaml::to_string(sink).unwrap();
        for (i, _) in yaml.match_indices("{{") {
            let end = yaml[i..].find("}}").unwrap() + i;
            read.insert(yaml[i + 2..end].trim().to_string());
        }
    }
    assert!(read.contains("time") && read.contains("node"), "{read:?}");
    for f in read {
        assert!(
            common.contains(&f),
            "the snippet reads .{f}: not in every schema"
        );
    }
}

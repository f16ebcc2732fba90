//! Golden verdicts: every recorded fixture's verdicts (JSON and text) as the engine rendered
//! them before the typed model, so any change to the engine or the model that alters a byte of
//! `netprobe.verdict/v1` fails here. Refresh (only for a named fix) with
//! `NETPROBE_BLESS=1 cargo test -p netprobe --lib golden`.

use std::collections::HashMap;

use super::{Context, Engine, Verdict, tests::listener};
use crate::events::Event;

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/src/verdict/fixtures");
const GOLDEN: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/src/verdict/golden");

/// The context each fixture was recorded with (as in verdict/tests.rs).
fn context(name: &str) -> Context {
    let (port, udp, listeners) = match name {
        "s2_refused" => (9500, false, vec![("pod", listener("127.0.0.1", 9000))]),
        "s2_v6only" => (9500, false, vec![("pod", listener("::1", 9500))]),
        "udp_no_listener" => (9999, true, vec![("server", listener("0.0.0.0", 9001))]),
        "success" => (9005, false, vec![]),
        n if n.starts_with("dns_") => (53, true, vec![]),
        _ => (9004, false, vec![]),
    };
    Context {
        port,
        udp,
        listeners: listeners
            .into_iter()
            .map(|(ns, l)| (ns.to_string(), vec![l]))
            .collect::<HashMap<_, _>>(),
    }
}

fn fixture_lines(name: &str) -> Vec<String> {
    let path = format!("{FIXTURES}/{name}.ndjson");
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{path}: {e}"))
        .lines()
        .map(str::to_string)
        .collect()
}

fn verdicts(name: &str) -> Vec<Verdict> {
    let mut engine = Engine::new(context(name));
    let mut out = Vec::new();
    for (i, line) in fixture_lines(name).iter().enumerate() {
        let e: Event = serde_json::from_str(line).unwrap_or_else(|e| panic!("{name}: {e}"));
        out.extend(engine.push(e, i as u64));
    }
    out.extend(engine.finish());
    out
}

/// One verdict per line as JSON, then each verdict's text, separated by a blank line.
fn render(verdicts: &[Verdict]) -> (String, String) {
    let json = verdicts
        .iter()
        .map(|v| serde_json::to_string(v).unwrap() + "\n")
        .collect();
    let text = verdicts
        .iter()
        .map(|v| crate::sinks::text::verdict_text(v) + "\n\n")
        .collect();
    (json, text)
}

pub(super) fn fixture_names() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(FIXTURES)
        .unwrap()
        .filter_map(|e| {
            let name = e.unwrap().file_name().into_string().ok()?;
            Some(name.strip_suffix(".ndjson")?.to_string())
        })
        .collect();
    names.sort();
    names
}

fn check_or_bless(path: &str, actual: &str) {
    if std::env::var_os("NETPROBE_BLESS").is_some() {
        std::fs::create_dir_all(GOLDEN).unwrap();
        std::fs::write(path, actual).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    assert!(expected == actual, "{path} differs:\n{actual}");
}

#[test]
fn every_fixture_renders_its_golden_verdicts() {
    let names = fixture_names();
    assert!(names.len() >= 10, "{names:?}");
    for name in names {
        let (json, text) = render(&verdicts(&name));
        check_or_bless(&format!("{GOLDEN}/{name}.verdicts.json"), &json);
        check_or_bless(&format!("{GOLDEN}/{name}.verdicts.txt"), &text);
    }
}

#[test]
fn every_fixture_event_round_trips_byte_identical() {
    for name in fixture_names() {
        for line in fixture_lines(&name) {
            let e: Event = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(serde_json::to_string(&e).unwrap(), line, "{name}");
        }
    }
}

/// Naming the pod behind a Calico rule's interface renders the explanations from fields; the
/// result is what the old text surgery (`replacen` of the interface name) produced.
#[test]
fn naming_the_rule_workload_renders_what_the_text_surgery_did() {
    for name in ["s1_calico", "dns_calico_egress"] {
        for mut v in verdicts(name) {
            let nf = v.netfilter.clone().expect("a rule verdict");
            let iface = nf.owner.interface.clone().expect("a Calico interface");
            let label = format!("{iface} = pod ns/pod-0");
            let owner_before = nf.owner.explanation.replacen(&iface, &label, 1);
            let before = v.explanation.replacen(&iface, &label, 1);
            v.name_rule_workload("ns/pod-0".into());
            let owner = &v.netfilter.as_ref().unwrap().owner;
            assert_eq!(owner.workload.as_deref(), Some("ns/pod-0"));
            assert_eq!(owner.explanation, owner_before, "{name}");
            assert_eq!(v.explanation, before, "{name}");
        }
    }
}

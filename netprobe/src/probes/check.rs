//! `netprobe check`: which hooks and kernel features this machine offers. Each probe is tried
//! for real (programs loaded and attached, tc tried in a private namespace), not guessed from
//! the kernel version. Nothing is left behind.

use std::path::Path;

use serde::Serialize;

use super::{Probes, TRACEPOINTS, btf::KernelBtf};

#[derive(Debug, Serialize)]
pub struct Feature {
    pub name: String,
    pub available: bool,
    /// Needed for tracing to work at all (as opposed to an optional extra).
    pub required: bool,
    pub detail: String,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub kernel: String,
    pub features: Vec<Feature>,
    /// What this node's configuration will break, apart from netprobe's own needs (two
    /// NetworkPolicy engines filtering pod traffic).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

impl Report {
    /// Tracing can work when every required feature is available, and at least one tc mode.
    pub fn tracing_possible(&self) -> bool {
        let tc = self
            .features
            .iter()
            .any(|f| f.name.starts_with("tc ") && f.available);
        tc && self.features.iter().all(|f| f.available || !f.required)
    }

    fn add(&mut self, name: &str, required: bool, r: Result<String, String>) {
        let (available, detail) = match r {
            Ok(d) => (true, d),
            Err(d) => (false, d),
        };
        self.features.push(Feature {
            name: name.to_string(),
            available,
            required,
            detail,
        });
    }
}

/// Two NetworkPolicy engines filtering pod traffic in this namespace's ruleset, said with the
/// usual fix; None with one engine or none.
fn policy_engines_warning(rs: &crate::attribution::rules::Ruleset) -> Option<String> {
    use crate::attribution::cni::{self, Cni};
    let engines = cni::policy_engines(rs);
    if engines.len() < 2 {
        return None;
    }
    let names: Vec<&str> = engines.iter().map(Cni::as_str).collect();
    let fix = if engines.contains(&Cni::KubeRouter) {
        cni::kube_router::TWO_ENGINES_FIX
    } else {
        "keep one NetworkPolicy engine"
    };
    Some(format!(
        "NetworkPolicy engines: {} both filter pod traffic on this node; a flow must be admitted by each. Fix: {fix}",
        names.join(" and ")
    ))
}

pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

/// Every tracepoint netprobe uses, loaded and attached for real.
fn check_tracepoints(r: &mut Report, probes: &mut Probes, btf: &aya::Btf) {
    for &(program, tp) in TRACEPOINTS {
        r.add(
            &format!("tp_btf/{tp}"),
            !super::OPTIONAL.contains(&program),
            probes
                .attach_tracepoint(btf, program, tp)
                .map(|_| "loaded and attached".into())
                .map_err(|e| chain(&e)),
        );
    }
}

/// Both ways of attaching tc programs, tried in a private namespace.
fn check_tc(r: &mut Report, probes: &mut Probes) {
    match probes.probe_tc_modes() {
        Err(e) => r.add("tc", true, Err(chain(&e))),
        Ok((tcx, clsact)) => {
            r.add(
                "tc tcx",
                false,
                tcx.map(|_| "bpf_link attach (preferred)".into())
                    .map_err(|e| chain(&e)),
            );
            r.add(
                "tc clsact",
                false,
                clsact
                    .map(|_| "netlink clsact attach (fallback)".into())
                    .map_err(|e| chain(&e)),
            );
        }
    }
}

pub fn run() -> Report {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string();
    let mut r = Report {
        kernel,
        features: Vec::new(),
        warnings: Vec::new(),
    };
    // SAFETY: geteuid never fails.
    let root = unsafe { libc::geteuid() } == 0;
    r.add(
        "root",
        true,
        if root {
            Ok("running as root".into())
        } else {
            Err("not root: loading programs needs CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN".into())
        },
    );

    let kbtf = match KernelBtf::load() {
        Ok(k) => k,
        Err(e) => {
            r.add("kernel BTF", true, Err(chain(&e)));
            return r;
        }
    };
    r.add(
        "kernel BTF",
        true,
        kbtf.offsets()
            .map(|_| {
                format!(
                    "{} (struct offsets resolved)",
                    super::btf::vmlinux_path().display()
                )
            })
            .map_err(|e| chain(&e)),
    );
    r.add(
        "drop reasons",
        true,
        kbtf.enum_names("skb_drop_reason", "SKB_DROP_REASON_")
            .map(|m| format!("{} names of enum skb_drop_reason from BTF", m.len()))
            .map_err(|e| chain(&e)),
    );
    r.add(
        "kallsyms",
        false,
        if super::super::enrich::kallsyms::Kallsyms::load().available() {
            Ok("drop locations are symbolized".into())
        } else {
            Err("/proc/kallsyms hides addresses: drop locations stay numeric".into())
        },
    );
    if !root {
        return r;
    }
    r.warnings.extend(policy_engines_warning(
        &crate::attribution::rules::fetch_ruleset(),
    ));
    match Probes::load(&kbtf, Default::default()) {
        Err(e) => r.add("eBPF object", true, Err(chain(&e))),
        Ok(mut probes) => {
            r.add(
                "eBPF object",
                true,
                Ok("loaded (ring buffer, per-CPU counters, filter maps)".into()),
            );
            check_tracepoints(&mut r, &mut probes, kbtf.aya());
            check_tc(&mut r, &mut probes);
        }
    }
    let fentry = aya::sys::is_program_supported(aya::programs::ProgramType::Tracing);
    r.add(
        "fentry/fexit (optional)",
        false,
        match fentry {
            Ok(true) => Ok("available; not needed".into()),
            Ok(false) => Err("refused by this kernel; netprobe does not need it".into()),
            Err(e) => Err(format!(
                "refused by this kernel ({}); netprobe does not need it",
                chain(&e)
            )),
        },
    );
    r.add(
        "kprobes (optional)",
        false,
        if Path::new("/sys/bus/event_source/devices/kprobe/type").exists() {
            Ok("available; not needed".into())
        } else {
            Err("not built into this kernel; netprobe does not need them".into())
        },
    );
    r
}

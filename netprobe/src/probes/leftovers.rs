//! tc filters a SIGKILLed netprobe left behind. On kernels before 6.6 netprobe attaches with a
//! clsact qdisc and netlink filters, which outlive their process (tcx links do not). At start,
//! a filter is an orphan of netprobe when its program is netprobe's — named `tc_ingress` or
//! `tc_egress` **and** using netprobe's maps (`EVENTS`, `COUNTERS`, `LAST_WAKEUP`: the kernel
//! keeps each program's map ids, and each map's name) — and no live process holds it (no fd on the program
//! anywhere in /proc). Orphans are deleted. Filters of live netprobe processes (another trace,
//! the agent), and everybody else's — another tool's program called `tc_ingress` included —
//! stay.

use std::collections::HashSet;

use crate::{
    error::{Error, Result},
    netlink::{self, Socket, attrs, c_string, encode_attr},
};

const RTM_NEWTFILTER: u16 = 44;
const RTM_DELTFILTER: u16 = 45;
const RTM_GETTFILTER: u16 = 46;
const NLM_F_ACK: u16 = 4;
const NLM_F_DUMP: u16 = 0x300;
const TCMSG_LEN: usize = 20;
const TCA_KIND: u16 = 1;
const TCA_OPTIONS: u16 = 2;
const TCA_BPF_NAME: u16 = 7;
const TCA_BPF_ID: u16 = 11;
/// `TC_H_MAKE(TC_H_CLSACT, TC_H_MIN_INGRESS)` and `…_EGRESS`.
pub(crate) const CLSACT_PARENTS: [u32; 2] = [0xFFFF_FFF2, 0xFFFF_FFF3];
/// The names netprobe's programs carry (netprobe-ebpf's tc entry points).
const OURS: [&str; 2] = ["tc_ingress", "tc_egress"];
/// Maps every netprobe tc program uses, by the names the kernel keeps (the statics of
/// netprobe-ebpf's `emit`: the ring buffer, the per-CPU counters, the wakeup clock). A name
/// alone is a weak mark (any tool may call its classifier `tc_ingress`); a program with all
/// three is netprobe's.
const OUR_MAPS: [&str; 3] = ["EVENTS", "COUNTERS", "LAST_WAKEUP"];

/// A tc filter running a BPF program.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BpfFilter {
    pub ifindex: u32,
    pub parent: u32,
    pub handle: u32,
    /// `prio << 16 | protocol`.
    pub info: u32,
    pub name: String,
    pub prog_id: u32,
}

/// Parses the body of an RTM_NEWTFILTER message (tcmsg + attributes); `None` unless it is a
/// `bpf` filter with a program.
pub fn parse_filter(body: &[u8]) -> Option<BpfFilter> {
    let word = |i: usize| -> Option<u32> {
        Some(u32::from_ne_bytes(body.get(i..i + 4)?.try_into().ok()?))
    };
    let (ifindex, handle, parent, info) = (word(4)?, word(8)?, word(12)?, word(16)?);
    let (mut kind, mut name, mut prog_id) = (String::new(), String::new(), None);
    for (ty, p) in attrs(body.get(TCMSG_LEN..)?) {
        match ty {
            TCA_KIND => kind = c_string(p),
            TCA_OPTIONS => {
                for (oty, op) in attrs(p) {
                    match oty {
                        TCA_BPF_NAME => name = c_string(op),
                        TCA_BPF_ID => {
                            prog_id = op
                                .get(..4)
                                .and_then(|b| b.try_into().ok())
                                .map(u32::from_ne_bytes)
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    (kind == "bpf").then_some(())?;
    Some(BpfFilter {
        ifindex,
        parent,
        handle,
        info,
        name,
        prog_id: prog_id?,
    })
}

fn tcmsg(ifindex: u32, handle: u32, parent: u32, info: u32) -> Vec<u8> {
    let mut m = vec![0u8; 4];
    m.extend_from_slice(&ifindex.to_ne_bytes());
    m.extend_from_slice(&handle.to_ne_bytes());
    m.extend_from_slice(&parent.to_ne_bytes());
    m.extend_from_slice(&info.to_ne_bytes());
    m
}

fn nl_err(what: &'static str) -> impl Fn(std::io::Error) -> Error {
    move |source| Error::Netlink { what, source }
}

/// The BPF filters on the clsact hooks of `ifindex` (calling thread's namespace).
pub(crate) fn clsact_filters(ifindex: u32) -> Result<Vec<BpfFilter>> {
    let mut out = Vec::new();
    for parent in CLSACT_PARENTS {
        let sock = Socket::route().map_err(nl_err("RTM_GETTFILTER dump"))?;
        sock.send(RTM_GETTFILTER, NLM_F_DUMP, &tcmsg(ifindex, 0, parent, 0))
            .map_err(nl_err("RTM_GETTFILTER dump"))?;
        let r = sock.recv_all(false, |ty, body| {
            if ty == RTM_NEWTFILTER
                && let Some(f) = parse_filter(body)
            {
                out.push(f);
            }
        });
        match r {
            Ok(()) => {}
            // No clsact qdisc on this interface: nothing to find.
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOENT)) => {}
            Err(e) => return Err(nl_err("RTM_GETTFILTER dump")(e)),
        }
    }
    Ok(out)
}

/// Ids of the BPF programs some live process holds an fd of (`prog_id:` in /proc/*/fdinfo).
fn held_program_ids() -> HashSet<u32> {
    let mut ids = HashSet::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return ids;
    };
    for p in procs.flatten() {
        let Ok(fds) = std::fs::read_dir(p.path().join("fdinfo")) else {
            continue;
        };
        for fd in fds.flatten() {
            if let Ok(text) = std::fs::read_to_string(fd.path())
                && let Some(id) = text
                    .lines()
                    .find_map(|l| l.strip_prefix("prog_id:"))
                    .and_then(|v| v.trim().parse().ok())
            {
                ids.insert(id);
            }
        }
    }
    ids
}

/// Does a program using the maps `map_names` look like netprobe's?
fn uses_our_maps<'a>(map_names: impl IntoIterator<Item = &'a str>) -> bool {
    let names: HashSet<&str> = map_names.into_iter().collect();
    OUR_MAPS.iter().all(|m| names.contains(m))
}

/// The names of the maps program `prog_id` uses; `None` if it is gone or unreadable.
fn map_names_of(prog_id: u32, programs: &[aya::programs::ProgramInfo]) -> Option<Vec<String>> {
    let info = programs.iter().find(|p| p.id() == prog_id)?;
    let ids = info.map_ids().ok()??;
    Some(
        ids.into_iter()
            .filter_map(|id| aya::maps::MapInfo::from_id(id).ok())
            .filter_map(|m| m.name_as_str().map(str::to_string))
            .collect(),
    )
}

/// Is this loaded program one of netprobe's tc programs (its name and its maps)?
pub(crate) fn is_netprobes(info: &aya::programs::ProgramInfo) -> bool {
    info.name_as_str().is_some_and(|n| OURS.contains(&n))
        && map_names_of(info.id(), std::slice::from_ref(info))
            .is_some_and(|names| uses_our_maps(names.iter().map(String::as_str)))
}

/// Of `candidates` (filters named like netprobe's), those running netprobe's programs.
fn netprobes(candidates: Vec<BpfFilter>) -> Vec<BpfFilter> {
    if candidates.is_empty() {
        return candidates;
    }
    // One pass over the loaded programs (ids → info) for all candidates.
    let ids: HashSet<u32> = candidates.iter().map(|f| f.prog_id).collect();
    let programs: Vec<_> = aya::programs::loaded_programs()
        .flatten()
        .filter(|p| ids.contains(&p.id()))
        .collect();
    candidates
        .into_iter()
        .filter(|f| {
            map_names_of(f.prog_id, &programs)
                .is_some_and(|names| uses_our_maps(names.iter().map(String::as_str)))
        })
        .collect()
}

/// Deletes orphaned netprobe filters on every interface of the calling thread's namespace;
/// returns what was removed.
pub fn remove_orphans() -> Result<Vec<BpfFilter>> {
    let mut named = Vec::new();
    for link in netlink::links()? {
        named.extend(
            clsact_filters(link.index)?
                .into_iter()
                .filter(|f| OURS.contains(&f.name.as_str())),
        );
    }
    let candidates = netprobes(named);
    if candidates.is_empty() {
        return Ok(candidates);
    }
    let held = held_program_ids();
    let mut removed = Vec::new();
    for f in candidates
        .into_iter()
        .filter(|f| !held.contains(&f.prog_id))
    {
        let mut body = tcmsg(f.ifindex, f.handle, f.parent, f.info);
        body.extend(encode_attr(TCA_KIND, b"bpf\0"));
        let sock = Socket::route().map_err(nl_err("RTM_DELTFILTER"))?;
        sock.send(RTM_DELTFILTER, NLM_F_ACK, &body)
            .map_err(nl_err("RTM_DELTFILTER"))?;
        match sock.recv_all(true, |_, _| {}) {
            // Gone meanwhile (its interface, or another netprobe cleaning up): fine.
            Err(e) if e.raw_os_error() != Some(libc::ENOENT) => {
                return Err(nl_err("RTM_DELTFILTER")(e));
            }
            _ => removed.push(f),
        }
    }
    Ok(removed)
}

/// [`remove_orphans`] inside `netns`, with a note on stderr for each interface cleaned.
pub fn remove_orphans_in(netns: &crate::netns::NetnsRef) -> Result<usize> {
    let removed = netns.run(remove_orphans)??;
    let names: HashSet<u32> = removed.iter().map(|f| f.ifindex).collect();
    if !removed.is_empty() {
        eprintln!(
            "netprobe: removed {} tc filter(s) a killed netprobe left on {} interface(s) in netns {}",
            removed.len(),
            names.len(),
            netns.name
        );
    }
    Ok(removed.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_program_with_netprobes_maps_is_netprobes() {
        // What the kernel lists for a netprobe tc_ingress (bpftool prog show: map_ids).
        assert!(uses_our_maps([
            "COUNTERS",
            ".rodata",
            "EVENTS",
            "LAST_WAKEUP"
        ]));
        // Another tool's `tc_ingress`: no map, or maps of its own.
        assert!(!uses_our_maps([]));
        assert!(!uses_our_maps(["EVENTS", "COUNTERS", "config"]));
    }

    #[test]
    fn parses_a_bpf_filter_and_skips_the_rest() {
        let mut body = tcmsg(7, 1, CLSACT_PARENTS[0], (49152 << 16) | 0x0300);
        body.extend(encode_attr(TCA_KIND, b"bpf\0"));
        let mut opts = encode_attr(TCA_BPF_NAME, b"tc_ingress\0");
        opts.extend(encode_attr(TCA_BPF_ID, &10833u32.to_ne_bytes()));
        body.extend(encode_attr(TCA_OPTIONS | 0x8000, &opts));
        let f = parse_filter(&body).unwrap();
        assert_eq!(
            (f.ifindex, f.handle, f.name.as_str(), f.prog_id),
            (7, 1, "tc_ingress", 10833)
        );
        assert_eq!(f.info >> 16, 49152);
        // The chain head line (no options) and other classifiers are not filters to judge.
        let mut head = tcmsg(7, 0, CLSACT_PARENTS[0], 49152 << 16);
        head.extend(encode_attr(TCA_KIND, b"bpf\0"));
        assert!(parse_filter(&head).is_none());
        let mut u32f = tcmsg(7, 1, CLSACT_PARENTS[0], 1 << 16);
        u32f.extend(encode_attr(TCA_KIND, b"u32\0"));
        assert!(parse_filter(&u32f).is_none());
        assert!(parse_filter(&[0u8; 19]).is_none());
    }
}

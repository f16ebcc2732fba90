//! The tc programs behind a TC_INGRESS/TC_EGRESS drop: the kernel's drop reason only says that
//! a program on that hook returned TC_ACT_SHOT. The hook's attachments — tcx links (bpf_mprog,
//! 6.6+) and `bpf` filters on the clsact qdisc — are read in the interface's own namespace when
//! the drop is seen; netprobe's own programs are left out (they never drop).

use std::{cell::RefCell, time::Duration};

use aya::programs::{ProgramInfo, SchedClassifier, TcAttachType, loaded_programs};

use super::recent::Recent;
use crate::{
    model::TcProgram,
    netlink,
    netns::NetnsRef,
    probes::leftovers::{CLSACT_PARENTS, clsact_filters, is_netprobes},
};

thread_local! {
    /// (netns, ifindex, ingress) → programs: a program dropping a flood of packets must not
    /// make each drop read the hook again.
    static RECENT: RefCell<Recent<(u64, u32, bool), Vec<TcProgram>>> =
        RefCell::new(Recent::new(Duration::from_secs(2), 256));
}

/// The programs on the `ingress` (else egress) hook of interface `ifindex` of namespace `netns`
/// (inode), as they are now (or were less than 2 s ago); none when this second's reads are
/// spent (see `Recent`).
pub fn at_drop(netns: u64, ifindex: u32, ingress: bool) -> Vec<TcProgram> {
    RECENT
        .with_borrow_mut(|r| {
            r.get_or((netns, ifindex, ingress), || {
                crate::netns::by_inode(netns)
                    .map(|ns| read_in(&ns, ifindex, ingress))
                    .unwrap_or_default()
            })
        })
        .unwrap_or_default()
}

fn read_in(ns: &NetnsRef, ifindex: u32, ingress: bool) -> Vec<TcProgram> {
    ns.run(|| {
        let mut out = tcx_programs(ifindex, ingress);
        out.extend(clsact_programs(ifindex, ingress));
        out
    })
    .unwrap_or_default()
}

/// Programs linked with tcx, in the order they run.
fn tcx_programs(ifindex: u32, ingress: bool) -> Vec<TcProgram> {
    let Some(name) = netlink::links()
        .ok()
        .and_then(|ls| ls.into_iter().find(|l| l.index == ifindex))
        .map(|l| l.name)
    else {
        return Vec::new();
    };
    let hook = if ingress {
        TcAttachType::Ingress
    } else {
        TcAttachType::Egress
    };
    // Before 6.6 there is no tcx: the query fails and clsact is all there is.
    let Ok((_, infos)) = SchedClassifier::query_tcx(&name, hook) else {
        return Vec::new();
    };
    infos
        .iter()
        .filter(|i| !is_netprobes(i))
        .map(|i| program(i, "tcx", ingress))
        .collect()
}

/// Programs of `bpf` filters on the clsact qdisc, in filter order.
fn clsact_programs(ifindex: u32, ingress: bool) -> Vec<TcProgram> {
    let parent = CLSACT_PARENTS[if ingress { 0 } else { 1 }];
    let ids: Vec<u32> = clsact_filters(ifindex)
        .unwrap_or_default()
        .into_iter()
        .filter(|f| f.parent == parent)
        .map(|f| f.prog_id)
        .collect();
    if ids.is_empty() {
        return Vec::new();
    }
    let infos: Vec<ProgramInfo> = loaded_programs()
        .flatten()
        .filter(|p| ids.contains(&p.id()))
        .collect();
    ids.iter()
        .filter_map(|id| infos.iter().find(|i| i.id() == *id))
        .filter(|i| !is_netprobes(i))
        .map(|i| program(i, "clsact", ingress))
        .collect()
}

fn program(info: &ProgramInfo, mode: &str, ingress: bool) -> TcProgram {
    let name = info.name_as_str().unwrap_or_default().to_string();
    TcProgram {
        owner: TcProgram::owner_of(&name).map(str::to_string),
        name,
        id: info.id(),
        tag: format!("{:016x}", info.tag()),
        mode: mode.into(),
        hook: if ingress { "ingress" } else { "egress" }.into(),
    }
}

//! What the agent holds per pod, and lets go of when the pod is gone: the node's interfaces
//! with tc programs (a deleted veth's tcx links are released, their fds closed) and the
//! namespaces in the kernel's filter map (a deleted pod's namespace leaves the map). A full map
//! refuses a new pod's namespace: counted, logged once per episode, retried every tick; the
//! agent keeps running and that pod's namespace is not watched until there is room.

use std::collections::{HashMap, HashSet};

use crate::{
    enrich::Enricher,
    error::Result,
    netlink,
    netns::NetnsRef,
    probes::{NetnsAdmission, Probes},
    sinks::prometheus::ScopeStats,
};

/// The node's interfaces with tc programs attached, by (ifindex, name).
#[derive(Default)]
pub(super) struct Interfaces {
    attached: HashSet<(u32, String)>,
    released: u64,
}

impl Interfaces {
    /// Releases the programs of links that are gone, then attaches tc to links of the node
    /// namespace not attached yet; returns how many are attached.
    pub fn sync(
        &mut self,
        probes: &mut Probes,
        node: &NetnsRef,
        enricher: &Enricher,
    ) -> Result<usize> {
        let links: HashSet<(u32, String)> = netlink::links()?
            .into_iter()
            .filter(|l| l.up && l.name != "lo")
            .map(|l| (l.index, l.name))
            .collect();
        // Gone first: a new link may reuse a gone one's index.
        self.release_gone(probes, node, enricher, &links);
        self.attach_fresh(probes, node, enricher, &links);
        Ok(self.attached.len())
    }

    fn release_gone(
        &mut self,
        probes: &mut Probes,
        node: &NetnsRef,
        enricher: &Enricher,
        links: &HashSet<(u32, String)>,
    ) {
        let gone: Vec<(u32, String)> = self.attached.difference(links).cloned().collect();
        for (ix, name) in gone {
            self.released += probes.release_interface(node.inode, ix) as u64;
            enricher.remove_interface(node.inode, ix);
            self.attached.remove(&(ix, name));
        }
    }

    fn attach_fresh(
        &mut self,
        probes: &mut Probes,
        node: &NetnsRef,
        enricher: &Enricher,
        links: &HashSet<(u32, String)>,
    ) {
        let fresh: Vec<(u32, String)> = links.difference(&self.attached).cloned().collect();
        if fresh.is_empty() {
            return;
        }
        for (ix, name) in &fresh {
            enricher.add_interface(node.inode, *ix, name);
        }
        let names: HashSet<&str> = fresh.iter().map(|(_, n)| n.as_str()).collect();
        // One pass for all new links (one link dump, one namespace entry). A link that vanished
        // between listing and attaching is not an error.
        let atts = probes
            .attach_tc(node, |l| names.contains(l.name.as_str()))
            .unwrap_or_else(|_| {
                // One link failed (gone meanwhile): the others one by one.
                names
                    .iter()
                    .filter_map(|n| probes.attach_tc(node, |l| l.name == *n).ok())
                    .flatten()
                    .collect()
            });
        for a in atts {
            enricher.add_tc(&a);
        }
        self.attached.extend(fresh);
    }

    pub fn len(&self) -> usize {
        self.attached.len()
    }
}

/// The namespaces in the kernel's filter: the node's, always, and its pods'.
pub(super) struct Scope {
    node: u64,
    /// inode → the name the enricher gives it.
    watched: HashMap<u64, String>,
    /// Pod namespaces present but refused by a full map (retried every tick).
    refused: HashSet<u64>,
    refused_total: u64,
    released_total: u64,
    capacity: u32,
}

impl Scope {
    /// The node's namespace in the filter; it is never released.
    pub fn new(
        probes: &mut Probes,
        node: &NetnsRef,
        enricher: &Enricher,
        capacity: u32,
    ) -> Result<Self> {
        probes.set_netns_filter(&[node.inode])?;
        enricher.add_netns(node.inode, &node.name);
        Ok(Self {
            node: node.inode,
            watched: HashMap::from([(node.inode, node.name.clone())]),
            refused: HashSet::new(),
            refused_total: 0,
            released_total: 0,
            capacity,
        })
    }

    /// The pod namespaces present now (`peers`): new ones join the filter, gone ones leave it.
    /// Returns the namespaces newly watched.
    pub fn sync<'p>(
        &mut self,
        probes: &mut Probes,
        enricher: &Enricher,
        peers: &'p [NetnsRef],
    ) -> Result<Vec<&'p NetnsRef>> {
        let present: HashSet<u64> = peers.iter().map(|n| n.inode).collect();
        let was_full = !self.refused.is_empty();
        self.release_gone(probes, enricher, &present)?;
        let mut fresh = Vec::new();
        for ns in peers {
            if self.watch(probes, enricher, ns)? {
                fresh.push(ns);
            }
        }
        self.report_full(was_full);
        Ok(fresh)
    }

    fn release_gone(
        &mut self,
        probes: &mut Probes,
        enricher: &Enricher,
        present: &HashSet<u64>,
    ) -> Result<()> {
        self.refused.retain(|i| present.contains(i));
        let gone: Vec<u64> = self
            .watched
            .keys()
            .copied()
            .filter(|i| *i != self.node && !present.contains(i))
            .collect();
        for inode in gone {
            probes.unwatch_netns(inode)?;
            enricher.remove_netns(inode);
            self.watched.remove(&inode);
            self.released_total += 1;
        }
        Ok(())
    }

    /// Whether `ns` is newly watched.
    fn watch(&mut self, probes: &mut Probes, enricher: &Enricher, ns: &NetnsRef) -> Result<bool> {
        match self.watched.get(&ns.inode) {
            Some(name) if *name == ns.name => return Ok(false),
            // An inode a deleted namespace freed, reused by a new one within a tick: in the map
            // already, under another name.
            Some(_) => {
                self.name(enricher, ns);
                return Ok(true);
            }
            None => {}
        }
        Ok(match probes.watch_netns(ns.inode)? {
            NetnsAdmission::Watched => {
                self.refused.remove(&ns.inode);
                self.name(enricher, ns);
                true
            }
            NetnsAdmission::MapFull => {
                if self.refused.insert(ns.inode) {
                    self.refused_total += 1;
                }
                false
            }
        })
    }

    fn name(&mut self, enricher: &Enricher, ns: &NetnsRef) {
        self.watched.insert(ns.inode, ns.name.clone());
        enricher.add_netns(ns.inode, &ns.name);
    }

    /// One line when the map becomes full, one when every pod is watched again.
    fn report_full(&self, was_full: bool) {
        match (was_full, self.refused.is_empty()) {
            (false, false) => eprintln!(
                "netprobe agent: WARNING: the namespace filter map is full ({} entries): {} pod namespace(s) not watched until others are deleted (netprobe_unwatched_namespaces, netprobe_netns_filter_refused_total; raise --max-namespaces)",
                self.capacity,
                self.refused.len()
            ),
            (true, true) => eprintln!("netprobe agent: every pod namespace is watched again"),
            _ => {}
        }
    }

    pub fn len(&self) -> usize {
        self.watched.len()
    }

    pub fn stats(&self, interfaces: &Interfaces, probes: &Probes) -> ScopeStats {
        ScopeStats {
            unwatched: self.refused.len(),
            refused_total: self.refused_total,
            released_total: self.released_total,
            capacity: self.capacity,
            tc_links: probes.tc_links(),
            tc_links_released_total: interfaces.released,
        }
    }
}

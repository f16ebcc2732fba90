//! Enrichment as session stages: names from the inventory, and the destination after DNAT from
//! conntrack.

use std::{cell::RefCell, rc::Rc};

use super::{Stage, conntrack, names::PodContext};
use crate::events::{Event, Kind, Translated};

/// Pod, container, node and Service of both ends of every event.
pub struct Names(pub Rc<RefCell<PodContext>>);

impl Stage for Names {
    fn enrich(&mut self, e: &mut Event, _derived: &mut Vec<Event>) {
        self.0.borrow().annotate_event(e);
    }
}

/// A SYN retransmitted or a socket error toward a Service: where the connection really went,
/// from this node's conntrack (the socket only knows the ClusterIP). Names the backend pod and
/// its node — across nodes, "SYNs to pods on node-b go unanswered" shows up here. Runs after
/// [`Names`] (it needs to know the destination is a Service).
pub struct Conntrack(pub Rc<RefCell<PodContext>>);

impl Stage for Conntrack {
    fn enrich(&mut self, e: &mut Event, _derived: &mut Vec<Event>) {
        let to_service = e.destination.as_ref().is_some_and(|d| d.service.is_some());
        if !to_service
            || e.protocol != crate::model::Protocol::Tcp
            || !matches!(e.kind, Kind::Retransmit | Kind::SocketError)
        {
            return;
        }
        let tuple = conntrack::Tuple {
            src: e.src,
            sport: e.sport,
            dst: e.dst,
            dport: e.dport,
        };
        // The agent runs in the node's namespace, where kube-proxy's DNAT keeps its entries.
        if let Ok(Some(entry)) = conntrack::lookup(libc::IPPROTO_TCP as u8, &tuple)
            && let Some((dst, dport)) = entry.translated_destination()
        {
            e.translated = Some(Translated {
                dst,
                dport,
                peer: Some(self.0.borrow().inventory.peer(dst, dport, None, None)),
            });
        }
    }
}

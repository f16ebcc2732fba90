//! The verdict stage: the pure engine, fed by the session's clock, and what needs the node to
//! finish a verdict — names for its endpoints, the client pod asked for, this node's route
//! toward a server that never answered.

use std::{cell::RefCell, rc::Rc, time::Instant};

use crate::{
    enrich::names::PodContext,
    events::Event,
    verdict::{Engine, Outcome, Verdict},
};

pub struct Judge {
    engine: Engine,
    started: Instant,
    names: Option<Rc<RefCell<PodContext>>>,
    /// Name the endpoints of healthy verdicts too (the always-on agent only counts them).
    name_healthy: bool,
    /// Add this node's route to verdicts of attempts that went unanswered.
    route_hints: bool,
}

impl Judge {
    pub fn new(engine: Engine) -> Self {
        Self {
            engine,
            started: Instant::now(),
            names: None,
            name_healthy: true,
            route_hints: false,
        }
    }

    pub fn with_names(mut self, names: Option<Rc<RefCell<PodContext>>>) -> Self {
        self.names = names;
        self
    }

    /// Healthy verdicts keep their bare addresses (no name lookups for what is only counted).
    pub fn name_failures_only(mut self) -> Self {
        self.name_healthy = false;
        self
    }

    /// The judge runs in the node's namespace: its route toward a silent server is the node's.
    pub fn with_route_hints(mut self) -> Self {
        self.route_hints = true;
        self
    }

    fn now(&self) -> u64 {
        self.started.elapsed().as_nanos() as u64
    }

    pub fn push(&mut self, e: Event) -> Vec<Verdict> {
        let now = self.now();
        let v = self.engine.push(e, now);
        self.finalize(v)
    }

    pub fn poll(&mut self) -> Vec<Verdict> {
        let now = self.now();
        let v = self.engine.poll(now);
        self.finalize(v)
    }

    pub fn finish(&mut self) -> Vec<Verdict> {
        let v = self.engine.finish();
        self.finalize(v)
    }

    fn finalize(&self, verdicts: Vec<Verdict>) -> Vec<Verdict> {
        verdicts
            .into_iter()
            .filter_map(|mut v| {
                if let Some(names) = &self.names
                    && (self.name_healthy || failed(&v))
                {
                    let names = names.borrow();
                    names.annotate_verdict(&mut v);
                    if !names.wanted(&v) {
                        return None;
                    }
                }
                if self.route_hints {
                    add_route_hint(&mut v);
                }
                Some(v)
            })
            .collect()
    }
}

/// A lookup or attempt that failed (for DNS: the application sees a failed lookup).
fn failed(v: &Verdict) -> bool {
    crate::verdict::dns_failure(v).is_some() || (v.udp.is_none() && v.outcome.is_failure())
}

fn add_route_hint(v: &mut Verdict) {
    if matches!(v.outcome, Outcome::TimedOut | Outcome::Unanswered)
        && v.route.is_none()
        && let Ok(Some(r)) = crate::enrich::route::route_hint(v.server.addr)
    {
        v.explanation
            .push_str(&format!(" This node routes {} {}.", r.dst, r.describe()));
        v.route = Some(r);
    }
}

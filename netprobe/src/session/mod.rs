//! The session loop, for `trace` and `agent` alike:
//!
//! ```text
//!  sources ──► route ──► stages (enrich) ──► judge (verdict engine) ──► sinks
//!  ring buffer          names, conntrack,    connection attempts,       text, NDJSON,
//!  nftables trace       xtables counters     DNS lookups                Prometheus, Events
//! ```
//!
//! A front-end (`trace`, `agent`) sets up the kernel side and the scope, then configures a
//! [`Session`]: which sources run, which events go where ([`Route`]), the enrichment stages, the
//! judge, the sinks, its housekeeping and when the loop ends. The loop itself knows none of them.

pub mod judge;
mod source_addr;

use std::{io, time::Duration};

use futures::future::LocalBoxFuture;

pub use crate::{enrich::Stage, sinks::Summary};
use crate::{
    error::{Error, Result},
    events::Event,
    sinks::{Sink, Sinks},
    verdict::Verdict,
};
pub use judge::Judge;

/// What a source hands the session.
pub enum Input {
    Events(Vec<Event>),
    /// Something in the node changed (a link came up): run the housekeeping now.
    Rescan,
    /// This source has nothing more (a recording read to its end).
    Exhausted,
}

/// Where events come from: the kernel's ring buffer, the nftables trace, a recording. A new
/// source is one new module under `sources/` implementing this.
pub trait Source {
    /// Waits for input. Must be cancel-safe: the session drops the future when another source
    /// or the timer wins, and asks again.
    fn next(&mut self) -> LocalBoxFuture<'_, Result<Input>>;

    /// What is left, without waiting (the session is ending).
    fn drain(&mut self) -> Vec<Event> {
        Vec::new()
    }

    /// Adds this source's counts (lost, malformed, overruns, warnings) to the summary.
    fn report(&self, _summary: &mut Summary) {}
}

/// Which parts of the pipeline an event goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    pub judge: bool,
    pub sinks: bool,
}

impl Route {
    pub const ALL: Self = Self {
        judge: true,
        sinks: true,
    };

    fn any(self) -> bool {
        self.judge || self.sinks
    }
}

/// Why a session ended.
#[derive(Debug)]
pub enum Ended {
    Deadline,
    Signal,
    /// `--count` verdicts were delivered.
    Count,
    /// Every source is exhausted (a replayed recording).
    Exhausted,
    /// An output is gone (stdout closed): the session stops without its summary.
    OutputGone(io::Error),
    /// The housekeeping ended it (e.g. a traced namespace vanished).
    Scope(Error),
}

/// The front-end's periodic work: follow new interfaces and namespaces, refresh names, update
/// gauges. `Ok(Some(_))` ends the session.
pub trait Housekeeping {
    fn tick(&mut self, stats: &Stats) -> Result<Option<Error>>;
}

/// Counts of what the session delivered.
#[derive(Debug, Clone, Copy, Default)]
pub struct Stats {
    pub events: u64,
    pub attempts: u64,
    pub failed: u64,
    /// What the judge's engines let go of to stay bounded.
    pub engine: crate::verdict::EngineStats,
}

/// What the verdict engines let go of to stay bounded, one line per engine and reason: a
/// summary must not be silent about verdicts judged early or never written.
fn evictions_warnings(st: &crate::verdict::EngineStats) -> Vec<String> {
    [("tcp", &st.tcp), ("dns", &st.dns)]
        .into_iter()
        .flat_map(|(engine, ev)| {
            ev.by_reason()
                .into_iter()
                .filter(|(_, n)| *n > 0)
                .map(move |(reason, n)| {
                    format!(
                        "verdict engine {engine}: {n} let go to stay bounded ({reason}; see netprobe_verdict_engine_evicted_total in the README)"
                    )
                })
        })
        .collect()
}

/// SIGINT and SIGTERM, listened to from the moment a front-end starts: a signal that arrives
/// while probes and tables are still being installed stops the installation at its next step
/// ([`Signals::check`], [`Signals::interruptible`]) or ends the session as soon as it starts,
/// and everything installed is removed on the way out.
pub struct Signals {
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
    /// Set by the signal handler itself: synchronous install steps run without polling the
    /// runtime, so the streams above would only see the signal once they finish.
    arrived: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Signals {
    pub fn install() -> Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        let arrived = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        for sig in [libc::SIGINT, libc::SIGTERM] {
            let flag = arrived.clone();
            // SAFETY: the action only stores to an atomic, which is async-signal-safe; the
            // registry chains it with tokio's own action for the same signal.
            unsafe {
                signal_hook_registry::register(sig, move || {
                    flag.store(true, std::sync::atomic::Ordering::SeqCst)
                })
            }
            .map_err(|e| Error::io("installing the signal flag", e))?;
        }
        Ok(Self {
            int: signal(SignalKind::interrupt())
                .map_err(|e| Error::io("installing the SIGINT handler", e))?,
            term: signal(SignalKind::terminate())
                .map_err(|e| Error::io("installing the SIGTERM handler", e))?,
            arrived,
        })
    }

    /// Has SIGINT or SIGTERM arrived since [`Signals::install`]?
    pub fn arrived(&self) -> bool {
        self.arrived.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Between install steps: `Err(Interrupted)` once a signal arrived.
    pub fn check(&self) -> Result<()> {
        if self.arrived() {
            return Err(Error::Interrupted);
        }
        Ok(())
    }

    /// What an install step returns, as `Interrupted` when a signal came first or while it ran
    /// (a failure then, e.g. a child process killed by the terminal's Ctrl-C, is the signal's).
    pub fn step<T>(&self, r: Result<T>) -> Result<T> {
        self.check()?;
        r
    }

    /// Waits for `f` unless a signal arrives first (e.g. the inventory of an API server that
    /// does not answer): `Interrupted` then, at once.
    pub async fn interruptible<T>(&mut self, f: impl Future<Output = Result<T>>) -> Result<T> {
        self.check()?;
        tokio::select! {
            r = f => self.step(r),
            () = self.recv() => Err(Error::Interrupted),
        }
    }

    async fn recv(&mut self) {
        tokio::select! {
            _ = self.int.recv() => {}
            _ = self.term.recv() => {}
        }
    }
}

/// One configured pipeline. Built by `trace` and `agent`; see the module documentation.
pub struct Session<'a> {
    pub sources: Vec<Box<dyn Source + 'a>>,
    pub route: fn(&Event) -> Route,
    pub stages: Vec<Box<dyn Stage + 'a>>,
    /// None: no verdicts (`trace --events`).
    pub judge: Option<Judge>,
    pub sinks: Sinks<'a>,
    pub housekeeping: Box<dyn Housekeeping + 'a>,
    pub tick: Duration,
    pub deadline: Option<Duration>,
    /// End after this many verdicts.
    pub count: Option<u64>,
    pub signals: Signals,
    pub stats: Stats,
}

enum Wake {
    Input(usize, Result<Input>),
    Tick,
    Deadline,
    Signal,
}

/// The first source with input (`select_all` over the ones not exhausted).
async fn next_input(sources: &mut [Box<dyn Source + '_>], exhausted: &[bool]) -> Wake {
    let waiting: Vec<(usize, LocalBoxFuture<'_, Result<Input>>)> = sources
        .iter_mut()
        .enumerate()
        .filter(|(i, _)| !exhausted[*i])
        .map(|(i, s)| (i, s.next()))
        .collect();
    if waiting.is_empty() {
        return std::future::pending().await;
    }
    let (ids, futs): (Vec<usize>, Vec<_>) = waiting.into_iter().unzip();
    let (r, i, _) = futures::future::select_all(futs).await;
    Wake::Input(ids[i], r)
}

impl<'a> Session<'a> {
    /// Runs until the deadline, a signal (SIGINT, SIGTERM), `count` verdicts, the end of every
    /// source, a gone output or the housekeeping's word. Returns why it ended.
    pub async fn run(&mut self) -> Result<Ended> {
        let mut tick = tokio::time::interval(self.tick);
        // A deadline beyond what the clock can hold is never reached: no deadline (the CLI refuses
        // such durations; this keeps a library caller from a panic).
        let deadline = self
            .deadline
            .and_then(|d| tokio::time::Instant::now().checked_add(d));
        let mut exhausted = vec![false; self.sources.len()];
        let ended = loop {
            let wake = tokio::select! {
                w = next_input(&mut self.sources, &exhausted) => w,
                _ = tick.tick() => Wake::Tick,
                _ = sleep_until(deadline) => Wake::Deadline,
                () = self.signals.recv() => Wake::Signal,
            };
            let outcome = match wake {
                Wake::Input(_, Ok(Input::Events(events))) => self.deliver(events),
                Wake::Input(_, Ok(Input::Rescan)) => {
                    tick.reset_immediately();
                    Ok(())
                }
                Wake::Input(i, Ok(Input::Exhausted)) => {
                    exhausted[i] = true;
                    if exhausted.iter().all(|x| *x) {
                        break Ended::Exhausted;
                    }
                    Ok(())
                }
                Wake::Input(_, Err(e)) => return Err(e),
                Wake::Tick => match self.housekeep()? {
                    Some(e) => break Ended::Scope(e),
                    None => self.poll(),
                },
                Wake::Deadline => break Ended::Deadline,
                Wake::Signal => break Ended::Signal,
            };
            if let Err(e) = outcome.and_then(|()| self.sinks.flush()) {
                break Ended::OutputGone(e);
            }
            if self.count_reached() {
                break Ended::Count;
            }
        };
        Ok(self.wind_down(ended))
    }

    /// What the sources still hold, and (unless `count` was reached) every attempt still open,
    /// judged with what was seen.
    fn wind_down(&mut self, ended: Ended) -> Ended {
        if matches!(ended, Ended::OutputGone(_)) {
            return ended;
        }
        let left: Vec<Event> = self.sources.iter_mut().flat_map(|s| s.drain()).collect();
        let mut r = self.deliver(left);
        if !self.count_reached()
            && let Some(j) = &mut self.judge
        {
            let verdicts = j.finish();
            r = r.and_then(|()| self.verdicts(verdicts));
        }
        match r.and_then(|()| self.sinks.flush()) {
            Err(e) => Ended::OutputGone(e),
            Ok(()) => ended,
        }
    }

    /// The front-end's tick, with what the session counted (the judge's evictions included).
    fn housekeep(&mut self) -> Result<Option<Error>> {
        if let Some(j) = &self.judge {
            self.stats.engine = j.stats();
        }
        self.housekeeping.tick(&self.stats)
    }

    fn count_reached(&self) -> bool {
        self.count.is_some_and(|n| self.stats.attempts >= n)
    }

    /// Routes, enriches, judges and hands on one batch of events.
    fn deliver(&mut self, events: Vec<Event>) -> io::Result<()> {
        let mut queue = std::collections::VecDeque::from(events);
        let mut derived = Vec::new();
        while let Some(mut e) = queue.pop_front() {
            let route = (self.route)(&e);
            if !route.any() {
                continue;
            }
            for s in &mut self.stages {
                s.enrich(&mut e, &mut derived);
            }
            self.stats.events += 1;
            if route.sinks {
                self.sinks.event(&e)?;
            }
            if route.judge
                && let Some(j) = &mut self.judge
            {
                let verdicts = j.push(e);
                self.verdicts(verdicts)?;
            }
            // A derived event comes right after the one it was derived from.
            for d in derived.drain(..).rev() {
                queue.push_front(d);
            }
        }
        Ok(())
    }

    /// Verdicts whose time has come (settled, or unanswered for long enough).
    fn poll(&mut self) -> io::Result<()> {
        let verdicts = self.judge.as_mut().map(Judge::poll).unwrap_or_default();
        self.verdicts(verdicts)?;
        self.sinks.tick()
    }

    fn verdicts(&mut self, verdicts: Vec<Verdict>) -> io::Result<()> {
        for v in verdicts {
            self.stats.attempts += 1;
            if v.is_failure() {
                self.stats.failed += 1;
            }
            self.sinks.verdict(&v)?;
        }
        Ok(())
    }

    /// Fills in what the session counted and what its sources report (lost, malformed,
    /// overruns, warnings).
    pub fn summarize(&self, summary: &mut Summary) {
        summary.events = self.stats.events;
        summary.attempts = self.stats.attempts;
        summary.failed = self.stats.failed;
        for s in &self.sources {
            s.report(summary);
        }
        if let Some(j) = &self.judge {
            summary.warnings.extend(evictions_warnings(&j.stats()));
        }
    }

    /// Ends the session but for its sinks (for the summary): sources, stages and housekeeping
    /// are dropped, and with them what they hold (the rule-trace table, reader threads).
    pub fn into_sinks(self) -> Sinks<'a> {
        self.sinks
    }
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use std::{cell::RefCell, rc::Rc};

    use super::*;

    #[test]
    fn a_summary_names_what_the_engines_let_go_of() {
        let mut st = crate::verdict::EngineStats::default();
        assert!(evictions_warnings(&st).is_empty());
        st.tcp.followed_evicted = 3;
        st.dns.dropped = 1;
        let w = evictions_warnings(&st);
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(
            w[0].contains("tcp: 3") && w[0].contains("followed_evicted"),
            "{w:?}"
        );
        assert!(w[1].contains("dns: 1") && w[1].contains("dropped"), "{w:?}");
    }
    use crate::{
        sinks::{Show, ndjson::NdjsonSink, text::TextSink},
        sources::recorded::Recorded,
        verdict::{Context, Engine},
    };

    fn fixture(name: &str) -> String {
        let path = format!(
            "{}/src/verdict/fixtures/{name}.ndjson",
            env!("CARGO_MANIFEST_DIR")
        );
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    struct Idle;

    impl Housekeeping for Idle {
        fn tick(&mut self, _stats: &Stats) -> Result<Option<Error>> {
            Ok(None)
        }
    }

    /// A `Write` both the test and the session's sink can hold.
    #[derive(Clone, Default)]
    struct Shared(Rc<RefCell<Vec<u8>>>);

    impl io::Write for Shared {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.borrow_mut().extend_from_slice(b);
            Ok(b.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn replay(name: &str, ctx: Context, sinks: Sinks<'_>, count: Option<u64>) -> (Ended, Stats) {
        let source = Recorded::read(fixture(name).as_bytes()).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let mut session = Session {
            sources: vec![Box::new(source)],
            route: |_| Route::ALL,
            stages: Vec::new(),
            judge: Some(Judge::new(Engine::new(ctx))),
            sinks,
            housekeeping: Box::new(Idle),
            tick: Duration::from_secs(3600),
            deadline: Some(Duration::from_secs(60)),
            count,
            signals: rt.block_on(async { Signals::install() }).unwrap(),
            stats: Stats::default(),
        };
        let ended = rt.block_on(session.run()).unwrap();
        (ended, session.stats)
    }

    fn ctx(port: u16) -> Context {
        Context {
            port,
            udp: false,
            listeners: Default::default(),
        }
    }

    /// The recorded S1 lab run through the whole loop gives the verdict the engine alone gives,
    /// byte for byte, on the NDJSON sink, and the text sink prints the same verdict.
    #[test]
    fn a_recording_replayed_through_the_session_gives_the_engines_verdicts() {
        let json = Shared::default();
        let text = Shared::default();
        let sinks = Sinks::default()
            .with(NdjsonSink::output(json.clone(), Show::Verdicts))
            .with(TextSink::new(text.clone(), Show::Verdicts));
        let (ended, stats) = replay("s1_calico", ctx(9004), sinks, None);
        assert!(matches!(ended, Ended::Exhausted), "{ended:?}");

        let mut engine = Engine::new(ctx(9004));
        let mut expected = Vec::new();
        for line in fixture("s1_calico").lines() {
            if let Ok(e) = serde_json::from_str::<Event>(line) {
                expected.extend(engine.push(e, 0));
            }
        }
        expected.extend(engine.finish());
        assert!(!expected.is_empty());
        // The sink adds when it wrote each verdict (`time_ns`, `time`: #17); the rest is the
        // engine's verdict.
        let expected_json: Vec<serde_json::Value> = expected
            .iter()
            .map(|v| serde_json::to_value(v).unwrap())
            .collect();
        let written: Vec<serde_json::Value> = String::from_utf8(json.0.take())
            .unwrap()
            .lines()
            .map(|l| {
                let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
                let o = v.as_object_mut().unwrap();
                assert!(o.remove("time_ns").is_some() && o.remove("time").is_some());
                v
            })
            .collect();
        assert_eq!(written, expected_json);
        let text = String::from_utf8(text.0.take()).unwrap();
        assert!(text.contains(expected[0].headline.as_str()), "{text}");
        assert_eq!(stats.attempts, expected.len() as u64);
        assert_eq!(
            stats.failed,
            expected.iter().filter(|v| v.outcome.is_failure()).count() as u64
        );
    }

    /// A sink whose output is gone ends the session (a closed stdout, e.g. `| head`).
    #[test]
    fn a_gone_output_ends_the_session() {
        struct Gone;
        impl crate::sinks::Sink for Gone {
            fn verdict(&mut self, _v: &Verdict) -> io::Result<()> {
                Err(io::ErrorKind::BrokenPipe.into())
            }
        }
        let (ended, _) = replay("s2_refused", ctx(9500), Sinks::default().with(Gone), None);
        assert!(matches!(ended, Ended::OutputGone(_)), "{ended:?}");
    }
}

//! `kubectl netprobe trace --pod P`: the trace as a `Trace` object
//! ([`crate::model::trace`]). The client creates it (generateName `<pod>-`), watches it and
//! prints the verdicts the node's agent writes into its status, with the printer of every other
//! trace, and deletes it when it ends or on Ctrl-C (unless `--keep`). It talks to the API
//! server only, with the kubeconfig's own authentication: who may trace where is RBAC on
//! `traces.netprobe.io`, and no credential goes anywhere else.

use std::{io::Write, time::Duration};

use futures::StreamExt;
use kube::{
    Api, ResourceExt,
    api::{DeleteParams, ObjectMeta, PostParams},
    runtime::{WatchStreamExt, watcher},
};

use super::{client::kube_err, kubeconfig::KubeOptions};
use crate::{
    error::{Error, Result},
    model::trace::{MAX_DURATION, MAX_VERDICTS, Trace, TracePhase, TraceSpec},
    sinks::{Format, Printer},
};

/// The label every Trace this client creates carries (who made it, for `kubectl get -l`).
pub const CREATED_BY: (&str, &str) = ("app.kubernetes.io/created-by", "kubectl-netprobe");
/// Exit codes, as for a trace run on the node: a failure was diagnosed; no attempt was seen.
pub const EXIT_DIAGNOSED: i32 = 1;
pub const EXIT_NO_ATTEMPT: i32 = 3;
/// How long past its duration a trace may take to be taken by an agent and finished before
/// the client gives up (the agent coalesces status writes; a node may run others first).
pub const GRACE: Duration = Duration::from_secs(30);

pub struct Options {
    pub namespace: Option<String>,
    /// What to trace (`pod`, `port`/`dns`, `duration`, `events`).
    pub spec: TraceSpec,
    /// Stop (and delete the object) after this many verdicts.
    pub count: Option<u64>,
    /// Leave the object when done (`--keep`).
    pub keep: bool,
    pub format: Format,
    /// How to reach the API server (kubectl's flags).
    pub kube: KubeOptions,
}

/// `--duration` as a Trace's `spec.duration`: whole seconds, rounded up, at most 10m.
pub fn spec_duration(d: Duration) -> std::result::Result<String, String> {
    if d > MAX_DURATION {
        return Err(format!(
            "--duration {}s: a Trace lasts at most 10m",
            d.as_secs()
        ));
    }
    let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    Ok(format!("{}s", secs.max(1)))
}

/// Creates the Trace, prints what its status shows until it ends (or `stop` completes, e.g.
/// Ctrl-C), deletes it unless kept; returns the exit code of a trace on the node.
pub async fn run(
    opts: Options,
    stdout: &mut dyn Write,
    stderr: &mut dyn Write,
    stop: impl std::future::Future<Output = ()>,
) -> Result<i32> {
    let clients = opts.kube.clients().await?;
    let namespace = opts
        .namespace
        .clone()
        .unwrap_or_else(|| clients.api.default_namespace().to_string());
    let api = Api::<Trace>::namespaced(clients.api.clone(), &namespace);
    let mut object = Trace::new("", opts.spec.clone());
    object.metadata = ObjectMeta {
        generate_name: Some(format!("{}-", opts.spec.pod)),
        labels: Some([(CREATED_BY.0.into(), CREATED_BY.1.into())].into()),
        ..ObjectMeta::default()
    };
    let what = || format!("creating a Trace in namespace {namespace}");
    let create = async {
        api.create(&PostParams::default(), &object)
            .await
            .map_err(|e| match e {
                kube::Error::Api(ae) if ae.code == 404 => Error::Kube {
                    what: what(),
                    reason: format!(
                        "{}: is the CRD traces.netprobe.io installed (deploy/)?",
                        ae.message
                    ),
                },
                e => kube_err(what())(e),
            })
    };
    let created = opts.kube.bounded(what, create).await?;
    let name = created.name_any();
    let _ = writeln!(
        stderr,
        "netprobe: trace {namespace}/{name} of pod {} created; waiting for the agent of its node",
        opts.spec.pod
    );
    // The watch may be silent for minutes: on the client without --request-timeout's read
    // bound.
    let watched = Api::<Trace>::namespaced(clients.streams.clone(), &namespace);
    let mut follow = Follow::new(&opts, Printer::new(stdout, opts.format));
    let ended = follow.run(watched, &name, stderr, stop).await;
    if opts.keep {
        let _ = writeln!(
            stderr,
            "netprobe: kept trace {namespace}/{name} (kubectl delete trace -n {namespace} {name})"
        );
    } else if !matches!(ended, Err(Error::Remote { .. }) if follow.deleted) {
        let what = || format!("deleting trace {namespace}/{name}");
        let delete = async {
            api.delete(&name, &DeleteParams::default())
                .await
                .map(drop)
                .map_err(kube_err(what()))
        };
        if let Err(e) = opts.kube.bounded(what, delete).await {
            let _ = writeln!(stderr, "netprobe: WARNING: {e}");
        }
    }
    let code = ended?;
    follow.finish(stderr);
    Ok(code)
}

/// What the client has shown of one Trace's status.
struct Follow<W: Write> {
    printer: Printer<W>,
    events_mode: bool,
    count: Option<u64>,
    /// The trace's own duration (the client's deadlines follow from it).
    duration: Duration,
    verdicts: usize,
    events: usize,
    attempts: u64,
    failed: u64,
    /// What the status said last (phase, node, message), to say changes once.
    said: Option<(TracePhase, Option<String>, Option<String>)>,
    dropped: (u64, u64),
    summary_seen: bool,
    deleted: bool,
    /// The last watch error said (the watcher retries).
    watch_error: Option<String>,
}

/// Why following a Trace ended.
enum End {
    Finished,
    /// The agent could not run it, or stopped it: why.
    Failed(String),
    /// `--count` verdicts were shown.
    Count,
    Stopped,
}

impl<W: Write> Follow<W> {
    fn new(opts: &Options, printer: Printer<W>) -> Self {
        Self {
            printer,
            events_mode: opts.spec.events,
            count: opts.count,
            duration: opts.spec.duration().unwrap_or(MAX_DURATION),
            verdicts: 0,
            events: 0,
            attempts: 0,
            failed: 0,
            said: None,
            dropped: (0, 0),
            summary_seen: false,
            deleted: false,
            watch_error: None,
        }
    }

    async fn run(
        &mut self,
        api: Api<Trace>,
        name: &str,
        stderr: &mut dyn Write,
        stop: impl std::future::Future<Output = ()>,
    ) -> Result<i32> {
        let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
        let mut updates = std::pin::pin!(watcher(api, config).default_backoff());
        let mut stop = std::pin::pin!(stop);
        // Not taken by an agent within this long: give up (an agent that started has its
        // own duration plus the grace).
        let mut deadline = tokio::time::Instant::now() + self.duration + 2 * GRACE;
        let mut started = false;
        let end = loop {
            let update = tokio::select! {
                u = updates.next() => u,
                () = &mut stop => break End::Stopped,
                () = tokio::time::sleep_until(deadline) => {
                    return Err(Error::Remote { reason: self.late(started) });
                }
            };
            let trace = match update {
                None => {
                    return Err(Error::Remote {
                        reason: "the watch of the trace ended".into(),
                    });
                }
                Some(Err(e)) => {
                    // The watcher retries with backoff; say why it waits, once per reason.
                    let said = e.to_string();
                    if self.watch_error.as_ref() != Some(&said) {
                        let _ =
                            writeln!(stderr, "netprobe: WARNING: watching trace {name}: {said}");
                        self.watch_error = Some(said);
                    }
                    continue;
                }
                Some(Ok(watcher::Event::Apply(t) | watcher::Event::InitApply(t))) => t,
                Some(Ok(watcher::Event::Delete(_))) => {
                    self.deleted = true;
                    return Err(Error::Remote {
                        reason: format!("trace {name} was deleted before it finished"),
                    });
                }
                Some(Ok(_)) => continue,
            };
            if !started && trace.phase() != TracePhase::Pending {
                started = true;
                deadline = tokio::time::Instant::now() + self.duration + GRACE;
            }
            match self.show(&trace, stderr) {
                Ok(Some(End::Failed(message))) => {
                    return Err(Error::Remote {
                        reason: format!("trace {name} failed: {message}"),
                    });
                }
                Ok(Some(end)) => break end,
                Ok(None) => {}
                Err(e) => return Err(Error::io("writing the trace output", e)),
            }
        };
        if matches!(end, End::Stopped) {
            let _ = writeln!(
                stderr,
                "netprobe: stopped; deleting the trace ends it on the node"
            );
        }
        Ok(self.exit_code(stderr))
    }

    fn late(&self, started: bool) -> String {
        if started {
            "the agent did not finish the trace within its duration (and 30s)".into()
        } else {
            "no netprobe agent took the trace (is the agent running on the pod's node, and the CRD installed?)".into()
        }
    }

    /// Prints what is new in `t`'s status; Some when following should end.
    fn show(&mut self, t: &Trace, stderr: &mut dyn Write) -> std::io::Result<Option<End>> {
        let Some(s) = &t.status else {
            return Ok(None);
        };
        let now = (s.phase, s.node.clone(), s.message.clone());
        if self.said.as_ref() != Some(&now) {
            let on = s
                .node
                .as_deref()
                .map(|n| format!(" on node {n}"))
                .unwrap_or_default();
            let why = s
                .message
                .as_deref()
                .map(|m| format!(": {m}"))
                .unwrap_or_default();
            writeln!(
                stderr,
                "netprobe: trace {} {:?}{on}{why}",
                t.name_any(),
                s.phase
            )?;
            self.said = Some(now);
        }
        for v in s.verdicts.iter().skip(self.verdicts) {
            self.verdicts += 1;
            self.attempts += 1;
            self.failed += u64::from(v.outcome.is_failure());
            if !self.events_mode {
                self.printer.verdict(v)?;
            }
            if self.count.is_some_and(|c| self.attempts >= c) {
                return Ok(Some(End::Count));
            }
        }
        for e in s.events.iter().skip(self.events) {
            self.events += 1;
            self.printer.event(e)?;
        }
        self.dropped = (s.verdicts_dropped, s.events_dropped);
        if s.phase == TracePhase::Failed {
            let why = s.message.as_deref().unwrap_or("(the agent gave no reason)");
            return Ok(Some(End::Failed(why.into())));
        }
        if !s.phase.is_finished() {
            return Ok(None);
        }
        if let Some(summary) = &s.summary {
            self.summary_seen = true;
            // What the node counted, verdicts the object could not keep included.
            self.attempts = self.attempts.max(summary.attempts);
            self.failed = self.failed.max(summary.failed);
            self.printer.summary(summary)?;
        } else if s.outcome.is_some_and(|o| o.is_failure()) {
            self.failed = self.failed.max(1);
        }
        Ok(Some(End::Finished))
    }

    /// The exit code of a trace on the node, from what was seen.
    fn exit_code(&self, stderr: &mut dyn Write) -> i32 {
        if self.events_mode {
            0
        } else if self.failed > 0 {
            EXIT_DIAGNOSED
        } else if self.attempts == 0 {
            let _ = writeln!(stderr, "netprobe: no connection attempt seen");
            EXIT_NO_ATTEMPT
        } else {
            0
        }
    }

    /// Says what the object could not keep.
    fn finish(&self, stderr: &mut dyn Write) {
        let (verdicts, events) = self.dropped;
        if verdicts > 0 {
            let _ = writeln!(
                stderr,
                "netprobe: WARNING: {verdicts} verdicts were not kept in the object (it keeps the first {MAX_VERDICTS}); {} attempts in all",
                self.attempts
            );
        }
        if events > 0 {
            let _ = writeln!(
                stderr,
                "netprobe: WARNING: {events} events were not kept in the object (it keeps the first {})",
                crate::model::trace::MAX_EVENTS
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_become_whole_seconds_within_ten_minutes() {
        assert_eq!(spec_duration(Duration::from_secs(30)).unwrap(), "30s");
        assert_eq!(spec_duration(Duration::from_millis(1500)).unwrap(), "2s");
        assert_eq!(spec_duration(Duration::from_millis(1)).unwrap(), "1s");
        assert_eq!(spec_duration(Duration::from_secs(600)).unwrap(), "600s");
        assert!(spec_duration(Duration::from_secs(601)).is_err());
    }
}

//! Counts the pipeline's parts report for `/metrics`: plain data, so that sinks need not know
//! the sources or the engine that produce them.

/// The two TCP MIB counters of one namespace, or their totals (`sources::tcp_opens`).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct TcpMib {
    pub active_opens: u64,
    pub attempt_fails: u64,
}

/// Flows armed for an nftables trace (`sources::nftrace::armed`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ArmStats {
    /// Flows armed now.
    pub armed_now: u64,
    /// Flows ever armed.
    pub armed_total: u64,
    /// Arm requests refused because `limit` flows were armed, or `MAX_ARMS_PER_SECOND` were
    /// armed this second.
    pub refused: u64,
    /// Flows disarmed by the TTL (no traced drop, no verdict).
    pub expired: u64,
    /// Armed flows whose next packet was traced to a dropping rule.
    pub traced: u64,
    /// Flows not armed because nft refused the change, or the namespace's trace socket could
    /// not be opened.
    pub errors: u64,
    /// Trace socket overruns (the kernel dropped trace messages).
    pub trace_overruns: u64,
    /// Longest time one `arm` call kept the session waiting, in µs (the `nft` run itself is
    /// on the worker thread).
    pub arm_us_max: u64,
    /// Longest time one table change (one `nft` run) took on the worker thread, in µs.
    pub nft_us_max: u64,
}

/// Rule counter reads after netfilter drops (`sources::xtables`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CounterStats {
    /// Counter reads (one `nft`/`iptables-legacy-save` run per backend).
    pub reads: u64,
    /// Drops attributed by counters (reused results included).
    pub attributed: u64,
    /// Drops in a read interval that reused the previous result (same destination).
    pub reused: u64,
    /// Drops in a read interval left unattributed (another destination).
    pub skipped: u64,
}

/// What one verdict engine had to let go of to stay bounded. Every bound is on state a tenant
/// can grow (client addresses and ports, DNS ids, datagrams of one exchange).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Evictions {
    /// Attempts (exchanges) judged early because `verdict::MAX_OPEN` were open: each one had a
    /// result (TCP: any evidence; DNS: a reply, a drop, a rule) and got its verdict from it.
    pub judged_early: u64,
    /// DNS exchanges forgotten unjudged because `verdict::MAX_OPEN` were open and none had a
    /// result yet: an unanswered query cannot be judged before its timeout (its reply may
    /// still come), so it gets no verdict.
    pub dropped: u64,
    /// Decided attempts forgotten early because `verdict::MAX_DONE` were remembered.
    pub forgotten_early: u64,
    /// Events not kept because their attempt already held `verdict::MAX_EVENTS` (only events
    /// that may decide the verdict are kept beyond it).
    pub events_dropped: u64,
    /// TCP: connections followed past their handshake let go because too many were followed —
    /// the agent's (from a failure signal, `verdict::midstream::MAX_FOLLOWED`) judged with what
    /// they had when a drop had hit them, forgotten otherwise; a trace's (from the handshake,
    /// `verdict::established::MAX_FOLLOWED`) get no second verdict.
    pub followed_evicted: u64,
}

impl std::ops::AddAssign for Evictions {
    fn add_assign(&mut self, o: Self) {
        self.judged_early += o.judged_early;
        self.dropped += o.dropped;
        self.forgotten_early += o.forgotten_early;
        self.events_dropped += o.events_dropped;
        self.followed_evicted += o.followed_evicted;
    }
}

impl Evictions {
    /// `(reason label, count)` as `/metrics` exports them.
    pub fn by_reason(&self) -> [(&'static str, u64); 5] {
        [
            ("judged_early", self.judged_early),
            ("dropped", self.dropped),
            ("forgotten_early", self.forgotten_early),
            ("events_dropped", self.events_dropped),
            ("followed_evicted", self.followed_evicted),
        ]
    }
}

/// What the always-on engines (TCP on every port, DNS) had to let go of to stay bounded.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct EngineStats {
    pub tcp: Evictions,
    pub dns: Evictions,
}

impl std::ops::Add for EngineStats {
    type Output = Self;
    fn add(mut self, o: Self) -> Self {
        self.tcp += o.tcp;
        self.dns += o.dns;
        self
    }
}

//! Who may start a trace or read failures on an agent: the Kubernetes API decides.
//!
//! The client sends `Authorization: Bearer <token>`; the agent asks the API server who the
//! token belongs to (TokenReview, audience [`AUDIENCE`] first, then the API server's own, so
//! kubeconfig tokens work too) and whether that caller may `create` [`TRACES`] of the traced
//! pod's namespace (or `list` [`FAILURES`]) in the virtual API group [`GROUP`]
//! (SubjectAccessReview). Answers are cached for [`CACHE_TTL`] by a hash of the token, never by
//! the token, in a bounded map whose evictions are counted.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Mutex,
    time::{Duration, Instant},
};

use k8s_openapi::api::{
    authentication::v1::{TokenReview, TokenReviewSpec},
    authorization::v1::{ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec},
};
use kube::{Api, api::PostParams};

/// The audience of the tokens a client requests for the agents.
pub const AUDIENCE: &str = "netprobe";
/// The virtual API group of netprobe's permissions (RBAC rules name it; nothing serves it).
pub const GROUP: &str = "netprobe.io";
/// `create` on it: start a trace of a pod of that namespace.
pub const TRACES: &str = "traces";
/// `list` on it: read the failures whose client or server is in that namespace.
pub const FAILURES: &str = "failures";
/// How long a TokenReview or SubjectAccessReview answer is reused.
pub const CACHE_TTL: Duration = Duration::from_secs(30);
/// Cached answers at most (a flood of distinct tokens evicts the oldest, counted).
pub const CACHE_ENTRIES: usize = 1024;
/// Namespaces checked at most for one failures request (one SubjectAccessReview each).
pub const MAX_NAMESPACE_CHECKS: usize = 32;

/// An authenticated caller, as the API server named it.
#[derive(Clone, Debug, PartialEq)]
pub struct Caller {
    pub user: String,
    pub uid: Option<String>,
    pub groups: Vec<String>,
    pub extra: BTreeMap<String, Vec<String>>,
}

impl std::fmt::Display for Caller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "user={:?} groups={:?}", self.user, self.groups.join(","))
    }
}

/// Why a request is not served.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Refusal {
    #[error("no bearer token: use `kubectl netprobe`, which sends one")]
    NoToken,
    #[error("the token was not accepted by the Kubernetes API ({0})")]
    BadToken(String),
    #[error("{user} may not {verb} {resource}.{GROUP}{}", scope(namespace))]
    Denied {
        user: String,
        verb: &'static str,
        resource: &'static str,
        namespace: String,
    },
    #[error("the Kubernetes API could not be asked ({0})")]
    Unavailable(String),
}

fn scope(namespace: &str) -> String {
    if namespace.is_empty() {
        " cluster-wide".into()
    } else {
        format!(" in namespace {namespace}")
    }
}

/// What is asked: `verb` on `resource` in `namespace` ("" = cluster scope), `name` if any.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Permission {
    pub verb: &'static str,
    pub resource: &'static str,
    pub namespace: String,
    pub name: Option<String>,
}

impl Permission {
    /// Tracing pod `name` of `namespace`.
    pub fn trace(namespace: &str, name: &str) -> Self {
        Self {
            verb: "create",
            resource: TRACES,
            namespace: namespace.into(),
            name: Some(name.into()),
        }
    }

    /// Reading the failures of `namespace` ("" = all).
    pub fn failures(namespace: &str) -> Self {
        Self {
            verb: "list",
            resource: FAILURES,
            namespace: namespace.into(),
            name: None,
        }
    }

    fn denied(&self, caller: &Caller) -> Refusal {
        Refusal::Denied {
            user: caller.user.clone(),
            verb: self.verb,
            resource: self.resource,
            namespace: self.namespace.clone(),
        }
    }
}

/// The SHA-1 of a token: what the cache keeps instead of the token.
type TokenHash = [u8; 20];

fn hash(token: &str) -> TokenHash {
    sha1_smol::Sha1::from(token).digest().bytes()
}

/// A bounded map of answers that expire.
struct Cache<K, V> {
    entries: HashMap<K, (Instant, V)>,
    evicted: u64,
}

impl<K: std::hash::Hash + Eq + Clone, V: Clone> Cache<K, V> {
    fn new() -> Self {
        Self {
            entries: HashMap::new(),
            evicted: 0,
        }
    }

    fn get(&self, k: &K, now: Instant) -> Option<V> {
        let (at, v) = self.entries.get(k)?;
        (now.duration_since(*at) < CACHE_TTL).then(|| v.clone())
    }

    fn insert(&mut self, k: K, v: V, now: Instant) {
        if self.entries.len() >= CACHE_ENTRIES && !self.entries.contains_key(&k) {
            self.entries
                .retain(|_, (at, _)| now.duration_since(*at) < CACHE_TTL);
        }
        if self.entries.len() >= CACHE_ENTRIES
            && let Some(oldest) = self.oldest()
        {
            self.entries.remove(&oldest);
            self.evicted += 1;
        }
        self.entries.insert(k, (now, v));
    }

    fn oldest(&self) -> Option<K> {
        self.entries
            .iter()
            .min_by_key(|(_, (at, _))| *at)
            .map(|(k, _)| k.clone())
    }
}

/// Counters of the agent's authorisation, for /metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct AuthStats {
    pub token_reviews: u64,
    pub access_reviews: u64,
    pub cache_evictions: u64,
}

struct State {
    callers: Cache<TokenHash, Result<Caller, Refusal>>,
    decisions: Cache<(TokenHash, Permission), bool>,
    stats: AuthStats,
}

/// Asks the API server who a token is and what it may do; caches the answers.
pub struct Authorizer {
    /// Built on first use (an agent may start before the API server is reachable).
    client: tokio::sync::OnceCell<Result<kube::Client, String>>,
    state: Mutex<State>,
}

impl Default for Authorizer {
    fn default() -> Self {
        Self {
            client: tokio::sync::OnceCell::new(),
            state: Mutex::new(State {
                callers: Cache::new(),
                decisions: Cache::new(),
                stats: AuthStats::default(),
            }),
        }
    }
}

impl Authorizer {
    /// Asks the API server of `client` (else the agent's kubeconfig or in-cluster config).
    pub fn with_client(client: kube::Client) -> Self {
        let me = Self::default();
        let _ = me.client.set(Ok(client));
        me
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn stats(&self) -> AuthStats {
        let st = self.state();
        AuthStats {
            cache_evictions: st.callers.evicted + st.decisions.evicted,
            ..st.stats
        }
    }

    async fn client(&self) -> Result<kube::Client, Refusal> {
        self.client
            .get_or_init(|| async {
                crate::enrich::kube::client()
                    .await
                    .map_err(|e| e.to_string())
            })
            .await
            .clone()
            .map_err(Refusal::Unavailable)
    }

    /// Who `token` is (TokenReview, cached).
    pub async fn authenticate(&self, token: &str) -> Result<Caller, Refusal> {
        let key = hash(token);
        if let Some(known) = self.state().callers.get(&key, Instant::now()) {
            return known;
        }
        let client = self.client().await?;
        let mut answer = review_token(&client, token, Some(AUDIENCE)).await;
        if matches!(answer, Err(Refusal::BadToken(_))) {
            // A kubeconfig's own token is for the API server's audience.
            answer = review_token(&client, token, None).await;
        }
        let mut st = self.state();
        st.stats.token_reviews += 1;
        // API errors are not remembered: the next request asks again.
        if !matches!(answer, Err(Refusal::Unavailable(_))) {
            st.callers.insert(key, answer.clone(), Instant::now());
        }
        answer
    }

    /// Whether `caller` (who presented `token`) holds `what` (SubjectAccessReview, cached).
    pub async fn allowed(
        &self,
        token: &str,
        caller: &Caller,
        what: &Permission,
    ) -> Result<bool, Refusal> {
        let key = (hash(token), what.clone());
        if let Some(known) = self.state().decisions.get(&key, Instant::now()) {
            return Ok(known);
        }
        let client = self.client().await?;
        let allowed = review_access(&client, caller, what).await?;
        let mut st = self.state();
        st.stats.access_reviews += 1;
        st.decisions.insert(key, allowed, Instant::now());
        Ok(allowed)
    }

    /// Ok when `caller` holds `what`, else the refusal naming the missing permission.
    pub async fn require(
        &self,
        token: &str,
        caller: &Caller,
        what: &Permission,
    ) -> Result<(), Refusal> {
        match self.allowed(token, caller, what).await? {
            true => Ok(()),
            false => Err(what.denied(caller)),
        }
    }

    /// Which failures `caller` may read: `None` = all (cluster-wide `list`), else the
    /// namespaces among `wanted` it may list (at most [`MAX_NAMESPACE_CHECKS`] are asked).
    pub async fn readable_namespaces(
        &self,
        token: &str,
        caller: &Caller,
        wanted: impl IntoIterator<Item = String>,
    ) -> Result<Option<std::collections::HashSet<String>>, Refusal> {
        if self
            .allowed(token, caller, &Permission::failures(""))
            .await?
        {
            return Ok(None);
        }
        let mut readable = std::collections::HashSet::new();
        let wanted: std::collections::BTreeSet<String> = wanted.into_iter().collect();
        for ns in wanted.into_iter().take(MAX_NAMESPACE_CHECKS) {
            if self
                .allowed(token, caller, &Permission::failures(&ns))
                .await?
            {
                readable.insert(ns);
            }
        }
        Ok(Some(readable))
    }
}

fn unavailable(e: kube::Error) -> Refusal {
    Refusal::Unavailable(e.to_string())
}

async fn review_token(
    client: &kube::Client,
    token: &str,
    audience: Option<&str>,
) -> Result<Caller, Refusal> {
    let review = TokenReview {
        spec: TokenReviewSpec {
            token: Some(token.into()),
            audiences: audience.map(|a| vec![a.into()]),
        },
        ..Default::default()
    };
    let answer = Api::<TokenReview>::all(client.clone())
        .create(&PostParams::default(), &review)
        .await
        .map_err(unavailable)?;
    let status = answer.status.unwrap_or_default();
    let user = status.user.filter(|_| status.authenticated == Some(true));
    let Some(user) = user else {
        let why = status.error.unwrap_or_else(|| "not authenticated".into());
        return Err(Refusal::BadToken(why));
    };
    Ok(Caller {
        user: user.username.unwrap_or_default(),
        uid: user.uid,
        groups: user.groups.unwrap_or_default(),
        extra: user.extra.unwrap_or_default(),
    })
}

async fn review_access(
    client: &kube::Client,
    caller: &Caller,
    what: &Permission,
) -> Result<bool, Refusal> {
    let review = SubjectAccessReview {
        spec: SubjectAccessReviewSpec {
            user: Some(caller.user.clone()),
            uid: caller.uid.clone(),
            groups: Some(caller.groups.clone()),
            extra: Some(caller.extra.clone()),
            resource_attributes: Some(ResourceAttributes {
                group: Some(GROUP.into()),
                resource: Some(what.resource.into()),
                verb: Some(what.verb.into()),
                namespace: Some(what.namespace.clone()),
                name: what.name.clone(),
                ..Default::default()
            }),
            ..Default::default()
        },
        ..Default::default()
    };
    let answer = Api::<SubjectAccessReview>::all(client.clone())
        .create(&PostParams::default(), &review)
        .await
        .map_err(unavailable)?;
    Ok(answer
        .status
        .is_some_and(|s| s.allowed && s.denied != Some(true)))
}

/// The bearer token of an `Authorization` header value.
pub fn bearer(header: Option<&hyper::header::HeaderValue>) -> Option<&str> {
    let v = header?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cache_is_bounded_and_counts_evictions() {
        let mut c = Cache::new();
        let t0 = Instant::now();
        for i in 0..CACHE_ENTRIES as u32 {
            c.insert(i, i, t0 + Duration::from_millis(u64::from(i)));
        }
        assert_eq!(c.evicted, 0);
        let later = t0 + Duration::from_secs(1);
        c.insert(u32::MAX, 0, later);
        assert_eq!((c.entries.len(), c.evicted), (CACHE_ENTRIES, 1));
        // The oldest went.
        assert_eq!(c.get(&0, later), None);
        assert_eq!(c.get(&1, later), Some(1));
        // Expired entries are dropped before anything fresh is evicted.
        let expired = t0 + CACHE_TTL + Duration::from_secs(2);
        c.insert(u32::MAX - 1, 0, expired);
        assert_eq!((c.entries.len(), c.evicted), (1, 1));
        assert_eq!(c.get(&u32::MAX, expired), None, "older than the TTL");
    }

    #[test]
    fn only_bearer_tokens_are_read() {
        let h = |s: &'static str| hyper::header::HeaderValue::from_static(s);
        assert_eq!(bearer(Some(&h("Bearer abc"))), Some("abc"));
        assert_eq!(bearer(Some(&h("bearer  abc "))), Some("abc"));
        assert_eq!(bearer(Some(&h("Basic abc"))), None);
        assert_eq!(bearer(Some(&h("Bearer "))), None);
        assert_eq!(bearer(None), None);
    }

    #[test]
    fn refusals_name_the_missing_permission() {
        let caller = Caller {
            user: "alice".into(),
            uid: None,
            groups: vec![],
            extra: BTreeMap::new(),
        };
        let e = Permission::trace("team-b", "api-0")
            .denied(&caller)
            .to_string();
        assert_eq!(
            e,
            "alice may not create traces.netprobe.io in namespace team-b"
        );
        let e = Permission::failures("").denied(&caller).to_string();
        assert_eq!(e, "alice may not list failures.netprobe.io cluster-wide");
    }
}

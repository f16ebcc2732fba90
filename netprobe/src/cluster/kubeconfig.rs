//! How the laptop reaches the API server: the flags kubectl users expect (`--kubeconfig`,
//! `--context`, `--as`, `--request-timeout`; `-n` is each command's own) turned into a kube-rs
//! configuration and clients.
//!
//! `--request-timeout` bounds each API request (connect, send, answer). A trace's stream runs
//! over a port-forward for as long as the trace does and may be silent for minutes, so the
//! client that opens port-forwards keeps the kubeconfig's read timeout; opening the
//! port-forward itself is bounded by the request timeout ([`KubeOptions::bounded`]).

use std::{path::PathBuf, time::Duration};

use kube::config::{KubeConfigOptions, Kubeconfig};

use crate::error::{Error, Result};

/// kubectl's connection flags; all `None`: what `kubectl` with no flags uses (`KUBECONFIG` or
/// `~/.kube/config` and its current context, else the in-cluster service account).
#[derive(Clone, Debug, Default)]
pub struct KubeOptions {
    /// `--kubeconfig`: this file instead of `KUBECONFIG` / `~/.kube/config`.
    pub kubeconfig: Option<PathBuf>,
    /// `--context`: this context of the kubeconfig instead of its current one.
    pub context: Option<String>,
    /// `--as`: every API request impersonates this user (`Impersonate-User`).
    pub impersonate: Option<String>,
    /// `--request-timeout`: the longest wait for one API request; `None`: kube-rs's defaults.
    pub request_timeout: Option<Duration>,
}

/// The clients of one command: `api` for requests, `streams` for port-forwards.
#[derive(Clone)]
pub struct Clients {
    pub api: kube::Client,
    pub streams: kube::Client,
    /// The configuration they were built from (its user's token is what the agents may get).
    pub config: kube::Config,
}

fn config_error(e: impl std::fmt::Display) -> Error {
    Error::Kube {
        what: "reading the kubeconfig / in-cluster config".into(),
        reason: e.to_string(),
    }
}

impl KubeOptions {
    /// The configuration these flags select, impersonation included, timeouts not applied.
    pub async fn config(&self) -> Result<kube::Config> {
        let options = KubeConfigOptions {
            context: self.context.clone(),
            ..Default::default()
        };
        let mut config = match (&self.kubeconfig, &self.context) {
            (Some(path), _) => {
                let file = Kubeconfig::read_from(path).map_err(|e| Error::Kube {
                    what: format!("reading the kubeconfig {}", path.display()),
                    reason: e.to_string(),
                })?;
                kube::Config::from_custom_kubeconfig(file, &options)
                    .await
                    .map_err(config_error)?
            }
            (None, Some(_)) => kube::Config::from_kubeconfig(&options)
                .await
                .map_err(config_error)?,
            (None, None) => kube::Config::infer().await.map_err(config_error)?,
        };
        if let Some(user) = &self.impersonate {
            config.auth_info.impersonate = Some(user.clone());
        }
        Ok(config)
    }

    /// The API and port-forward clients.
    pub async fn clients(&self) -> Result<Clients> {
        // kube's rustls needs a process-wide provider; a second install is a harmless no-op.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let config = self.config().await?;
        let mut api = config.clone();
        let mut streams = config.clone();
        if let Some(t) = self.request_timeout {
            (api.connect_timeout, api.read_timeout, api.write_timeout) =
                (Some(t), Some(t), Some(t));
            (streams.connect_timeout, streams.write_timeout) = (Some(t), Some(t));
        }
        Ok(Clients {
            api: build(api)?,
            streams: build(streams)?,
            config,
        })
    }

    /// `fut` within the request timeout (no bound without one); `what` names it in the error.
    pub async fn bounded<T>(
        &self,
        what: impl FnOnce() -> String,
        fut: impl std::future::Future<Output = Result<T>>,
    ) -> Result<T> {
        let Some(t) = self.request_timeout else {
            return fut.await;
        };
        tokio::time::timeout(t, fut)
            .await
            .map_err(|_| Error::Kube {
                what: what(),
                reason: format!("no answer within --request-timeout {}", humantime(t)),
            })?
    }
}

fn build(config: kube::Config) -> Result<kube::Client> {
    kube::Client::try_from(config).map_err(|e| Error::Kube {
        what: "building the API client".into(),
        reason: e.to_string(),
    })
}

fn humantime(d: Duration) -> String {
    match d.subsec_millis() {
        0 => format!("{}s", d.as_secs()),
        _ => format!("{}ms", d.as_millis()),
    }
}

/// kubectl's `--request-timeout`: a number with a unit (`500ms`, `30s`, `2m`, `1h`; a bare
/// number is seconds); zero (`0`) means none, as for kubectl.
pub fn parse_request_timeout(s: &str) -> std::result::Result<Duration, String> {
    let s = s.trim();
    let digits = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(digits);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("invalid timeout `{s}` (examples: 0, 30s, 500ms, 2m)"))?;
    let d = match unit {
        "" | "s" => Duration::from_secs(n),
        "ms" => Duration::from_millis(n),
        "m" => Duration::from_secs(n.saturating_mul(60)),
        "h" => Duration::from_secs(n.saturating_mul(3600)),
        _ => return Err(format!("invalid unit in `{s}` (use ms, s, m or h)")),
    };
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_timeouts_read_as_kubectl_writes_them() {
        assert_eq!(parse_request_timeout("0").unwrap(), Duration::ZERO);
        assert_eq!(
            parse_request_timeout("30s").unwrap(),
            Duration::from_secs(30)
        );
        assert_eq!(
            parse_request_timeout("500ms").unwrap(),
            Duration::from_millis(500)
        );
        assert_eq!(
            parse_request_timeout("2m").unwrap(),
            Duration::from_secs(120)
        );
        assert_eq!(parse_request_timeout("5").unwrap(), Duration::from_secs(5));
        for bad in ["", "5x", "-1s", "1.5s"] {
            assert!(parse_request_timeout(bad).is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn a_context_and_impersonation_come_from_the_named_kubeconfig() {
        let dir = std::env::temp_dir().join(format!("netprobe-kubeconfig-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("config");
        std::fs::write(
            &path,
            "apiVersion: v1\nkind: Config\nclusters:\n- name: a\n  cluster: {server: 'http://127.0.0.1:1'}\n- name: b\n  cluster: {server: 'http://127.0.0.1:2'}\ncontexts:\n- name: a\n  context: {cluster: a, user: u}\n- name: b\n  context: {cluster: b, user: u, namespace: team-b}\ncurrent-context: a\nusers:\n- name: u\n  user: {token: t}\n",
        )
        .unwrap();
        let options = KubeOptions {
            kubeconfig: Some(path),
            context: Some("b".into()),
            impersonate: Some("alice".into()),
            request_timeout: None,
        };
        let config = options.config().await.unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(config.cluster_url.to_string(), "http://127.0.0.1:2/");
        assert_eq!(config.default_namespace, "team-b");
        assert_eq!(config.auth_info.impersonate.as_deref(), Some("alice"));
    }
}

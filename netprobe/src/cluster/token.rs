//! The client's credential for the agents: the bearer token it sends on every trace and
//! failures request (the agent reviews it, [`super::auth`]).
//!
//! The kubeconfig's own token when it has one; otherwise (client certificates, as k3s's
//! admin kubeconfig, or an exec plugin) a short-lived token for a ServiceAccount, from an
//! RBAC-guarded TokenRequest.

use k8s_openapi::api::{
    authentication::v1::{TokenRequest, TokenRequestSpec},
    core::v1::ServiceAccount,
};
use kube::{Api, api::PostParams};
use secrecy::ExposeSecret;

use super::auth::AUDIENCE;
use crate::error::{Error, Result};

/// The ServiceAccount deploy/ ships for TokenRequests (`--as-service-account`).
pub const DEFAULT_SERVICE_ACCOUNT: (&str, &str) = ("netprobe", "netprobe-tracer");
/// Lifetime asked for a requested token: a trace is at most 10 minutes.
pub const TOKEN_SECONDS: i64 = 600;

/// `NAMESPACE/NAME` of a ServiceAccount.
pub fn parse_service_account(s: &str) -> std::result::Result<(String, String), String> {
    match s.split_once('/') {
        Some((ns, name))
            if super::protocol::valid_name(ns) && super::protocol::valid_name(name) =>
        {
            Ok((ns.into(), name.into()))
        }
        _ => Err(format!("expected NAMESPACE/NAME, got `{s}`")),
    }
}

/// The ServiceAccount whose token the agents get, if one is requested: `--as-service-account`
/// when given; else, under `--as system:serviceaccount:NS:NAME`, that ServiceAccount (so the
/// agents see who the API server sees); `None`: the kubeconfig's own token, else
/// [`DEFAULT_SERVICE_ACCOUNT`]. `--as` a user without `--as-service-account` is refused: the
/// agents authorise a bearer token and cannot impersonate, and sending the kubeconfig's token
/// would authorise the caller, not the user `--as` names.
pub fn agent_service_account(
    impersonate: Option<&str>,
    service_account: Option<&(String, String)>,
) -> Result<Option<(String, String)>> {
    if let Some(sa) = service_account {
        return Ok(Some(sa.clone()));
    }
    let Some(user) = impersonate else {
        return Ok(None);
    };
    let as_service_account = user
        .strip_prefix("system:serviceaccount:")
        .and_then(|rest| parse_service_account(&rest.replacen(':', "/", 1)).ok());
    as_service_account.map(Some).ok_or_else(|| Error::Kube {
        what: format!("--as {user}"),
        reason: "the agents check a bearer token and cannot impersonate, so a trace or failures request cannot be made as a user; name the ServiceAccount whose token they should get with --as-service-account NAMESPACE/NAME (requested as this user, who needs `create` on its serviceaccounts/token), or impersonate a ServiceAccount: --as system:serviceaccount:NAMESPACE:NAME".into(),
    })
}

/// The token to send the agents: a requested one for `service_account` (from
/// [`agent_service_account`]) when given, else `config`'s own, else one requested for
/// [`DEFAULT_SERVICE_ACCOUNT`]. Requests go through `client` (impersonating, under `--as`).
pub async fn bearer(
    client: &kube::Client,
    config: &kube::Config,
    service_account: Option<&(String, String)>,
) -> Result<String> {
    if service_account.is_none()
        && let Some(token) = kubeconfig_token(config)?
    {
        return Ok(token);
    }
    let (ns, name) = service_account.cloned().unwrap_or_else(|| {
        let (ns, name) = DEFAULT_SERVICE_ACCOUNT;
        (ns.into(), name.into())
    });
    request_token(client, &ns, &name).await
}

/// The static token (`token` or `tokenFile`) of the kubeconfig user or in-cluster config, if
/// it has one.
fn kubeconfig_token(config: &kube::Config) -> Result<Option<String>> {
    let auth = &config.auth_info;
    if let Some(t) = &auth.token {
        return Ok(Some(t.expose_secret().trim().to_string()));
    }
    let Some(file) = &auth.token_file else {
        return Ok(None);
    };
    let token =
        std::fs::read_to_string(file).map_err(|e| Error::io(format!("reading {file}"), e))?;
    Ok(Some(token.trim().to_string()))
}

async fn request_token(client: &kube::Client, ns: &str, name: &str) -> Result<String> {
    let request = TokenRequest {
        spec: TokenRequestSpec {
            audiences: vec![AUDIENCE.into()],
            expiration_seconds: Some(TOKEN_SECONDS),
            ..Default::default()
        },
        ..Default::default()
    };
    let answer = Api::<ServiceAccount>::namespaced(client.clone(), ns)
        .create_token_request(name, &PostParams::default(), &request)
        .await
        .map_err(|e| Error::Kube {
            what: format!("requesting a token for ServiceAccount {ns}/{name} (the agents need a bearer token; this kubeconfig has none)"),
            reason: format!(
                "{e}. Either use a kubeconfig with a token, or get `create` on serviceaccounts/token of {ns}/{name} (deploy/: bind Role netprobe-token-requester), or name another ServiceAccount with --as-service-account NAMESPACE/NAME"
            ),
        })?;
    answer
        .status
        .map(|s| s.token)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| Error::Kube {
            what: format!("requesting a token for ServiceAccount {ns}/{name}"),
            reason: "the API server answered without a token".into(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_accounts_are_namespace_slash_name() {
        assert_eq!(
            parse_service_account("netprobe/netprobe-tracer").unwrap(),
            ("netprobe".into(), "netprobe-tracer".into())
        );
        for bad in ["netprobe", "a/b/c", "/x", "A/b", "a/--x"] {
            assert!(parse_service_account(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn impersonation_decides_whose_token_the_agents_get() {
        let sa = |ns: &str, name: &str| Some((ns.to_string(), name.to_string()));
        assert_eq!(agent_service_account(None, None).unwrap(), None);
        let explicit = ("netprobe".to_string(), "netprobe-tracer".to_string());
        assert_eq!(
            agent_service_account(Some("alice"), Some(&explicit)).unwrap(),
            sa("netprobe", "netprobe-tracer")
        );
        assert_eq!(
            agent_service_account(Some("system:serviceaccount:team-a:tracer"), None).unwrap(),
            sa("team-a", "tracer")
        );
        let refused = agent_service_account(Some("alice"), None)
            .unwrap_err()
            .to_string();
        assert!(refused.contains("--as-service-account"), "{refused}");
        assert!(agent_service_account(Some("system:serviceaccount:bad"), None).is_err());
    }
}

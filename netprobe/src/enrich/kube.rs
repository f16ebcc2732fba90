//! The Kubernetes side of the inventory: reflectors (list + watch, resync and backoff by
//! kube-rs) for this node's pods (field selector `spec.nodeName`), Services and EndpointSlices.
//! Configuration from `KUBECONFIG` (or ~/.kube/config) or the in-cluster service account.

use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::{
    core::v1::{Pod, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client, Config,
    runtime::{WatchStreamExt, reflector, reflector::Store, watcher},
};

use crate::{
    enrich::pods::Inventory,
    error::{Error, Result},
};

pub struct KubeSource {
    client: Client,
    pods: Store<Pod>,
    services: Store<Service>,
    slices: Store<EndpointSlice>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    sync: InventorySync,
}

/// Whether the inventory has had its first full list of each kind, and the API's last error:
/// what `/readyz` says (a handle any thread may hold).
#[derive(Clone)]
pub struct InventorySync {
    pods: Store<Pod>,
    services: Store<Service>,
    slices: Store<EndpointSlice>,
    last_error: LastError,
}

/// The watchers' latest error, cleared by their next success.
type LastError = std::sync::Arc<std::sync::Mutex<Option<String>>>;

fn listed<K>(store: &Store<K>) -> bool
where
    K: kube::Resource<DynamicType = ()> + Clone + 'static,
{
    futures::FutureExt::now_or_never(store.wait_until_ready()).is_some_and(|r| r.is_ok())
}

impl InventorySync {
    /// Each kind (`pods`, `services`, `endpointslices`) and whether its first list is in.
    pub fn kinds(&self) -> [(&'static str, bool); 3] {
        [
            ("pods", listed(&self.pods)),
            ("services", listed(&self.services)),
            ("endpointslices", listed(&self.slices)),
        ]
    }

    /// The kinds not listed yet.
    pub fn missing(&self) -> Vec<&'static str> {
        self.kinds()
            .into_iter()
            .filter_map(|(kind, done)| (!done).then_some(kind))
            .collect()
    }

    /// `None` when synced; otherwise what is missing and why, in one line.
    pub fn not_synced(&self) -> Option<String> {
        let missing = self.missing();
        if missing.is_empty() {
            return None;
        }
        let why = self
            .last_error
            .lock()
            .expect("last error lock")
            .clone()
            .map(|e| format!("; last API error: {e}"))
            .unwrap_or_default();
        Some(format!(
            "inventory not synced ({} not listed yet{why}; retrying in the background): no pod or Service names until it is",
            missing.join(", ")
        ))
    }
}

/// Whether this process is configured to reach an API server at all.
pub fn configured() -> bool {
    std::env::var_os("KUBECONFIG").is_some()
        || std::env::var_os("KUBERNETES_SERVICE_HOST").is_some()
}

fn reflect<K>(
    api: Api<K>,
    config: watcher::Config,
    last_error: LastError,
) -> (Store<K>, tokio::task::JoinHandle<()>)
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
{
    let (store, writer) = reflector::store();
    // The watcher re-lists and re-watches with exponential backoff: an API server that goes
    // away and comes back is survived, never fatal.
    let stream = reflector(writer, watcher(api, config))
        .default_backoff()
        .touched_objects();
    let task = tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(r) = stream.next().await {
            *last_error.lock().expect("last error lock") = r.err().map(|e| e.to_string());
        }
    });
    (store, task)
}

/// An API client from `KUBECONFIG` (or ~/.kube/config) or the in-cluster service account.
pub async fn client() -> Result<Client> {
    // kube's rustls needs a process-wide provider; a second install is a harmless no-op.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let config = Config::infer().await.map_err(|e| Error::Kube {
        what: "reading the kubeconfig / in-cluster config".into(),
        reason: e.to_string(),
    })?;
    Client::try_from(config).map_err(|e| Error::Kube {
        what: "building the API client".into(),
        reason: e.to_string(),
    })
}

impl KubeSource {
    /// Starts the reflectors. `node`: only this node's pods (from NODE_NAME).
    pub async fn start(node: Option<&str>) -> Result<Self> {
        let client = client().await?;
        let pod_cfg = match node {
            Some(n) => watcher::Config::default().fields(&format!("spec.nodeName={n}")),
            None => watcher::Config::default(),
        };
        let last_error = LastError::default();
        let (pods, t1) = reflect(Api::<Pod>::all(client.clone()), pod_cfg, last_error.clone());
        let (services, t2) = reflect(
            Api::<Service>::all(client.clone()),
            watcher::Config::default(),
            last_error.clone(),
        );
        let (slices, t3) = reflect(
            Api::<EndpointSlice>::all(client.clone()),
            watcher::Config::default(),
            last_error.clone(),
        );
        let sync = InventorySync {
            pods: pods.clone(),
            services: services.clone(),
            slices: slices.clone(),
            last_error,
        };
        Ok(Self {
            client,
            pods,
            services,
            slices,
            tasks: vec![t1, t2, t3],
            sync,
        })
    }

    /// Whether the first lists are in (for `/readyz`).
    pub fn sync(&self) -> InventorySync {
        self.sync.clone()
    }

    /// Waits until every store has its first full list.
    pub async fn wait_ready(&self, timeout: Duration) -> Result<()> {
        let ready = async {
            let _ = self.pods.wait_until_ready().await;
            let _ = self.services.wait_until_ready().await;
            let _ = self.slices.wait_until_ready().await;
        };
        tokio::time::timeout(timeout, ready)
            .await
            .map_err(|_| Error::Kube {
                what: "listing pods, services and endpointslices".into(),
                reason: format!("no answer within {timeout:?}"),
            })
    }

    /// The API client (Kubernetes Events are posted with it).
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// The current state as an inventory (namespaces are bound by the caller).
    pub fn inventory(&self) -> Inventory {
        let pods: Vec<Pod> = self.pods.state().iter().map(|p| (**p).clone()).collect();
        let services: Vec<Service> = self
            .services
            .state()
            .iter()
            .map(|s| (**s).clone())
            .collect();
        let slices: Vec<EndpointSlice> =
            self.slices.state().iter().map(|s| (**s).clone()).collect();
        Inventory::build(&pods, &services, &slices)
    }
}

impl Drop for KubeSource {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What /readyz says follows the stores: each kind counts as listed once its first list is
    /// complete (the watcher's InitDone), and the API's last error is quoted until then.
    #[test]
    fn sync_names_what_is_not_listed_yet_and_why() {
        let (pods, mut pods_w) = reflector::store::<Pod>();
        let (services, mut services_w) = reflector::store::<Service>();
        let (slices, mut slices_w) = reflector::store::<EndpointSlice>();
        let sync = InventorySync {
            pods,
            services,
            slices,
            last_error: LastError::default(),
        };
        *sync.last_error.lock().unwrap() = Some("HTTP 503: down".into());
        assert_eq!(sync.missing(), ["pods", "services", "endpointslices"]);
        let why = sync.not_synced().unwrap();
        assert!(
            why.starts_with("inventory not synced (pods, services, endpointslices not listed yet")
                && why.contains("last API error: HTTP 503: down"),
            "{why}"
        );
        pods_w.apply_watcher_event(&watcher::Event::InitDone);
        services_w.apply_watcher_event(&watcher::Event::InitDone);
        assert_eq!(sync.missing(), ["endpointslices"]);
        slices_w.apply_watcher_event(&watcher::Event::InitDone);
        assert!(sync.missing().is_empty());
        assert_eq!(sync.not_synced(), None);
    }
}

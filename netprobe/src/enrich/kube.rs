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
}

/// Whether this process is configured to reach an API server at all.
pub fn configured() -> bool {
    std::env::var_os("KUBECONFIG").is_some()
        || std::env::var_os("KUBERNETES_SERVICE_HOST").is_some()
}

fn reflect<K>(api: Api<K>, config: watcher::Config) -> (Store<K>, tokio::task::JoinHandle<()>)
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
        while stream.next().await.is_some() {}
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
        let (pods, t1) = reflect(Api::<Pod>::all(client.clone()), pod_cfg);
        let (services, t2) = reflect(
            Api::<Service>::all(client.clone()),
            watcher::Config::default(),
        );
        let (slices, t3) = reflect(
            Api::<EndpointSlice>::all(client.clone()),
            watcher::Config::default(),
        );
        Ok(Self {
            client,
            pods,
            services,
            slices,
            tasks: vec![t1, t2, t3],
        })
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

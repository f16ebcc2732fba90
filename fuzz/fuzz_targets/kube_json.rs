//! Kubernetes JSON (Pod, Service) as the API returns it, into the inventory and its lookups.
#![no_main]
use k8s_openapi::api::core::v1::{Pod, Service};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let pods: Vec<Pod> = serde_json::from_slice::<Pod>(data).into_iter().collect();
    let services: Vec<Service> = serde_json::from_slice::<Service>(data)
        .into_iter()
        .collect();
    let mut inv = netprobe::enrich::pods::Inventory::build(&pods, &services, &[]);
    inv.bind_netns(1, &["10.42.0.10".parse().unwrap()]);
    let _ = inv.peer(
        "10.42.0.10".parse().unwrap(),
        80,
        Some(1),
        Some("/kubepods/pod1/0123456789abcdef"),
    );
    let _ = inv.pod_of_calico_iface("cali0123456789a");
});

//! rtnetlink, sock_diag and ctnetlink (conntrack) replies.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for (_, body) in netprobe::netlink::messages(data) {
        let _ = netprobe::netlink::parse_link(body);
        let _ = netprobe::netlink::parse_addr(body);
        let _ = netprobe::netlink::parse_inet_diag(body);
        let _ = netprobe::netlink::parse_route(body);
        let _ = netprobe::netlink::parse_neighbour(body);
        let _ = netprobe::probes::leftovers::parse_filter(body);
        let _ = netprobe::enrich::conntrack::parse_entry(body);
    }
    let _ = netprobe::netlink::parse_link(data);
    let _ = netprobe::netlink::attrs(data).count();
});

//! The lab itself behaves like a node: pods reach each other through it, closed ports refuse,
//! a FORWARD DROP times out, and everything is gone after drop. Root only (fails otherwise).

use std::time::Duration;

use netprobe_lab::{Connect, Lab, serve};

#[test]
fn pods_talk_through_the_node_and_the_lab_cleans_up() {
    let names;
    {
        let mut lab = Lab::new("self").unwrap();
        let a = lab
            .add_pod("default", "a-0", "10.42.9.1".parse().unwrap())
            .unwrap();
        let b = lab
            .add_pod("default", "b-0", "10.42.9.2".parse().unwrap())
            .unwrap();
        serve(
            lab.listen(&b.netns, "10.42.9.2:8080".parse().unwrap())
                .unwrap(),
        );
        let t = Duration::from_secs(2);
        assert_eq!(
            lab.connect(&a.netns, "10.42.9.2:8080".parse().unwrap(), t),
            Connect::Connected
        );
        assert_eq!(
            lab.connect(&a.netns, "10.42.9.2:8081".parse().unwrap(), t),
            Connect::Refused
        );
        lab.sh(
            lab.node(),
            "iptables -A FORWARD -p tcp --dport 8080 -j DROP",
        )
        .unwrap();
        assert_eq!(
            lab.connect(&a.netns, "10.42.9.2:8080".parse().unwrap(), t),
            Connect::TimedOut
        );
        names = vec![lab.node().to_string(), a.netns.clone(), b.netns.clone()];
    }
    for n in names {
        assert!(
            !std::path::Path::new(&format!("/run/netns/{n}")).exists(),
            "{n} left behind"
        );
    }
}

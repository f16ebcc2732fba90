//! `cargo xtask demo`: the S1 and S2 labs, traced by the real binary, which prints its verdicts.

use std::{
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use netprobe_lab::{Lab, rules, serve};

use crate::build::repo_root;

/// Starts `netprobe trace` in `netns`, runs `traffic` once it is ready, and returns its output.
fn traced(netns: &str, args: &[&str], traffic: impl FnOnce() -> String) -> Result<String> {
    let bin = repo_root().join("target/debug/netprobe");
    let ready = std::env::temp_dir().join(format!("netprobe-demo-ready-{}", std::process::id()));
    let _ = std::fs::remove_file(&ready);
    let child = Command::new("ip")
        .args(["netns", "exec", netns])
        .arg(&bin)
        .args(["trace", "--ready-file"])
        .arg(&ready)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("start netprobe trace")?;
    let start = Instant::now();
    while !Path::new(&ready).exists() {
        if start.elapsed() > Duration::from_secs(60) {
            bail!("netprobe trace did not become ready");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let what = traffic();
    let out = child.wait_with_output()?;
    let _ = std::fs::remove_file(&ready);
    Ok(format!(
        "{what}\n{}{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    ))
}

fn s2(lab: &mut Lab) -> Result<String> {
    let pod = lab.add_pod("financial-ml", "mlserver-0", "10.42.0.10".parse()?)?;
    let _l = lab.listen(&pod.netns, "127.0.0.1:9000".parse()?)?;
    traced(
        lab.node(),
        &["--port", "9500", "--netns", &pod.netns, "--duration", "3s"],
        || {
            let r = lab.connect(
                &pod.netns,
                "127.0.0.1:9500".parse().unwrap(),
                Duration::from_secs(2),
            );
            format!(
                "agent → 127.0.0.1:9500 in financial-ml/mlserver-0 (server listens on 127.0.0.1:9000): {r}"
            )
        },
    )
}

fn s1(lab: &mut Lab) -> Result<String> {
    let client = lab.add_pod("financial-inference", "client-0", "10.42.0.20".parse()?)?;
    let server = lab.add_pod(
        "financial-inference",
        "seldon-scheduler-0",
        "10.42.0.30".parse()?,
    )?;
    serve(lab.listen(&server.netns, "10.42.0.30:9004".parse()?)?);
    // kube-proxy's ClusterIP, and Calico's policy for the scheduler: admits 9005 only.
    rules::restore(
        lab,
        "iptables-restore",
        &rules::kube_proxy_dnat("10.42.0.30"),
    )?;
    rules::restore(
        lab,
        "iptables-restore",
        &rules::calico_filter(&server.host_if, &client.host_if),
    )?;
    traced(lab.node(), &["--port", "9004", "--duration", "5s"], || {
        let r = lab.connect(
            &client.netns,
            format!("{}:9004", rules::CLUSTER_IP).parse().unwrap(),
            Duration::from_secs(3),
        );
        format!(
            "client-0 → seldon-scheduler Service {}:9004 (financial-inference): {r}",
            rules::CLUSTER_IP
        )
    })
}

pub fn run() -> Result<()> {
    crate::setup::run()?;
    crate::build::build(false)?;
    for (title, scenario) in [
        (
            "S2: connection refused on localhost",
            s2 as fn(&mut Lab) -> Result<String>,
        ),
        (
            "S1: i/o timeout to a Service after a Flannel→Calico migration",
            s1,
        ),
    ] {
        let mut lab = Lab::new("demo")?;
        println!("\n===== {title} =====");
        println!("{}", scenario(&mut lab)?);
    }
    Ok(())
}

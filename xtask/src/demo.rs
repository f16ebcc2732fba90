//! `cargo xtask demo`: the S2 and FORWARD-DROP labs, traced by the real binary.

use std::{
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use netprobe_lab::{Lab, serve};

use crate::build::repo_root;

/// Starts `netprobe trace` in `netns`, runs `traffic` once it is ready, and returns its output.
fn traced(netns: &str, args: &[&str], traffic: impl FnOnce() -> String) -> Result<String> {
    let bin = repo_root().join("target/debug/netprobe");
    let ready = std::env::temp_dir().join(format!("netprobe-demo-ready-{}", std::process::id()));
    let _ = std::fs::remove_file(&ready);
    let child = Command::new("ip")
        .args(["netns", "exec", netns])
        .arg(&bin)
        .args(["trace", "-o", "text", "--ready-file"])
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

fn forward_drop(lab: &mut Lab) -> Result<String> {
    let client = lab.add_pod("financial-inference", "client-0", "10.42.0.20".parse()?)?;
    let server = lab.add_pod(
        "financial-inference",
        "seldon-scheduler-0",
        "10.42.0.30".parse()?,
    )?;
    serve(lab.listen(&server.netns, "10.42.0.30:9004".parse()?)?);
    lab.sh(
        lab.node(),
        "iptables -A FORWARD -p tcp --dport 9004 -m comment --comment 'demo: a plain DROP' -j DROP",
    )?;
    traced(lab.node(), &["--port", "9004", "--duration", "4s"], || {
        let r = lab.connect(
            &client.netns,
            "10.42.0.30:9004".parse().unwrap(),
            Duration::from_secs(3),
        );
        format!(
            "client-0 → seldon-scheduler-0 10.42.0.30:9004 through a node with a FORWARD DROP: {r}"
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
        ("FORWARD DROP: a silent drop on the node", forward_drop),
    ] {
        let mut lab = Lab::new("demo")?;
        println!("\n===== {title} =====");
        println!("{}", scenario(&mut lab)?);
    }
    Ok(())
}

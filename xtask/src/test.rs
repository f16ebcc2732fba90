//! `cargo xtask test`: what CI runs (`.ci/run`), in order, stopping at the first failure:
//! setup → build → fmt → clippy (userspace) → clippy (eBPF) → client build (no eBPF toolchain)
//! → unit tests → privileged tests.

use std::{
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Result, bail};

use crate::build::{debian_cargo, debian_clippy, repo_root, run_checked, target_dir};

/// A group of steps `--only` can select (setup and build always run).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Stage {
    /// rustfmt check and clippy (userspace and eBPF).
    Lint,
    /// Unit tests (`--lib --bins`), no root needed.
    Unit,
    /// Integration tests (`--test '*'`): real kernel programs and netns labs, as root.
    Privileged,
}

/// Runs the steps, printing a banner for each and a summary at the end.
struct Steps {
    done: Vec<(String, Duration, bool)>,
    started: Instant,
}

impl Steps {
    fn new() -> Self {
        Self {
            done: Vec::new(),
            started: Instant::now(),
        }
    }

    fn step(&mut self, name: &str, f: impl FnOnce() -> Result<()>) -> Result<()> {
        println!("\n==== {name} ====");
        let t = Instant::now();
        let r = f();
        self.done.push((name.to_string(), t.elapsed(), r.is_ok()));
        if r.is_err() {
            self.summary();
        }
        r
    }

    fn summary(&self) {
        println!("\n==== summary ====");
        for (name, took, ok) in &self.done {
            println!(
                "  {:<6} {name} ({:.1}s)",
                if *ok { "ok" } else { "FAILED" },
                took.as_secs_f64()
            );
        }
        let ok = self.done.iter().all(|(_, _, ok)| *ok);
        println!(
            "  {} in {:.0}s",
            if ok {
                "all green"
            } else {
                "stopped at the first failure"
            },
            self.started.elapsed().as_secs_f64()
        );
    }
}

fn cargo_fmt_check() -> Result<()> {
    // Debian ships no rustfmt: use rustup's, through the cargo that started xtask (CARGO), or
    // `cargo` from the caller's PATH. Its environment is left as it is.
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut fmt = Command::new(cargo);
    fmt.current_dir(repo_root())
        .args(["fmt", "--all", "--", "--check"]);
    run_checked(fmt, "cargo fmt --check")
}

fn clippy_userspace() -> Result<()> {
    let mut clippy = debian_clippy();
    clippy.args([
        "clippy",
        "--workspace",
        "--exclude",
        "netprobe-ebpf",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]);
    run_checked(clippy, "clippy (userspace)")
}

fn clippy_ebpf() -> Result<()> {
    let mut clippy = debian_clippy();
    // What aya-build passes for the bpf target (the flags are \x1f-separated when several).
    clippy.env(
        "CARGO_ENCODED_RUSTFLAGS",
        ["--cfg=bpf_target_arch=\"x86_64\""].join("\x1f"),
    );
    clippy
        .args([
            "clippy",
            "-p",
            "netprobe-ebpf",
            "--release",
            "--target",
            "bpfel-unknown-none",
            // Own target dir: other RUSTFLAGS than the host build, no cache thrashing.
            "--target-dir",
        ])
        .arg(target_dir().join("ebpf-lint"))
        .args(["--", "-D", "warnings"]);
    run_checked(clippy, "clippy (eBPF)")
}

/// The client-only build (`--no-default-features`) with the plain toolchain and no bpf-linker
/// in PATH: clippy, build, then what a kubectl user runs: `--help` offers only the
/// cluster-mode commands, a node command says why it is missing, completions and the man page
/// are generated (bash's passes `bash -n`), and `cargo xtask dist --debug`'s manifest matches
/// its archive.
fn client_build() -> Result<()> {
    if let Some(dir) =
        std::env::split_paths(crate::dist::CLIENT_PATH).find(|d| d.join("bpf-linker").exists())
    {
        bail!(
            "bpf-linker is in {}: the client build would not prove it builds without",
            dir.display()
        );
    }
    let host = "x86_64-unknown-linux-gnu";
    let mut clippy = crate::dist::client_cargo();
    clippy.args([
        "clippy",
        "-p",
        "netprobe",
        "--no-default-features",
        "--all-targets",
        "--target",
        host,
        "--",
        "-D",
        "warnings",
    ]);
    run_checked(clippy, "clippy (client build, -D warnings)")?;
    let bin = crate::dist::build_client(host, false)?;
    crate::client::smoke(&bin)?;
    crate::dist::run(&crate::dist::Options {
        targets: vec![host.into()],
        base_url: crate::dist::DEFAULT_BASE_URL.into(),
        debug: true,
    })
}

fn unit_tests() -> Result<()> {
    let mut unit = debian_cargo();
    unit.args([
        "test",
        "--workspace",
        "--exclude",
        "netprobe-ebpf",
        "--lib",
        "--bins",
    ]);
    run_checked(unit, "unit tests")
}

fn privileged_tests() -> Result<()> {
    let mut privileged = debian_cargo();
    privileged.env("RUST_BACKTRACE", "1").args([
        "test",
        "--workspace",
        "--exclude",
        "netprobe-ebpf",
        "--test",
        "*",
        "--",
        "--test-threads=1",
    ]);
    run_checked(privileged, "privileged tests")
}

pub fn run(skip_setup: bool, only: Option<Stage>) -> Result<()> {
    let want = |s: Stage| only.is_none_or(|o| o == s);
    if want(Stage::Privileged) && !netprobe_lab::is_root() {
        bail!(
            "the privileged tests need root (they load eBPF programs and build network-namespace \
             labs): run `cargo xtask test` as root, or `--only lint` / `--only unit` without"
        );
    }
    let mut steps = Steps::new();
    if !skip_setup {
        steps.step("setup", crate::setup::run)?;
    }
    steps.step("build (cargo build -p netprobe)", || {
        crate::build::build(false)
    })?;
    if want(Stage::Lint) {
        steps.step("cargo fmt --all -- --check", cargo_fmt_check)?;
        steps.step("clippy (userspace, -D warnings)", clippy_userspace)?;
        steps.step(
            "clippy (eBPF, bpfel-unknown-none, -D warnings)",
            clippy_ebpf,
        )?;
    }
    if want(Stage::Lint) {
        steps.step(
            "client-only build (no eBPF toolchain): clippy, build, smoke, dist",
            client_build,
        )?;
    }
    if want(Stage::Unit) {
        steps.step("unit tests (--lib --bins)", unit_tests)?;
    }
    if want(Stage::Privileged) {
        steps.step(
            "privileged tests (real kernel programs, netns labs; --test-threads=1)",
            privileged_tests,
        )?;
    }
    steps.summary();
    Ok(())
}

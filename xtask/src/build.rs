//! `cargo xtask build` and the "Debian route" environment every build, lint and test uses:
//! Debian's rustc 1.96 + prebuilt `core` for bpfel, bpf-linker from `.tools`, rustup's proxies
//! out of PATH (aya-build changes behaviour when it finds rustup). See
//! shared/reference/toolchain.md.

use std::{
    ffi::OsString,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

/// Debian's cargo (package cargo-web).
pub const DEBIAN_CARGO: &str = "/usr/bin/cargo";
/// Debian's clippy (package rust-web-clippy), run directly: through `cargo clippy`, cargo
/// would find rustup's `cargo-clippy` proxy in `$CARGO_HOME/bin` first.
pub const DEBIAN_CARGO_CLIPPY: &str = "/usr/bin/cargo-clippy";

/// Variables cargo and rustup set for the running xtask, or that pick another compiler or
/// flags: never passed on to Debian's cargo.
const DROPPED: &[&str] = &[
    "CARGO",
    "CARGO_MANIFEST_DIR",
    "CARGO_MANIFEST_PATH",
    "CARGO_MANIFEST_LINKS",
    "CARGO_CRATE_NAME",
    "CARGO_BIN_NAME",
    "CARGO_PRIMARY_PACKAGE",
    "CARGO_TARGET_TMPDIR",
    "CARGO_RUSTC_CURRENT_DIR",
    "CARGO_MAKEFLAGS",
    "CARGO_ENCODED_RUSTFLAGS",
    "CARGO_ENCODED_RUSTDOCFLAGS",
    "CARGO_BUILD_RUSTC",
    "CARGO_BUILD_RUSTC_WRAPPER",
    "CARGO_BUILD_RUSTC_WORKSPACE_WRAPPER",
    "CARGO_BUILD_RUSTDOC",
    "CARGO_BUILD_RUSTFLAGS",
    "RUSTC",
    "RUSTDOC",
    "RUSTC_WRAPPER",
    "RUSTC_WORKSPACE_WRAPPER",
    "RUSTFLAGS",
    "RUSTC_BOOTSTRAP",
    "RUST_RECURSION_COUNT",
];
/// Prefixes of the same (CARGO_HOME, CARGO_TARGET_DIR and user settings such as
/// CARGO_TERM_COLOR or CARGO_HTTP_CAINFO are kept).
const DROPPED_PREFIXES: &[&str] = &["CARGO_PKG_", "CARGO_BIN_EXE_", "CARGO_CFG_", "RUSTUP_"];

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask is in the workspace")
        .to_path_buf()
}

pub fn tools_dir() -> PathBuf {
    repo_root().join(".tools")
}

/// The workspace's target directory (honours CARGO_TARGET_DIR, which the Debian env keeps).
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(d) if !d.is_empty() => repo_root().join(d),
        _ => repo_root().join("target"),
    }
}

/// The netprobe binary `cargo xtask build` produces.
pub fn netprobe_bin(release: bool) -> PathBuf {
    target_dir()
        .join(if release { "release" } else { "debug" })
        .join("netprobe")
}

/// PATH for the Debian route: `.tools/bin` (bpf-linker) and the system directories only.
pub fn debian_path() -> String {
    format!(
        "{}:/usr/sbin:/usr/bin:/sbin:/bin",
        tools_dir().join("bin").display()
    )
}

fn dropped(key: &str) -> bool {
    DROPPED.contains(&key) || DROPPED_PREFIXES.iter().any(|p| key.starts_with(p))
}

/// LD_LIBRARY_PATH without what `cargo run` added for xtask (its target dir, rustup's
/// toolchain libraries); None when nothing is left.
fn filtered_library_path(value: &OsString, target: &Path) -> Option<OsString> {
    let kept: Vec<PathBuf> = std::env::split_paths(value)
        .filter(|p| {
            !p.as_os_str().is_empty()
                && !p.starts_with(target)
                && !p.components().any(|c| c.as_os_str() == ".rustup")
        })
        .collect();
    if kept.is_empty() {
        None
    } else {
        std::env::join_paths(kept).ok()
    }
}

/// Applies the Debian-route environment to any command (cargo, cargo-clippy…).
pub fn debian_env(cmd: &mut Command) {
    cmd.current_dir(repo_root());
    for (k, _) in std::env::vars_os() {
        if dropped(&k.to_string_lossy()) {
            cmd.env_remove(&k);
        }
    }
    match std::env::var_os("LD_LIBRARY_PATH").and_then(|v| filtered_library_path(&v, &target_dir()))
    {
        Some(v) => cmd.env("LD_LIBRARY_PATH", v),
        None => cmd.env_remove("LD_LIBRARY_PATH"),
    };
    cmd.env("PATH", debian_path());
    // aya-ebpf needs one unstable feature; naming the crate (not `1`) keeps aya-build from
    // adding `-Z build-std`.
    cmd.env("RUSTC_BOOTSTRAP", "aya_ebpf");
    // Tells netprobe's build.rs to keep rustup out of aya-build's PATH as well.
    cmd.env("NETPROBE_EBPF_TOOLCHAIN", "debian");
}

/// `/usr/bin/cargo` with the Debian-route environment; every build, lint and test goes
/// through it.
pub fn debian_cargo() -> Command {
    let mut cmd = Command::new(DEBIAN_CARGO);
    debian_env(&mut cmd);
    cmd
}

/// Debian's `cargo-clippy` with the Debian-route environment; add `clippy` as the first arg.
pub fn debian_clippy() -> Command {
    let mut cmd = Command::new(DEBIAN_CARGO_CLIPPY);
    debian_env(&mut cmd);
    cmd
}

/// Runs `cmd` (inheriting stdio) and fails unless it exits 0.
pub fn run_checked(mut cmd: Command, what: &str) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("spawn {what} ({})", Path::new(cmd.get_program()).display()))?;
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    Ok(())
}

pub fn build(release: bool) -> Result<()> {
    let mut cmd = debian_cargo();
    cmd.args(["build", "-p", "netprobe"]);
    if release {
        cmd.arg("--release");
    }
    run_checked(cmd, "cargo build -p netprobe")?;
    println!("built {}", netprobe_bin(release).display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env_of(cmd: &Command) -> Vec<(String, Option<String>)> {
        cmd.get_envs()
            .map(|(k, v)| {
                (
                    k.to_string_lossy().into_owned(),
                    v.map(|v| v.to_string_lossy().into_owned()),
                )
            })
            .collect()
    }

    #[test]
    fn debian_cargo_hides_rustup_and_the_running_cargo() {
        // `cargo test` sets the same CARGO_* variables as `cargo run` does for xtask.
        let cmd = debian_cargo();
        assert_eq!(cmd.get_program(), DEBIAN_CARGO);
        let env = env_of(&cmd);
        let get = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        for k in ["CARGO_PKG_NAME", "CARGO_MANIFEST_DIR", "CARGO"] {
            if std::env::var_os(k).is_some() {
                assert_eq!(get(k), Some(None), "{k} removed");
            }
        }
        for (k, _) in std::env::vars() {
            if k.starts_with("RUSTUP_") {
                assert_eq!(get(&k), Some(None), "{k} removed");
            }
            if k == "CARGO_HOME" || k == "CARGO_TARGET_DIR" {
                assert_eq!(get(&k), None, "{k} kept");
            }
        }
        let path = get("PATH").flatten().unwrap();
        assert!(path.starts_with(&tools_dir().join("bin").display().to_string()));
        assert!(!path.contains(".cargo"), "{path}");
        assert_eq!(get("RUSTC_BOOTSTRAP"), Some(Some("aya_ebpf".into())));
        if let Some(Some(lib)) = get("LD_LIBRARY_PATH") {
            assert!(!lib.contains(".rustup"), "{lib}");
        }
    }

    #[test]
    fn user_settings_survive() {
        assert!(!dropped("CARGO_HOME"));
        assert!(!dropped("CARGO_TARGET_DIR"));
        assert!(!dropped("CARGO_TERM_COLOR"));
        assert!(!dropped("CARGO_HTTP_CAINFO"));
        assert!(dropped("CARGO_PKG_VERSION_MAJOR"));
        assert!(dropped("CARGO_BUILD_RUSTC"));
        assert!(dropped("RUSTUP_TOOLCHAIN"));
    }

    #[test]
    fn library_path_loses_rustup_and_target_entries() {
        let target = Path::new("/w/target");
        let v = OsString::from(
            "/w/target/debug:/w/target/debug/deps:/root/.rustup/toolchains/x/lib:/opt/lib",
        );
        assert_eq!(
            filtered_library_path(&v, target),
            Some(OsString::from("/opt/lib"))
        );
        assert_eq!(
            filtered_library_path(&OsString::from("/w/target/debug"), target),
            None
        );
    }
}

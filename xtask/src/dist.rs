//! `cargo xtask dist`: the client-only `kubectl-netprobe` (no eBPF, `--no-default-features`)
//! for every target this machine can build, one `kubectl-netprobe_vVERSION_TARGET.tar.gz` per
//! target (the binary and LICENSE), `SHA256SUMS`, and the krew manifest rendered from
//! `deploy/krew/netprobe.yaml` with each archive's URL and sha256, all in `target/dist/`.
//!
//! The client builds with the plain toolchain: PATH without `.tools/bin` (no bpf-linker), no
//! RUSTC_BOOTSTRAP ([`client_cargo`]). A target is built when the toolchain has its standard
//! library; the others are listed with the reason.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};
use serde_yaml::Value;

use crate::build::{debian_env, repo_root, run_checked, target_dir};

/// Targets a laptop runs kubectl on, tried in this order.
pub const CANDIDATES: &[&str] = &[
    "x86_64-unknown-linux-gnu",
    "aarch64-unknown-linux-gnu",
    "x86_64-unknown-linux-musl",
    "aarch64-apple-darwin",
    "x86_64-apple-darwin",
];

/// The binary's name in the archive: kubectl finds plugins by it.
pub const PLUGIN_BIN: &str = "kubectl-netprobe";

/// Where a client build of `target` puts its binary (`--target` keeps it apart from the node
/// build's target/debug/netprobe).
pub fn client_bin(target: &str, release: bool) -> PathBuf {
    target_dir()
        .join(target)
        .join(if release { "release" } else { "debug" })
        .join("netprobe")
}

/// PATH for the client build: the system directories only (no `.tools/bin`, no rustup).
pub const CLIENT_PATH: &str = "/usr/sbin:/usr/bin:/sbin:/bin";

/// Debian's cargo as a laptop would run it: no bpf-linker in PATH, no RUSTC_BOOTSTRAP, no
/// eBPF toolchain switch.
pub fn client_cargo() -> Command {
    let mut cmd = Command::new("/usr/bin/cargo");
    debian_env(&mut cmd);
    cmd.env("PATH", CLIENT_PATH)
        .env_remove("RUSTC_BOOTSTRAP")
        .env_remove("NETPROBE_EBPF_TOOLCHAIN")
        .current_dir(repo_root());
    cmd
}

/// Builds the client for `target`.
pub fn build_client(target: &str, release: bool) -> Result<PathBuf> {
    let mut cargo = client_cargo();
    cargo.args([
        "build",
        "-p",
        "netprobe",
        "--no-default-features",
        "--target",
        target,
    ]);
    if release {
        cargo.arg("--release");
    }
    run_checked(cargo, &format!("client build for {target}"))?;
    Ok(client_bin(target, release))
}

/// Why this toolchain cannot build `target` (None: it can).
fn unbuildable(target: &str) -> Option<String> {
    let sysroot = Command::new("/usr/bin/rustc")
        .args(["--print", "sysroot"])
        .env("PATH", CLIENT_PATH)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()));
    let Some(sysroot) = sysroot else {
        return Some("`rustc --print sysroot` failed".into());
    };
    let std = sysroot.join("lib/rustlib").join(target).join("lib");
    if !std.is_dir() {
        return Some(format!(
            "no standard library for it in this toolchain ({} missing: Debian's rustc-web ships \
             the host's only, and `rustup target add` needs the network)",
            std.display()
        ));
    }
    let host = target.starts_with(std::env::consts::ARCH) && target.contains("linux-gnu");
    (!host).then(|| {
        format!(
            "a cross C compiler and linker for {target} are needed (ring builds C code); none is \
             configured here"
        )
    })
}

/// (os, arch) as krew's selector labels name them.
fn krew_platform(target: &str) -> Result<(&'static str, &'static str)> {
    let os = if target.contains("linux") {
        "linux"
    } else if target.contains("apple-darwin") {
        "darwin"
    } else if target.contains("windows") {
        "windows"
    } else {
        bail!("no krew os for {target}")
    };
    let arch = match target.split('-').next() {
        Some("x86_64") => "amd64",
        Some("aarch64") => "arm64",
        _ => bail!("no krew arch for {target}"),
    };
    Ok((os, arch))
}

/// One built archive.
pub struct Archive {
    pub target: String,
    pub path: PathBuf,
    pub sha256: String,
}

pub fn archive_name(version: &str, target: &str) -> String {
    format!("{PLUGIN_BIN}_v{version}_{target}.tar.gz")
}

/// Packs `bin` (as kubectl-netprobe) and LICENSE into `out/<archive_name>`, reproducibly
/// (sorted, owner 0, mtime 0, gzip without a name or time).
pub fn pack(bin: &Path, version: &str, target: &str, out: &Path) -> Result<Archive> {
    let staging = out.join(format!("staging-{target}"));
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging).context("staging directory")?;
    std::fs::copy(bin, staging.join(PLUGIN_BIN)).context("copying the client binary")?;
    std::fs::copy(repo_root().join("LICENSE"), staging.join("LICENSE")).context("LICENSE")?;
    let path = out.join(archive_name(version, target));
    let mut tar = Command::new("tar");
    tar.args([
        "--sort=name",
        "--owner=0",
        "--group=0",
        "--numeric-owner",
        "--mtime=@0",
        "--use-compress-program=gzip -n",
        "-cf",
    ])
    .arg(&path)
    .arg("-C")
    .arg(&staging)
    .args(["LICENSE", PLUGIN_BIN]);
    run_checked(tar, "tar")?;
    std::fs::remove_dir_all(&staging).context("removing the staging directory")?;
    let sha256 = sha256_of(&path)?;
    Ok(Archive {
        target: target.into(),
        path,
        sha256,
    })
}

/// The hex sha256 of a file (`sha256sum`).
pub fn sha256_of(path: &Path) -> Result<String> {
    let out = Command::new("sha256sum")
        .arg(path)
        .output()
        .context("sha256sum")?;
    if !out.status.success() {
        bail!("sha256sum {} failed", path.display());
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let hex = text.split_whitespace().next().unwrap_or_default();
    if hex.len() != 64 {
        bail!("sha256sum printed `{text}`");
    }
    Ok(hex.to_string())
}

/// The krew manifest: `template` with `version` and one platform per archive (shaped like the
/// template's first platform), downloads under `base_url/vVERSION/`.
pub fn render_manifest(
    template: &str,
    version: &str,
    base_url: &str,
    archives: &[Archive],
) -> Result<String> {
    let mut manifest: Value = serde_yaml::from_str(template).context("parsing the template")?;
    let shape = manifest["spec"]["platforms"][0].clone();
    if !shape.is_mapping() {
        bail!("the template has no spec.platforms[0] to shape the platforms on");
    }
    let platforms = archives
        .iter()
        .map(|a| {
            let (os, arch) = krew_platform(&a.target)?;
            let mut p = shape.clone();
            p["selector"]["matchLabels"]["os"] = os.into();
            p["selector"]["matchLabels"]["arch"] = arch.into();
            let file = a
                .path
                .file_name()
                .context("archive name")?
                .to_string_lossy();
            p["uri"] = format!("{base_url}/v{version}/{file}").into();
            p["sha256"] = a.sha256.clone().into();
            Ok(p)
        })
        .collect::<Result<Vec<_>>>()?;
    manifest["spec"]["version"] = format!("v{version}").into();
    manifest["spec"]["platforms"] = Value::Sequence(platforms);
    serde_yaml::to_string(&manifest).context("writing the manifest")
}

pub struct Options {
    /// Build these targets (default: every candidate this machine can build).
    pub targets: Vec<String>,
    /// Where the release archives will be downloaded from (without `/vVERSION`).
    pub base_url: String,
    /// Pack the debug build (quick checks) instead of the release build.
    pub debug: bool,
}

pub const DEFAULT_BASE_URL: &str = "https://github.com/netprobe/netprobe/releases/download";

/// The targets to build: those asked for (each must be buildable), or every buildable
/// candidate; the others are printed with the reason.
fn chosen_targets(asked: &[String]) -> Result<Vec<String>> {
    let explicit = !asked.is_empty();
    let wanted: Vec<String> = if explicit {
        asked.to_vec()
    } else {
        CANDIDATES.iter().map(|t| t.to_string()).collect()
    };
    let mut chosen = Vec::new();
    for t in wanted {
        match unbuildable(&t) {
            None => chosen.push(t),
            Some(why) if explicit => bail!("cannot build {t}: {why}"),
            // Release packaging, not a test: without --target, the candidates this machine
            // cannot build are listed and left out. The CI step names its target, which must
            // build (the arm above fails).
            Some(why) => println!("dist: skipping {t}: {why}"),
        }
    }
    if chosen.is_empty() {
        bail!("no target can be built here");
    }
    Ok(chosen)
}

pub fn run(opts: &Options) -> Result<()> {
    let version = env!("CARGO_PKG_VERSION");
    let out = target_dir().join("dist");
    std::fs::create_dir_all(&out).context("target/dist")?;
    let mut archives = Vec::new();
    for target in chosen_targets(&opts.targets)? {
        let bin = build_client(&target, !opts.debug)?;
        archives.push(pack(&bin, version, &target, &out)?);
    }
    let sums: String = archives
        .iter()
        .map(|a| {
            let name = a.path.file_name().unwrap_or_default().to_string_lossy();
            format!("{}  {name}\n", a.sha256)
        })
        .collect();
    std::fs::write(out.join("SHA256SUMS"), sums).context("SHA256SUMS")?;
    let template = std::fs::read_to_string(repo_root().join("deploy/krew/netprobe.yaml"))
        .context("deploy/krew/netprobe.yaml")?;
    let manifest = render_manifest(&template, version, &opts.base_url, &archives)?;
    std::fs::write(out.join("netprobe.yaml"), &manifest).context("netprobe.yaml")?;
    verify(&out.join("netprobe.yaml"), &out)?;
    for a in &archives {
        println!("dist: {}  {}", a.sha256, a.path.display());
    }
    println!(
        "dist: krew manifest {}",
        out.join("netprobe.yaml").display()
    );
    Ok(())
}

/// Checks a rendered manifest against the archives in `dir`: it parses as a krew Plugin, each
/// platform's archive exists there and its sha256 is the one the manifest names.
pub fn verify(manifest: &Path, dir: &Path) -> Result<()> {
    let text = std::fs::read_to_string(manifest).context("reading the manifest")?;
    let m: Value = serde_yaml::from_str(&text).context("the manifest is not YAML")?;
    if m["apiVersion"].as_str() != Some("krew.googlecontainertools.github.com/v1alpha2")
        || m["kind"].as_str() != Some("Plugin")
    {
        bail!("not a krew v1alpha2 Plugin");
    }
    let platforms = m["spec"]["platforms"]
        .as_sequence()
        .filter(|p| !p.is_empty())
        .context("no platforms")?;
    for p in platforms {
        if p["bin"].as_str() != Some(PLUGIN_BIN) {
            bail!("a platform's bin is not {PLUGIN_BIN}");
        }
        let uri = p["uri"].as_str().context("a platform without uri")?;
        let file = uri.rsplit('/').next().unwrap_or_default();
        let actual = sha256_of(&dir.join(file))?;
        if p["sha256"].as_str() != Some(actual.as_str()) {
            bail!(
                "{file}: the manifest says {:?}, the archive is {actual}",
                p["sha256"]
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rendered_manifest_parses_and_names_each_archives_sha256() {
        let dir = std::env::temp_dir().join(format!("xtask-dist-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let bin = dir.join("netprobe");
        std::fs::write(&bin, b"\x7fELF a client binary").unwrap();
        let archive = pack(&bin, "1.2.3", "x86_64-unknown-linux-gnu", &dir).unwrap();
        let again = pack(&bin, "1.2.3", "x86_64-unknown-linux-gnu", &dir).unwrap();
        assert_eq!(archive.sha256, again.sha256, "reproducible archives");
        let listing = Command::new("tar")
            .arg("-tzf")
            .arg(&archive.path)
            .output()
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&listing.stdout),
            "LICENSE\nkubectl-netprobe\n"
        );
        let template = std::fs::read_to_string(repo_root().join("deploy/krew/netprobe.yaml"))
            .expect("the template");
        let text =
            render_manifest(&template, "1.2.3", "https://example.test/dl", &[archive]).unwrap();
        let manifest = dir.join("netprobe.yaml");
        std::fs::write(&manifest, &text).unwrap();
        verify(&manifest, &dir).unwrap();
        let m: Value = serde_yaml::from_str(&text).unwrap();
        assert_eq!(m["spec"]["version"].as_str(), Some("v1.2.3"));
        let p = &m["spec"]["platforms"][0];
        assert_eq!(p["selector"]["matchLabels"]["arch"].as_str(), Some("amd64"));
        assert_eq!(
            p["uri"].as_str(),
            Some(
                "https://example.test/dl/v1.2.3/kubectl-netprobe_v1.2.3_x86_64-unknown-linux-gnu.tar.gz"
            )
        );
        // A changed archive no longer matches.
        std::fs::write(
            dir.join(archive_name("1.2.3", "x86_64-unknown-linux-gnu")),
            b"x",
        )
        .unwrap();
        assert!(verify(&manifest, &dir).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn targets_map_to_krew_platforms() {
        assert_eq!(
            krew_platform("aarch64-apple-darwin").unwrap(),
            ("darwin", "arm64")
        );
        assert_eq!(
            krew_platform("x86_64-unknown-linux-musl").unwrap(),
            ("linux", "amd64")
        );
        assert!(krew_platform("riscv64gc-unknown-linux-gnu").is_err());
    }
}

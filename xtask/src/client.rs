//! What a kubectl user sees of the client-only build, checked on the built binary.

use std::{path::Path, process::Command};

use anyhow::{Context, Result, bail, ensure};

/// The cluster-mode commands the client offers; the node commands it must not.
const CLIENT_COMMANDS: &[&str] = &["trace", "failures", "schema", "completions"];
const NODE_COMMANDS: &[&str] = &["agent", "check"];

fn run(bin: &Path, args: &[&str]) -> Result<(Option<i32>, String, String)> {
    let out = Command::new(bin)
        .args(args)
        .output()
        .with_context(|| format!("running {} {}", bin.display(), args.join(" ")))?;
    Ok((
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// The commands `--help` lists (the first word of each line under "Commands:").
fn listed_commands(help: &str) -> Vec<String> {
    help.lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        // Deeper indents continue a description.
        .filter(|l| !l.starts_with("   "))
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect()
}

pub fn smoke(bin: &Path) -> Result<()> {
    let (code, help, _) = run(bin, &["--help"])?;
    ensure!(code == Some(0), "--help failed");
    let listed = listed_commands(&help);
    for c in CLIENT_COMMANDS {
        ensure!(
            listed.iter().any(|l| l == c),
            "--help does not list `{c}`: {listed:?}"
        );
    }
    for c in NODE_COMMANDS {
        ensure!(
            !listed.iter().any(|l| l == c),
            "--help lists the node command `{c}`"
        );
        for args in [&[*c][..], &[*c, "--help"]] {
            let (code, _, err) = run(bin, args)?;
            ensure!(
                code == Some(2) && err.contains("needs the full build"),
                "`{}` did not say it needs the full build (exit {code:?}): {err}",
                args.join(" ")
            );
        }
    }
    completions(bin)?;
    let (code, page, _) = run(bin, &["man"])?;
    ensure!(
        code == Some(0) && page.contains(".TH"),
        "`man` printed no roff page"
    );
    let (code, schemas, _) = run(bin, &["schema"])?;
    ensure!(code == Some(0), "`schema` failed");
    serde_json::from_str::<serde_json::Value>(&schemas).context("`schema` is not JSON")?;
    println!(
        "client smoke: --help lists {listed:?}; node commands refused; completions, man, schema ok"
    );
    Ok(())
}

/// Each shell's script is non-empty and names the commands; bash's passes `bash -n`.
fn completions(bin: &Path) -> Result<()> {
    for shell in ["bash", "zsh", "fish"] {
        let (code, script, err) = run(bin, &["completions", shell])?;
        ensure!(code == Some(0), "completions {shell}: {err}");
        for c in ["trace", "failures"] {
            ensure!(
                script.contains(c),
                "the {shell} completion does not mention `{c}`"
            );
        }
        if shell == "bash" {
            let file = std::env::temp_dir()
                .join(format!("netprobe-completion-{}.bash", std::process::id()));
            std::fs::write(&file, &script).context("writing the bash completion")?;
            let checked = Command::new("bash").arg("-n").arg(&file).status();
            let _ = std::fs::remove_file(&file);
            if !checked.context("bash -n")?.success() {
                bail!("the bash completion script does not pass `bash -n`");
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn commands_are_read_from_help() {
        let help = "About\n\nUsage: netprobe <COMMAND>\n\nCommands:\n  schema  Print\n  trace   Follow\n          more\n  help    Print this\n\nOptions:\n  -h, --help\n";
        assert_eq!(super::listed_commands(help), ["schema", "trace", "help"]);
    }
}

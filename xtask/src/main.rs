//! netprobe's task runner: `cargo xtask setup | build | test | demo | bench`.

mod bench;
mod build;
mod client;
mod demo;
mod dist;
mod setup;
mod test;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask", about = "netprobe's setup, build, test and demo tasks")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install the eBPF toolchain and lab tools (idempotent; seconds when all is present).
    Setup,
    /// Build the kernel programs and the netprobe binary that embeds them
    /// (target/debug/netprobe, or target/release/netprobe with --release).
    Build {
        #[arg(long)]
        release: bool,
    },
    /// Everything CI runs: setup, build, fmt, clippy (userspace and eBPF), unit and privileged
    /// tests; stops at the first failure.
    Test {
        /// Skip `setup` (when you know the machine is ready).
        #[arg(long)]
        skip_setup: bool,
        /// Run only this stage (setup and build still run).
        #[arg(long, value_enum)]
        only: Option<test::Stage>,
    },
    /// Set up, build, run k3s-node-shaped labs (S2, FORWARD DROP, S1) traced by netprobe and
    /// print what it saw. Root only.
    Demo {
        /// Skip `setup` (when you know the machine is ready).
        #[arg(long)]
        skip_setup: bool,
        /// Run only these scenarios (repeatable; default: all).
        #[arg(long, value_enum)]
        scenario: Vec<demo::Scenario>,
    },
    /// Build the client-only kubectl-netprobe (no eBPF) for every target this machine can
    /// build, pack each with LICENSE into a tar.gz, write SHA256SUMS and render the krew
    /// manifest (deploy/krew/netprobe.yaml) with their URLs and checksums, in target/dist/.
    Dist {
        /// Build only this target (repeatable; default: every one this toolchain can build).
        #[arg(long)]
        target: Vec<String>,
        /// Where the archives will be downloaded from; `/vVERSION/ARCHIVE` is appended.
        #[arg(long, default_value = dist::DEFAULT_BASE_URL)]
        base_url: String,
        /// Pack the debug build (a quick check) instead of the release build.
        #[arg(long)]
        debug: bool,
    },
    /// Measure what leaving netprobe on costs, side by side in one run inside a lab: throughput
    /// and connection rate without / with the agent, a drop storm, attach times, verdict
    /// latency. Writes bench/results/latest.json and updates BENCHMARKS.md. Root only.
    Bench {
        /// Skip `setup` (when you know the machine is ready).
        #[arg(long)]
        skip_setup: bool,
        /// Seconds per throughput / connection-rate sample (3 rounds × each mode).
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        /// Seconds of the drop storm.
        #[arg(long, default_value_t = 5)]
        storm_seconds: u64,
        /// Also run a soak: a drop storm this long with the agent's RSS sampled every second
        /// (e.g. 600 for the 10-minute soak).
        #[arg(long, default_value_t = 0)]
        soak_seconds: u64,
        /// Another netprobe binary (e.g. the release build of the commit before a change):
        /// its agent runs as one more mode in the same rounds, and its drop storm beside this
        /// one's, so the two are compared side by side in one run.
        #[arg(long, value_name = "BIN")]
        compare_with: Option<std::path::PathBuf>,
        /// Seconds of each run of the DNS load case (without netprobe, with the agent, with
        /// the compared binary's).
        #[arg(long, default_value_t = 20)]
        dns_seconds: u64,
        /// Run only these cases (repeatable), keeping the other figures of
        /// bench/results/latest.json.
        #[arg(long, value_enum)]
        only: Vec<bench::Case>,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse().command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // `{:#}` prints the whole context chain on one line; no backtrace noise.
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(command: Cmd) -> anyhow::Result<()> {
    match command {
        Cmd::Setup => setup::run(),
        Cmd::Build { release } => build::build(release),
        Cmd::Test { skip_setup, only } => test::run(skip_setup, only),
        Cmd::Dist {
            target,
            base_url,
            debug,
        } => dist::run(&dist::Options {
            targets: target,
            base_url,
            debug,
        }),
        Cmd::Demo {
            skip_setup,
            scenario,
        } => demo::run(skip_setup, &scenario),
        Cmd::Bench {
            skip_setup,
            seconds,
            storm_seconds,
            soak_seconds,
            compare_with,
            dns_seconds,
            only,
        } => bench::run(
            skip_setup,
            &bench::Options {
                seconds,
                storm_seconds,
                soak_seconds,
                compare_with,
                dns_seconds,
                only,
            },
        ),
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        super::Cli::command().debug_assert();
    }
}

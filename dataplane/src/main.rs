//! `espgw-dataplane`: the ESP data plane.
//!
//! Exit status: 0 on success (dropped packets are counted, not errors), 1 for configuration,
//! file or start-up problems, 2 for usage errors.

use clap::{Parser, Subcommand};
use espgw_dataplane::config::{self, PortId};
use espgw_dataplane::{demo, gateway, replay};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser, Debug)]
#[command(name = "espgw-dataplane", version, about = "espgw ESP data plane")]
struct Cli {
    /// Log filter (RUST_LOG syntax), e.g. `info` or `espgw_dataplane=debug`.
    #[arg(long, global = true, default_value = "warn")]
    log: String,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Process a capture offline as if it arrived on one port; write what the data plane emits.
    Replay {
        /// Configuration file (TOML).
        #[arg(long)]
        config: PathBuf,
        /// Input capture (pcap or pcapng, Ethernet).
        #[arg(long)]
        input: PathBuf,
        /// Port the frames arrive on: wan (ESP side), lan (plaintext side) or host (locally
        /// originated, e.g. transport-mode traffic).
        #[arg(long)]
        port: PortId,
        /// Output capture (pcap): every frame sent to WAN, LAN or the host, in order.
        #[arg(long)]
        output: PathBuf,
        /// Frames per burst.
        #[arg(long, default_value_t = 32)]
        burst: usize,
    },
    /// Run the gateway: XDP steering and AF_XDP workers on the configured ports, static SAs and
    /// policies from the file, counters on the stats socket; SIGINT/SIGTERM stop it and print
    /// the final counters.
    Run {
        /// Configuration file (TOML).
        #[arg(long)]
        config: PathBuf,
    },
    /// Show a running gateway's counters (what its stats socket serves): SAs in Cisco's
    /// `show crypto ipsec sa` terms, per-worker traffic, named drops, XDP verdicts.
    Stats {
        /// The stats socket (default: the one named in --config, else /run/espgw/dataplane.sock).
        #[arg(long)]
        socket: Option<PathBuf>,
        /// Take the socket path from this configuration file.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Print the raw JSON.
        #[arg(long)]
        json: bool,
    },
    /// Check a configuration file and print its warnings.
    CheckConfig {
        /// Configuration file (TOML).
        config: PathBuf,
    },
    /// Run the built-in demo: two gateways with static SAs, traffic through both, counters.
    Demo {
        /// Where to write the demo's configs and captures.
        #[arg(long, default_value = "espgw-demo")]
        out: PathBuf,
        /// Print the full JSON reports instead of the summary.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_new(&cli.log)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    match cli.cmd {
        Cmd::Replay {
            config,
            input,
            port,
            output,
            burst,
        } => match replay::run(&config, &input, port, &output, burst) {
            Ok(r) => {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&r.json).unwrap_or_default()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("espgw-dataplane: {e}");
                ExitCode::from(1)
            }
        },
        Cmd::Run { config } => match gateway::run(&config, None) {
            Ok(stats) => {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&stats).unwrap_or_default()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("espgw-dataplane: {e}");
                ExitCode::from(1)
            }
        },
        Cmd::Stats {
            socket,
            config,
            json,
        } => {
            let path = match (socket, config) {
                (Some(s), _) => s,
                (None, Some(c)) => match config::load(&c) {
                    Ok(cfg) => cfg.dataplane.run.stats_socket,
                    Err(e) => {
                        eprintln!("{e}");
                        return ExitCode::from(1);
                    }
                },
                (None, None) => config::RunConfig::default().stats_socket,
            };
            match read_stats(&path) {
                Ok(v) => {
                    if json {
                        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
                    } else {
                        print_stats(&v);
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!(
                        "espgw-dataplane: reading {}: {e} (is espgw-dataplane run up?)",
                        path.display()
                    );
                    ExitCode::from(1)
                }
            }
        }
        Cmd::CheckConfig { config } => match config::load(&config) {
            Ok(c) => {
                for w in &c.warnings {
                    eprintln!(
                        "{}:{}:{}: warning: {}",
                        config.display(),
                        w.line,
                        w.column,
                        w.message
                    );
                }
                println!(
                    "{}: {} SAs, {} policies: OK",
                    config.display(),
                    c.sas.len(),
                    c.policies.len()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::from(1)
            }
        },
        Cmd::Demo { out, json } => match demo::run(&out) {
            Ok(r) => {
                if json {
                    println!(
                        "{}",
                        serde_json::to_string_pretty(
                            &serde_json::json!({ "gateway_a": r.a, "gateway_b": r.b })
                        )
                        .unwrap_or_default()
                    );
                } else {
                    print_demo(&r);
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("espgw-dataplane: {e}");
                ExitCode::from(1)
            }
        },
    }
}

fn read_stats(path: &std::path::Path) -> std::io::Result<serde_json::Value> {
    use std::io::Read;
    let mut s = std::os::unix::net::UnixStream::connect(path)?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(5)))?;
    let mut body = String::new();
    s.read_to_string(&mut body)?;
    serde_json::from_str(&body).map_err(std::io::Error::other)
}

/// One line per SA in Cisco's terms, then traffic, drops and XDP verdicts.
fn print_stats(v: &serde_json::Value) {
    let s = |x: &serde_json::Value| x.as_str().unwrap_or("?").to_string();
    let port = |p: &serde_json::Value| {
        format!(
            "{} ({})",
            s(&p["interface"]),
            p["addresses"]
                .as_array()
                .map(|a| a.iter().map(&s).collect::<Vec<_>>().join(", "))
                .unwrap_or_default()
        )
    };
    println!(
        "espgw-dataplane: WAN {}, LAN {}, up {:.1} s",
        port(&v["ports"]["wan"]),
        port(&v["ports"]["lan"]),
        v["uptime_s"].as_f64().unwrap_or(0.0)
    );
    if let Some(sas) = v["sas"].as_array() {
        println!("SAs:");
        for sa in sas {
            let c = &sa["counters"];
            let traffic = if sa["direction"] == "out" {
                format!(
                    "#pkts encaps {} encrypt {} digest {}, bytes {}",
                    c["pkts_encaps"], c["pkts_encrypt"], c["pkts_digest"], c["bytes_encaps"]
                )
            } else {
                format!(
                    "#pkts decaps {} decrypt {} verify {}, bytes {}",
                    c["pkts_decaps"], c["pkts_decrypt"], c["pkts_verify"], c["bytes_decaps"]
                )
            };
            println!(
                "  {:<12} {:<3} spi {} {:<24} {} -> {}  {traffic}  drops: {}",
                s(&sa["name"]),
                s(&sa["direction"]),
                s(&sa["spi"]),
                s(&sa["transform"]),
                s(&sa["local"]),
                s(&sa["remote"]),
                drops_text(&sa["drops"]),
            );
        }
    }
    if let Some(ws) = v["workers"].as_array() {
        for w in ws {
            let c = &w["counters"];
            println!(
                "worker {} (core {}, queue {}): WAN rx {} tx {}, LAN rx {} tx {}, mean burst {:.1}",
                w["worker"],
                w["core"],
                w["queue"],
                c["wan"]["rx_frames"],
                c["wan"]["tx_frames"],
                c["lan"]["rx_frames"],
                c["lan"]["tx_frames"],
                c["mean_burst_fill"].as_f64().unwrap_or(0.0)
            );
        }
    }
    println!("drops: {}", drops_text(&v["totals"]["drops"]));
    if let Some(x) = v["xdp"].as_object() {
        for (ifname, counts) in x {
            let nonzero: Vec<String> = counts
                .as_object()
                .map(|m| {
                    m.iter()
                        .filter(|(_, n)| n.as_u64().unwrap_or(0) > 0)
                        .map(|(k, n)| format!("{k}={n}"))
                        .collect()
                })
                .unwrap_or_default();
            println!(
                "xdp {ifname}: {}",
                if nonzero.is_empty() {
                    "-".into()
                } else {
                    nonzero.join(" ")
                }
            );
        }
    }
}

/// `replay=1 auth_failed=1 (absorbed: natt_keepalive=2)`, or `none`.
fn drops_text(d: &serde_json::Value) -> String {
    let list = |v: &serde_json::Value| -> Vec<String> {
        v.as_object()
            .map(|m| m.iter().map(|(k, n)| format!("{k}={n}")).collect())
            .unwrap_or_default()
    };
    let mut out = list(&d["errors"]).join(" ");
    let absorbed = list(&d["absorbed"]);
    if !absorbed.is_empty() {
        out = format!("{out} (absorbed: {})", absorbed.join(" "))
            .trim()
            .to_string();
    }
    if out.is_empty() { "none".into() } else { out }
}

fn print_demo(r: &demo::DemoResult) {
    println!(
        "espgw demo: gateway A (203.0.113.1) encrypts LAN traffic, gateway B (203.0.113.2) decrypts it."
    );
    println!("On the way an attacker replays one ESP packet and forges another.\n");
    for (name, rep) in [("gateway A", &r.a), ("gateway B", &r.b)] {
        println!(
            "== {name}: {} frames in, {} frames out",
            rep["frames_in"], rep["frames_out"]
        );
        if let Some(sas) = rep["sas"].as_array() {
            for sa in sas {
                let c = &sa["counters"];
                let (pk, by) = if sa["direction"] == "out" {
                    (c["pkts_encaps"].clone(), c["bytes_encaps"].clone())
                } else {
                    (c["pkts_decaps"].clone(), c["bytes_decaps"].clone())
                };
                println!(
                    "   SA {:<10} {:<3} spi {} {:<28} {} -> {}  pkts {pk}  bytes {by}  drops {}",
                    sa["name"].as_str().unwrap_or("?"),
                    sa["direction"].as_str().unwrap_or("?"),
                    sa["spi"].as_str().unwrap_or("?"),
                    sa["transform"].as_str().unwrap_or("?"),
                    sa["local"].as_str().unwrap_or("?"),
                    sa["remote"].as_str().unwrap_or("?"),
                    drops_text(&sa["drops"]),
                );
            }
        }
        println!("   drops: {}", drops_text(&rep["counters"]["drops"]));
    }
    println!(
        "\n{} of {} plaintext frames arrived at B's LAN byte for byte (TTL two hops lower).",
        r.delivered_intact, r.sent
    );
    println!(
        "Configs and captures are in {} (open them with tshark or Wireshark).",
        r.dir.display()
    );
}

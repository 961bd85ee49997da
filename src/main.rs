//! The `regmirror` command line: parse, load the config, hand off to the library.

#![forbid(unsafe_code)]
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

mod cache_cli;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use regmirror::config::Settings;
use regmirror::setup::{self, SetupOptions, Target};
use regmirror::tls::CertificateAuthority;

#[derive(Parser)]
#[command(
    name = "regmirror",
    version,
    about = "Transparent pull-through cache for container registries"
)]
struct Cli {
    /// Log lines as text, or as one JSON object per line (for log shippers)
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Serve: intercept registry hostnames and cache what clients pull.
    Serve {
        /// Config file (default: the built-in config.toml)
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Validate a config and explain every problem with the key at fault.
    Check {
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Inspect and maintain the cache (safe while `serve` runs on it).
    Cache {
        #[arg(long, global = true)]
        config: Option<PathBuf>,
        #[command(subcommand)]
        action: CacheAction,
    },
    /// Root CA operations.
    Ca {
        #[command(subcommand)]
        action: CaAction,
    },
    /// Print the client-side configuration for one way of using regmirror.
    Setup {
        target: Target,
        #[arg(long)]
        config: Option<PathBuf>,
        /// Address clients reach regmirror at (IP, host or host:port)
        #[arg(long)]
        proxy: Option<String>,
        /// containerd: mirror over TLS on server.name instead of plain HTTP
        #[arg(long)]
        tls: bool,
        /// docker, containerd, podman: CONNECT proxy mode (HTTPS_PROXY at
        /// PROXY, default server.connect) instead of a mirror
        #[arg(long, value_name = "PROXY", num_args = 0..=1, default_missing_value = "")]
        connect: Option<String>,
        /// Write the files under this directory instead of printing them
        #[arg(long)]
        write: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum CacheAction {
    /// Cached images: upstream, repository, tag, size, last use.
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// Bytes stored, against cache.max_size.
    Du,
    /// Re-hash every blob; quarantine mismatches (exit 1 if any).
    Verify,
    /// Evict least recently used content now, down to --to (default cache.low_water).
    Gc {
        #[arg(long)]
        to: Option<String>,
    },
    /// Forget a cached image (`docker.io/library/alpine:3`) and delete its content.
    Rm { image: String },
    /// Pull images through the running server so they are cached before use.
    Warm {
        #[arg(required = true)]
        images: Vec<String>,
        /// os/arch to take from a multi-platform image (default: this machine's)
        #[arg(long)]
        platform: Option<String>,
    },
}

#[derive(Subcommand)]
enum CaAction {
    /// Print the root CA certificate (PEM), creating the CA if needed.
    Export {
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

/// jemalloc instead of glibc's malloc: allocation and free were ~15% of
/// the CPU a warm manifest GET cost (issue 16's profile, `perf record`
/// under h2load), mostly glibc's free-list upkeep across worker threads.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let flush_on_exit = regmirror::logging::init(match cli.log_format {
        LogFormat::Text => regmirror::logging::Format::Text,
        LogFormat::Json => regmirror::logging::Format::Json,
    });
    let result = run(cli);
    // Every log line out before the exit status and any error message.
    drop(flush_on_exit);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("regmirror: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<(), String> {
    match cli.command {
        Command::Serve { config } => {
            let settings = Settings::load(config.as_deref()).map_err(|e| e.to_string())?;
            for w in settings.warnings() {
                tracing::warn!("{w}");
            }
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                // Workers hold request lines back while busy (see `logging`).
                .on_thread_park(regmirror::logging::flush_thread)
                .on_thread_stop(regmirror::logging::flush_thread)
                .build()
                .map_err(|e| format!("starting the runtime: {e}"))?;
            rt.block_on(regmirror::serve(settings, shutdown_signal()))
                .map_err(|e| e.to_string())
        }
        Command::Check { config } => {
            let s = Settings::load(config.as_deref()).map_err(|e| e.to_string())?;
            for w in s.warnings() {
                println!("warning: {w}");
            }
            // An existing CA must still cover every configured hostname.
            if CertificateAuthority::cert_path(&s.ca_dir).exists() {
                CertificateAuthority::load_or_create(&s.ca_dir, &s.tls_names()).map_err(|e| format!("ca.dir: {e}"))?;
            }
            println!(
                "config OK: {} upstream(s) ({}), https {}, http {}, cache {} (max {} bytes), CA in {}",
                s.upstreams.len(),
                s.upstreams
                    .iter()
                    .map(|u| u.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
                s.https.map_or("off".into(), |a| a.to_string()),
                s.http.map_or("off".into(), |a| a.to_string()),
                s.cache_dir.display(),
                s.max_size,
                s.ca_dir.display(),
            );
            Ok(())
        }
        Command::Cache { config, action } => {
            let s = Settings::load(config.as_deref()).map_err(|e| e.to_string())?;
            match action {
                CacheAction::Ls { json } => cache_cli::ls(&s, json),
                CacheAction::Du => cache_cli::du(&s),
                CacheAction::Verify => cache_cli::verify(&s),
                CacheAction::Gc { to } => cache_cli::gc(&s, to.as_deref()),
                CacheAction::Rm { image } => cache_cli::rm(&s, &image),
                CacheAction::Warm { images, platform } => cache_cli::warm(&s, &images, platform.as_deref()),
            }
        }
        Command::Ca {
            action: CaAction::Export { config },
        } => {
            let s = Settings::load(config.as_deref()).map_err(|e| e.to_string())?;
            let ca = CertificateAuthority::load_or_create(&s.ca_dir, &s.tls_names()).map_err(|e| e.to_string())?;
            print!("{}", ca.cert_pem);
            Ok(())
        }
        Command::Setup {
            target,
            config,
            proxy,
            tls,
            connect,
            write,
        } => {
            let s = Settings::load(config.as_deref()).map_err(|e| e.to_string())?;
            let files = setup::files(&s, target, &SetupOptions { proxy, tls, connect })?;
            setup::emit(&files, write.as_deref()).map_err(|e| e.to_string())
        }
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for SIGTERM");
            return std::future::pending().await;
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
    }
}

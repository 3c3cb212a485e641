//! `backupmx`: the SMTP ingest, the embedded all-in-one mode and the admin
//! commands. Wiring only: configuration, backends and sockets; the logic is
//! in relay-core.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod auth;
mod backends;
mod cli;
mod connection;
mod filtering;
mod http;
mod limits;
mod listener;
mod metrics;
mod sender_auth;
mod server;
mod services;
mod shutdown;
mod tls;
mod web;

#[derive(Parser)]
#[command(
    name = "backupmx",
    version,
    about = "A backup MX: accepts mail for hosted domains while their primary is down"
)]
struct Cli {
    /// Configuration file (default: backupmx.toml if present, else built-in defaults).
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Log as JSON lines instead of human-readable text.
    #[arg(long, global = true)]
    log_json: bool,
    /// Say on stderr which configuration file and store a command uses.
    #[arg(long, short, global = true)]
    verbose: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Embedded all-in-one mode: SMTP ingest with the local store.
    Run,
    /// SMTP ingest only, with the configured storage backend.
    Ingest,
    /// The status page and admin API alone (`[admin] listen`), on the configured store.
    Admin,
    /// Manage hosted domains.
    #[command(subcommand)]
    Domain(cli::DomainCommand),
    /// Inspect and steer the queue.
    #[command(subcommand)]
    Queue(cli::QueueCommand),
    /// Recipient verification's cache (callout verdicts).
    #[command(subcommand)]
    Recipients(cli::RecipientsCommand),
    /// Check a domain's set-up: MX records, the primary, MTA-STS, DANE,
    /// SPF, our certificate (exit 0 only when no check fails).
    Doctor {
        /// The domain name.
        domain: String,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// AWS backend set-up.
    #[command(subcommand)]
    Aws(cli::AwsCommand),
    /// TLS reports (RFC 8460) on our deliveries to the primaries.
    #[command(subcommand)]
    Tlsrpt(cli::TlsrptCommand),
    /// Health check: connect, expect the 220 greeting, QUIT (exit 0 if healthy).
    Health {
        /// The SMTP listener to check (ADDR:PORT).
        #[arg(long, default_value = "127.0.0.1:2525", value_name = "ADDR:PORT")]
        connect: std::net::SocketAddr,
        /// Send a PROXY v2 LOCAL header first (when proxy_protocol is on).
        #[arg(long)]
        proxy: bool,
    },
}

fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    if json {
        // A connection's events carry its `session` span (session_id,
        // peer) once, under "span"; the list of enclosing spans would only
        // repeat it.
        builder.json().with_span_list(false).init();
    } else {
        builder.init();
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // A worker thread about to sleep first commits what its sessions wait
    // for (the embedded store's group commit; a no-op otherwise).
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .on_thread_park(relay_core::store::local::commit_pending)
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("backupmx: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Command::Health { connect, proxy } = cli.command {
        return match runtime.block_on(health(connect, proxy)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("backupmx: unhealthy: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let result = runtime.block_on(async {
        let config = relay_core::config::Config::load(cli.config.as_deref())
            .map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))?;
        let source = config_source(cli.config.as_deref());
        if cli.verbose {
            eprintln!(
                "backupmx: configuration {source}; store {}",
                cli::store_description(&config)
            );
        }
        match cli.command {
            Command::Run => {
                init_logging(cli.log_json);
                server::run(config, server::Mode::Embedded).await
            }
            Command::Ingest => {
                init_logging(cli.log_json);
                server::run(config, server::Mode::IngestOnly).await
            }
            Command::Admin => {
                init_logging(cli.log_json);
                server::admin_only(config, &source).await
            }
            Command::Domain(cmd) => cli::domain(&config, &source, cmd).await,
            Command::Queue(cmd) => cli::queue(&config, &source, cmd).await,
            Command::Recipients(cmd) => cli::recipients(&config, &source, cmd).await,
            Command::Aws(cmd) => cli::aws(&config, cmd).await,
            Command::Tlsrpt(cmd) => cli::tlsrpt(&config, &source, cmd).await,
            Command::Doctor { domain, json } => cli::doctor(&config, &source, &domain, json).await,
            Command::Health { .. } => Ok(()),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line: the error and its causes.
            let mut line = format!("backupmx: {e}");
            for cause in e.chain().skip(1) {
                line.push_str(&format!(": {cause}"));
            }
            if line.contains("TOML parse error") {
                // The caret under the mistake needs its lines.
                eprintln!("{line}");
            } else {
                eprintln!("{}", line.replace('\n', " "));
            }
            ExitCode::FAILURE
        }
    }
}

/// Which configuration a command runs with (as `Config::load` picks it).
fn config_source(path: Option<&std::path::Path>) -> String {
    match path {
        Some(p) => p.display().to_string(),
        None if std::path::Path::new("backupmx.toml").exists() => "./backupmx.toml".into(),
        None => "built-in defaults (no --config, no ./backupmx.toml)".into(),
    }
}

async fn health(addr: std::net::SocketAddr, proxy: bool) -> anyhow::Result<()> {
    // Behind the load balancer's PROXY listener: a LOCAL v2 header (no
    // forwarded address), which the server takes from this host.
    const LOCAL_V2: &[u8] = b"\r\n\r\n\0\r\nQUIT\n\x20\x00\x00\x00";
    let preface = if proxy { LOCAL_V2 } else { b"" };
    let hop = relay_core::delivery::handshake::Greeted::connect(
        addr,
        preface,
        std::time::Duration::from_secs(5),
    )
    .await?;
    hop.quit().await;
    Ok(())
}

//! `retry-fn`: delivers queued messages from SQS with relay-core's engine.
//!
//! Run without arguments under the Lambda runtime (SQS event source with
//! `ReportBatchItemFailures`), or as `retry-fn poll` to consume the same
//! queue from a plain process (containers, and tests against LocalStack).
//! Clients and configuration are built once, before the first event.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use aws_lambda_events::event::sqs::SqsEvent;
use clap::{Parser, Subcommand};
use lambda_runtime::{service_fn, LambdaEvent};
use relay_core::config::Config;

#[derive(Parser)]
#[command(
    name = "retry-fn",
    version,
    about = "backupmx delivery from the SQS queue"
)]
struct Cli {
    /// Configuration file (default: backupmx.toml if present, else built-in defaults).
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Consume the SQS queue from this process (long polling) until SIGTERM.
    Poll {
        /// Stop when the queue has been empty this long (for tests and batch runs).
        #[arg(long, value_name = "DURATION", value_parser = relay_core::config::parse_duration)]
        exit_when_idle: Option<Duration>,
    },
    /// One sweeper pass (orphaned records, dead letters), then exit; the
    /// scheduled Lambda invocation does the same.
    Sweep,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    // As a Lambda: JSON lines, which CloudWatch Logs Insights can query.
    if std::env::var_os("AWS_LAMBDA_RUNTIME_API").is_some() {
        builder.json().init();
    } else {
        builder.init();
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("retry-fn: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result: anyhow::Result<()> = runtime.block_on(async {
        let config = Config::load(cli.config.as_deref())
            .map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))?;
        let processor = Arc::new(retry_fn::build(&config).await?);
        match cli.command {
            Some(Command::Poll { exit_when_idle }) => {
                retry_fn::poll(processor, exit_when_idle).await
            }
            Some(Command::Sweep) => retry_fn::sweep(&processor).await.map(|_| ()),
            None => {
                lambda_runtime::run(service_fn(move |event: LambdaEvent<serde_json::Value>| {
                    let p = processor.clone();
                    // The runtime gives the deadline in milliseconds since the epoch.
                    let deadline =
                        std::time::UNIX_EPOCH + Duration::from_millis(event.context.deadline);
                    async move {
                        // Two event sources: the SQS queue, and the schedule
                        // (EventBridge) that runs the sweeper.
                        if event.payload.get("Records").is_some() {
                            let batch: SqsEvent = serde_json::from_value(event.payload)?;
                            let response = retry_fn::handle(&p, batch, Some(deadline)).await;
                            Ok::<_, lambda_runtime::Error>(serde_json::to_value(response)?)
                        } else {
                            retry_fn::scheduled(&p)
                                .await
                                .map_err(|e| format!("{e:#}"))?;
                            Ok(serde_json::json!({}))
                        }
                    }
                }))
                .await
                .map_err(|e| anyhow::anyhow!("lambda runtime: {e}"))
            }
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let mut line = format!("retry-fn: {e}");
            for cause in e.chain().skip(1) {
                line.push_str(&format!(": {cause}"));
            }
            eprintln!("{}", line.replace('\n', " "));
            ExitCode::FAILURE
        }
    }
}

//! The retry function's wiring: build the AWS clients and the delivery
//! engine once, then process SQS messages as a Lambda handler or a poller.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use aws_lambda_events::event::sqs::{SqsBatchResponse, SqsEvent};
use relay_core::config::Config;
use relay_core::delivery::retry::{CrashPoint, Processed, RetryProcessor, RetrySettings};
use relay_core::delivery::{Engine, EngineConfig};
use relay_core::dns::HickoryResolver;
use relay_core::store::aws::{AwsNames, AwsStore};

/// Clients, resolver and engine from the configuration.
pub async fn build(config: &Config) -> anyhow::Result<RetryProcessor> {
    let conf = relay_core::store::aws::sdk_config().await;
    let names = AwsNames::from_config(&config.aws);
    let store = Arc::new(
        AwsStore::connect(&conf, names)
            .await
            .context("cannot reach the AWS backend")?,
    );
    let resolver = HickoryResolver::new(&config.dns.servers, config.dns.timeout)
        .map_err(|e| anyhow::anyhow!("cannot set up the DNS resolver: {e}"))?;
    let engine = Arc::new(Engine::new(
        EngineConfig::from_config(config),
        Arc::new(resolver),
        store.clone(),
    ));
    Ok(
        RetryProcessor::new(store, engine, RetrySettings::from_config(config))
            .with_crash_point(crash_point()),
    )
}

/// Debug builds only: `FAULT_INJECTION=retry:POINT` makes the process die
/// at that point of its work (tests of the sweeper's rescue).
fn crash_point() -> Option<CrashPoint> {
    if !cfg!(debug_assertions) {
        return None;
    }
    let spec = std::env::var("FAULT_INJECTION").ok()?;
    let point = CrashPoint::parse_spec(&spec);
    if point.is_some() {
        tracing::warn!(event = "fault_injection", spec = %spec);
    }
    point
}

/// One sweeper pass, logged.
pub async fn sweep(processor: &RetryProcessor) -> anyhow::Result<()> {
    let report = processor
        .sweep(SystemTime::now())
        .await
        .map_err(|e| anyhow::anyhow!("sweep failed: {e}"))?;
    tracing::info!(
        event = "sweep_done",
        orphans = report.orphans,
        dead_letters = report.dead_letters,
        redriven = report.redriven,
        malformed_dead_letters = report.malformed
    );
    Ok(())
}

/// Time kept back from the invocation's deadline to report the batch.
const DEADLINE_MARGIN: Duration = Duration::from_secs(5);

/// The Lambda handler: the records of a batch are processed at once (a
/// slow primary does not hold up the others), each within the time the
/// invocation has left. Only the records that failed transiently or did
/// not finish are reported, so SQS redelivers just those.
pub async fn handle(
    processor: &RetryProcessor,
    event: SqsEvent,
    deadline: Option<SystemTime>,
) -> SqsBatchResponse {
    let budget = deadline.map(|d| {
        d.duration_since(SystemTime::now())
            .unwrap_or_default()
            .saturating_sub(DEADLINE_MARGIN)
    });
    let work = event.records.into_iter().map(|record| async move {
        let id = record.message_id.clone().unwrap_or_default();
        let body = record.body.unwrap_or_default();
        let processing = processor.process(&body, SystemTime::now());
        let result = match budget {
            Some(left) => match tokio::time::timeout(left, processing).await {
                Ok(r) => r.map_err(|e| e.to_string()),
                Err(_) => Err("not finished before the invocation's deadline".to_string()),
            },
            None => processing.await.map_err(|e| e.to_string()),
        };
        (id, result)
    });
    let mut response = SqsBatchResponse::default();
    for (id, result) in futures_util::future::join_all(work).await {
        match result {
            Ok(outcome) => {
                tracing::debug!(event = "sqs_record_done", message_id = %id, outcome = ?outcome)
            }
            Err(e) => {
                tracing::warn!(event = "sqs_record_failed", message_id = %id, error = %e);
                response.add_failure(id);
            }
        }
    }
    response
}

pub async fn poll(
    processor: Arc<RetryProcessor>,
    exit_when_idle: Option<Duration>,
) -> anyhow::Result<()> {
    let sqs = processor.store.sqs().clone();
    let url = processor.store.queue_url().to_string();
    let mut idle_since = std::time::Instant::now();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    // The sweeper runs beside the consumer, so one process is a whole
    // delivery tier (containers, LocalStack).
    let sweeper = {
        let p = processor.clone();
        let every = p.settings().sweep_interval;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                if let Err(e) = sweep(&p).await {
                    tracing::warn!(event = "sweep_failed", error = %e);
                }
            }
        })
    };
    let _stop_sweeper = AbortOnDrop(sweeper);
    // An attempt must end (and its outcome be stored) inside its lease, or
    // another may take the record over.
    let attempt_limit = processor.settings().attempt_lease.mul_f32(0.9);
    loop {
        let receive = sqs
            .receive_message()
            .queue_url(&url)
            .max_number_of_messages(10)
            .wait_time_seconds(if exit_when_idle.is_some() { 1 } else { 20 })
            .send();
        let out = tokio::select! {
            r = receive => r.context("SQS receive failed")?,
            _ = term.recv() => return Ok(()),
        };
        let messages = out.messages().to_vec();
        if messages.is_empty() {
            if exit_when_idle.is_some_and(|d| idle_since.elapsed() >= d) {
                return Ok(());
            }
            continue;
        }
        idle_since = std::time::Instant::now();
        let mut tasks = Vec::new();
        for m in messages {
            let p = processor.clone();
            tasks.push(tokio::spawn(async move {
                let processing = p.process(m.body().unwrap_or_default(), SystemTime::now());
                let result = match tokio::time::timeout(attempt_limit, processing).await {
                    Ok(r) => r,
                    Err(_) => Err(relay_core::delivery::retry::RetryError(
                        "attempt did not finish within its lease".into(),
                    )),
                };
                (m, result)
            }));
        }
        for t in tasks {
            let Ok((m, result)) = t.await else { continue };
            match result {
                Ok(outcome) => {
                    if matches!(outcome, Processed::Attempted { .. }) {
                        tracing::debug!(event = "sqs_record_done", outcome = ?outcome);
                    }
                    processor.crash_if(CrashPoint::BeforeSqsDelete);
                    if let Some(handle) = m.receipt_handle() {
                        if let Err(e) = sqs
                            .delete_message()
                            .queue_url(&url)
                            .receipt_handle(handle)
                            .send()
                            .await
                        {
                            tracing::warn!(event = "sqs_delete_failed", error = %aws_sdk_error(&e));
                        }
                    }
                }
                // Left in the queue: SQS shows it again after the visibility timeout.
                Err(e) => tracing::warn!(event = "sqs_record_failed", error = %e),
            }
        }
    }
}

fn aws_sdk_error(e: &dyn std::error::Error) -> String {
    e.to_string()
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

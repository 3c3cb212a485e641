//! The retry function's wiring: build the AWS clients and the delivery
//! engine once, then process SQS messages as a Lambda handler or a poller.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use aws_lambda_events::event::sqs::{SqsBatchResponse, SqsEvent};
use relay_core::config::Config;
pub mod poll;
pub mod processor;
pub mod slots;
pub mod sweep;

pub use poll::poll;
pub use processor::{CrashPoint, Processed, RetryError, RetryProcessor, RetrySettings};
pub use sweep::SweepReport;

/// Clients, resolver and engine from the configuration (the composition
/// root builds them as for the ingest server).
pub async fn build(config: &Config) -> anyhow::Result<RetryProcessor> {
    let store = Arc::new(relay_core::setup::aws_store(config).await?);
    let resolver = relay_core::setup::resolver(config)?;
    let spool = Arc::new(relay_core::store::SplitSpool {
        messages: store.clone(),
        queue: store.clone(),
        history: None,
    });
    let tls_reporter =
        relay_core::setup::tls_reporter(config, resolver.clone(), store.clone(), spool);
    // Deliveries teach the callout cache and the primaries' states that the
    // ingest tasks read (for domains with callouts or defer mode).
    let alerter = relay_core::setup::alerter(config)?;
    let history =
        relay_core::setup::history_recorder(store.clone(), store.clone(), alerter.clone());
    let engine = Arc::new(
        relay_core::setup::engine(
            config,
            resolver,
            store.clone(),
            store.clone(),
            alerter,
            store.clone(),
        )
        .with_history(Some(history)),
    );
    let mut processor = RetryProcessor::new(store, engine, RetrySettings::from(config))
        .with_crash_point(crash_point());
    processor.tls_reporter = tls_reporter;
    processor.history = Some(relay_core::setup::history_upkeep(config));
    Ok(processor)
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

/// One sweeper pass, logged; returns how many destinations are still down.
pub async fn sweep(processor: &RetryProcessor) -> anyhow::Result<usize> {
    let report = processor
        .sweep(SystemTime::now())
        .await
        .map_err(|e| anyhow::anyhow!("sweep failed: {}", relay_core::error::Report(&e)))?;
    tracing::info!(
        event = "sweep_done",
        orphans = report.orphans,
        dead_letters = report.dead_letters,
        redriven = report.redriven,
        malformed_dead_letters = report.malformed,
        destinations_down = report.down,
        oldest_overdue_secs = report.oldest_overdue
    );
    history_pass(processor).await;
    if let Some(reporter) = &processor.tls_reporter {
        // The day's reports, from the first pass after midnight (UTC).
        match reporter.send_daily(SystemTime::now()).await {
            Ok(Some(sent)) => tracing::info!(
                event = "tlsrpt_pass",
                reports = sent.reports,
                posted = sent.posted,
                mailed = sent.mailed,
                failed = sent.failed
            ),
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(event = "tlsrpt_pass_failed", error = %relay_core::error::Report(&e))
            }
        }
    }
    Ok(report.down)
}

/// The history's upkeep from the sweeper: one process per minute takes
/// the queue-depth samples, one per UTC day prunes.
async fn history_pass(processor: &RetryProcessor) {
    let Some(upkeep) = &processor.history else {
        return;
    };
    let store = processor.store.as_ref();
    let now = relay_core::time::unix_seconds(SystemTime::now());
    let minute = now - now % 60;
    match store
        .take_turn(&format!("history-sample#{minute}"), minute + 600)
        .await
    {
        Ok(true) => {
            if let Err(e) = upkeep.sample(store, store, now).await {
                tracing::warn!(event = "queue_sample_failed", error = %relay_core::error::Report(&e));
            }
        }
        Ok(false) => {}
        Err(e) => {
            tracing::warn!(event = "queue_sample_failed", error = %relay_core::error::Report(&e))
        }
    }
    let day = now / 86_400;
    if let Ok(true) = store
        .take_turn(&format!("history-prune#{day}"), (day + 2) * 86_400)
        .await
    {
        match upkeep.prune(store, now).await {
            Ok(n) => tracing::info!(event = "history_pruned", outages = n),
            Err(e) => {
                tracing::warn!(event = "history_prune_failed", error = %relay_core::error::Report(&e))
            }
        }
    }
}

/// The scheduled invocation (every minute, the shortest EventBridge
/// rate): a sweeper pass, then, while a destination is down, probes every
/// `probe_interval` for most of the minute, so a primary that comes back
/// is found within one interval, not at the next schedule.
pub async fn scheduled(processor: &RetryProcessor) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let mut down = sweep(processor).await?;
    let every = processor
        .settings()
        .probe_interval
        .max(Duration::from_secs(1));
    while down > 0 && started.elapsed() + every < SCHEDULED_PROBING {
        tokio::time::sleep(every).await;
        down = processor
            .probe_down(SystemTime::now())
            .await
            .map_err(|e| anyhow::anyhow!("probe failed: {}", relay_core::error::Report(&e)))?
            .len();
    }
    Ok(())
}

/// How long a scheduled invocation keeps probing down destinations (under
/// the one-minute schedule, so invocations do not pile up).
const SCHEDULED_PROBING: Duration = Duration::from_secs(50);

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
                Ok(r) => r.map_err(|e| relay_core::error::Report(&e).to_string()),
                Err(_) => Err("not finished before the invocation's deadline".to_string()),
            },
            None => processing
                .await
                .map_err(|e| relay_core::error::Report(&e).to_string()),
        };
        (id, result)
    });
    let results = futures_util::future::join_all(work).await;
    // A returned invocation is frozen: it must not hold slots meanwhile.
    processor.give_back_idle_slots().await;
    let mut response = SqsBatchResponse::default();
    for (id, result) in results {
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

/// The AWS requests this process made (what AWS bills), in one line.
pub fn log_requests() {
    let (total, by_operation) = relay_core::store::aws::requests::summary();
    tracing::info!(event = "aws_requests", total, by_operation = %by_operation);
}

/// `[aws]` and `[delivery]` timings for the AWS queue.
impl From<&Config> for RetrySettings {
    fn from(config: &Config) -> Self {
        RetrySettings {
            attempt_lease: config.aws.attempt_lease,
            orphan_after: config.aws.orphan_after,
            sweep_interval: config.aws.sweep_interval,
            probe_interval: config.delivery.probe_interval,
            queue_age: config.alerts.queue_age,
            max_per_destination: config.delivery.max_connections_per_destination,
        }
    }
}

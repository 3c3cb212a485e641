//! The poller: the retry function as a long-running process (containers,
//! LocalStack), receiving tickets from SQS itself, with the sweeper and
//! the prober beside it, so one process is a whole delivery tier.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context;

use crate::processor::{CrashPoint, RetryError, RetryProcessor};
use crate::{log_requests, sweep};

/// Works on tickets until SIGTERM (or, with `exit_when_idle`, until the
/// queue has been empty that long).
pub async fn poll(
    processor: Arc<RetryProcessor>,
    exit_when_idle: Option<Duration>,
) -> anyhow::Result<()> {
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
                    tracing::warn!(event = "sweep_failed", error = %format!("{e:#}"));
                }
            }
        })
    };
    let _stop_sweeper = AbortOnDrop(sweeper);
    // Destinations recorded down are probed more often than the sweep.
    let prober = {
        let p = processor.clone();
        let every = p.settings().probe_interval.max(Duration::from_secs(1));
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                if let Err(e) = p.probe_down(SystemTime::now()).await {
                    tracing::warn!(event = "probe_failed", error = %relay_core::error::Report(&e));
                }
            }
        })
    };
    let _stop_prober = AbortOnDrop(prober);
    // An attempt must end (and its outcome be stored) inside its lease, or
    // another may take the record over.
    let attempt_limit = processor.settings().attempt_lease.mul_f32(0.9);
    // Tickets in work at once: a receive takes at most 10, and a batch
    // does not wait for its slowest record before the next is received.
    let slots = Arc::new(tokio::sync::Semaphore::new(POLL_CONCURRENCY));
    let mut in_flight = tokio::task::JoinSet::new();
    loop {
        while in_flight.try_join_next().is_some() {}
        let free = slots.available_permits().min(10);
        if free == 0 {
            // Wait for one to finish before receiving more.
            tokio::select! {
                _ = in_flight.join_next() => {}
                _ = term.recv() => break,
            }
            continue;
        }
        let wait = if exit_when_idle.is_some() { 1 } else { 20 };
        let receive = processor.store.receive_tickets(free, wait);
        let messages = tokio::select! {
            r = receive => r.context("SQS receive failed")?,
            _ = term.recv() => break,
        };
        if messages.is_empty() {
            if in_flight.is_empty() && exit_when_idle.is_some_and(|d| idle_since.elapsed() >= d) {
                break;
            }
            continue;
        }
        idle_since = std::time::Instant::now();
        for m in messages {
            let p = processor.clone();
            let Ok(permit) = slots.clone().acquire_owned().await else {
                break;
            };
            in_flight.spawn(async move {
                let _permit = permit;
                let processing = p.process(&m.body, SystemTime::now());
                let result = match tokio::time::timeout(attempt_limit, processing).await {
                    Ok(r) => r,
                    Err(_) => Err(RetryError::LeaseExceeded),
                };
                match result {
                    Ok(outcome) => {
                        tracing::debug!(event = "sqs_record_done", outcome = ?outcome);
                        p.crash_if(CrashPoint::BeforeSqsDelete);
                        if let Some(receipt) = &m.receipt {
                            if let Err(e) = p.store.delete_ticket(receipt).await {
                                tracing::warn!(event = "sqs_delete_failed", error = %relay_core::error::Report(&e));
                            }
                        }
                    }
                    // Left in the queue: SQS shows it again after the visibility timeout.
                    // Not ours: no retry makes it readable; the operator
                    // finds it in the dead-letter queue.
                    Err(e) if !e.is_retryable() => {
                        tracing::error!(event = "sqs_record_failed", retryable = false, error = %relay_core::error::Report(&e))
                    }
                    Err(e) => tracing::warn!(event = "sqs_record_failed", error = %relay_core::error::Report(&e)),
                }
            });
        }
    }
    // SIGTERM: attempts under way finish and store their outcome (an
    // attempt cut short would hold its record until the lease ends).
    while in_flight.join_next().await.is_some() {}
    processor.give_back_idle_slots().await;
    log_requests();
    Ok(())
}

/// Tickets one poller works on at once (a Lambda deployment's equivalent
/// is its batch size times its maximum concurrency).
const POLL_CONCURRENCY: usize = 50;

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

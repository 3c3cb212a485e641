//! Prometheus text exposition at `/metrics` on `[metrics] listen`.

use std::net::SocketAddr;

use anyhow::Context;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

/// Installs the global recorder, with every metric described; its handle
/// renders the exposition (here and on the admin listener).
pub(crate) fn install() -> anyhow::Result<PrometheusHandle> {
    let handle = PrometheusBuilder::new()
        .install_recorder()
        .context("cannot install the metrics recorder")?;
    describe();
    Ok(handle)
}

/// Serves the exposition at `/metrics` on its own listener (the admin
/// listener's HTTP stack; nothing else is served here).
pub(crate) async fn serve(listen: SocketAddr, handle: PrometheusHandle) -> anyhow::Result<()> {
    let addr = crate::http::serve(listen, "metrics", move |req, _| {
        let found = req.method() == hyper::Method::GET && req.uri().path() == "/metrics";
        let (status, body) = if found {
            (hyper::StatusCode::OK, handle.render())
        } else {
            (hyper::StatusCode::NOT_FOUND, "not found\n".to_string())
        };
        async move {
            let mut reply = crate::http::Reply::new(http_body_util::Full::new(body.into()));
            *reply.status_mut() = status;
            reply.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static("text/plain; version=0.0.4"),
            );
            reply
        }
    })
    .await?;
    tracing::info!(event = "metrics_listening", addr = %addr);
    Ok(())
}

/// Every metric the server exports: name, help, whether it is a gauge,
/// and the labels of the series created at 0 when the server starts (so
/// dashboards and alerts can be built before the first event). The DNSBL
/// counter has a series per configured zone once lookups happen.
/// (name, help, is a gauge, labels of the series created at start)
type MetricSpec = (
    &'static str,
    &'static str,
    bool,
    &'static [(&'static str, &'static str)],
);

const METRICS: &[MetricSpec] = &[
    (
        "backupmx_sessions_total",
        "SMTP sessions accepted",
        false,
        &[],
    ),
    (
        "backupmx_sessions_active",
        "SMTP sessions open now",
        true,
        &[],
    ),
    (
        "backupmx_messages_accepted_total",
        "messages stored and answered 250",
        false,
        &[],
    ),
    (
        "backupmx_bytes_accepted_total",
        "bytes of accepted messages",
        false,
        &[],
    ),
    (
        "backupmx_rejections_total",
        "rejected commands and connections by reason and code",
        false,
        &[("reason", "recipient"), ("code", "550")],
    ),
    (
        "backupmx_queue_depth",
        "queue entries waiting for delivery",
        true,
        &[],
    ),
    (
        "backupmx_delivered_total",
        "recipients delivered to their primary",
        false,
        &[],
    ),
    (
        "backupmx_delivery_sessions_total",
        "delivery sessions that reached a transaction, by the domain's TLS policy and whether TLS was used",
        false,
        &[("policy", "opportunistic"), ("tls", "yes")],
    ),
    (
        "backupmx_tlsrpt_reports_total",
        "TLS reports (RFC 8460) delivered to a domain's rua, or failed",
        false,
        &[("result", "sent")],
    ),
    (
        "backupmx_tls_policy_failures_total",
        "connections to a primary given up because its TLS policy could not be met (no STARTTLS, refused, certificate not valid)",
        false,
        &[("policy", "verified")],
    ),
    (
        "backupmx_mta_sts_fetches_total",
        "MTA-STS policy fetches by result (ok, failed)",
        false,
        &[("result", "ok")],
    ),
    (
        "backupmx_mta_sts_testing_failures_total",
        "deliveries an MTA-STS policy in testing mode would have refused (delivered anyway)",
        false,
        &[],
    ),
    (
        "backupmx_bounces_queued_total",
        "delivery status notifications queued for senders",
        false,
        &[],
    ),
    (
        "backupmx_probe_recoveries_total",
        "destinations found answering again by the probe",
        false,
        &[],
    ),
    (
        "backupmx_etrn_total",
        "ETRN requests by result",
        false,
        &[("result", "started")],
    ),
    (
        "backupmx_greylist_total",
        "greylisting decisions by result",
        false,
        &[("result", "greylisted")],
    ),
    (
        "backupmx_callouts_total",
        "recipient callouts to primaries by result (valid, invalid, inconclusive, primary_down, skipped_primary_down, throttled_client, throttled_domain)",
        false,
        &[("result", "valid")],
    ),
    (
        "backupmx_recipient_cache_hits_total",
        "recipient verdicts answered from the callout cache, by verdict",
        false,
        &[("verdict", "invalid")],
    ),
    (
        "backupmx_held_refusals_finalised_total",
        "refusals held back by the bounce-storm guard that a release made final, by action (bounced: tried once more, a refusal bounces; discarded)",
        false,
        &[("action", "bounced")],
    ),
    (
        "backupmx_operator_deletions_total",
        "queued mail deleted by an operator with queue delete --domain, by what (messages, recipients)",
        false,
        &[("what", "messages")],
    ),
    (
        "backupmx_dsn_not_requested_total",
        "failed recipients that got no DSN because the sender asked for none (RFC 3461 NOTIFY=NEVER or without FAILURE)",
        false,
        &[],
    ),
    (
        "backupmx_harvest_penalties_total",
        "clients that collected smtp.unknown_recipient_limit unknown-user refusals within the window and were penalised",
        false,
        &[],
    ),
    (
        "backupmx_harvest_refusals_total",
        "recipients refused 451 4.7.1 because their client is serving an unknown-recipient penalty",
        false,
        &[],
    ),
    (
        "backupmx_rcpt_verify_rejections_total",
        "recipients refused as unknown by recipient verification, by source (cache, callout)",
        false,
        &[("reason", "callout")],
    ),
    (
        "backupmx_deferrals_total",
        "recipients deferred by policy, by reason (primary_up: defer_while_primary_up)",
        false,
        &[("reason", "primary_up")],
    ),
    (
        "backupmx_bounce_storms_total",
        "drains the bounce-storm guard stopped (domain held, no DSN)",
        false,
        &[],
    ),
    (
        "backupmx_filter_results_total",
        "messages the content filter (rspamd) scanned, by its action",
        false,
        &[("action", "reject")],
    ),
    (
        "backupmx_auth_results_total",
        "sender authentication results by method (spf, dkim, dmarc, iprev) and result",
        false,
        &[("method", "spf"), ("result", "pass")],
    ),
    (
        "backupmx_outages_total",
        "outages recorded: a delivery found a hosted domain's primary down (domain history)",
        false,
        &[],
    ),
    (
        "backupmx_dmarc_rejections_total",
        "messages refused after DATA for a DMARC fail under p=reject (auth = enforce)",
        false,
        &[],
    ),
    (
        "backupmx_filter_errors_total",
        "scans that got no answer (connect, timeout, status, bad_reply, ...): on_error decided",
        false,
        &[("reason", "timeout")],
    ),
    (
        "backupmx_alerts_total",
        "webhook alerts by result (sent, failed, coalesced, dropped)",
        false,
        &[("result", "sent")],
    ),
    (
        "backupmx_admin_auth_failures_total",
        "wrong tokens sent to the admin listener (bearer or sign-in form)",
        false,
        &[],
    ),
    (
        "backupmx_unknown_user_bounces_total",
        "recipients accepted here that the primary refused as unknown (5.1.x): the backscatter still caused",
        false,
        &[],
    ),
    (
        "backupmx_greylist_errors_total",
        "greylist store errors (mail let through)",
        false,
        &[],
    ),
    (
        "backupmx_delivery_paused",
        "1 while delivery waits because outcomes cannot be stored",
        true,
        &[],
    ),
    (
        "backupmx_outcome_store_failures_total",
        "delivery outcomes the store refused (kept and written again)",
        false,
        &[],
    ),
    (
        "backupmx_disk_full_outcome_deferred_total",
        "attempts that delivered nothing whose outcome the store refused: kept in memory, delivery goes on",
        false,
        &[],
    ),
    (
        "backupmx_disk_free_bytes",
        "free bytes on the data directory's filesystem (local store)",
        true,
        &[],
    ),
    (
        "backupmx_store_bytes",
        "size of the local store's database file",
        true,
        &[],
    ),
    (
        "backupmx_store_wal_bytes",
        "size of the local store's write-ahead log (counted as not free: copying it into the database may need that much)",
        true,
        &[],
    ),
    (
        "backupmx_store_free_bytes",
        "free pages inside the local store's database, reused for new mail and counted as free space by min_free_space",
        true,
        &[],
    ),
    (
        "backupmx_storage_reserve_released_total",
        "times the disk reserve was given up on a full disk",
        false,
        &[],
    ),
    (
        "backupmx_memory_budget_refusals_total",
        "messages refused because smtp.memory_budget was in use",
        false,
        &[],
    ),
    (
        "backupmx_dnsbl_task_failures_total",
        "DNSBL lookups that failed inside (counted as not listed: fail open)",
        false,
        &[],
    ),
    (
        "backupmx_accept_out_of_files_total",
        "accepts that failed for want of file descriptors",
        false,
        &[],
    ),
];

fn describe() {
    metrics::describe_counter!(
        "backupmx_dnsbl_lookups_total",
        "DNSBL lookups by zone and result"
    );
    metrics::describe_histogram!(
        "backupmx_filter_seconds",
        "time a message spent with the content filter, waiting for a slot included"
    );
    metrics::describe_counter!(
        "backupmx_aws_requests_total",
        "requests to AWS by service and operation (what AWS bills; AWS backend only)"
    );
    for &(name, help, gauge, labels) in METRICS {
        let labels: Vec<metrics::Label> = labels
            .iter()
            .map(|&(k, v)| metrics::Label::new(k, v))
            .collect();
        if gauge {
            metrics::describe_gauge!(name, help);
            metrics::gauge!(name, labels).set(0.0);
        } else {
            metrics::describe_counter!(name, help);
            metrics::counter!(name, labels).absolute(0);
        }
    }
}

//! Sending TLS reports: the domains that counted sessions on a day, their
//! `_smtp._tls` record, and each `rua` (HTTPS POST, or mail through our
//! own queue).

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::{gzip, parse_record, report_json, report_mail, Rua, SessionOutcome, Submitter, DAY};
use crate::address::DomainName;
use crate::dns::Resolver;
use crate::queue::{AcceptedMessage, AcceptedRecipient};
use crate::store::{Spool, StoreError, TlsReportStore};
use crate::time::unix_seconds;

/// Days back that due reports are looked for.
const LOOK_BACK_DAYS: u64 = 7;

/// What one pass sent.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SendSummary {
    /// Reports made (one per domain and day).
    pub reports: usize,
    /// Posted to an `https:` rua.
    pub posted: usize,
    /// Queued to a `mailto:` rua.
    pub mailed: usize,
    /// Deliveries to a rua that failed (logged).
    pub failed: usize,
    /// Domains with sessions but no `_smtp._tls` record: nothing to send.
    pub unpublished: usize,
}

/// Sends the reports of the days that are due.
pub struct TlsReporter {
    pub store: Arc<dyn TlsReportStore>,
    pub resolver: Arc<dyn Resolver>,
    /// Where `mailto:` reports are queued.
    pub spool: Arc<dyn Spool>,
    /// Verifies `https:` receivers' certificates.
    pub tls: Arc<rustls::ClientConfig>,
    pub submitter: Submitter,
    /// Longest HTTPS exchange.
    pub timeout: Duration,
}

impl TlsReporter {
    /// Sends every report not sent yet of the last days; with
    /// `include_today` also today's so far (`tlsrpt send --now`: the day's
    /// report is then closed early).
    pub async fn send_due(
        &self,
        now: SystemTime,
        include_today: bool,
    ) -> Result<SendSummary, StoreError> {
        let now_secs = unix_seconds(now);
        let today = now_secs / DAY;
        let last = if include_today { today } else { today - 1 };
        let mut summary = SendSummary::default();
        for day in today.saturating_sub(LOOK_BACK_DAYS)..=last {
            let mut by_domain: BTreeMap<DomainName, Vec<(SessionOutcome, u64)>> = BTreeMap::new();
            for (domain, outcome, n) in self.store.sessions_of_day(day).await? {
                by_domain.entry(domain).or_default().push((outcome, n));
            }
            for (domain, mut counts) in by_domain {
                let Some(ruas) = self.ruas(&domain).await else {
                    summary.unpublished += 1;
                    continue;
                };
                if !self.store.claim_report(day, &domain).await? {
                    continue;
                }
                counts.sort();
                let until = if day == today {
                    now_secs
                } else {
                    day * DAY + DAY - 1
                };
                let report = report_json(&self.submitter, domain.as_str(), day, until, &counts);
                let gz = gzip(&report);
                summary.reports += 1;
                for rua in &ruas {
                    let sent = match rua {
                        Rua::Https(url) => self.post(url, &gz).await.map(|()| summary.posted += 1),
                        Rua::Mailto(addr) => self
                            .mail(&domain, day, addr, &gz, now)
                            .await
                            .map(|()| summary.mailed += 1),
                    };
                    let target = match rua {
                        Rua::Https(u) => u.as_str(),
                        Rua::Mailto(a) => a.as_str(),
                    };
                    match sent {
                        Ok(()) => {
                            tracing::info!(event = "tlsrpt_sent", domain = %domain, day = %super::report_id(&self.submitter, domain.as_str(), day), rua = %target);
                            metrics::counter!("backupmx_tlsrpt_reports_total", "result" => "sent")
                                .increment(1);
                        }
                        Err(why) => {
                            summary.failed += 1;
                            tracing::warn!(event = "tlsrpt_failed", domain = %domain, rua = %target, error = %why);
                            metrics::counter!("backupmx_tlsrpt_reports_total", "result" => "failed")
                                .increment(1);
                        }
                    }
                }
            }
        }
        Ok(summary)
    }

    /// [`send_due`](TlsReporter::send_due) once per UTC day across every
    /// process sharing the store (the AWS sweeper runs every minute):
    /// `None` when another pass had today's turn.
    pub async fn send_daily(&self, now: SystemTime) -> Result<Option<SendSummary>, StoreError> {
        let today = unix_seconds(now) / DAY;
        // A name that is never a real domain (RFC 2606 `.invalid`).
        let turn = DomainName::parse("daily-pass.tlsrpt.invalid")
            .map_err(|_| StoreError::Invalid("the daily pass marker".into()))?;
        if !self.store.claim_report(today, &turn).await? {
            return Ok(None);
        }
        self.send_due(now, false).await.map(Some)
    }

    /// The domain's report addresses, from `_smtp._tls.DOMAIN`.
    async fn ruas(&self, domain: &DomainName) -> Option<Vec<Rua>> {
        let records = self
            .resolver
            .txt(&format!("_smtp._tls.{domain}"))
            .await
            .ok()?;
        // RFC 8460 §3: exactly one record counts; several are none.
        let mut found = records.iter().filter_map(|r| parse_record(r));
        let first = found.next()?;
        found.next().is_none().then_some(first)
    }

    /// Queues the report as mail to `to` (null sender: nobody answers it).
    async fn mail(
        &self,
        domain: &DomainName,
        day: u64,
        to: &str,
        gz: &[u8],
        now: SystemTime,
    ) -> Result<(), String> {
        let rcpt_domain = to
            .rsplit_once('@')
            .and_then(|(_, d)| DomainName::parse(d).ok())
            .ok_or_else(|| format!("{to}: not an address"))?;
        let message = AcceptedMessage {
            id: crate::queue::new_id(now),
            sender: String::new(),
            recipients: vec![AcceptedRecipient {
                address: to.to_string(),
                domain: rcpt_domain,
                dsn: Default::default(),
            }],
            client_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
            helo: self.submitter.hostname.clone(),
            received_at: now,
            smtputf8: false,
            eight_bit: false,
            body: report_mail(&self.submitter, domain.as_str(), day, to, gz, now),
            deferred: Vec::new(),
            spooled: None,
            dsn: Default::default(),
            tls_request: None,
        };
        self.spool
            .accept(message)
            .await
            .map(|_| ())
            .map_err(|e| format!("queueing the report: {}", crate::error::Report(&e)))
    }

    /// POSTs the report (`application/tlsrpt+gzip`, RFC 8460 §5.4); a 2xx
    /// answer is success.
    async fn post(&self, url: &str, gz: &[u8]) -> Result<(), String> {
        let rest = url.strip_prefix("https://").ok_or("not an https URL")?;
        let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        let path = if path.is_empty() { "/" } else { path };
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || authority.starts_with('[') => (
                h.trim_start_matches('[').trim_end_matches(']'),
                p.parse::<u16>().map_err(|_| format!("{url}: bad port"))?,
            ),
            _ => (authority, 443),
        };
        let work = async {
            let ips = self
                .resolver
                .ips(host)
                .await
                .map_err(|e| format!("{host}: {e}"))?;
            let ip = ips.first().ok_or_else(|| format!("{host}: no address"))?;
            let tcp = TcpStream::connect(SocketAddr::new(*ip, port))
                .await
                .map_err(|e| format!("connect to {host}: {e}"))?;
            let name =
                ServerName::try_from(host.to_string()).map_err(|e| format!("{host}: {e}"))?;
            let mut tls = tokio_rustls::TlsConnector::from(self.tls.clone())
                .connect(name, tcp)
                .await
                .map_err(|e| format!("TLS to {host}: {e}"))?;
            let head = format!(
                "POST {path} HTTP/1.1\r\nHost: {authority}\r\nUser-Agent: backupmx\r\nContent-Type: application/tlsrpt+gzip\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                gz.len()
            );
            tls.write_all(head.as_bytes())
                .await
                .map_err(|e| format!("{host}: {e}"))?;
            tls.write_all(gz)
                .await
                .map_err(|e| format!("{host}: {e}"))?;
            let mut answer = Vec::new();
            let _ = (&mut tls).take(64 * 1024).read_to_end(&mut answer).await;
            let status = String::from_utf8_lossy(&answer)
                .lines()
                .next()
                .unwrap_or_default()
                .to_string();
            match status.split(' ').nth(1) {
                Some(code) if code.starts_with('2') => Ok(()),
                _ => Err(format!("{host} answered {status:?}")),
            }
        };
        tokio::time::timeout(self.timeout, work)
            .await
            .map_err(|_| format!("posting to {host} timed out"))?
    }
}

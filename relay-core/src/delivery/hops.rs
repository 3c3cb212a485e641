//! The hops of one delivery: the TLS each next hop must get (the domain's
//! `tls` setting raised by its MTA-STS policy, RFC 8461 §4–5, and by DANE,
//! RFC 7672) and the loop over the hops in order until one holds a
//! transaction. Deliveries and callout channels share both.
//!
//! [`plan_sts`] is the pure core of the planning: the MTA-STS decision
//! per target, unit-tested without a network.

use std::sync::Arc;
use std::time::Duration;

use relay_proto::client::{Envelope, RcptResult};
use relay_proto::queue::TlsRequest;

use crate::address::DomainName;
use crate::dns::Resolver;
use crate::domain::{Domain, TlsPolicy};
use crate::mta_sts::{Mode, Policy};

use super::route::Target;
use super::transport::{self, HopTls, SessionReport, Timeouts};
use super::{dane, mta_sts, EngineConfig};

/// The TLS a connection to one target must have, and where that came from.
#[derive(Debug, Clone)]
pub(crate) struct HopPlan {
    pub tls: TlsPolicy,
    /// Where the TLS requirement came from.
    pub source: PlanSource,
    /// MTA-STS testing mode: the policy to deliver with when the verified
    /// connection fails (after reporting it).
    pub testing_fallback: Option<TlsPolicy>,
    /// DANE: TLS authenticated by the host's TLSA records.
    pub dane: Option<Arc<rustls::ClientConfig>>,
}

/// Where a hop's TLS requirement came from (the label of its logs and
/// metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PlanSource {
    /// The domain's own `tls` setting.
    Domain,
    /// Raised by the destination's MTA-STS policy.
    MtaSts,
    /// Raised by DNSSEC-validated TLSA records.
    Dane,
}

impl PlanSource {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            PlanSource::Domain => "domain",
            PlanSource::MtaSts => "mta-sts",
            PlanSource::Dane => "dane",
        }
    }
}

impl HopPlan {
    /// The domain's own policy, nothing raised.
    fn own(tls: TlsPolicy) -> Self {
        HopPlan {
            tls,
            source: PlanSource::Domain,
            testing_fallback: None,
            dane: None,
        }
    }

    /// Verified TLS asked for by the domain's MTA-STS policy.
    fn mta_sts(testing_fallback: Option<TlsPolicy>) -> Self {
        HopPlan {
            tls: TlsPolicy::Verified,
            source: PlanSource::MtaSts,
            testing_fallback,
            dane: None,
        }
    }

    /// The label of this plan's policy in logs and metrics: the domain's
    /// `tls` value, or where a raised policy came from.
    fn label(&self, tls: TlsPolicy) -> String {
        if tls != self.tls || self.source == PlanSource::Domain {
            tls.to_string()
        } else {
            self.source.as_str().to_string()
        }
    }
}

/// What an MTA-STS policy makes of a domain's targets.
#[derive(Debug)]
pub(crate) struct StsPlan {
    pub plans: Vec<(Target, HopPlan)>,
    /// MX hosts an enforced policy does not name: not used.
    pub skipped: Vec<String>,
    /// MX hosts a testing policy does not name: used, and reported.
    pub testing_misses: Vec<String>,
}

/// The MTA-STS decision for each target (pure): a host the policy names
/// gets verified TLS (with the domain's own policy as the fallback in
/// testing mode); one it does not name is skipped under `enforce` unless
/// the next hops are `explicit` (the operator's choice: primaries or a
/// static route), and used as usual otherwise. No policy, or mode `none`:
/// the domain's own policy everywhere.
pub(crate) fn plan_sts(
    own: TlsPolicy,
    policy: Option<&Policy>,
    explicit: bool,
    targets: Vec<Target>,
) -> StsPlan {
    let mut out = StsPlan {
        plans: Vec::with_capacity(targets.len()),
        skipped: Vec::new(),
        testing_misses: Vec::new(),
    };
    let Some(policy) = policy.filter(|p| p.mode != Mode::None) else {
        out.plans = targets
            .into_iter()
            .map(|t| (t, HopPlan::own(own)))
            .collect();
        return out;
    };
    for t in targets {
        match (policy.mode, policy.allows(&t.host)) {
            (Mode::Enforce, true) => out.plans.push((t, HopPlan::mta_sts(None))),
            (Mode::Enforce, false) if explicit => out.plans.push((t, HopPlan::own(own))),
            (Mode::Enforce, false) => out.skipped.push(t.host),
            (_, true) => out.plans.push((t, HopPlan::mta_sts(Some(own)))),
            (_, false) => {
                if !explicit {
                    out.testing_misses.push(t.host.clone());
                }
                out.plans.push((t, HopPlan::own(own)));
            }
        }
    }
    out
}

/// Plans and connects the hops of deliveries and channels.
pub(crate) struct Hops {
    hostname: String,
    pub(crate) timeouts: Timeouts,
    dane: bool,
    resolver: Arc<dyn Resolver>,
    /// MTA-STS policies of the destinations.
    sts: Option<mta_sts::StsPolicies>,
    /// Opportunistic STARTTLS (`None`: off).
    tls: Option<Arc<rustls::ClientConfig>>,
    /// STARTTLS with any certificate, for `tls = "required"` hops.
    any_certificate: Arc<rustls::ClientConfig>,
    /// STARTTLS with a certificate valid for the hop's name.
    verifying: Arc<rustls::ClientConfig>,
    /// Where sessions are counted for TLS reports (RFC 8460), if anywhere.
    pub(crate) tls_reports: Option<Arc<dyn crate::store::TlsReportStore>>,
}

impl Hops {
    pub(crate) fn new(cfg: &EngineConfig, resolver: Arc<dyn Resolver>) -> Self {
        let extra_roots = match &cfg.tls_ca_file {
            None => Vec::new(),
            // The configuration's validation read it already; a file gone
            // since then leaves the Web PKI roots only.
            Some(path) => transport::load_ca_file(path).unwrap_or_else(|e| {
                tracing::error!(event = "tls_ca_file_unreadable", error = %e);
                Vec::new()
            }),
        };
        let verifying = transport::verifying_tls(&extra_roots);
        let sts = cfg.mta_sts.then(|| {
            mta_sts::StsPolicies::new(
                resolver.clone(),
                verifying.clone(),
                cfg.mta_sts_port,
                cfg.timeouts.connect.min(Duration::from_secs(30)),
            )
        });
        Hops {
            hostname: cfg.me.hostname.clone(),
            timeouts: cfg.timeouts,
            dane: cfg.dane,
            resolver,
            sts,
            tls: cfg.opportunistic_tls.then(transport::opportunistic_tls),
            any_certificate: transport::opportunistic_tls(),
            verifying,
            tls_reports: None,
        }
    }

    /// Each target with the TLS it must get: the domain's own policy,
    /// raised by its MTA-STS policy and by DANE. An enforced policy that
    /// no MX host matches, or TLSA lookups that fail for every host, are
    /// an error (the mail waits).
    pub(crate) async fn plans(
        &self,
        domain: &DomainName,
        record: Option<&Domain>,
        explicit: bool,
        targets: Vec<Target>,
        now: u64,
        envelopes: &[Envelope],
    ) -> Result<Vec<(Target, HopPlan)>, String> {
        let not_required = Some(TlsRequest::NotRequired);
        if !envelopes.is_empty() && envelopes.iter().all(|e| e.tls_request == not_required) {
            // RFC 8689 §4.2.1 `TLS-Required: No`: the sender waives the
            // domain's TLS policy, MTA-STS and DANE; TLS stays
            // opportunistic.
            return Ok(targets
                .into_iter()
                .map(|t| (t, HopPlan::own(TlsPolicy::Opportunistic)))
                .collect());
        }
        let plans = self
            .sts_plans(domain, record, explicit, targets, now)
            .await?;
        if !self.dane {
            return Ok(plans);
        }
        self.dane_plans(domain, plans).await
    }

    /// The domain's own policy raised by its MTA-STS policy.
    async fn sts_plans(
        &self,
        domain: &DomainName,
        record: Option<&Domain>,
        explicit: bool,
        targets: Vec<Target>,
        now: u64,
    ) -> Result<Vec<(Target, HopPlan)>, String> {
        let own = record.map_or(TlsPolicy::Opportunistic, |r| r.tls);
        // A policy's patterns name hosts: next hops given as addresses
        // (explicit primaries) are never covered, so no lookup is needed.
        let named = targets
            .iter()
            .any(|t| t.host.parse::<std::net::IpAddr>().is_err());
        let policy = match (&self.sts, named) {
            (Some(sts), true) => sts.policy(domain, now).await,
            _ => None,
        };
        let plan = plan_sts(own, policy.as_ref(), explicit, targets);
        for host in &plan.skipped {
            tracing::info!(event = "mta_sts_mx_skipped", domain = %domain, host = %host,
                "not in the domain's MTA-STS policy");
        }
        for host in &plan.testing_misses {
            tracing::warn!(event = "mta_sts_testing_failure", domain = %domain, host = %host,
                error = "MX host not in the policy (testing mode: delivered anyway)");
            metrics::counter!("backupmx_mta_sts_testing_failures_total").increment(1);
        }
        if plan.plans.is_empty() {
            if let Some(policy) = policy.as_ref().filter(|p| p.mode != Mode::None) {
                metrics::counter!("backupmx_tls_policy_failures_total", "policy" => "mta-sts")
                    .increment(1);
                let why = format!(
                    "MTA-STS policy of {domain} (enforce) lists none of its MX hosts: mx {}",
                    policy.mx.join(", ")
                );
                tracing::warn!(event = "tls_policy_failed", domain = %domain, policy = "mta-sts", error = %why);
                return Err(why);
            }
        }
        Ok(plan.plans)
    }

    /// DANE over the other plans: a host with validated TLSA records gets
    /// TLS authenticated by them (DANE takes precedence over MTA-STS, RFC
    /// 8461 §2); a host whose TLSA lookup fails or does not validate is
    /// not used now.
    async fn dane_plans(
        &self,
        domain: &DomainName,
        plans: Vec<(Target, HopPlan)>,
    ) -> Result<Vec<(Target, HopPlan)>, String> {
        use crate::dns::TlsaAnswer;
        let mut out = Vec::with_capacity(plans.len());
        let mut failure = None;
        for (target, mut plan) in plans {
            if target.host.parse::<std::net::IpAddr>().is_ok() {
                out.push((target, plan));
                continue;
            }
            let name = format!("_25._tcp.{}", target.host);
            match self.resolver.tlsa_validated(&name).await {
                TlsaAnswer::NotApplicable => out.push((target, plan)),
                TlsaAnswer::Secure(records) => {
                    tracing::info!(event = "dane_tlsa", domain = %domain, host = %target.host, records = records.len(), "TLS authenticated by TLSA records");
                    plan.tls = TlsPolicy::Verified;
                    plan.source = PlanSource::Dane;
                    plan.testing_fallback = None;
                    plan.dane = Some(dane::DaneVerifier::client_config(records));
                    out.push((target, plan));
                }
                TlsaAnswer::Failed(why) => {
                    tracing::warn!(event = "tls_policy_failed", domain = %domain, host = %target.host, policy = "dane", error = %why);
                    metrics::counter!("backupmx_tls_policy_failures_total", "policy" => "dane")
                        .increment(1);
                    failure = Some(format!("DANE: {why}"));
                }
            }
        }
        match (out.is_empty(), failure) {
            (true, Some(why)) => Err(why),
            _ => Ok(out),
        }
    }

    /// One address of a planned hop, with the fallbacks deliveries and
    /// callout channels share: a verified connection that an MTA-STS
    /// policy in testing mode asked for and that failed is reported, and
    /// made again under the domain's own policy; a broken opportunistic
    /// handshake is made again in the clear. Returns what the last try
    /// gave and the TLS policy it ran under.
    pub(crate) async fn try_address<'a, T, F, Fut>(
        &'a self,
        domain: &DomainName,
        target: &Target,
        addr: std::net::SocketAddr,
        plans: (&'a HopPlan, Option<&'a HopPlan>),
        purpose: Purpose,
        attempt: F,
    ) -> (T, TlsPolicy)
    where
        T: HopAttempt,
        F: Fn(HopTls<'a>) -> Fut,
        Fut: std::future::Future<Output = T>,
    {
        let (plan, fallback) = plans;
        let mut outcome = attempt(self.hop_tls(plan)).await;
        let mut tls_policy = plan.tls;
        if outcome.tls_policy_failed() {
            let why = outcome.why();
            let purpose_name = purpose.as_str();
            match fallback {
                Some(fallback) => {
                    // MTA-STS testing: report, and go on as usual.
                    tracing::warn!(event = "mta_sts_testing_failure", domain = %domain, host = %target.host, addr = %addr, purpose = purpose_name, error = %why);
                    if purpose == Purpose::Delivery {
                        metrics::counter!("backupmx_mta_sts_testing_failures_total").increment(1);
                    }
                    tls_policy = fallback.tls;
                    outcome = attempt(self.hop_tls(fallback)).await;
                }
                None => {
                    let label = plan.label(plan.tls);
                    tracing::warn!(event = "tls_policy_failed", domain = %domain, host = %target.host, addr = %addr, policy = %label, purpose = purpose_name, error = %why);
                    if purpose == Purpose::Delivery {
                        metrics::counter!("backupmx_tls_policy_failures_total", "policy" => label)
                            .increment(1);
                    }
                }
            }
        }
        if outcome.tls_failed() && !outcome.tls_policy_failed() {
            // Opportunistic TLS: a broken handshake must not stop the mail.
            tracing::info!(event = "tls_fallback_plaintext", addr = %addr);
            outcome = attempt(HopTls::Off).await;
        }
        (outcome, tls_policy)
    }

    /// Tries the planned hops in order until one holds a transaction, each
    /// with the TLS its plan asks for (and the fallbacks of
    /// [`Hops::try_address`]).
    pub(crate) async fn deliver(
        &self,
        domain: &DomainName,
        plans: &[(Target, HopPlan)],
        envelopes: &[Envelope],
        bodies: &transport::Bodies<'_>,
    ) -> SessionReport {
        let mut last = None;
        for (target, plan) in plans {
            if plan.dane.is_none()
                && plan.tls != TlsPolicy::Verified
                && envelopes
                    .iter()
                    .all(|e| e.tls_request == Some(TlsRequest::Requiretls))
            {
                // RFC 8689: no verified TLS on this hop, so nothing here to
                // send; the host is not down for that.
                last = Some(policy_refusal(
                    envelopes,
                    "REQUIRETLS: no TLS verified by MTA-STS, DANE or tls = \"verified\" to this host",
                ));
                continue;
            }
            let fallback = Self::fallback_of(plan);
            for addr in &target.addrs {
                let session = |tls| {
                    transport::deliver(
                        *addr,
                        &target.host,
                        &self.hostname,
                        tls,
                        &self.timeouts,
                        envelopes.to_vec(),
                        bodies,
                    )
                };
                let (report, tls_policy) = self
                    .try_address(
                        domain,
                        target,
                        *addr,
                        (plan, fallback.as_ref()),
                        Purpose::Delivery,
                        session,
                    )
                    .await;
                let conclusive = report.transaction_started
                    || report
                        .results
                        .iter()
                        .flatten()
                        .any(|r| !matches!(r, RcptResult::Transient(_)));
                self.count_for_tls_report(domain, target, *addr, plan, &report);
                let label = plan.label(tls_policy);
                tracing::debug!(event = "delivery_session", addr = %addr, host = %target.host, conclusive,
                    tls = report.tls, policy = %label, messages = envelopes.len());
                if report.transaction_started {
                    metrics::counter!("backupmx_delivery_sessions_total",
                        "policy" => label,
                        "tls" => if report.tls { "yes" } else { "no" })
                    .increment(1);
                }
                last = Some(report);
                if conclusive {
                    break;
                }
            }
            if last.as_ref().is_some_and(|r| r.transaction_started) {
                break;
            }
        }
        last.unwrap_or_else(|| unreachable_report(envelopes))
    }

    /// Counts a session that reached the server and tried TLS, for the
    /// domain's TLS report (in the background: the delivery does not wait
    /// for the store).
    fn count_for_tls_report(
        &self,
        domain: &DomainName,
        target: &Target,
        addr: std::net::SocketAddr,
        plan: &HopPlan,
        report: &SessionReport,
    ) {
        let Some(store) = &self.tls_reports else {
            return;
        };
        let reached = report.transaction_started
            || report.tls
            || report.tls_failed
            || report.tls_policy_failed;
        if !reached || matches!(self.hop_tls(plan), HopTls::Off) {
            return;
        }
        let policy = if plan.dane.is_some() {
            crate::tlsrpt::PolicyType::Tlsa
        } else if plan.source == PlanSource::MtaSts {
            crate::tlsrpt::PolicyType::Sts
        } else {
            crate::tlsrpt::PolicyType::NoPolicyFound
        };
        let why = report
            .results
            .iter()
            .flatten()
            .find_map(|r| match r {
                RcptResult::Transient(t) => Some(t.as_str()),
                _ => None,
            })
            .unwrap_or_default();
        let outcome = crate::tlsrpt::SessionOutcome {
            policy,
            mx_host: target.host.clone(),
            receiving_ip: addr.ip().to_string(),
            // Opportunistic TLS that did not happen, with no handshake
            // and no policy failure: the server did not offer STARTTLS.
            failure: if report.tls || report.tls_failed || report.tls_policy_failed {
                crate::tlsrpt::classify(report.tls, why)
            } else {
                Some(crate::tlsrpt::FailureType::StarttlsNotSupported)
            },
        };
        let day = crate::time::unix_seconds(std::time::SystemTime::now()) / crate::tlsrpt::DAY;
        let (store, domain) = (store.clone(), domain.clone());
        tokio::spawn(async move {
            if let Err(e) = store.count_session(day, &domain, &outcome).await {
                tracing::warn!(event = "tlsrpt_count_failed", domain = %domain, error = %crate::error::Report(&e));
            }
        });
    }

    /// The client TLS a plan asks for.
    pub(crate) fn hop_tls<'a>(&'a self, plan: &'a HopPlan) -> HopTls<'a> {
        if let Some(dane) = &plan.dane {
            return HopTls::Verified(dane);
        }
        match (plan.tls, self.tls.as_ref()) {
            (TlsPolicy::Verified, _) => HopTls::Verified(&self.verifying),
            (TlsPolicy::Required, _) => HopTls::Required(&self.any_certificate),
            (TlsPolicy::Opportunistic, Some(c)) => HopTls::Opportunistic(c),
            (TlsPolicy::Opportunistic, None) => HopTls::Off,
        }
    }

    /// The plan for a hop whose MTA-STS testing policy failed: the
    /// domain's own.
    pub(crate) fn fallback_of(plan: &HopPlan) -> Option<HopPlan> {
        plan.testing_fallback.map(HopPlan::own)
    }
}

/// What a connection to a hop is for: deliveries count their TLS policy
/// failures in the metrics; callouts only log theirs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Purpose {
    Delivery,
    Callout,
}

impl Purpose {
    fn as_str(self) -> &'static str {
        match self {
            Purpose::Delivery => "delivery",
            Purpose::Callout => "callout",
        }
    }
}

/// What one try at a hop says about TLS, for the fallbacks.
pub(crate) trait HopAttempt {
    /// TLS was required and could not be had: the hop answers.
    fn tls_policy_failed(&self) -> bool;
    /// An opportunistic handshake broke: the clear may work.
    fn tls_failed(&self) -> bool;
    /// For the log.
    fn why(&self) -> String;
}

impl HopAttempt for SessionReport {
    fn tls_policy_failed(&self) -> bool {
        self.tls_policy_failed
    }
    fn tls_failed(&self) -> bool {
        self.tls_failed
    }
    fn why(&self) -> String {
        first_transient(self).to_string()
    }
}

impl HopAttempt for Result<transport::Channel, transport::SetupFailure> {
    fn tls_policy_failed(&self) -> bool {
        self.as_ref().err().is_some_and(|f| f.tls_policy_failed)
    }
    fn tls_failed(&self) -> bool {
        self.as_ref().err().is_some_and(|f| f.tls_failed)
    }
    fn why(&self) -> String {
        self.as_ref()
            .err()
            .map(|f| f.why.clone())
            .unwrap_or_default()
    }
}

fn first_transient(report: &SessionReport) -> &str {
    report
        .results
        .iter()
        .flatten()
        .find_map(|r| match r {
            RcptResult::Transient(t) => Some(t.as_str()),
            _ => None,
        })
        .unwrap_or_default()
}

/// Every recipient deferred by a TLS policy that no target can meet.
pub(crate) fn policy_refusal(envelopes: &[Envelope], why: &str) -> SessionReport {
    SessionReport {
        results: envelopes
            .iter()
            .map(|e| vec![RcptResult::Transient(why.to_string()); e.recipients.len()])
            .collect(),
        transaction_started: false,
        tls: false,
        tls_failed: false,
        tls_policy_failed: true,
        dsn_offered: false,
    }
}

fn unreachable_report(envelopes: &[Envelope]) -> SessionReport {
    SessionReport {
        results: envelopes
            .iter()
            .map(|e| {
                vec![RcptResult::Transient("no address to connect to".into()); e.recipients.len()]
            })
            .collect(),
        transaction_started: false,
        tls: false,
        tls_failed: false,
        tls_policy_failed: false,
        dsn_offered: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(host: &str) -> Target {
        Target {
            host: host.into(),
            addrs: vec!["127.0.0.1:25".parse().unwrap()],
        }
    }

    fn policy(mode: Mode, mx: &[&str]) -> Policy {
        Policy {
            mode,
            mx: mx.iter().map(|m| m.to_string()).collect(),
            max_age: 86_400,
        }
    }

    fn summary(plan: &StsPlan) -> Vec<(String, TlsPolicy, &'static str, Option<TlsPolicy>)> {
        plan.plans
            .iter()
            .map(|(t, p)| (t.host.clone(), p.tls, p.source.as_str(), p.testing_fallback))
            .collect()
    }

    #[test]
    fn without_a_policy_every_target_keeps_the_domains_own_tls() {
        let plan = plan_sts(TlsPolicy::Required, None, false, vec![target("mx.a.test")]);
        assert_eq!(
            summary(&plan),
            [("mx.a.test".into(), TlsPolicy::Required, "domain", None)]
        );
        let none = policy(Mode::None, &["mx.a.test"]);
        let plan = plan_sts(
            TlsPolicy::Opportunistic,
            Some(&none),
            false,
            vec![target("mx.a.test")],
        );
        assert_eq!(plan.plans[0].1.source, PlanSource::Domain);
    }

    #[test]
    fn enforce_verifies_named_hosts_and_skips_the_others_unless_explicit() {
        let p = policy(Mode::Enforce, &["*.a.test"]);
        let targets = || vec![target("mx1.a.test"), target("mx.other.test")];
        let plan = plan_sts(TlsPolicy::Opportunistic, Some(&p), false, targets());
        assert_eq!(
            summary(&plan),
            [("mx1.a.test".into(), TlsPolicy::Verified, "mta-sts", None)]
        );
        assert_eq!(plan.skipped, ["mx.other.test"]);
        let plan = plan_sts(TlsPolicy::Opportunistic, Some(&p), true, targets());
        assert_eq!(plan.plans.len(), 2);
        assert_eq!(plan.plans[1].1.source, PlanSource::Domain);
        assert!(plan.skipped.is_empty());
    }

    #[test]
    fn enforce_naming_no_target_leaves_nothing_to_deliver_to() {
        let p = policy(Mode::Enforce, &["mx.elsewhere.test"]);
        let plan = plan_sts(
            TlsPolicy::Opportunistic,
            Some(&p),
            false,
            vec![target("mx.a.test")],
        );
        assert!(plan.plans.is_empty());
        assert_eq!(plan.skipped, ["mx.a.test"]);
    }

    #[test]
    fn testing_verifies_named_hosts_with_a_fallback_and_reports_the_others() {
        let p = policy(Mode::Testing, &["mx1.a.test"]);
        let plan = plan_sts(
            TlsPolicy::Required,
            Some(&p),
            false,
            vec![target("mx1.a.test"), target("mx2.a.test")],
        );
        assert_eq!(
            summary(&plan),
            [
                (
                    "mx1.a.test".into(),
                    TlsPolicy::Verified,
                    "mta-sts",
                    Some(TlsPolicy::Required)
                ),
                ("mx2.a.test".into(), TlsPolicy::Required, "domain", None),
            ]
        );
        assert_eq!(plan.testing_misses, ["mx2.a.test"]);
    }

    #[test]
    fn a_raised_policy_is_labelled_by_its_source_and_a_fallback_by_its_value() {
        let sts = HopPlan::mta_sts(Some(TlsPolicy::Opportunistic));
        assert_eq!(sts.label(TlsPolicy::Verified), "mta-sts");
        assert_eq!(
            sts.label(TlsPolicy::Opportunistic),
            TlsPolicy::Opportunistic.to_string()
        );
        let own = HopPlan::own(TlsPolicy::Required);
        assert_eq!(
            own.label(TlsPolicy::Required),
            TlsPolicy::Required.to_string()
        );
    }
}

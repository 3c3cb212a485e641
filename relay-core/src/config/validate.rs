//! The checks a configuration must pass before anything starts: every
//! value in range, every file readable, every combination meaningful,
//! each refusal naming its key.

use super::*;

impl Config {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |s: String| Err(ConfigError::Invalid(s));
        if let Err(e) = crate::dns::trust_anchors(&self.dns.dnssec_trust_anchors) {
            return invalid(format!("dns.dnssec_trust_anchors: {e}"));
        }
        if let Some(ca) = &self.delivery.tls_ca_file {
            if let Err(e) = crate::delivery::transport::load_ca_file(ca) {
                return invalid(format!("delivery.tls_ca_file: {e}"));
            }
        }
        if let Some(a) = &self.admin {
            if a.token.is_empty() && !a.listen.ip().is_loopback() {
                return invalid(format!(
                    "admin.token must be set when admin.listen ({}) is not a loopback address: anyone who reaches it could flush, hold and delete mail",
                    a.listen
                ));
            }
            if !a.token.is_empty()
                && (a.token.len() < 16 || a.token.chars().any(|c| !c.is_ascii_graphic()))
            {
                return invalid(
                    "admin.token must be at least 16 printable ASCII characters without spaces"
                        .into(),
                );
            }
        }
        if !self.postmaster.is_empty() {
            self.postmaster()?;
        }
        if self.history.keep < Duration::from_secs(86_400) {
            return invalid(format!(
                "history.keep must be at least a day, not {}",
                humantime::format_duration(self.history.keep)
            ));
        }
        if !(Duration::from_secs(1)..=Duration::from_secs(60))
            .contains(&self.history.sample_interval)
        {
            return invalid("history.sample_interval must be between 1s and 60s".into());
        }
        if let Some(f) = &self.filter {
            self.filter_settings()?;
            if f.timeout.is_zero() || f.max_concurrent == 0 {
                return invalid("filter.timeout and filter.max_concurrent must be positive".into());
            }
        }
        if self.smtp.listen.is_empty() {
            return invalid("smtp.listen must name at least one address".into());
        }
        if self.smtp.max_command_line < 512 {
            return invalid(
                "smtp.max_command_line must be at least 512 (RFC 5321 §4.5.3.1.4)".into(),
            );
        }
        if self.smtp.max_recipients == 0
            || self.smtp.max_connections == 0
            || self.smtp.max_connections_per_ip == 0
        {
            return invalid(
                "smtp.max_recipients, max_connections and max_connections_per_ip must be positive"
                    .into(),
            );
        }
        if self.smtp.proxy_protocol && self.smtp.trusted_proxies.is_empty() {
            return invalid("smtp.proxy_protocol = true needs smtp.trusted_proxies (the load balancer's addresses)".into());
        }
        if self.smtp.memory_budget < self.smtp.max_message_size {
            return invalid(format!(
                "smtp.memory_budget ({}) must be at least smtp.max_message_size ({}), or no message of the largest size could ever be received",
                self.smtp.memory_budget, self.smtp.max_message_size
            ));
        }
        if self.smtp.max_errors == 0 {
            return invalid("smtp.max_errors must be positive".into());
        }
        if self.smtp.idle_timeout.is_zero() {
            return invalid("smtp.idle_timeout must be positive".into());
        }
        let g = &self.greylist;
        if g.ipv4_prefix > 32 || g.ipv6_prefix > 128 {
            return invalid(
                "greylist.ipv4_prefix must be at most 32 and ipv6_prefix at most 128".into(),
            );
        }
        if g.retry_window < g.delay {
            return invalid("greylist.retry_window must be at least greylist.delay".into());
        }
        if self.dnsbl.self_test_interval.is_zero() {
            return invalid("dnsbl.self_test_interval must be positive".into());
        }
        for z in self.dnsbl.zones.iter().chain(&self.dnsbl.allow_zones) {
            if crate::address::DomainName::parse(&z.zone).is_err() {
                return invalid(format!(
                    "dnsbl zone {:?} is not a valid domain name",
                    z.zone
                ));
            }
        }
        if self.aws.attempt_lease < Duration::from_secs(1) || self.aws.sweep_interval.is_zero() {
            return invalid("aws.attempt_lease and aws.sweep_interval must be positive".into());
        }
        let d = &self.delivery;
        if d.retry_initial.is_zero() || d.retry_max < d.retry_initial {
            return invalid(
                "delivery.retry_initial must be positive and at most delivery.retry_max".into(),
            );
        }
        if d.max_connections_per_destination == 0 || d.max_connections == 0 || d.mx_port == 0 {
            return invalid("delivery.max_connections, max_connections_per_destination and mx_port must be positive".into());
        }
        if d.queue_lifetime > MAX_QUEUE_LIFETIME {
            return invalid("delivery.queue_lifetime must be at most 60d".into());
        }
        if d.probe_interval.is_zero() || d.poll_interval.is_zero() {
            return invalid("delivery.probe_interval and poll_interval must be positive".into());
        }
        let v = &self.recipient_verify;
        if v.valid_ttl.is_zero() || v.invalid_ttl.is_zero() || v.timeout.is_zero() {
            return invalid(
                "recipient_verify.valid_ttl, invalid_ttl and timeout must be positive".into(),
            );
        }
        if v.concurrency == 0 {
            return invalid("recipient_verify.concurrency must be at least 1".into());
        }
        let rate_ok = |r: f64| r.is_finite() && r >= 0.0;
        if !rate_ok(v.callouts_per_second_per_domain) || !rate_ok(v.callouts_per_second_per_client)
        {
            return invalid(
                "recipient_verify.callouts_per_second_per_domain and _per_client must be 0 (no limit) or positive".into(),
            );
        }
        if self.smtp.unknown_recipient_limit > 0
            && (self.smtp.unknown_recipient_window.is_zero()
                || self.smtp.unknown_recipient_penalty.is_zero())
        {
            return invalid(
                "smtp.unknown_recipient_window and unknown_recipient_penalty must be positive"
                    .into(),
            );
        }
        if !(d.bounce_storm_ratio > 0.0 && d.bounce_storm_ratio <= 1.0)
            || d.bounce_storm_window.is_zero()
        {
            return invalid(
                "delivery.bounce_storm_ratio must be in (0, 1] and bounce_storm_window positive"
                    .into(),
            );
        }
        if !self.alerts.webhook.is_empty() {
            crate::alerts::Webhook::parse(&self.alerts.webhook).map_err(ConfigError::Invalid)?;
        }
        if self.alerts.queue_age.is_zero() {
            return invalid("alerts.queue_age must be positive".into());
        }
        for (dest, hop) in &d.routes {
            crate::domain::validate_primary(hop)
                .map_err(|e| ConfigError::Invalid(format!("delivery.routes.{dest}: {e}")))?;
        }
        if crate::address::DomainName::parse(&self.hostname).is_err() {
            return invalid(format!(
                "hostname {:?} is not a valid host name",
                self.hostname
            ));
        }
        for d in &self.domains {
            d.to_domain()
                .map_err(|e| ConfigError::Invalid(format!("[[domain]] {}: {e}", d.name)))?;
            if d.queue_lifetime
                .is_some_and(|l| l.is_zero() || l > MAX_QUEUE_LIFETIME)
            {
                return invalid(format!(
                    "[[domain]] {}: queue_lifetime must be positive and at most 60d",
                    d.name
                ));
            }
            if let Some(why) = d
                .max_message_size
                .and_then(|m| crate::admin::message_size_error(m, self.smtp.max_message_size))
            {
                return invalid(format!("[[domain]] {}: {why}", d.name));
            }
        }
        Ok(())
    }
}

//! The configuration turned into each subsystem's own settings: the only
//! place where sections become runtime types.

use super::*;

impl From<&GreylistConfig> for GreylistSettings {
    fn from(g: &GreylistConfig) -> Self {
        GreylistSettings {
            delay: g.delay,
            retry_window: g.retry_window,
            max_age: g.max_age,
            ipv4_prefix: g.ipv4_prefix,
            ipv6_prefix: g.ipv6_prefix,
            auto_whitelist_after: g.auto_whitelist_after,
            whitelist_clients: g.whitelist_clients.clone(),
            whitelist_sender_domains: g
                .whitelist_sender_domains
                .iter()
                .map(|d| d.trim_end_matches('.').to_lowercase())
                .collect(),
            whitelist_recipients: g
                .whitelist_recipients
                .iter()
                .map(|r| r.to_lowercase())
                .collect(),
        }
    }
}

impl From<&Config> for EngineConfig {
    fn from(config: &Config) -> Self {
        let d = &config.delivery;
        EngineConfig {
            me: crate::delivery::route::SelfIdentity {
                hostname: config.hostname.clone(),
                listen: config.smtp.listen.clone(),
                mx_port: d.mx_port,
            },
            routes: d.routes.clone(),
            retry_initial: d.retry_initial,
            retry_max: d.retry_max,
            queue_lifetime: d.queue_lifetime,
            timeouts: Timeouts {
                connect: d.connect_timeout,
                command: d.command_timeout,
                // RFC 5321 §4.5.3.2.5 asks for at least 3 minutes per data
                // block; the command timeout (5 minutes) is used.
                data_block: d.command_timeout,
                data_final: d.data_timeout,
            },
            opportunistic_tls: d.opportunistic_tls,
            tls_ca_file: d.tls_ca_file.clone(),
            mta_sts: d.mta_sts,
            mta_sts_port: d.mta_sts_port,
            dane: d.dane,
            bounce_headers_max: usize::try_from(d.bounce_headers_max).unwrap_or(usize::MAX),
            delay_warning: d.delay_warning,
            storm: crate::delivery::storm::StormSettings {
                min_recipients: d.bounce_storm_min_recipients,
                ratio: d.bounce_storm_ratio,
                window: d.bounce_storm_window,
            },
        }
    }
}

impl From<&StorageConfig> for crate::store::local::StoreOptions {
    fn from(s: &StorageConfig) -> Self {
        crate::store::local::StoreOptions {
            reserve_space: s.reserve_space,
            min_free_space: s.min_free_space,
        }
    }
}

#[cfg(feature = "aws")]
impl From<&AwsConfig> for crate::store::aws::AwsNames {
    fn from(aws: &AwsConfig) -> Self {
        crate::store::aws::AwsNames {
            domains_table: aws.domains_table.clone(),
            greylist_table: aws.greylist_table.clone(),
            bucket: aws.bucket.clone(),
            queue_url: aws.queue_url.clone(),
            queue_name: aws.queue_name.clone(),
            queue_table: aws.queue_table.clone(),
            dead_letter_queue_url: aws.dead_letter_queue_url.clone(),
        }
    }
}

impl From<&Config> for crate::recipients::VerifySettings {
    fn from(config: &Config) -> Self {
        let v = &config.recipient_verify;
        crate::recipients::VerifySettings {
            valid_ttl: v.valid_ttl,
            invalid_ttl: v.invalid_ttl,
            timeout: v.timeout,
            concurrency: v.concurrency,
            primary_up_fresh: config.delivery.primary_up_fresh,
        }
    }
}

impl From<&Config> for crate::harvest::HarvestSettings {
    fn from(config: &Config) -> Self {
        let (s, v) = (&config.smtp, &config.recipient_verify);
        crate::harvest::HarvestSettings {
            unknown_recipient_limit: s.unknown_recipient_limit,
            unknown_recipient_window: s.unknown_recipient_window,
            penalty: s.unknown_recipient_penalty,
            client_callout_rate: v.callouts_per_second_per_client,
            client_callout_burst: f64::from(v.callout_burst_per_client),
            domain_callout_rate: v.callouts_per_second_per_domain,
        }
    }
}

impl From<&Config> for WorkerConfig {
    fn from(config: &Config) -> Self {
        let d = &config.delivery;
        WorkerConfig {
            max_per_destination: d.max_connections_per_destination,
            max_total: d.max_connections,
            poll_interval: d.poll_interval,
            probe_interval: d.probe_interval,
        }
    }
}

/// The session's limits and identity. What depends on the running process
/// (`tls_available`, `etrn_available`, `admit_mail`) is off here; the
/// server turns it on for what it has.
impl From<&Config> for SessionConfig {
    fn from(config: &Config) -> Self {
        let s = &config.smtp;
        SessionConfig {
            hostname: config.hostname.clone(),
            max_message_size: s.max_message_size,
            max_recipients: s.max_recipients,
            max_command_line: s.max_command_line,
            max_errors: s.max_errors,
            postmaster: config.postmaster().ok().map(|(address, domain)| {
                crate::queue::AcceptedRecipient {
                    dsn: Default::default(),
                    address,
                    domain,
                }
            }),
            idle_timeout: s.idle_timeout,
            data_timeout: s.data_timeout,
            ..SessionConfig::DEFAULT
        }
    }
}

impl DnsblZone {
    pub fn to_zone(&self) -> crate::dnsbl::ZoneConfig {
        crate::dnsbl::ZoneConfig {
            zone: self.zone.trim_end_matches('.').to_lowercase(),
            weight: self.weight,
            codes: self.codes.clone(),
        }
    }
}

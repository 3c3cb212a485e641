//! The configuration file (TOML) with `BACKUPMX_*` environment overrides.
//!
//! Strict: unknown keys are errors, durations are typed (`90s`, `5m`, `2d`),
//! and every limit has a default here rather than in code that uses it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::delivery::transport::Timeouts;
use crate::delivery::worker::WorkerConfig;
use crate::delivery::EngineConfig;
use crate::domain::{Domain, DomainError};
use crate::greylist::GreylistSettings;
use crate::smtp::SessionConfig;

mod convert;
mod diagnostics;
mod validate;

pub use crate::queue::MAX_QUEUE_LIFETIME;
use diagnostics::describe;

/// Days the AWS bucket keeps a message body before its lifecycle rule
/// deletes it: past [`MAX_QUEUE_LIFETIME`] with a margin, so no body goes
/// before its message was delivered or bounced. The SAM template has the
/// same number (tests/tests/infra.rs checks it).
pub const AWS_BODY_EXPIRATION_DAYS: u64 = 62;

const SESSION_DEFAULTS: SessionConfig = SessionConfig::DEFAULT;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    #[error("{0}")]
    Parse(String),
    #[error("{0}")]
    Invalid(String),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Our host name: greeting, Received header, MX self-detection.
    pub hostname: String,
    /// Where mail to the bare `postmaster` (RFC 5321 §4.5.1) goes; empty:
    /// `postmaster@HOSTNAME`.
    pub postmaster: String,
    pub smtp: SmtpConfig,
    pub tls: Option<TlsConfig>,
    pub storage: StorageConfig,
    pub aws: AwsConfig,
    pub metrics: Option<MetricsConfig>,
    pub dns: DnsConfig,
    pub greylist: GreylistConfig,
    pub dnsbl: DnsblConfig,
    pub delivery: DeliveryConfig,
    /// Callouts and their cache (`recipient_verify = "callout"` domains).
    pub recipient_verify: RecipientVerifyConfig,
    /// Alerts to a webhook.
    pub alerts: AlertsConfig,
    /// The status page and admin API (`[admin] listen`); absent: none.
    pub admin: Option<AdminConfig>,
    /// The content filter (`[filter] rspamd`); absent: none.
    pub filter: Option<FilterConfig>,
    /// TLS reports (RFC 8460) on our deliveries to primaries.
    pub tlsrpt: TlsRptConfig,
    /// The outage history kept per domain.
    pub history: HistoryConfig,
    /// `[[domain]]` entries, upserted into the registry at start.
    #[serde(rename = "domain")]
    pub domains: Vec<DomainConfig>,
}

/// `[recipient_verify]`: how long callout verdicts count, and how hard a
/// primary may be asked.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RecipientVerifyConfig {
    /// How long "the primary accepts this recipient" is remembered.
    #[serde(with = "humantime_serde")]
    pub valid_ttl: Duration,
    /// How long "the primary does not know this recipient" is remembered.
    #[serde(with = "humantime_serde")]
    pub invalid_ttl: Duration,
    /// Longest callout (or defer-mode probe); past it the recipient is
    /// accepted and the primary counts as down.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Callout connections to one primary at once.
    pub concurrency: usize,
    /// Callouts to one domain's primary per second, all clients together;
    /// past it the recipient gets `451 4.7.1`, not a verdict. 0: no limit.
    pub callouts_per_second_per_domain: f64,
    /// Callouts one client may cause per second (0: no limit), and how
    /// many at once after a quiet spell.
    pub callouts_per_second_per_client: f64,
    pub callout_burst_per_client: u32,
}

impl Default for RecipientVerifyConfig {
    fn default() -> Self {
        RecipientVerifyConfig {
            valid_ttl: Duration::from_secs(7 * 86_400),
            invalid_ttl: Duration::from_secs(3600),
            timeout: Duration::from_secs(10),
            concurrency: 4,
            callouts_per_second_per_domain: 20.0,
            callouts_per_second_per_client: 5.0,
            callout_burst_per_client: 20,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SmtpConfig {
    pub listen: Vec<SocketAddr>,
    pub max_message_size: u64,
    pub max_recipients: usize,
    /// Longest command line including CRLF (RFC 5321 §4.5.3.1.4).
    pub max_command_line: usize,
    /// Errors before the session is closed (Postfix's hard limit is 20).
    pub max_errors: u32,
    /// RFC 5321 §4.5.3.2: at least 5 minutes.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Longest a DATA phase may take (slow-sender defence).
    #[serde(with = "humantime_serde")]
    pub data_timeout: Duration,
    pub max_connections: usize,
    pub max_connections_per_ip: usize,
    /// How long sessions in progress may run on after SIGTERM.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    pub proxy_protocol: bool,
    pub trusted_proxies: Vec<IpNet>,
    /// How long a connection may take to send its PROXY header.
    #[serde(with = "humantime_serde")]
    pub proxy_header_timeout: Duration,
    /// Bytes of message data all sessions together may hold in memory
    /// while receiving; past it, `452 4.3.1` at MAIL (for a declared
    /// `SIZE=`) or at the end of DATA, rather than growth.
    pub memory_budget: u64,
    /// Unknown-user refusals one client (an IPv4 address, an IPv6 /64)
    /// may collect within `unknown_recipient_window`, across sessions,
    /// before it is refused for `unknown_recipient_penalty`: `421 4.7.0`
    /// to new sessions, `451 4.7.1` to further recipients. 0: no limit.
    pub unknown_recipient_limit: u32,
    #[serde(with = "humantime_serde")]
    pub unknown_recipient_window: Duration,
    #[serde(with = "humantime_serde")]
    pub unknown_recipient_penalty: Duration,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM file, or `s3://bucket/key` (the AWS shape: a private object,
    /// fetched with the task's role).
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Re-read the certificate and key this often (renewals without a
    /// SIGHUP); absent: every hour when either comes from S3, else only on
    /// SIGHUP.
    #[serde(default, with = "humantime_serde")]
    pub reload_interval: Option<Duration>,
}

impl TlsConfig {
    /// How often the certificate is re-read, if at all.
    pub fn reload_every(&self) -> Option<Duration> {
        let from_s3 = [&self.cert, &self.key]
            .iter()
            .any(|p| p.to_string_lossy().starts_with("s3://"));
        match self.reload_interval {
            Some(d) if d.is_zero() => None,
            Some(d) => Some(d),
            None if from_s3 => Some(Duration::from_secs(3600)),
            None => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    Local,
    Aws,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    pub backend: Backend,
    pub data_dir: PathBuf,
    /// Free bytes on the data directory's filesystem below which new mail
    /// is refused with `452 4.3.1` at MAIL (Postfix's `queue_minfree`); a
    /// declared `SIZE=` must fit above it too.
    pub min_free_space: u64,
    /// Bytes preallocated in the data directory and given up when the disk
    /// is full, so that deliveries can still be recorded and `queue delete`
    /// still works; 0 = none.
    pub reserve_space: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AwsConfig {
    pub domains_table: String,
    pub greylist_table: String,
    pub bucket: String,
    /// Empty: looked up by `queue_name`.
    pub queue_url: String,
    pub queue_name: String,
    /// The queue records (per-recipient state, next attempt, version):
    /// updated only conditionally, so no writer overwrites another's.
    pub queue_table: String,
    /// Empty: the one the queue's redrive policy names.
    pub dead_letter_queue_url: String,
    /// A record this long past its next attempt, with no attempt under
    /// way, is given a new SQS message by the sweeper (its own was lost).
    #[serde(with = "humantime_serde")]
    pub orphan_after: Duration,
    /// How long a claimed attempt owns a record; longer than any attempt
    /// can run (the function's 15-minute limit).
    #[serde(with = "humantime_serde")]
    pub attempt_lease: Duration,
    /// How often `retry-fn poll` runs the sweeper.
    #[serde(with = "humantime_serde")]
    pub sweep_interval: Duration,
}

/// `[filter]`: rspamd at the edge, for every domain that does not say
/// `filter = false`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilterConfig {
    /// rspamd's normal worker, `http://host:port`.
    pub rspamd: String,
    /// Longest a scan may take (waiting for a free slot included).
    #[serde(with = "humantime_serde", default = "filter_timeout")]
    pub timeout: Duration,
    /// When rspamd cannot answer: `accept` (unscanned, counted and logged)
    /// or `tempfail` (`451 4.7.1`).
    #[serde(default)]
    pub on_error: crate::filter::OnError,
    /// Messages at once with rspamd.
    #[serde(default = "filter_max_concurrent")]
    pub max_concurrent: usize,
}

fn filter_timeout() -> Duration {
    Duration::from_secs(10)
}

fn filter_max_concurrent() -> usize {
    32
}

impl Config {
    /// The filter's settings, if `[filter]` is set.
    pub fn filter_settings(&self) -> Result<Option<crate::filter::FilterSettings>, ConfigError> {
        let Some(f) = &self.filter else {
            return Ok(None);
        };
        let (authority, base_path) = crate::filter::parse_url(&f.rspamd)
            .map_err(|e| ConfigError::Invalid(format!("filter.rspamd: {e}")))?;
        Ok(Some(crate::filter::FilterSettings {
            authority,
            base_path,
            timeout: f.timeout,
            on_error: f.on_error,
            max_concurrent: f.max_concurrent,
            mta_name: self.hostname.clone(),
        }))
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    pub listen: SocketAddr,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DnsConfig {
    /// Nameservers (`ip:port`); empty uses the system resolver.
    pub servers: Vec<SocketAddr>,
    /// Per-query timeout.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// DNSKEYs (`corp.example. 257 3 13 BASE64`; without a name, a root
    /// key) DANE's validating lookups start from; empty: the root zone's
    /// keys.
    pub dnssec_trust_anchors: Vec<String>,
}

impl Default for DnsConfig {
    fn default() -> Self {
        DnsConfig {
            servers: Vec::new(),
            timeout: Duration::from_secs(5),
            dnssec_trust_anchors: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GreylistConfig {
    pub enabled: bool,
    #[serde(with = "humantime_serde")]
    pub delay: Duration,
    #[serde(with = "humantime_serde")]
    pub retry_window: Duration,
    #[serde(with = "humantime_serde")]
    pub max_age: Duration,
    /// Client network sizes a triplet is keyed by.
    pub ipv4_prefix: u8,
    pub ipv6_prefix: u8,
    /// Passes (one an hour at most) before a client network is whitelisted; 0 = never.
    pub auto_whitelist_after: u32,
    pub whitelist_clients: Vec<IpNet>,
    pub whitelist_sender_domains: Vec<String>,
    pub whitelist_recipients: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DnsblZone {
    pub zone: String,
    #[serde(default = "one")]
    pub weight: u32,
    /// Answers that count as a listing (e.g. `["127.0.0.2"]`); empty = any.
    #[serde(default)]
    pub codes: Vec<std::net::Ipv4Addr>,
}

fn one() -> u32 {
    1
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DnsblConfig {
    pub zones: Vec<DnsblZone>,
    pub threshold: u32,
    /// DNS allowlists: a listed client skips greylisting.
    pub allow_zones: Vec<DnsblZone>,
    /// Shortest time an answer is cached.
    #[serde(with = "humantime_serde")]
    pub min_cache_ttl: Duration,
    /// How often each zone is checked against RFC 5782's test addresses.
    #[serde(with = "humantime_serde")]
    pub self_test_interval: Duration,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeliveryConfig {
    #[serde(with = "humantime_serde")]
    pub retry_initial: Duration,
    #[serde(with = "humantime_serde")]
    pub retry_max: Duration,
    #[serde(with = "humantime_serde")]
    pub queue_lifetime: Duration,
    /// Static next hop per destination domain.
    pub routes: std::collections::BTreeMap<String, String>,
    /// Port MX hosts are contacted on.
    pub mx_port: u16,
    /// Connections at once to one destination domain.
    pub max_connections_per_destination: usize,
    /// Delivery attempts at once in all.
    pub max_connections: usize,
    /// How often a destination that was down is probed (connect + EHLO).
    #[serde(with = "humantime_serde")]
    pub probe_interval: Duration,
    /// How often the queue is checked for due entries.
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
    /// Clients allowed to ETRN any hosted domain, besides its primaries.
    pub etrn_networks: Vec<IpNet>,
    /// Use STARTTLS with next hops that offer it.
    pub opportunistic_tls: bool,
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Greeting and command replies (RFC 5321 §4.5.3.2: 5 minutes).
    #[serde(with = "humantime_serde")]
    pub command_timeout: Duration,
    /// The reply after the end of data (RFC 5321 §4.5.3.2: 10 minutes).
    #[serde(with = "humantime_serde")]
    pub data_timeout: Duration,
    /// Most bytes of the original message's headers a DSN returns (the
    /// rest is cut at a line end): bounces go to possibly forged senders.
    pub bounce_headers_max: u64,
    /// Send one "delayed" notice (RFC 3464 `Action: delayed`) for a message
    /// still queued this long after it arrived, to recipients that asked
    /// for DELAY or did not say; absent: never (the default).
    #[serde(default, with = "humantime_serde")]
    pub delay_warning: Option<Duration>,
    /// How long an observation of a primary (probe, callout, delivery)
    /// counts: `defer_while_primary_up` defers only on a fresh "up".
    #[serde(with = "humantime_serde")]
    pub primary_up_fresh: Duration,
    /// Bounce-storm guard: distinct recipients answered during a drain
    /// before it may trip (0: off)…
    pub bounce_storm_min_recipients: usize,
    /// …the share of them refused (5xx) that trips it…
    pub bounce_storm_ratio: f64,
    /// …and how long a drain lasts after the primary answers again.
    #[serde(with = "humantime_serde")]
    pub bounce_storm_window: Duration,
    /// PEM certificates trusted besides the Web PKI roots for hops whose
    /// certificate must be verified (`tls = "verified"`, MTA-STS): a
    /// private CA.
    pub tls_ca_file: Option<PathBuf>,
    /// Honour destination domains' MTA-STS policies (RFC 8461).
    pub mta_sts: bool,
    /// The HTTPS port MTA-STS policies are fetched from (443).
    pub mta_sts_port: u16,
    /// Honour DNSSEC-validated TLSA records of next hops (DANE, RFC 7672).
    /// Needs nameservers that return DNSSEC records (a validating or
    /// DNSSEC-aware resolver).
    pub dane: bool,
}

/// `[alerts]`: where alerts go.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AlertsConfig {
    /// `http://HOST:PORT/PATH` receiving JSON POSTs; empty: no alerts.
    pub webhook: String,
    /// Alert when the oldest queued message is older than this.
    #[serde(with = "humantime_serde")]
    pub queue_age: Duration,
}

/// `[tlsrpt]`: daily TLS reports (RFC 8460) to the primaries' domains
/// that publish `_smtp._tls` with `rua=`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsRptConfig {
    /// Count delivery sessions and send the reports.
    pub enabled: bool,
    /// How often due reports (whole UTC days) are looked for and sent.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// `organization-name` in reports; empty: the hostname.
    pub organization: String,
    /// `contact-info` in reports; empty: `postmaster@HOSTNAME`.
    pub contact: String,
}

impl Default for TlsRptConfig {
    fn default() -> Self {
        TlsRptConfig {
            enabled: false,
            interval: Duration::from_secs(86_400),
            organization: String::new(),
            contact: String::new(),
        }
    }
}

/// `[history]`: each domain's outages (when its primary was down, what
/// we held and refused, how the drain went) and queue-depth samples.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HistoryConfig {
    /// How long an ended, drained outage is kept (samples: 7 days).
    #[serde(with = "humantime_serde")]
    pub keep: Duration,
    /// How often the embedded server samples each domain's queue depth
    /// (one point per domain and minute is kept; AWS: the sweeper, each
    /// minute).
    #[serde(with = "humantime_serde")]
    pub sample_interval: Duration,
}

impl Default for HistoryConfig {
    fn default() -> Self {
        HistoryConfig {
            keep: Duration::from_secs(90 * 86_400),
            sample_interval: Duration::from_secs(60),
        }
    }
}

/// `[admin]`: the status page and JSON API.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Where the HTTP listener binds.
    pub listen: SocketAddr,
    /// Bearer token every request must present; may be empty only when
    /// `listen` is a loopback address.
    #[serde(default)]
    pub token: String,
}

impl AdminConfig {
    /// The token requests must carry, if one is configured.
    pub fn token(&self) -> Option<&str> {
        Some(self.token.as_str()).filter(|t| !t.is_empty())
    }
}

impl Default for AlertsConfig {
    fn default() -> Self {
        AlertsConfig {
            webhook: String::new(),
            queue_age: Duration::from_secs(3600),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DomainConfig {
    pub name: String,
    #[serde(default)]
    pub primary: Vec<String>,
    #[serde(default)]
    pub recipients: Option<Vec<String>>,
    #[serde(default)]
    pub greylist: Option<bool>,
    #[serde(default)]
    pub max_message_size: Option<u64>,
    #[serde(default)]
    pub enabled: Option<bool>,
    #[serde(default)]
    pub recipient_verify: Option<crate::domain::RecipientVerify>,
    #[serde(default)]
    pub defer_while_primary_up: Option<bool>,
    /// `true` holds the domain's mail, `false` releases it; absent leaves
    /// what `domain set` decided.
    #[serde(default)]
    pub hold: Option<bool>,
    /// This domain's queue lifetime (at most 60 d).
    #[serde(default, with = "humantime_serde")]
    pub queue_lifetime: Option<Duration>,
    /// How the hop to the primary must be protected.
    #[serde(default)]
    pub tls: Option<crate::domain::TlsPolicy>,
    /// `false`: this domain's mail is not scanned by `[filter]`.
    #[serde(default)]
    pub filter: Option<bool>,
    /// `false`: the bounce-storm guard does not watch this domain.
    #[serde(default)]
    pub bounce_storm_guard: Option<bool>,
    /// Sender authentication: `off`, `annotate` (default) or `enforce`.
    #[serde(default)]
    pub auth: Option<crate::domain::AuthPolicy>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            hostname: system_hostname(),
            postmaster: String::new(),
            smtp: SmtpConfig::default(),
            tls: None,
            storage: StorageConfig::default(),
            aws: AwsConfig::default(),
            metrics: None,
            dns: DnsConfig::default(),
            greylist: GreylistConfig::default(),
            dnsbl: DnsblConfig::default(),
            delivery: DeliveryConfig::default(),
            recipient_verify: RecipientVerifyConfig::default(),
            alerts: AlertsConfig::default(),
            admin: None,
            filter: None,
            tlsrpt: TlsRptConfig::default(),
            history: HistoryConfig::default(),
            domains: Vec::new(),
        }
    }
}

impl Default for SmtpConfig {
    fn default() -> Self {
        SmtpConfig {
            listen: vec![SocketAddr::from(([127, 0, 0, 1], 2525))],
            // The session's limits have their defaults in one place: the
            // protocol crate's, which its tests and fuzzers use too.
            max_message_size: SESSION_DEFAULTS.max_message_size,
            max_recipients: SESSION_DEFAULTS.max_recipients,
            max_command_line: SESSION_DEFAULTS.max_command_line,
            max_errors: SESSION_DEFAULTS.max_errors,
            idle_timeout: SESSION_DEFAULTS.idle_timeout,
            data_timeout: SESSION_DEFAULTS.data_timeout,
            max_connections: 10_000,
            max_connections_per_ip: 50,
            shutdown_grace: Duration::from_secs(30),
            proxy_protocol: false,
            trusted_proxies: Vec::new(),
            proxy_header_timeout: Duration::from_secs(5),
            memory_budget: 256 * 1024 * 1024,
            unknown_recipient_limit: 20,
            unknown_recipient_window: Duration::from_secs(600),
            unknown_recipient_penalty: Duration::from_secs(600),
        }
    }
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            backend: Backend::Local,
            data_dir: PathBuf::from("./data"),
            min_free_space: crate::store::local::StoreOptions::default().min_free_space,
            reserve_space: crate::store::local::StoreOptions::default().reserve_space,
        }
    }
}

impl Default for AwsConfig {
    fn default() -> Self {
        AwsConfig {
            domains_table: "backupmx-domains".into(),
            greylist_table: "backupmx-greylist".into(),
            bucket: "backupmx-messages".into(),
            queue_url: String::new(),
            queue_name: crate::store::DEFAULT_QUEUE_NAME.into(),
            queue_table: "backupmx-queue-records".into(),
            dead_letter_queue_url: String::new(),
            orphan_after: Duration::from_secs(300),
            attempt_lease: Duration::from_secs(1200),
            sweep_interval: Duration::from_secs(60),
        }
    }
}

impl Default for GreylistConfig {
    fn default() -> Self {
        GreylistConfig {
            enabled: true,
            delay: Duration::from_secs(300),
            retry_window: Duration::from_secs(2 * 86_400),
            max_age: Duration::from_secs(35 * 86_400),
            ipv4_prefix: 24,
            ipv6_prefix: 64,
            auto_whitelist_after: 5,
            whitelist_clients: Vec::new(),
            whitelist_sender_domains: Vec::new(),
            whitelist_recipients: Vec::new(),
        }
    }
}

impl Default for DnsblConfig {
    fn default() -> Self {
        DnsblConfig {
            zones: Vec::new(),
            threshold: 1,
            allow_zones: Vec::new(),
            min_cache_ttl: Duration::from_secs(60),
            self_test_interval: Duration::from_secs(1800),
        }
    }
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        DeliveryConfig {
            retry_initial: Duration::from_secs(60),
            retry_max: Duration::from_secs(900),
            queue_lifetime: Duration::from_secs(5 * 86_400),
            routes: Default::default(),
            mx_port: 25,
            max_connections_per_destination: 10,
            max_connections: 100,
            probe_interval: Duration::from_secs(5),
            poll_interval: Duration::from_secs(1),
            etrn_networks: Vec::new(),
            opportunistic_tls: true,
            connect_timeout: Duration::from_secs(30),
            command_timeout: Duration::from_secs(300),
            data_timeout: Duration::from_secs(600),
            bounce_headers_max: 50 * 1024,
            delay_warning: None,
            primary_up_fresh: Duration::from_secs(300),
            bounce_storm_min_recipients: 10,
            bounce_storm_ratio: 0.9,
            bounce_storm_window: Duration::from_secs(600),
            tls_ca_file: None,
            mta_sts: true,
            mta_sts_port: 443,
            dane: false,
        }
    }
}

fn system_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

impl Config {
    /// Parses TOML alone (no environment): for tests.
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        let cfg: Config = Figment::from(Serialized::defaults(Config::default()))
            .merge(Toml::string(text))
            .extract()
            .map_err(|e| ConfigError::Parse(describe(e, None, Some(text))))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Reads `path` (if given; else `backupmx.toml` when it exists; else the
    /// defaults), then applies `BACKUPMX_*` variables (`__` separates
    /// sections: `BACKUPMX_SMTP__LISTEN`).
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let mut fig = Figment::from(Serialized::defaults(Config::default()));
        let default = Path::new("backupmx.toml");
        let file = match path {
            Some(p) => Some(p),
            None if default.exists() => Some(default),
            None => None,
        };
        let text = match file {
            Some(p) => Some(std::fs::read_to_string(p).map_err(|e| {
                ConfigError::Parse(format!("cannot read config file {}: {e}", p.display()))
            })?),
            None => None,
        };
        if let Some(t) = &text {
            fig = fig.merge(Toml::string(t));
        }
        let cfg: Config = fig
            .merge(Env::prefixed("BACKUPMX_").split("__"))
            .extract()
            .map_err(|e| ConfigError::Parse(describe(e, file, text.as_deref())))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// The address `RCPT TO:<postmaster>` is delivered to, and its domain.
    pub fn postmaster(&self) -> Result<(String, crate::address::DomainName), ConfigError> {
        let address = if self.postmaster.is_empty() {
            format!("postmaster@{}", self.hostname)
        } else {
            self.postmaster.clone()
        };
        let mailbox = crate::address::parse_mailbox(&address)
            .ok()
            .filter(|m| m.domain().is_some())
            .ok_or_else(|| {
                ConfigError::Invalid(format!(
                    "postmaster {address:?} is not an address with a domain (set postmaster = \"you@example.net\")"
                ))
            })?;
        let domain = mailbox
            .domain()
            .cloned()
            .ok_or_else(|| ConfigError::Invalid(address.clone()))?;
        Ok((mailbox.to_string(), domain))
    }
}

impl DomainConfig {
    pub fn to_domain(&self) -> Result<Domain, DomainError> {
        let mut d = Domain::from_parts(&self.name, &self.primary, self.recipients.as_deref())?;
        if let Some(g) = self.greylist {
            d.greylist = g;
        }
        d.max_message_size = self.max_message_size;
        if let Some(e) = self.enabled {
            d.enabled = e;
        }
        if let Some(v) = self.recipient_verify {
            d.recipient_verify = v;
        }
        if let Some(v) = self.defer_while_primary_up {
            d.defer_while_primary_up = v;
        }
        if self.hold == Some(true) {
            d.hold = Some(crate::domain::Hold {
                reason: crate::domain::HoldReason::Operator,
                since: crate::time::unix_seconds(std::time::SystemTime::now()),
            });
        }
        d.queue_lifetime = self.queue_lifetime.map(|l| l.as_secs());
        if let Some(t) = self.tls {
            d.tls = t;
        }
        if let Some(f) = self.filter {
            d.filter = f;
        }
        if let Some(g) = self.bounce_storm_guard {
            d.bounce_storm_guard = g;
        }
        if let Some(a) = self.auth {
            d.auth = a;
        }
        Ok(d)
    }
}

/// Parses a human duration (`90s`, `5m`, `2d`).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("invalid duration {s:?}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_spec_example_parses() {
        let cfg = Config::from_toml(include_str!("../../../backupmx.example.toml")).unwrap();
        assert_eq!(cfg.hostname, "mx2.example.net");
        assert_eq!(cfg.smtp.idle_timeout, Duration::from_secs(300));
        assert_eq!(cfg.greylist.retry_window, Duration::from_secs(2 * 86_400));
        assert_eq!(cfg.dnsbl.zones[0].zone, "zen.spamhaus.org");
        assert_eq!(cfg.delivery.routes["bounce.example"], "127.0.0.1:2626");
        let admin = cfg.admin.as_ref().unwrap();
        assert_eq!(admin.listen, "127.0.0.1:9326".parse().unwrap());
        assert_eq!(admin.token(), None);
        let filter = cfg.filter_settings().unwrap().unwrap();
        assert_eq!(filter.authority, "127.0.0.1:11333");
        assert_eq!(filter.on_error, crate::filter::OnError::Accept);
        assert!(cfg.domains[0].to_domain().unwrap().filter);
        assert_eq!(
            cfg.domains[0].to_domain().unwrap().recipients.unwrap(),
            ["user@example.test"]
        );
    }

    #[test]
    fn an_admin_listener_others_can_reach_needs_a_real_token() {
        let err = Config::from_toml("[admin]\nlisten = \"0.0.0.0:9326\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("admin.token must be set"), "{err}");
        let err = Config::from_toml("[admin]\nlisten = \"127.0.0.1:9326\"\ntoken = \"short\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("at least 16"), "{err}");
        let cfg =
            Config::from_toml("[admin]\nlisten = \"[::]:9326\"\ntoken = \"0123456789abcdef\"\n")
                .unwrap();
        assert_eq!(cfg.admin.unwrap().token(), Some("0123456789abcdef"));
        assert!(Config::from_toml("").unwrap().admin.is_none());
    }

    #[test]
    fn defaults_match_the_spec() {
        let cfg = Config::from_toml("").unwrap();
        assert_eq!(cfg.smtp.listen, vec!["127.0.0.1:2525".parse().unwrap()]);
        assert_eq!(cfg.storage.data_dir, PathBuf::from("./data"));
        assert_eq!(cfg.storage.backend, Backend::Local);
        assert_eq!(cfg.smtp.max_message_size, 36_700_160);
    }

    #[test]
    fn bad_configs_are_rejected_with_the_key_named() {
        let cases = [
            ("[smtp]\nlisten = 5", "listen"),
            ("[smtp]\nidle_timeout = \"forever\"", "idle_timeout"),
            ("[smtp]\nbogus = 1", "bogus"),
            ("[smtp]\nmax_command_line = 100", "max_command_line"),
            ("[[domain]]\nname = \"bad domain\"", "bad domain"),
            ("[[domain]]\nname = \"ok.test\"\nprimary = [\"x:0\"]", "x:0"),
            ("hostname = \"not a host\"", "hostname"),
            (
                "[[domain]]\nname = \"ok.test\"\nmax_message_size = 0",
                "max_message_size must be between 1",
            ),
            (
                "[[domain]]\nname = \"ok.test\"\nmax_message_size = 999999999999",
                "max_message_size must be between 1",
            ),
        ];
        for (text, needle) in cases {
            let err = Config::from_toml(text).unwrap_err().to_string();
            assert!(err.contains(needle), "{text:?}: {err}");
            assert!(!err.contains('\n'));
        }
    }
}

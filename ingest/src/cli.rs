//! `backupmx domain …` and `backupmx queue …`: operator commands that work
//! on the configured store, also while a server is running on it.

use std::sync::Arc;

use anyhow::{anyhow, bail, Context};
use clap::Subcommand;
use relay_core::address::DomainName;
use relay_core::admin::{entry_json, message_size_error, rfc3339, Admin, AdminError, DomainChange};
use relay_core::config::Config;
use relay_core::domain::Domain;
use relay_core::queue::QueueId;
use relay_core::store::DomainRegistry;

use crate::backends::open_backends_as;

#[derive(Subcommand)]
pub(crate) enum DomainCommand {
    /// Add a hosted domain (with --replace: overwrite an existing one's settings).
    Add {
        /// The domain name (Unicode or A-labels; stored as A-labels).
        domain: String,
        /// Explicit next hop, host or host:port; repeat for several (tried in order).
        #[arg(long = "primary", value_name = "HOST[:PORT]")]
        primary: Vec<String>,
        /// Do not greylist mail for this domain.
        #[arg(long)]
        no_greylist: bool,
        /// Largest message accepted for this domain.
        #[arg(long, value_name = "BYTES")]
        max_size: Option<u64>,
        /// Accept only these recipients; repeat for several.
        #[arg(long = "recipient", value_name = "ADDR")]
        recipient: Vec<String>,
        /// Overwrite the settings of a domain that is already hosted.
        #[arg(long)]
        replace: bool,
    },
    /// List hosted domains.
    List {
        /// Print a JSON array of domain records.
        #[arg(long)]
        json: bool,
    },
    /// Change settings of a hosted domain; what is not given stays.
    Set {
        /// The domain name.
        domain: String,
        /// Explicit next hop, host or host:port; repeat for several (replaces the list).
        #[arg(long = "primary", value_name = "HOST[:PORT]")]
        primary: Vec<String>,
        /// Greylist mail for this domain.
        #[arg(long, value_name = "BOOL")]
        greylist: Option<bool>,
        /// Largest message accepted for this domain.
        #[arg(long, value_name = "BYTES")]
        max_size: Option<u64>,
        /// Check recipients outside the static list against the primary (callout), or not.
        #[arg(long, value_name = "off|callout")]
        recipient_verify: Option<relay_core::domain::RecipientVerify>,
        /// Answer 451 while the primary is known to be up.
        #[arg(long, value_name = "BOOL")]
        defer_while_primary_up: Option<bool>,
        /// Accept mail for the domain (false refuses it like an unknown one).
        #[arg(long, value_name = "BOOL")]
        enabled: Option<bool>,
        /// Keep the domain's queued mail: no attempt, no expiry, no bounce.
        #[arg(long, conflicts_with = "release")]
        hold: bool,
        /// Release a held domain: its queued mail goes out at once, and a
        /// refusal of what the bounce-storm guard held back is final (one
        /// DSN per message) instead of held back again.
        #[arg(long)]
        release: bool,
        /// With --release: drop the held-back refusals (logged and
        /// counted) instead of bouncing them.
        #[arg(long, requires = "release")]
        discard_refused: bool,
        /// How long this domain's mail may stay queued (at most 60d).
        #[arg(long, value_name = "DUR", value_parser = relay_core::config::parse_duration)]
        queue_lifetime: Option<std::time::Duration>,
        /// How the hop to the primary must be protected: STARTTLS when
        /// offered, STARTTLS always, or STARTTLS with a certificate valid
        /// for the primary's name.
        #[arg(long, value_name = "opportunistic|required|verified")]
        tls: Option<relay_core::domain::TlsPolicy>,
        /// Scan the domain's mail with the content filter (`[filter] rspamd`), or not.
        #[arg(long, value_name = "BOOL")]
        filter: Option<bool>,
        /// Let the bounce-storm guard watch the domain's drains, or not.
        #[arg(long, value_name = "BOOL")]
        bounce_storm_guard: Option<bool>,
        /// Sender authentication (SPF, DKIM, DMARC, iprev): none, an
        /// Authentication-Results header for the primary, or that header
        /// and refusing DMARC failures under p=reject.
        #[arg(long, value_name = "off|annotate|enforce")]
        auth: Option<relay_core::domain::AuthPolicy>,
    },
    /// Show one domain, with its primary's last observed state.
    Show {
        /// The domain name.
        domain: String,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// A domain's outage history: when its primary was down, what was held
    /// and refused meanwhile, how the drain went; and its queue depth.
    History {
        /// The domain name.
        domain: String,
        /// Print one JSON object (the API's `GET /api/domains/D/history`).
        #[arg(long)]
        json: bool,
        /// How far back (queue-depth samples are kept 7 days).
        #[arg(long, value_name = "DUR", default_value = "7d", value_parser = relay_core::config::parse_duration)]
        since: std::time::Duration,
    },
    /// A one-page summary of one outage, to send to the domain's owner.
    Report {
        /// The domain name.
        domain: String,
        /// The outage's number (as `domain history` shows it).
        #[arg(
            long,
            value_name = "N",
            required_unless_present = "last",
            conflicts_with = "last"
        )]
        outage: Option<u64>,
        /// The latest outage.
        #[arg(long)]
        last: bool,
        /// text, json (the `outage_report` alert's object) or html (one
        /// self-contained page).
        #[arg(long, value_name = "text|json|html", default_value = "text")]
        format: ReportFormat,
    },
    /// Stop hosting a domain. Its queued mail stays queued and is delivered
    /// by its MX records, unless --purge-queue deletes it.
    Remove {
        /// The domain name.
        domain: String,
        /// Also delete the domain's queued messages (they will not be delivered).
        #[arg(long)]
        purge_queue: bool,
    },
}

/// `domain report --format`.
#[derive(Clone, Copy, clap::ValueEnum)]
pub(crate) enum ReportFormat {
    Text,
    Json,
    Html,
}

#[derive(Subcommand)]
pub(crate) enum TlsrptCommand {
    /// Send the reports that are due (whole UTC days not sent yet) to the
    /// domains that publish `_smtp._tls`.
    Send {
        /// Also today's so far (the day's report is then closed).
        #[arg(long)]
        now: bool,
    },
}

#[derive(Subcommand)]
pub(crate) enum RecipientsCommand {
    /// The callout cache of a domain: address, verdict, learnt from, expires.
    List {
        /// The domain name.
        domain: String,
        /// Print a JSON array.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
pub(crate) enum QueueCommand {
    /// List queued messages, oldest first.
    List {
        /// Only the messages for this hosted domain.
        #[arg(long, value_name = "D")]
        domain: Option<String>,
        /// Print a JSON array, one object per queued message.
        #[arg(long)]
        json: bool,
    },
    /// Show one queued message.
    Show {
        /// The queue id (from `queue list`).
        id: String,
        /// Print the stored message exactly as it will be relayed.
        #[arg(long)]
        raw: bool,
    },
    /// Make queued messages due now (the running worker sends them within a second).
    Flush {
        /// Only the messages for this hosted domain.
        #[arg(long, value_name = "D")]
        domain: Option<String>,
    },
    /// Delete a queued message, or a domain's (it will not be delivered).
    Delete {
        /// The queue id (from `queue list`).
        #[arg(required_unless_present = "domain", conflicts_with = "domain")]
        id: Option<String>,
        /// Every queued message of this hosted domain.
        #[arg(long, value_name = "D")]
        domain: Option<String>,
        /// With --domain: only the recipients whose refusal the
        /// bounce-storm guard held back.
        #[arg(long, requires = "domain")]
        refused_only: bool,
    },
}

fn parse_domain(name: &str) -> anyhow::Result<DomainName> {
    Ok(relay_core::admin::parse_domain(name)?)
}

fn parse_id(id: &str) -> anyhow::Result<QueueId> {
    Ok(relay_core::admin::parse_id(id)?)
}

fn now() -> u64 {
    relay_core::time::unix_seconds(std::time::SystemTime::now())
}

/// Where the configured store is, for messages.
pub(crate) fn store_description(config: &Config) -> String {
    match config.storage.backend {
        relay_core::config::Backend::Local => format!(
            "{}",
            config
                .storage
                .data_dir
                .join(relay_core::store::local::DB_FILE)
                .display()
        ),
        relay_core::config::Backend::Aws => format!(
            "DynamoDB table {} and bucket {}",
            config.aws.domains_table, config.aws.bucket
        ),
    }
}

/// Opens the store for an admin command; an error names the configuration
/// it came from, the usual cause of "no store here".
async fn open_store(
    config: &Config,
    create: bool,
    source: &str,
) -> anyhow::Result<crate::backends::Backends> {
    open_backends_as(config, create)
        .await
        .map_err(|e| anyhow!("{e:#} [configuration: {source}]"))
}

/// The shared operations on the configured store (the admin API uses the
/// same), announcing holds and releases when alerts are configured.
pub(crate) async fn open_admin(
    config: &Config,
    create: bool,
    source: &str,
) -> anyhow::Result<(Admin, crate::backends::Backends)> {
    let backends = open_store(config, create, source).await?;
    let admin = backends.admin(
        crate::backends::alerter(config)?,
        config.smtp.max_message_size,
    );
    Ok((admin, backends))
}

pub(crate) async fn tlsrpt(
    config: &Config,
    source: &str,
    cmd: TlsrptCommand,
) -> anyhow::Result<()> {
    let TlsrptCommand::Send { now: today } = cmd;
    if !config.tlsrpt.enabled {
        bail!("TLS reports are off: set [tlsrpt] enabled = true [configuration: {source}]");
    }
    let backends = open_store(config, false, source).await?;
    let resolver = relay_core::setup::resolver(config)?;
    let reporter = relay_core::setup::tls_reporter(
        config,
        resolver,
        backends.tls_reports.clone(),
        backends.spool.clone(),
    )
    .ok_or_else(|| anyhow!("TLS reports are off"))?;
    let sent = reporter
        .send_due(std::time::SystemTime::now(), today)
        .await?;
    println!(
        "reports: {}, posted: {}, mailed: {}, failed: {}, domains without a TLSRPT record: {}",
        sent.reports, sent.posted, sent.mailed, sent.failed, sent.unpublished
    );
    if sent.failed > 0 {
        bail!("{} report deliveries failed (see the log)", sent.failed);
    }
    Ok(())
}

pub(crate) async fn recipients(
    config: &Config,
    source: &str,
    cmd: RecipientsCommand,
) -> anyhow::Result<()> {
    let (admin, _) = open_admin(config, false, source).await?;
    match cmd {
        RecipientsCommand::List { domain, json } => {
            let name = parse_domain(&domain)?;
            let cached = admin.recipients(&name, now()).await?;
            if json {
                let rows: Vec<_> = cached
                    .iter()
                    .map(relay_core::admin::recipient_json)
                    .collect();
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                for c in &cached {
                    println!(
                        "{}\t{}\t{}\texpires={}",
                        c.address,
                        serde_json::to_value(c.verdict)?
                            .as_str()
                            .unwrap_or_default(),
                        serde_json::to_value(c.learnt)?.as_str().unwrap_or_default(),
                        rfc3339(c.expires)
                    );
                }
                if cached.is_empty() {
                    eprintln!("no cached verdicts for {name}");
                }
            }
        }
    }
    Ok(())
}

pub(crate) async fn domain(
    config: &Config,
    source: &str,
    cmd: DomainCommand,
) -> anyhow::Result<()> {
    // Only `add` may create a store; the others need the one that exists.
    let create = matches!(cmd, DomainCommand::Add { .. });
    let (admin, backends) = open_admin(config, create, source).await?;
    let store: Arc<dyn DomainRegistry> = backends.registry;
    match cmd {
        DomainCommand::Add {
            domain,
            primary,
            no_greylist,
            max_size,
            recipient,
            replace,
        } => {
            let recipients = (!recipient.is_empty()).then_some(recipient.as_slice());
            let mut d = Domain::from_parts(&domain, &primary, recipients)?;
            d.greylist = !no_greylist;
            if let Some(why) =
                max_size.and_then(|m| message_size_error(m, config.smtp.max_message_size))
            {
                bail!("{why}");
            }
            d.max_message_size = max_size;
            let existing = store.get(&d.name).await.context("cannot read the domain")?;
            if existing.is_some() && !replace {
                bail!(
                    "{} is already hosted: add --replace to overwrite its settings (see `backupmx domain show {}`)",
                    d.name,
                    d.name
                );
            }
            store.put(&d).await.context("cannot store the domain")?;
            let verb = if existing.is_some() {
                "replaced"
            } else {
                "added"
            };
            println!("{verb} {}", d.name);
        }
        DomainCommand::List { json } => {
            let domains = admin.domains().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&domains)?);
            } else {
                for d in &domains {
                    println!("{}", domain_line(d));
                }
                if domains.is_empty() {
                    eprintln!("no hosted domains in {}", store_description(config));
                }
            }
        }
        DomainCommand::Set {
            domain,
            primary,
            greylist,
            max_size,
            recipient_verify,
            defer_while_primary_up,
            enabled,
            hold,
            release,
            discard_refused,
            queue_lifetime,
            tls,
            filter,
            bounce_storm_guard,
            auth,
        } => {
            let name = parse_domain(&domain)?;
            let change = DomainChange {
                primary: Some(primary),
                greylist,
                max_message_size: max_size,
                recipient_verify,
                defer_while_primary_up,
                enabled,
                hold: match (hold, release) {
                    (true, _) => Some(true),
                    (_, true) => Some(false),
                    _ => None,
                },
                queue_lifetime,
                tls,
                filter,
                bounce_storm_guard,
                auth,
                discard_refused,
            };
            let outcome = match admin.set_domain(&name, change, now()).await {
                Err(AdminError::NoSuchDomain(_)) => {
                    bail!("no such domain: {name} (add it with `backupmx domain add {name}`)")
                }
                other => other?,
            };
            if let Some(a) = admin.alerter() {
                a.flush(std::time::Duration::from_secs(5)).await;
            }
            let d = &outcome.domain;
            match (&d.hold, outcome.flushed) {
                (Some(h), _) => println!(
                    "updated {}; held ({}) since {}: queued mail is kept",
                    d.name,
                    h.reason,
                    rfc3339(h.since)
                ),
                (None, true) => println!(
                    "updated {}; {} queued message(s) released for delivery",
                    d.name, outcome.released
                ),
                (None, false) => println!("updated {}", d.name),
            }
            let r = outcome.refusals;
            if r.bounced > 0 {
                println!(
                    "{} held-back refusal(s) released: tried again at once, a refusal now bounces",
                    r.bounced
                );
            }
            if r.discarded > 0 {
                println!(
                    "{} held-back refusal(s) discarded without a DSN ({} message(s) deleted)",
                    r.discarded, r.messages_deleted
                );
            }
        }
        DomainCommand::Show { domain, json } => {
            let name = parse_domain(&domain)?;
            let view = admin.domain_view(&name).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&view.to_json())?);
                return Ok(());
            }
            let d = &view.domain;
            println!("name: {}", d.name);
            println!("enabled: {}", d.enabled);
            println!(
                "primary: {}",
                if d.primary.is_empty() {
                    "(MX lookup)".into()
                } else {
                    d.primary.join(", ")
                }
            );
            println!("greylist: {}", d.greylist);
            println!(
                "max_message_size: {}",
                d.max_message_size
                    .map_or("(global)".into(), |n| n.to_string())
            );
            println!(
                "recipients: {}",
                d.recipients
                    .as_ref()
                    .map_or("(any)".into(), |r| r.join(", "))
            );
            println!(
                "hold: {}",
                match &d.hold {
                    None => "no".to_string(),
                    Some(h) => format!("yes ({}) since {}", h.reason, rfc3339(h.since)),
                }
            );
            println!(
                "queue_lifetime: {}",
                d.queue_lifetime.map_or("(global)".into(), |l| {
                    humantime::format_duration(std::time::Duration::from_secs(l)).to_string()
                })
            );
            println!("recipient_verify: {}", d.recipient_verify);
            println!("defer_while_primary_up: {}", d.defer_while_primary_up);
            println!("tls: {}", d.tls);
            println!(
                "filter: {}{}",
                d.filter,
                if config.filter.is_none() {
                    " (no [filter] configured)"
                } else {
                    ""
                }
            );
            println!("bounce_storm_guard: {}", d.bounce_storm_guard);
            println!("auth: {}", d.auth);
            println!(
                "primary_state: {}",
                match view.primary_state {
                    None => "unknown (not observed yet)".to_string(),
                    Some(s) => format!(
                        "{} since {} (last observed {})",
                        if s.up { "up" } else { "down" },
                        rfc3339(s.since),
                        rfc3339(s.observed)
                    ),
                }
            );
            println!("queued: {}", view.queued);
        }
        DomainCommand::History {
            domain,
            json,
            since,
        } => {
            let name = parse_domain(&domain)?;
            let now = now();
            let history = admin
                .domain_history(&name, now.saturating_sub(since.as_secs()))
                .await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&history.to_json(now))?);
            } else {
                print!(
                    "{}",
                    relay_core::admin::history_view::history_text(&history, now)
                );
            }
        }
        DomainCommand::Report {
            domain,
            outage,
            last: _,
            format,
        } => {
            let name = parse_domain(&domain)?;
            let now = now();
            let o = admin.outage(&name, outage).await?;
            let text = match format {
                ReportFormat::Text => {
                    relay_core::admin::history_view::report_text(&name, &o, &config.hostname, now)
                }
                ReportFormat::Json => {
                    serde_json::to_string_pretty(&relay_core::history::report_json(&name, &o, now))?
                }
                ReportFormat::Html => {
                    relay_core::admin::history_view::report_html(&name, &o, &config.hostname, now)
                }
            };
            println!("{}", text.trim_end());
        }
        DomainCommand::Remove {
            domain,
            purge_queue,
        } => {
            let name = parse_domain(&domain)?;
            if !store.remove(&name).await? {
                bail!("no such domain: {name}");
            }
            let queued = admin.queue_list(Some(&name)).await?;
            if purge_queue {
                for e in &queued {
                    backends.queue.remove(&e.id).await?;
                }
                println!(
                    "removed {name}; deleted its {} queued message(s)",
                    queued.len()
                );
            } else if queued.is_empty() {
                println!("removed {name}");
            } else {
                println!(
                    "removed {name}; its {} queued message(s) stay queued and go to its MX hosts (--purge-queue deletes them)",
                    queued.len()
                );
            }
        }
    }
    Ok(())
}

fn domain_line(d: &Domain) -> String {
    format!(
        "{}\tprimary={}\tgreylist={}\tmax_size={}\trecipients={}\tenabled={}",
        d.name,
        if d.primary.is_empty() {
            "mx".into()
        } else {
            d.primary.join(",")
        },
        d.greylist,
        d.max_message_size.map_or("-".into(), |n| n.to_string()),
        d.recipients
            .as_ref()
            .map_or("any".into(), |r| r.len().to_string()),
        d.enabled
    )
}

pub(crate) async fn queue(config: &Config, source: &str, cmd: QueueCommand) -> anyhow::Result<()> {
    let (admin, _) = open_admin(config, false, source).await?;
    match cmd {
        QueueCommand::List { domain, json } => {
            let domain = domain.as_deref().map(parse_domain).transpose()?;
            let entries = admin.queue_list(domain.as_ref()).await?;
            if json {
                let mut out = std::io::BufWriter::new(std::io::stdout().lock());
                relay_core::admin::write_entries_json(&entries, &mut out)?;
                std::io::Write::flush(&mut out)?;
            } else {
                for e in &entries {
                    println!(
                        "{}\t{}\t{} bytes\tattempts={}\tnext={}\t<{}>\t{}",
                        e.id,
                        rfc3339(e.received_at),
                        e.size,
                        e.attempts,
                        rfc3339(e.next_attempt),
                        e.sender,
                        e.pending_recipients()
                            .map(|r| r.address.as_str())
                            .collect::<Vec<_>>()
                            .join(",")
                    );
                }
                println!("{} message(s)", entries.len());
            }
        }
        QueueCommand::Show { id, raw } => {
            let id = parse_id(&id)?;
            if raw {
                // In pieces: a 30 MB message is never in memory whole.
                use std::io::Write;
                let mut out = std::io::stdout().lock();
                let mut offset = 0u64;
                loop {
                    let piece = admin
                        .body_chunk(&id, offset, relay_core::store::BODY_CHUNK)
                        .await?;
                    if piece.is_empty() {
                        break;
                    }
                    offset += piece.len() as u64;
                    out.write_all(&piece).context("cannot write to stdout")?;
                }
                out.flush().context("cannot write to stdout")?;
                return Ok(());
            }
            let e = admin.queue_entry(&id).await?;
            println!("{}", serde_json::to_string_pretty(&entry_json(&e))?);
        }
        QueueCommand::Flush { domain } => {
            let domain = domain.as_deref().map(parse_domain).transpose()?;
            let n = admin.flush(domain.as_ref(), now()).await?;
            println!("{n} message(s) released for delivery");
        }
        QueueCommand::Delete {
            id,
            domain,
            refused_only,
        } => match (id, domain) {
            (Some(id), _) => {
                let id = parse_id(&id)?;
                admin.delete(&id).await?;
                println!("deleted {id}");
            }
            (None, Some(domain)) => {
                let name = parse_domain(&domain)?;
                admin.domain_view(&name).await?;
                let d = admin.delete_domain_mail(&name, refused_only).await?;
                println!(
                    "deleted {} message(s) and {} recipient(s) of {name}",
                    d.messages, d.recipients
                );
            }
            (None, None) => bail!("queue delete needs a queue id or --domain D"),
        },
    }
    Ok(())
}

/// `backupmx doctor DOMAIN`: every onboarding check, ok/warn/fail with
/// the fix; an error (exit 1) when one fails.
pub(crate) async fn doctor(
    config: &Config,
    source: &str,
    domain: &str,
    json: bool,
) -> anyhow::Result<()> {
    use relay_core::delivery::transport;
    use relay_core::doctor::{Doctor, DoctorSettings, Verdict};
    let name = parse_domain(domain)?;
    let (_, backends) = open_admin(config, false, source).await?;
    let record = backends
        .registry
        .get(&name)
        .await
        .context("cannot read the domain")?;
    let resolver = relay_core::dns::HickoryResolver::with_trust_anchors(
        &config.dns.servers,
        config.dns.timeout,
        &config.dns.dnssec_trust_anchors,
    )
    .map_err(|e| anyhow!("cannot set up the DNS resolver: {e}"))?;
    let extra = match &config.delivery.tls_ca_file {
        Some(p) => transport::load_ca_file(p).map_err(|e| anyhow!("delivery.tls_ca_file: {e}"))?,
        None => Vec::new(),
    };
    let mut roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    for c in &extra {
        let _ = roots.add(c.clone());
    }
    let engine = relay_core::delivery::EngineConfig::from(config);
    let settings = DoctorSettings {
        me: engine.me,
        routes: engine.routes,
        max_message_size: config.smtp.max_message_size,
        // Unreadable: an empty chain, which the check reports.
        certificate: config
            .tls
            .as_ref()
            .map(|t| transport::load_ca_file(&t.cert).unwrap_or_default()),
        verifying: transport::verifying_tls(&extra),
        roots: Arc::new(roots),
        mta_sts_port: config.delivery.mta_sts_port,
        timeout: config
            .delivery
            .connect_timeout
            .min(std::time::Duration::from_secs(10)),
    };
    let checks = Doctor::new(Arc::new(resolver), settings)
        .examine(&name, record.as_ref())
        .await;
    let failed = checks.iter().filter(|c| c.status == Verdict::Fail).count();
    let warned = checks.iter().filter(|c| c.status == Verdict::Warn).count();
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "domain": name,
                "ok": failed == 0,
                "checks": checks,
            }))?
        );
    } else {
        println!("{name}: backup MX {}", config.hostname);
        for c in &checks {
            println!("{:<5} {:<16} {}", c.status, c.check, c.detail);
            if let (Some(fix), true) = (&c.fix, c.status != Verdict::Ok) {
                println!("{:<22} fix: {fix}", "");
            }
        }
        println!(
            "{} check(s): {failed} failed, {warned} warning(s)",
            checks.len()
        );
    }
    if failed > 0 {
        bail!("{name}: {failed} check(s) failed");
    }
    Ok(())
}

#[derive(Subcommand)]
pub(crate) enum AwsCommand {
    /// Create the tables, bucket and queues (template settings) at AWS_ENDPOINT_URL.
    Bootstrap,
}

pub(crate) async fn aws(config: &Config, cmd: AwsCommand) -> anyhow::Result<()> {
    match cmd {
        AwsCommand::Bootstrap => {
            let conf = relay_core::store::aws::sdk_config().await;
            let names = relay_core::store::aws::AwsNames::from(&config.aws);
            let store = relay_core::store::aws::AwsStore::bootstrap(&conf, names.clone())
                .await
                .context("cannot create the AWS resources")?;
            println!("domains_table = \"{}\"", names.domains_table);
            println!("greylist_table = \"{}\"", names.greylist_table);
            println!("bucket = \"{}\"", names.bucket);
            println!("queue_url = \"{}\"", store.queue_url());
        }
    }
    Ok(())
}

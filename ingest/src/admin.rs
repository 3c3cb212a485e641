//! `backupmx domain …` and `backupmx queue …`: operator commands that work
//! on the configured store, also while a server is running on it.

use std::sync::Arc;

use anyhow::{anyhow, bail, Context};
use clap::Subcommand;
use relay_core::address::DomainName;
use relay_core::config::Config;
use relay_core::domain::Domain;
use relay_core::queue::{QueueEntry, QueueId, RecipientStatus};
use relay_core::store::{DeliveryQueue, DomainRegistry, MessageStore};
use relay_core::time::from_unix_seconds;
use serde_json::json;

use crate::server::open_backends_as;

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
        /// Release a held domain: its queued mail goes out at once.
        #[arg(long)]
        release: bool,
        /// How long this domain's mail may stay queued (at most 60d).
        #[arg(long, value_name = "DUR", value_parser = relay_core::config::parse_duration)]
        queue_lifetime: Option<std::time::Duration>,
    },
    /// Show one domain, with its primary's last observed state.
    Show {
        /// The domain name.
        domain: String,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
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
    /// Delete a queued message (it will not be delivered).
    Delete {
        /// The queue id (from `queue list`).
        id: String,
    },
}

fn parse_domain(name: &str) -> anyhow::Result<DomainName> {
    DomainName::parse(name).map_err(|_| anyhow!("invalid domain name {name:?}"))
}

fn parse_id(id: &str) -> anyhow::Result<QueueId> {
    QueueId::parse(id).map_err(|e| anyhow!("{e}"))
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
) -> anyhow::Result<crate::server::Backends> {
    open_backends_as(config, create)
        .await
        .map_err(|e| anyhow!("{e:#} [configuration: {source}]"))
}

pub(crate) async fn recipients(
    config: &Config,
    source: &str,
    cmd: RecipientsCommand,
) -> anyhow::Result<()> {
    let backends = open_store(config, false, source).await?;
    match cmd {
        RecipientsCommand::List { domain, json } => {
            let name = parse_domain(&domain)?;
            if backends.registry.get(&name).await?.is_none() {
                bail!("no such domain: {name}");
            }
            let now = relay_core::time::unix_seconds(std::time::SystemTime::now());
            let cached = backends
                .recipients
                .recipients(&name, now)
                .await
                .context("cannot read the recipient cache")?;
            if json {
                let rows: Vec<_> = cached
                    .iter()
                    .map(|c| {
                        json!({
                            "address": c.address,
                            "verdict": c.verdict,
                            "learnt_from": c.learnt,
                            "learnt_at": rfc3339(c.learnt_at),
                            "expires": rfc3339(c.expires),
                        })
                    })
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
    let backends = open_store(config, create, source).await?;
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
            let domains = store.list().await.context("cannot list domains")?;
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
            queue_lifetime,
        } => {
            let name = parse_domain(&domain)?;
            if let Some(l) = queue_lifetime {
                if l.is_zero() || l > relay_core::config::MAX_QUEUE_LIFETIME {
                    bail!("--queue-lifetime must be positive and at most 60d");
                }
            }
            let mut d = store
                .get(&name)
                .await
                .context("cannot read the domain")?
                .ok_or_else(|| {
                    anyhow!("no such domain: {name} (add it with `backupmx domain add {name}`)")
                })?;
            // A new next hop, a release or a new lifetime applies to mail
            // already queued: it is made due now (as `queue flush`).
            let mut flush = false;
            if !primary.is_empty() {
                for p in &primary {
                    relay_core::domain::validate_primary(p)?;
                }
                flush |= d.primary != primary;
                d.primary = primary;
            }
            let now = relay_core::time::unix_seconds(std::time::SystemTime::now());
            if hold && d.hold.is_none() {
                d.hold = Some(relay_core::domain::Hold {
                    reason: relay_core::domain::HoldReason::Operator,
                    since: now,
                });
            }
            if release && d.hold.is_some() {
                d.hold = None;
                flush = true;
            }
            if let Some(l) = queue_lifetime {
                flush |= d.queue_lifetime != Some(l.as_secs());
                d.queue_lifetime = Some(l.as_secs());
            }
            if let Some(g) = greylist {
                d.greylist = g;
            }
            if let Some(m) = max_size {
                d.max_message_size = Some(m);
            }
            if let Some(v) = recipient_verify {
                d.recipient_verify = v;
            }
            if let Some(v) = defer_while_primary_up {
                d.defer_while_primary_up = v;
            }
            if let Some(e) = enabled {
                d.enabled = e;
            }
            let was_held = store.get(&name).await.ok().flatten().and_then(|x| x.hold);
            store.put(&d).await.context("cannot store the domain")?;
            if let Some(a) = crate::server::alerter(config)? {
                match (&was_held, &d.hold) {
                    (None, Some(h)) => a.send(
                        "domain_held",
                        Some(name.as_str()),
                        json!({ "reason": h.reason.to_string() }),
                    ),
                    (Some(h), None) => a.send(
                        "domain_released",
                        Some(name.as_str()),
                        json!({ "held_for": h.reason.to_string() }),
                    ),
                    _ => {}
                }
                a.flush(std::time::Duration::from_secs(5)).await;
            }
            let released = if flush && d.hold.is_none() {
                backends
                    .queue
                    .release(Some(&name), now)
                    .await
                    .context("cannot release the domain's queued mail")?
            } else {
                0
            };
            match (&d.hold, flush) {
                (Some(h), _) => println!(
                    "updated {}; held ({}) since {}: queued mail is kept",
                    d.name,
                    h.reason,
                    rfc3339(h.since)
                ),
                (None, true) => println!(
                    "updated {}; {released} queued message(s) released for delivery",
                    d.name
                ),
                (None, false) => println!("updated {}", d.name),
            }
        }
        DomainCommand::Show { domain, json } => {
            let name = parse_domain(&domain)?;
            let d = store
                .get(&name)
                .await?
                .ok_or_else(|| anyhow!("no such domain: {name}"))?;
            let state = backends
                .recipients
                .primary_state(&name)
                .await
                .context("cannot read the primary's state")?;
            let queued = backends
                .queue
                .list(Some(&name))
                .await
                .context("cannot list the domain's queued mail")?
                .len();
            if json {
                let mut v = serde_json::to_value(&d)?;
                v["primary_state"] = match state {
                    None => json!(null),
                    Some(s) => json!({
                        "up": s.up,
                        "since": rfc3339(s.since),
                        "observed": rfc3339(s.observed),
                    }),
                };
                v["queued"] = json!(queued);
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(());
            }
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
            println!(
                "primary_state: {}",
                match state {
                    None => "unknown (not observed yet)".to_string(),
                    Some(s) => format!(
                        "{} since {} (last observed {})",
                        if s.up { "up" } else { "down" },
                        rfc3339(s.since),
                        rfc3339(s.observed)
                    ),
                }
            );
            println!("queued: {queued}");
        }
        DomainCommand::Remove {
            domain,
            purge_queue,
        } => {
            let name = parse_domain(&domain)?;
            if !store.remove(&name).await? {
                bail!("no such domain: {name}");
            }
            let queued = backends
                .queue
                .list(Some(&name))
                .await
                .context("cannot list the domain's queued mail")?;
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

fn rfc3339(secs: u64) -> String {
    humantime::format_rfc3339_seconds(from_unix_seconds(secs)).to_string()
}

fn status_name(s: &RecipientStatus) -> &'static str {
    match s {
        RecipientStatus::Pending => "pending",
        RecipientStatus::Delivered => "delivered",
        RecipientStatus::Failed => "failed",
    }
}

fn entry_json(e: &QueueEntry) -> serde_json::Value {
    json!({
        "id": e.id,
        "sender": e.sender,
        "recipients": e.recipients.iter().map(|r| r.address.clone()).collect::<Vec<_>>(),
        "recipient_status": e.recipients.iter().map(|r| json!({
            "address": r.address, "status": status_name(&r.status), "last_reply": r.last_reply,
        })).collect::<Vec<_>>(),
        "domain": e.domain,
        "attempts": e.attempts,
        "next_attempt": rfc3339(e.next_attempt),
        "received_at": rfc3339(e.received_at),
        "size": e.size,
        "last_error": e.last_error,
        "client_ip": e.client_ip,
        "helo": e.helo,
    })
}

pub(crate) async fn queue(config: &Config, source: &str, cmd: QueueCommand) -> anyhow::Result<()> {
    let backends = open_store(config, false, source).await?;
    let store: Arc<dyn DeliveryQueue> = backends.queue;
    let messages: Arc<dyn MessageStore> = backends.messages;
    match cmd {
        QueueCommand::List { domain, json } => {
            let domain = domain.as_deref().map(parse_domain).transpose()?;
            let entries = store
                .list(domain.as_ref())
                .await
                .context("cannot list the queue")?;
            if json {
                let list: Vec<_> = entries.iter().map(entry_json).collect();
                println!("{}", serde_json::to_string_pretty(&list)?);
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
                    let piece = messages
                        .read_chunk(&id, offset, relay_core::store::BODY_CHUNK)
                        .await?
                        .ok_or_else(|| anyhow!("no such message: {id}"))?;
                    if piece.is_empty() {
                        break;
                    }
                    offset += piece.len() as u64;
                    out.write_all(&piece).context("cannot write to stdout")?;
                }
                out.flush().context("cannot write to stdout")?;
                return Ok(());
            }
            let e = store
                .get(&id)
                .await?
                .ok_or_else(|| anyhow!("no such message: {id}"))?;
            println!("{}", serde_json::to_string_pretty(&entry_json(&e))?);
        }
        QueueCommand::Flush { domain } => {
            let domain = domain.as_deref().map(parse_domain).transpose()?;
            let now = relay_core::time::unix_seconds(std::time::SystemTime::now());
            let n = store
                .release(domain.as_ref(), now)
                .await
                .context("cannot flush the queue")?;
            println!("{n} message(s) released for delivery");
        }
        QueueCommand::Delete { id } => {
            let id = parse_id(&id)?;
            if !store.remove(&id).await? {
                bail!("no such message: {id}");
            }
            println!("deleted {id}");
        }
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

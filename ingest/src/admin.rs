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

use crate::server::open_backends;

#[derive(Subcommand)]
pub enum DomainCommand {
    /// Add a hosted domain, or replace its settings.
    Add {
        domain: String,
        /// Explicit next hop HOST[:PORT]; repeat for several (tried in order).
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
    },
    /// List hosted domains.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Show one domain.
    Show { domain: String },
    /// Stop hosting a domain.
    Remove { domain: String },
}

#[derive(Subcommand)]
pub enum QueueCommand {
    /// List queued messages, oldest first.
    List {
        #[arg(long, value_name = "D")]
        domain: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Show one queued message.
    Show {
        id: String,
        /// Print the stored message exactly as it will be relayed.
        #[arg(long)]
        raw: bool,
    },
    /// Make queued messages due now (the running worker sends them within a second).
    Flush {
        #[arg(long, value_name = "D")]
        domain: Option<String>,
    },
    /// Delete a queued message (it will not be delivered).
    Delete { id: String },
}

fn parse_domain(name: &str) -> anyhow::Result<DomainName> {
    DomainName::parse(name).map_err(|_| anyhow!("invalid domain name {name:?}"))
}

fn parse_id(id: &str) -> anyhow::Result<QueueId> {
    QueueId::parse(id).map_err(|e| anyhow!("{e}"))
}

pub async fn domain(config: &Config, cmd: DomainCommand) -> anyhow::Result<()> {
    let store: Arc<dyn DomainRegistry> = open_backends(config).await?.registry;
    match cmd {
        DomainCommand::Add {
            domain,
            primary,
            no_greylist,
            max_size,
            recipient,
        } => {
            let recipients = (!recipient.is_empty()).then_some(recipient.as_slice());
            let mut d = Domain::from_parts(&domain, &primary, recipients)?;
            d.greylist = !no_greylist;
            d.max_message_size = max_size;
            store.put(&d).await.context("cannot store the domain")?;
            println!("{}", d.name);
        }
        DomainCommand::List { json } => {
            let domains = store.list().await.context("cannot list domains")?;
            if json {
                println!("{}", serde_json::to_string_pretty(&domains)?);
            } else {
                for d in &domains {
                    println!("{}", domain_line(d));
                }
            }
        }
        DomainCommand::Show { domain } => {
            let name = parse_domain(&domain)?;
            let d = store
                .get(&name)
                .await?
                .ok_or_else(|| anyhow!("no such domain: {name}"))?;
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
        }
        DomainCommand::Remove { domain } => {
            let name = parse_domain(&domain)?;
            if !store.remove(&name).await? {
                bail!("no such domain: {name}");
            }
            println!("{name}");
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

pub async fn queue(config: &Config, cmd: QueueCommand) -> anyhow::Result<()> {
    let backends = open_backends(config).await?;
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
            println!("{id}");
        }
    }
    Ok(())
}

#[derive(Subcommand)]
pub enum AwsCommand {
    /// Create the tables, bucket and queues (template settings) at AWS_ENDPOINT_URL.
    Bootstrap,
}

pub async fn aws(config: &Config, cmd: AwsCommand) -> anyhow::Result<()> {
    match cmd {
        AwsCommand::Bootstrap => {
            let conf = relay_core::store::aws::sdk_config().await;
            let names = relay_core::store::aws::AwsNames::from_config(&config.aws);
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

//! The AWS backend: domains, greylisting and queue records in DynamoDB,
//! message bodies in S3, the delivery schedule in SQS.
//!
//! Layout (documented for operators in `infra/README.md`):
//! - domains table, partition key `name` (S): `primary` (L of S),
//!   `greylist` (BOOL), `max_message_size` (N), `recipients` (L of S),
//!   `enabled` (BOOL).
//! - greylist table, partition key `pk` (S): `t#<triplet>` or `c#<network>`,
//!   the state as attributes, and `expires` (N, the table's TTL attribute —
//!   DynamoDB deletes lazily, so expiry is always checked in code too).
//! - bucket: `messages/<yyyy-mm-dd>/<id>.eml` (the message body, SSE);
//!   the date comes from the id.
//! - queue table and SQS tickets: see [`queue`].

use std::collections::HashMap;
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, KeySchemaElement, KeyType,
    ScalarAttributeType, TimeToLiveSpecification,
};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::ServerSideEncryption;
use aws_sdk_sqs::types::QueueAttributeName;

use super::{DomainRegistry, MessageStore, RecipientCache, StoreError};
use crate::address::DomainName;
use crate::domain::Domain;
use crate::greylist::{ClientState, GreylistStore, TripletState};
use crate::queue::{QueueId, SpooledBody};
use crate::verify::{CachedRecipient, PrimaryState};

pub mod queue;
pub mod requests;
pub use queue::{Claim, DownState, DueRecord, QueueItem, Received, Ticket};

/// Names of the AWS resources.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AwsNames {
    pub domains_table: String,
    pub greylist_table: String,
    pub bucket: String,
    /// Full queue URL; empty to look it up by `queue_name`.
    pub queue_url: String,
    pub queue_name: String,
    pub queue_table: String,
    /// Empty: the one the queue's redrive policy names.
    pub dead_letter_queue_url: String,
}

/// SQS delays are at most 15 minutes.
pub const MAX_SQS_DELAY: u64 = 900;

/// The AWS clients, built once.
#[derive(Clone)]
pub struct AwsStore {
    dynamodb: aws_sdk_dynamodb::Client,
    s3: aws_sdk_s3::Client,
    sqs: aws_sdk_sqs::Client,
    names: AwsNames,
    queue_url: String,
}

/// An SDK call failed. The SDK's own error says only "service error" at
/// its top; its full context (the service's code and message) is kept as
/// the source's text.
fn backend(what: &str, e: impl std::error::Error) -> StoreError {
    StoreError::backend(what, aws_sdk_s3::error::DisplayErrorContext(e).to_string())
}

/// The object an `s3://bucket/key` URI names (a certificate, a key).
pub async fn fetch_s3_uri(conf: &aws_config::SdkConfig, uri: &str) -> Result<Vec<u8>, StoreError> {
    let rest = uri
        .strip_prefix("s3://")
        .ok_or_else(|| StoreError::Invalid(format!("{uri:?} is not an s3:// URI")))?;
    let (bucket, key) = rest
        .split_once('/')
        .filter(|(b, k)| !b.is_empty() && !k.is_empty())
        .ok_or_else(|| StoreError::Invalid(format!("{uri:?} is not s3://BUCKET/KEY")))?;
    let out = s3_client(conf)
        .get_object()
        .bucket(bucket)
        .key(key)
        .send()
        .await
        .map_err(|e| backend(&format!("S3 get {uri}"), e))?;
    let bytes = out
        .body
        .collect()
        .await
        .map_err(|e| backend(&format!("S3 read {uri}"), e))?;
    Ok(bytes.into_bytes().to_vec())
}

/// An answer that lacks what it must carry (an emulator or API change):
/// an error, never an empty name used later.
fn no_answer(what: &str) -> StoreError {
    StoreError::Invalid(format!("unexpected answer from AWS: {what}"))
}

/// SDK configuration from the environment (`AWS_ENDPOINT_URL` included).
pub async fn sdk_config() -> aws_config::SdkConfig {
    aws_config::defaults(aws_config::BehaviorVersion::latest())
        .load()
        .await
}

fn s3_client(conf: &aws_config::SdkConfig) -> aws_sdk_s3::Client {
    // An emulator endpoint has no per-bucket host names: use path style.
    let path_style = conf.endpoint_url().is_some();
    aws_sdk_s3::Client::from_conf(
        aws_sdk_s3::config::Builder::from(conf)
            .force_path_style(path_style)
            .interceptor(requests::RequestCounter)
            .build(),
    )
}

fn dynamodb_client(conf: &aws_config::SdkConfig) -> aws_sdk_dynamodb::Client {
    aws_sdk_dynamodb::Client::from_conf(
        aws_sdk_dynamodb::config::Builder::from(conf)
            .interceptor(requests::RequestCounter)
            .build(),
    )
}

fn sqs_client(conf: &aws_config::SdkConfig) -> aws_sdk_sqs::Client {
    aws_sdk_sqs::Client::from_conf(
        aws_sdk_sqs::config::Builder::from(conf)
            .interceptor(requests::RequestCounter)
            .build(),
    )
}

/// The queue `bootstrap` creates: the one a configured `queue_url` names
/// (its last path segment), else `queue_name`. A `queue_name` set to
/// something else than the URL's is a contradiction, refused.
fn queue_name_to_create(names: &AwsNames) -> Result<String, StoreError> {
    if names.queue_url.is_empty() {
        return Ok(names.queue_name.clone());
    }
    let from_url = names
        .queue_url
        .trim_end_matches('/')
        .rsplit('/')
        .next()
        .unwrap_or_default()
        .to_string();
    if from_url.is_empty() || from_url.contains(':') {
        return Err(StoreError::Invalid(format!(
            "aws.queue_url {:?} does not end in a queue name",
            names.queue_url
        )));
    }
    if names.queue_name != crate::store::DEFAULT_QUEUE_NAME && names.queue_name != from_url {
        return Err(StoreError::Invalid(format!(
            "aws.queue_url names the queue {from_url:?} but aws.queue_name is {:?}: set one of them",
            names.queue_name
        )));
    }
    Ok(from_url)
}

/// The delivery queue's visibility timeout (seconds): at least six times
/// the function's 900 s timeout, AWS's advice for SQS event sources. The
/// SAM template sets the same value (tests/tests/infra.rs checks it).
pub const QUEUE_VISIBILITY_TIMEOUT_SECS: u64 = 5400;

/// How long SQS keeps a ticket (its maximum, 14 days); the queue lifetime
/// is checked from the record, not from this. Template and code agree
/// (tests/tests/infra.rs).
pub const QUEUE_RETENTION_SECS: u64 = 14 * 86_400;

/// Receipts of one ticket before SQS moves it to the dead-letter queue,
/// from which the sweeper re-drives it. Template and code agree.
pub const MAX_RECEIVE_COUNT: u32 = 10;

impl AwsStore {
    /// A domain's unexpired callout verdicts, one scan answer at a time
    /// (they share the greylist table: the scan reads all of it).
    async fn visit_recipients(
        &self,
        domain: &DomainName,
        now: u64,
        visit: &mut (dyn FnMut(CachedRecipient) + Send),
    ) -> Result<(), StoreError> {
        let mut start: Option<HashMap<String, AttributeValue>> = None;
        loop {
            let out = self
                .dynamodb
                .scan()
                .table_name(&self.names.greylist_table)
                .filter_expression("begins_with(pk, :r) AND #d = :d AND expires > :now")
                .expression_attribute_names("#d", "domain")
                .expression_attribute_values(":r", s("r#".to_string()))
                .expression_attribute_values(":d", s(domain.as_str().to_string()))
                .expression_attribute_values(":now", n(now))
                .consistent_read(true)
                .set_exclusive_start_key(start.take())
                .send()
                .await
                .map_err(|e| backend("DynamoDB scan recipients", e))?;
            for item in out.items() {
                if let Some(entry) = item
                    .get("record")
                    .and_then(|v| v.as_s().ok())
                    .and_then(|r| serde_json::from_str::<CachedRecipient>(r).ok())
                {
                    visit(entry);
                }
            }
            match out.last_evaluated_key() {
                Some(k) if !k.is_empty() => start = Some(k.clone()),
                _ => return Ok(()),
            }
        }
    }

    /// Connects to existing resources.
    pub async fn connect(
        conf: &aws_config::SdkConfig,
        names: AwsNames,
    ) -> Result<Self, StoreError> {
        let sqs = sqs_client(conf);
        let queue_url = if names.queue_url.is_empty() {
            sqs.get_queue_url()
                .queue_name(&names.queue_name)
                .send()
                .await
                .map_err(|e| backend(&format!("queue {}", names.queue_name), e))?
                .queue_url()
                .map(String::from)
                .ok_or_else(|| no_answer(&format!("queue {} has no URL", names.queue_name)))?
        } else {
            names.queue_url.clone()
        };
        Ok(AwsStore {
            dynamodb: dynamodb_client(conf),
            s3: s3_client(conf),
            sqs,
            names,
            queue_url,
        })
    }

    /// Creates the tables, bucket and queues with the template's settings
    /// (idempotent), then connects.
    pub async fn bootstrap(
        conf: &aws_config::SdkConfig,
        names: AwsNames,
    ) -> Result<Self, StoreError> {
        let ddb = dynamodb_client(conf);
        for (table, key) in [
            (&names.domains_table, "name"),
            (&names.greylist_table, "pk"),
        ] {
            let created = ddb
                .create_table()
                .table_name(table)
                .billing_mode(BillingMode::PayPerRequest)
                .attribute_definitions(
                    AttributeDefinition::builder()
                        .attribute_name(key)
                        .attribute_type(ScalarAttributeType::S)
                        .build()
                        .map_err(|e| backend("table definition", e))?,
                )
                .key_schema(
                    KeySchemaElement::builder()
                        .attribute_name(key)
                        .key_type(KeyType::Hash)
                        .build()
                        .map_err(|e| backend("table key", e))?,
                )
                .send()
                .await;
            if let Err(e) = created {
                let service = e.into_service_error();
                if !service.is_resource_in_use_exception() {
                    return Err(backend(&format!("create table {table}"), service));
                }
            }
        }
        create_queue_table(&ddb, &names.queue_table).await?;
        let ttl = ddb
            .update_time_to_live()
            .table_name(&names.greylist_table)
            .time_to_live_specification(
                TimeToLiveSpecification::builder()
                    .attribute_name("expires")
                    .enabled(true)
                    .build()
                    .map_err(|e| backend("ttl", e))?,
            )
            .send()
            .await;
        if let Err(e) = ttl {
            // Enabling it twice is refused; that is fine.
            let s = e.into_service_error();
            if !s.to_string().to_lowercase().contains("already enabled") {
                return Err(backend("enable TTL", s));
            }
        }
        let s3 = s3_client(conf);
        if let Err(e) = s3.create_bucket().bucket(&names.bucket).send().await {
            let s = e.into_service_error();
            if !(s.is_bucket_already_owned_by_you() || s.is_bucket_already_exists()) {
                return Err(backend(&format!("create bucket {}", names.bucket), s));
            }
        }
        let sqs = sqs_client(conf);
        let queue_name = queue_name_to_create(&names)?;
        let dlq_name = format!("{queue_name}-dlq");
        let dlq_url = sqs
            .create_queue()
            .queue_name(&dlq_name)
            .attributes(
                QueueAttributeName::MessageRetentionPeriod,
                QUEUE_RETENTION_SECS.to_string(),
            )
            .send()
            .await
            .map_err(|e| backend("create dead-letter queue", e))?
            .queue_url()
            .map(String::from)
            .ok_or_else(|| no_answer("the dead-letter queue was created without a URL"))?;
        let dlq_arn = sqs
            .get_queue_attributes()
            .queue_url(&dlq_url)
            .attribute_names(QueueAttributeName::QueueArn)
            .send()
            .await
            .map_err(|e| backend("dead-letter queue ARN", e))?
            .attributes()
            .and_then(|a| a.get(&QueueAttributeName::QueueArn).cloned())
            .ok_or_else(|| no_answer("the dead-letter queue has no ARN"))?;
        let created_url = sqs
            .create_queue()
            .queue_name(&queue_name)
            .attributes(
                QueueAttributeName::MessageRetentionPeriod,
                QUEUE_RETENTION_SECS.to_string(),
            )
            .attributes(
                QueueAttributeName::VisibilityTimeout,
                QUEUE_VISIBILITY_TIMEOUT_SECS.to_string(),
            )
            .attributes(
                QueueAttributeName::RedrivePolicy,
                format!("{{\"deadLetterTargetArn\":\"{dlq_arn}\",\"maxReceiveCount\":\"{MAX_RECEIVE_COUNT}\"}}"),
            )
            .send()
            .await
            .map_err(|e| backend("create queue", e))?
            .queue_url()
            .map(String::from)
            .ok_or_else(|| no_answer("the queue was created without a URL"))?;
        // A configured queue_url is what the servers will use; the queue it
        // names now exists.
        let queue_url = if names.queue_url.is_empty() {
            created_url
        } else {
            names.queue_url.clone()
        };
        AwsStore::connect(conf, AwsNames { queue_url, ..names }).await
    }

    pub fn queue_url(&self) -> &str {
        &self.queue_url
    }

    pub fn names(&self) -> &AwsNames {
        &self.names
    }

    pub fn sqs(&self) -> &aws_sdk_sqs::Client {
        &self.sqs
    }

    /// The dead-letter queue named by the delivery queue's redrive policy
    /// (the template's and `bootstrap`'s alike); `None` without one.
    pub async fn dead_letter_queue_url(&self) -> Result<Option<String>, StoreError> {
        if !self.names.dead_letter_queue_url.is_empty() {
            return Ok(Some(self.names.dead_letter_queue_url.clone()));
        }
        let attrs = self
            .sqs
            .get_queue_attributes()
            .queue_url(&self.queue_url)
            .attribute_names(QueueAttributeName::RedrivePolicy)
            .send()
            .await
            .map_err(|e| backend("queue redrive policy", e))?;
        let Some(policy) = attrs
            .attributes()
            .and_then(|a| a.get(&QueueAttributeName::RedrivePolicy))
        else {
            return Ok(None);
        };
        let arn = serde_json::from_str::<serde_json::Value>(policy)
            .ok()
            .and_then(|v| v["deadLetterTargetArn"].as_str().map(String::from))
            .ok_or_else(|| StoreError::Invalid(format!("unreadable redrive policy {policy:?}")))?;
        let name = arn.rsplit(':').next().unwrap_or_default();
        let url = self
            .sqs
            .get_queue_url()
            .queue_name(name)
            .send()
            .await
            .map_err(|e| backend(&format!("dead-letter queue {name}"), e))?
            .queue_url()
            .map(String::from);
        Ok(url)
    }

    /// `messages/<yyyy-mm-dd>/<id>` from the time inside the id.
    fn key_base(id: &QueueId) -> String {
        let millis = id.timestamp_millis();
        let date = humantime::format_rfc3339_seconds(
            std::time::UNIX_EPOCH + Duration::from_millis(millis),
        )
        .to_string();
        format!("messages/{}/{id}", &date[..10])
    }

    async fn put_object(
        &self,
        key: &str,
        body: Vec<u8>,
        content_type: &str,
    ) -> Result<(), StoreError> {
        self.s3
            .put_object()
            .bucket(&self.names.bucket)
            .key(key)
            .content_type(content_type)
            .server_side_encryption(ServerSideEncryption::Aes256)
            .body(ByteStream::from(body))
            .send()
            .await
            .map_err(|e| backend(&format!("S3 put {key}"), e))?;
        Ok(())
    }

    async fn get_object(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        match self
            .s3
            .get_object()
            .bucket(&self.names.bucket)
            .key(key)
            .send()
            .await
        {
            Ok(out) => {
                let bytes = out
                    .body
                    .collect()
                    .await
                    .map_err(|e| backend(&format!("S3 read {key}"), e))?;
                Ok(Some(bytes.into_bytes().to_vec()))
            }
            Err(e) => {
                let s = e.into_service_error();
                if s.is_no_such_key() {
                    Ok(None)
                } else {
                    Err(backend(&format!("S3 get {key}"), s))
                }
            }
        }
    }

    async fn delete_object(&self, key: &str) -> Result<(), StoreError> {
        self.s3
            .delete_object()
            .bucket(&self.names.bucket)
            .key(key)
            .send()
            .await
            .map_err(|e| backend(&format!("S3 delete {key}"), e))?;
        Ok(())
    }
}

/// The queue table with its two indexes (see [`queue`]); an existing
/// table is left as it is.
async fn create_queue_table(ddb: &aws_sdk_dynamodb::Client, table: &str) -> Result<(), StoreError> {
    use aws_sdk_dynamodb::types::{GlobalSecondaryIndex, Projection, ProjectionType};
    let attr = |name: &str, kind: ScalarAttributeType| {
        AttributeDefinition::builder()
            .attribute_name(name)
            .attribute_type(kind)
            .build()
            .map_err(|e| backend("queue table definition", e))
    };
    let key = |name: &str, kind: KeyType| {
        KeySchemaElement::builder()
            .attribute_name(name)
            .key_type(kind)
            .build()
            .map_err(|e| backend("queue table key", e))
    };
    let index = |name: &str, hash: &str, projection: Projection| {
        GlobalSecondaryIndex::builder()
            .index_name(name)
            .key_schema(key(hash, KeyType::Hash)?)
            .key_schema(key("due", KeyType::Range)?)
            .projection(projection)
            .build()
            .map_err(|e| backend("queue table index", e))
    };
    let all = Projection::builder()
        .projection_type(ProjectionType::All)
        .build();
    // The sweeper reads every overdue record each minute (a long outage
    // parks thousands): only the attributes it needs.
    let mut light = Projection::builder().projection_type(ProjectionType::Include);
    for attr in queue::BY_DUE_ATTRIBUTES {
        light = light.non_key_attributes(attr);
    }
    let created = ddb
        .create_table()
        .table_name(table)
        .billing_mode(BillingMode::PayPerRequest)
        .attribute_definitions(attr("id", ScalarAttributeType::S)?)
        .attribute_definitions(attr("domain", ScalarAttributeType::S)?)
        .attribute_definitions(attr("q", ScalarAttributeType::S)?)
        .attribute_definitions(attr("due", ScalarAttributeType::N)?)
        .key_schema(key("id", KeyType::Hash)?)
        .global_secondary_indexes(index(queue::BY_DOMAIN, "domain", all)?)
        .global_secondary_indexes(index(queue::BY_DUE, "q", light.build())?)
        .send()
        .await;
    if let Err(e) = created {
        let service = e.into_service_error();
        if !service.is_resource_in_use_exception() {
            return Err(backend(&format!("create table {table}"), service));
        }
    }
    Ok(())
}

fn s(v: impl Into<String>) -> AttributeValue {
    AttributeValue::S(v.into())
}

fn n(v: u64) -> AttributeValue {
    AttributeValue::N(v.to_string())
}

fn get_n(item: &HashMap<String, AttributeValue>, key: &str) -> Option<u64> {
    item.get(key)
        .and_then(|v| v.as_n().ok())
        .and_then(|v| v.parse().ok())
}

fn get_strings(item: &HashMap<String, AttributeValue>, key: &str) -> Option<Vec<String>> {
    match item.get(key)? {
        AttributeValue::L(list) => {
            Some(list.iter().filter_map(|v| v.as_s().ok().cloned()).collect())
        }
        AttributeValue::Ss(set) => Some(set.clone()),
        _ => None,
    }
}

fn domain_item(d: &Domain) -> HashMap<String, AttributeValue> {
    let mut item = HashMap::from([
        ("name".to_string(), s(d.name.as_str())),
        (
            "primary".to_string(),
            AttributeValue::L(d.primary.iter().map(|p| s(p.as_str())).collect()),
        ),
        ("greylist".to_string(), AttributeValue::Bool(d.greylist)),
        ("enabled".to_string(), AttributeValue::Bool(d.enabled)),
    ]);
    if let Some(m) = d.max_message_size {
        item.insert("max_message_size".into(), n(m));
    }
    if let Some(r) = &d.recipients {
        item.insert(
            "recipients".into(),
            AttributeValue::L(r.iter().map(|a| s(a.as_str())).collect()),
        );
    }
    if d.recipient_verify != crate::domain::RecipientVerify::Off {
        item.insert("recipient_verify".into(), s(d.recipient_verify.to_string()));
    }
    if d.defer_while_primary_up {
        item.insert("defer_while_primary_up".into(), AttributeValue::Bool(true));
    }
    if let Some(h) = &d.hold {
        item.insert("hold_reason".into(), s(h.reason.to_string()));
        item.insert("hold_since".into(), n(h.since));
    }
    if let Some(l) = d.queue_lifetime {
        item.insert("queue_lifetime".into(), n(l));
    }
    if !d.filter {
        item.insert("filter".into(), AttributeValue::Bool(false));
    }
    if d.tls != crate::domain::TlsPolicy::Opportunistic {
        item.insert("tls".into(), s(d.tls.to_string()));
    }
    item
}

fn domain_from_item(item: &HashMap<String, AttributeValue>) -> Result<Domain, StoreError> {
    let name = item
        .get("name")
        .and_then(|v| v.as_s().ok())
        .cloned()
        .unwrap_or_default();
    let corrupt = || StoreError::CorruptDomain(name.clone());
    let domain_name = DomainName::parse(&name).map_err(|_| corrupt())?;
    let flag = |k: &str| {
        item.get(k)
            .map(|v| v.as_bool().copied().map_err(|_| corrupt()))
            .transpose()
    };
    Ok(Domain {
        name: domain_name,
        primary: get_strings(item, "primary").unwrap_or_default(),
        greylist: flag("greylist")?.unwrap_or(true),
        max_message_size: get_n(item, "max_message_size"),
        recipients: get_strings(item, "recipients")
            .map(|r| r.into_iter().map(|a| a.to_lowercase()).collect()),
        enabled: flag("enabled")?.unwrap_or(true),
        recipient_verify: match item.get("recipient_verify") {
            None => crate::domain::RecipientVerify::Off,
            Some(v) => v
                .as_s()
                .ok()
                .and_then(|v| v.parse().ok())
                .ok_or_else(corrupt)?,
        },
        defer_while_primary_up: flag("defer_while_primary_up")?.unwrap_or(false),
        filter: flag("filter")?.unwrap_or(true),
        hold: match item.get("hold_reason") {
            None => None,
            Some(v) => Some(crate::domain::Hold {
                reason: v
                    .as_s()
                    .ok()
                    .and_then(|r| r.parse().ok())
                    .ok_or_else(corrupt)?,
                since: get_n(item, "hold_since").unwrap_or(0),
            }),
        },
        queue_lifetime: get_n(item, "queue_lifetime"),
        tls: match item.get("tls") {
            None => crate::domain::TlsPolicy::Opportunistic,
            Some(v) => v
                .as_s()
                .ok()
                .and_then(|v| v.parse().ok())
                .ok_or_else(corrupt)?,
        },
    })
}

#[async_trait]
impl DomainRegistry for AwsStore {
    async fn get(&self, name: &DomainName) -> Result<Option<Domain>, StoreError> {
        let out = self
            .dynamodb
            .get_item()
            .table_name(&self.names.domains_table)
            .key("name", s(name.as_str()))
            .send()
            .await
            .map_err(|e| backend("DynamoDB get domain", e))?;
        out.item().map(domain_from_item).transpose()
    }

    async fn list(&self) -> Result<Vec<Domain>, StoreError> {
        let mut domains = Vec::new();
        let mut start = None;
        loop {
            let out = self
                .dynamodb
                .scan()
                .table_name(&self.names.domains_table)
                .set_exclusive_start_key(start)
                .send()
                .await
                .map_err(|e| backend("DynamoDB scan domains", e))?;
            for item in out.items() {
                domains.push(domain_from_item(item)?);
            }
            match out.last_evaluated_key() {
                Some(k) if !k.is_empty() => start = Some(k.clone()),
                _ => break,
            }
        }
        domains.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(domains)
    }

    async fn put(&self, domain: &Domain) -> Result<(), StoreError> {
        self.dynamodb
            .put_item()
            .table_name(&self.names.domains_table)
            .set_item(Some(domain_item(domain)))
            .send()
            .await
            .map_err(|e| backend("DynamoDB put domain", e))?;
        Ok(())
    }

    async fn remove(&self, name: &DomainName) -> Result<bool, StoreError> {
        let out = self
            .dynamodb
            .delete_item()
            .table_name(&self.names.domains_table)
            .key("name", s(name.as_str()))
            .return_values(aws_sdk_dynamodb::types::ReturnValue::AllOld)
            .send()
            .await
            .map_err(|e| backend("DynamoDB delete domain", e))?;
        Ok(out.attributes().is_some_and(|a| !a.is_empty()))
    }
}

fn triplet_item(key: &str, t: &TripletState) -> HashMap<String, AttributeValue> {
    let mut item = HashMap::from([
        ("pk".to_string(), s(format!("t#{key}"))),
        ("first_seen".to_string(), n(t.first_seen)),
        ("expires".to_string(), n(t.expires)),
    ]);
    if let Some(p) = t.passed_until {
        item.insert("passed_until".into(), n(p));
    }
    item
}

fn triplet_from_item(item: &HashMap<String, AttributeValue>) -> Option<TripletState> {
    Some(TripletState {
        first_seen: get_n(item, "first_seen")?,
        passed_until: get_n(item, "passed_until"),
        expires: get_n(item, "expires")?,
    })
}

impl AwsStore {
    async fn get_greylist_item(
        &self,
        pk: String,
    ) -> Result<Option<HashMap<String, AttributeValue>>, StoreError> {
        let out = self
            .dynamodb
            .get_item()
            .table_name(&self.names.greylist_table)
            .key("pk", s(pk))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| backend("DynamoDB get greylist", e))?;
        Ok(out.item().cloned())
    }

    /// An unconditional put (the newest verdict or state wins).
    async fn put_greylist(
        &self,
        item: HashMap<String, AttributeValue>,
        what: &str,
    ) -> Result<(), StoreError> {
        self.dynamodb
            .put_item()
            .table_name(&self.names.greylist_table)
            .set_item(Some(item))
            .send()
            .await
            .map_err(|e| backend(what, e))?;
        Ok(())
    }

    /// A conditional put: `Ok(false)` when the condition failed.
    async fn put_greylist_if(
        &self,
        item: HashMap<String, AttributeValue>,
        condition: &str,
        values: HashMap<String, AttributeValue>,
    ) -> Result<bool, StoreError> {
        let mut req = self
            .dynamodb
            .put_item()
            .table_name(&self.names.greylist_table)
            .set_item(Some(item))
            .condition_expression(condition);
        if !values.is_empty() {
            req = req.set_expression_attribute_values(Some(values));
        }
        match req.send().await {
            Ok(_) => Ok(true),
            Err(e) => {
                let s = e.into_service_error();
                if s.is_conditional_check_failed_exception() {
                    Ok(false)
                } else {
                    Err(backend("DynamoDB put greylist", s))
                }
            }
        }
    }
}

/// How long a primary's state item outlives its last observation (TTL).
const PRIMARY_STATE_KEEP_SECS: u64 = 30 * 86_400;

/// Recipient verification lives in the greylist table, the store of
/// short-lived verdicts with a TTL: `r#ADDRESS` items (one per cached
/// recipient, with its domain, for `recipients list`) and `p#DOMAIN` items
/// (a primary's state).
#[async_trait]
impl RecipientCache for AwsStore {
    async fn recipient(
        &self,
        address: &str,
        now: u64,
    ) -> Result<Option<CachedRecipient>, StoreError> {
        let Some(item) = self.get_greylist_item(format!("r#{address}")).await? else {
            return Ok(None);
        };
        let entry: CachedRecipient = item
            .get("record")
            .and_then(|v| v.as_s().ok())
            .and_then(|r| serde_json::from_str(r).ok())
            .ok_or_else(|| {
                StoreError::Invalid(format!("corrupt recipient cache item {address}"))
            })?;
        // TTL deletion is lazy: an expired item may still be read.
        Ok((entry.expires > now).then_some(entry))
    }

    async fn put_recipient(
        &self,
        domain: &DomainName,
        entry: &CachedRecipient,
    ) -> Result<(), StoreError> {
        let item = HashMap::from([
            ("pk".to_string(), s(format!("r#{}", entry.address))),
            ("domain".to_string(), s(domain.as_str().to_string())),
            (
                "record".to_string(),
                s(serde_json::to_string(entry).unwrap_or_default()),
            ),
            ("expires".to_string(), n(entry.expires)),
        ]);
        self.put_greylist(item, "DynamoDB put recipient").await
    }

    /// A filtered scan of the greylist table: an operator's command, not
    /// the mail path.
    async fn recipients(
        &self,
        domain: &DomainName,
        now: u64,
    ) -> Result<Vec<CachedRecipient>, StoreError> {
        let mut found = Vec::new();
        self.visit_recipients(domain, now, &mut |entry| found.push(entry))
            .await?;
        found.sort_by(|a, b| a.address.cmp(&b.address));
        Ok(found)
    }

    async fn verdict_counts(
        &self,
        domain: &DomainName,
        now: u64,
    ) -> Result<(usize, usize), StoreError> {
        let mut counts = (0, 0);
        self.visit_recipients(domain, now, &mut |entry| match entry.verdict {
            crate::verify::Verdict::Valid => counts.0 += 1,
            crate::verify::Verdict::Invalid => counts.1 += 1,
        })
        .await?;
        Ok(counts)
    }

    async fn primary_state(&self, domain: &DomainName) -> Result<Option<PrimaryState>, StoreError> {
        let item = self.get_greylist_item(format!("p#{domain}")).await?;
        Ok(item.and_then(|i| {
            Some(PrimaryState {
                up: i.get("up")?.as_bool().ok().copied()?,
                since: get_n(&i, "since")?,
                observed: get_n(&i, "observed")?,
            })
        }))
    }

    async fn put_primary_state(
        &self,
        domain: &DomainName,
        state: &PrimaryState,
    ) -> Result<(), StoreError> {
        let item = HashMap::from([
            ("pk".to_string(), s(format!("p#{domain}"))),
            ("up".to_string(), AttributeValue::Bool(state.up)),
            ("since".to_string(), n(state.since)),
            ("observed".to_string(), n(state.observed)),
            (
                "expires".to_string(),
                n(state.observed + PRIMARY_STATE_KEEP_SECS),
            ),
        ]);
        self.put_greylist(item, "DynamoDB put primary state").await
    }
}

#[async_trait]
impl GreylistStore for AwsStore {
    async fn triplet(&self, key: &str) -> Result<Option<TripletState>, StoreError> {
        Ok(self
            .get_greylist_item(format!("t#{key}"))
            .await?
            .as_ref()
            .and_then(triplet_from_item))
    }

    async fn insert_triplet(&self, key: &str, state: &TripletState) -> Result<bool, StoreError> {
        self.put_greylist_if(
            triplet_item(key, state),
            "attribute_not_exists(pk)",
            HashMap::new(),
        )
        .await
    }

    async fn replace_triplet(
        &self,
        key: &str,
        previous: &TripletState,
        state: &TripletState,
    ) -> Result<bool, StoreError> {
        // The record is unchanged if its first sighting and pass time are.
        let (condition, mut values) = match previous.passed_until {
            Some(p) => (
                "first_seen = :f AND passed_until = :p",
                HashMap::from([(":p".to_string(), n(p))]),
            ),
            None => (
                "first_seen = :f AND attribute_not_exists(passed_until)",
                HashMap::new(),
            ),
        };
        values.insert(":f".into(), n(previous.first_seen));
        self.put_greylist_if(triplet_item(key, state), condition, values)
            .await
    }

    async fn client(&self, network: &str) -> Result<Option<ClientState>, StoreError> {
        let item = self.get_greylist_item(format!("c#{network}")).await?;
        Ok(item.and_then(|i| {
            Some(ClientState {
                passes: u32::try_from(get_n(&i, "passes")?).ok()?,
                last_counted: get_n(&i, "last_counted")?,
                expires: get_n(&i, "expires")?,
            })
        }))
    }

    async fn put_client(
        &self,
        network: &str,
        previous: Option<&ClientState>,
        state: &ClientState,
    ) -> Result<bool, StoreError> {
        let item = HashMap::from([
            ("pk".to_string(), s(format!("c#{network}"))),
            ("passes".to_string(), n(u64::from(state.passes))),
            ("last_counted".to_string(), n(state.last_counted)),
            ("expires".to_string(), n(state.expires)),
        ]);
        match previous {
            None => {
                self.put_greylist_if(item, "attribute_not_exists(pk)", HashMap::new())
                    .await
            }
            Some(p) => {
                let values = HashMap::from([
                    (":n".to_string(), n(u64::from(p.passes))),
                    (":l".to_string(), n(p.last_counted)),
                ]);
                self.put_greylist_if(item, "passes = :n AND last_counted = :l", values)
                    .await
            }
        }
    }

    /// DynamoDB's TTL deletes expired items by itself (lazily); nothing to do.
    async fn sweep(&self, _now: u64) -> Result<(), StoreError> {
        Ok(())
    }
}

#[async_trait]
impl MessageStore for AwsStore {
    async fn put(&self, id: &QueueId, body: &[u8]) -> Result<(), StoreError> {
        self.put_object(
            &format!("{}.eml", Self::key_base(id)),
            body.to_vec(),
            "message/rfc822",
        )
        .await
    }

    async fn put_file(&self, id: &QueueId, body: &SpooledBody) -> Result<(), StoreError> {
        let key = format!("{}.eml", Self::key_base(id));
        // Streamed from the file: the body is never in memory whole.
        let stream = ByteStream::read_from()
            .path(&body.path)
            .length(aws_sdk_s3::primitives::Length::Exact(body.len))
            .build()
            .await
            .map_err(|e| backend(&format!("S3 put {key}: reading the spool file"), e))?;
        self.s3
            .put_object()
            .bucket(&self.names.bucket)
            .key(&key)
            .content_type("message/rfc822")
            .content_length(i64::try_from(body.len).unwrap_or(i64::MAX))
            .server_side_encryption(ServerSideEncryption::Aes256)
            .body(stream)
            .send()
            .await
            .map_err(|e| backend(&format!("S3 put {key}"), e))?;
        Ok(())
    }

    async fn get(&self, id: &QueueId) -> Result<Option<Vec<u8>>, StoreError> {
        self.get_object(&format!("{}.eml", Self::key_base(id)))
            .await
    }

    async fn read_chunk(
        &self,
        id: &QueueId,
        offset: u64,
        max: usize,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        let key = format!("{}.eml", Self::key_base(id));
        let last = offset.saturating_add(max.max(1) as u64 - 1);
        match self
            .s3
            .get_object()
            .bucket(&self.names.bucket)
            .key(&key)
            .range(format!("bytes={offset}-{last}"))
            .send()
            .await
        {
            Ok(out) => {
                let ranged = out.content_range().is_some();
                let bytes = out
                    .body
                    .collect()
                    .await
                    .map_err(|e| backend(&format!("S3 read {key}"), e))?;
                let mut bytes = bytes.into_bytes().to_vec();
                if !ranged {
                    // A server that ignores Range sends the whole object.
                    let start = usize::try_from(offset)
                        .unwrap_or(usize::MAX)
                        .min(bytes.len());
                    bytes = bytes[start..(start.saturating_add(max)).min(bytes.len())].to_vec();
                }
                Ok(Some(bytes))
            }
            Err(e) => {
                // 416: the range starts past the end of the body.
                if e.raw_response().is_some_and(|r| r.status().as_u16() == 416) {
                    return Ok(Some(Vec::new()));
                }
                let s = e.into_service_error();
                if s.is_no_such_key() {
                    Ok(None)
                } else {
                    Err(backend(&format!("S3 get {key}"), s))
                }
            }
        }
    }

    async fn delete(&self, id: &QueueId) -> Result<(), StoreError> {
        self.delete_object(&format!("{}.eml", Self::key_base(id)))
            .await
    }
}

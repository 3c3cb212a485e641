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
//! - outage history and queue-depth samples, in the greylist table: see
//!   `history.rs`.

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

mod bodies;
mod cache;
mod domains;
mod greylist;
mod history;
pub mod queue;
pub mod requests;
mod tlsrpt;
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
    /// The domains' latest outages as this process last saw them
    /// (`HistoryStore::recent_outage`).
    history_cache: std::sync::Arc<crate::history::LatestCache>,
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
            history_cache: std::sync::Arc::new(crate::history::LatestCache::new(
                history::RECENT_FOR,
            )),
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

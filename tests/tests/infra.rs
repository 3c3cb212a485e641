//! The SAM template: every variable the binaries are given is a real
//! config key, the required ones are there, and IAM policies only name the
//! stack's own resources.

use std::collections::BTreeSet;

use relay_core::config::Config;
use serde_yaml::Value;

fn template() -> Value {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../infra/template.yaml"
    ))
    .unwrap();
    serde_yaml::from_str(&text).expect("template is YAML")
}

fn resources(t: &Value) -> &serde_yaml::Mapping {
    t["Resources"].as_mapping().expect("Resources")
}

/// `BACKUPMX_AWS__QUEUE_URL` → `["aws", "queue_url"]`, checked against the
/// serialised default configuration.
fn assert_config_key(var: &str) {
    let rest = var
        .strip_prefix("BACKUPMX_")
        .unwrap_or_else(|| panic!("{var} is not a BACKUPMX_ variable"));
    let mut defaults = serde_json::to_value(Config::default()).unwrap();
    // Optional sections are absent by default: their keys come from a
    // sample.
    defaults["tls"] = serde_json::to_value(relay_core::config::TlsConfig {
        cert: "cert.pem".into(),
        key: "key.pem".into(),
        reload_interval: None,
    })
    .unwrap();
    defaults["filter"] = serde_json::to_value(relay_core::config::FilterConfig {
        rspamd: "http://127.0.0.1:11333".into(),
        timeout: std::time::Duration::from_secs(10),
        on_error: Default::default(),
        max_concurrent: 32,
    })
    .unwrap();
    let mut node = &defaults;
    for part in rest.to_lowercase().split("__") {
        node = node
            .get(part)
            .unwrap_or_else(|| panic!("{var}: no config key {part:?}"));
    }
}

fn function_env(t: &Value) -> BTreeSet<String> {
    let vars = t["Resources"]["RetryFunction"]["Properties"]["Environment"]["Variables"]
        .as_mapping()
        .unwrap();
    vars.keys()
        .map(|k| k.as_str().unwrap().to_string())
        .collect()
}

fn ingest_env(t: &Value) -> Vec<(String, Value)> {
    let containers = t["Resources"]["IngestTaskDefinition"]["Properties"]["ContainerDefinitions"]
        .as_sequence()
        .unwrap();
    containers[0]["Environment"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|e| match e {
            // `!If [Condition, {Name, Value}, !Ref AWS::NoValue]`
            Value::Tagged(t) if t.tag == "!If" => t.value[1].clone(),
            _ => e.clone(),
        })
        .map(|e| (e["Name"].as_str().unwrap().to_string(), e["Value"].clone()))
        .collect()
}

#[test]
fn every_variable_is_a_config_key_and_the_required_ones_are_set() {
    let t = template();
    let function = function_env(&t);
    let ingest: BTreeSet<String> = ingest_env(&t).into_iter().map(|(k, _)| k).collect();
    for var in function.iter().chain(ingest.iter()) {
        assert_config_key(var);
    }
    for required in [
        "BACKUPMX_HOSTNAME",
        "BACKUPMX_STORAGE__BACKEND",
        "BACKUPMX_AWS__DOMAINS_TABLE",
        "BACKUPMX_AWS__GREYLIST_TABLE",
        "BACKUPMX_AWS__BUCKET",
        "BACKUPMX_AWS__QUEUE_URL",
        "BACKUPMX_AWS__QUEUE_TABLE",
    ] {
        assert!(function.contains(required), "retry-fn lacks {required}");
        assert!(ingest.contains(required), "ingest lacks {required}");
    }
    for required in [
        "BACKUPMX_SMTP__LISTEN",
        "BACKUPMX_SMTP__PROXY_PROTOCOL",
        "BACKUPMX_SMTP__TRUSTED_PROXIES",
    ] {
        assert!(ingest.contains(required), "ingest lacks {required}");
    }
    let env: std::collections::HashMap<String, Value> = ingest_env(&t).into_iter().collect();
    assert_eq!(env["BACKUPMX_SMTP__PROXY_PROTOCOL"].as_str(), Some("true"));
    assert_eq!(env["BACKUPMX_STORAGE__BACKEND"].as_str(), Some("aws"));
    // The literal values parse the way the binary will read them.
    let listen: Vec<std::net::SocketAddr> =
        serde_json::from_str(env["BACKUPMX_SMTP__LISTEN"].as_str().unwrap()).unwrap();
    // Unprivileged inside the container; the NLB listens on 25.
    assert_eq!(listen[0].port(), 2525);
}

/// Logical ids a `!Ref`, `!GetAtt` or `!Sub` points at.
fn referenced_ids(v: &Value) -> Vec<String> {
    match v {
        Value::Tagged(t) => {
            let s = t.value.as_str().unwrap_or_default();
            match t.tag.to_string().as_str() {
                "!Ref" => vec![s.to_string()],
                "!GetAtt" => vec![s.split('.').next().unwrap_or_default().to_string()],
                "!Sub" => s
                    .split("${")
                    .skip(1)
                    .map(|p| p.split(['}', '.']).next().unwrap_or_default().to_string())
                    .collect(),
                other => panic!("unexpected tag {other}"),
            }
        }
        Value::Sequence(items) => items.iter().flat_map(referenced_ids).collect(),
        Value::String(s) => {
            panic!("policy resource is a literal {s:?}, not one of the stack's resources")
        }
        other => panic!("unexpected policy resource {other:?}"),
    }
}

#[test]
fn iam_policies_reference_only_the_stacks_own_resources() {
    let t = template();
    let ids: BTreeSet<String> = resources(&t)
        .keys()
        .map(|k| k.as_str().unwrap().to_string())
        .collect();
    let statements = t["Resources"]["IngestTaskRole"]["Properties"]["Policies"][0]
        ["PolicyDocument"]["Statement"]
        .as_sequence()
        .unwrap();
    assert!(!statements.is_empty());
    for st in statements {
        // The STARTTLS certificate's objects: named by the operator (the
        // two parameters), readable only, and only when configured.
        let (st, allowed) = match st {
            Value::Tagged(t) if t.tag == "!If" => {
                assert_eq!(t.value[0].as_str(), Some("WithTls"));
                assert_eq!(t.value[1]["Action"].as_str(), Some("s3:GetObject"));
                (&t.value[1], vec!["TlsCertUri", "TlsKeyUri"])
            }
            _ => (st, Vec::new()),
        };
        assert_eq!(st["Effect"].as_str(), Some("Allow"));
        for id in referenced_ids(&st["Resource"]) {
            assert!(
                ids.contains(&id) || allowed.contains(&id.as_str()),
                "task role names {id}, not a resource of the stack"
            );
        }
        let actions = match &st["Action"] {
            Value::Sequence(a) => a.clone(),
            one => vec![one.clone()],
        };
        for action in &actions {
            assert!(
                !action.as_str().unwrap().contains('*'),
                "wildcard action {action:?}"
            );
        }
    }
    // SAM policy templates on the function: each names one of our resources.
    for policy in t["Resources"]["RetryFunction"]["Properties"]["Policies"]
        .as_sequence()
        .unwrap()
    {
        for (_, args) in policy.as_mapping().unwrap() {
            for (_, value) in args.as_mapping().unwrap() {
                for id in referenced_ids(value) {
                    assert!(
                        ids.contains(&id),
                        "retry-fn policy names {id}, not a resource of the stack"
                    );
                }
            }
        }
    }
}

#[test]
fn queue_and_function_settings_fit_together() {
    let t = template();
    let r = &t["Resources"];
    let timeout = t["Parameters"]["RetryFunctionTimeout"]["Default"]
        .as_u64()
        .unwrap();
    let visibility = r["DeliveryQueue"]["Properties"]["VisibilityTimeout"]
        .as_u64()
        .unwrap();
    assert!(
        visibility >= 6 * timeout,
        "visibility {visibility} < 6 x {timeout}"
    );
    // One value in the template and in the code (bootstrap, retry-fn).
    assert_eq!(
        visibility,
        relay_core::store::aws::QUEUE_VISIBILITY_TIMEOUT_SECS
    );
    assert_eq!(
        r["DeliveryQueue"]["Properties"]["MessageRetentionPeriod"].as_u64(),
        Some(relay_core::store::aws::QUEUE_RETENTION_SECS)
    );
    assert_eq!(
        r["DeadLetterQueue"]["Properties"]["MessageRetentionPeriod"].as_u64(),
        Some(relay_core::store::aws::QUEUE_RETENTION_SECS)
    );
    assert_eq!(
        r["DeliveryQueue"]["Properties"]["RedrivePolicy"]["maxReceiveCount"].as_u64(),
        Some(u64::from(relay_core::store::aws::MAX_RECEIVE_COUNT))
    );
    // Bodies outlive the longest queue lifetime an operator may set.
    let rules = r["MessagesBucket"]["Properties"]["LifecycleConfiguration"]["Rules"]
        .as_sequence()
        .unwrap();
    let expiry = rules
        .iter()
        .find(|rule| rule["Prefix"].as_str() == Some("messages/"))
        .and_then(|rule| rule["ExpirationInDays"].as_u64());
    assert_eq!(expiry, Some(relay_core::config::AWS_BODY_EXPIRATION_DAYS));
    assert!(
        relay_core::config::AWS_BODY_EXPIRATION_DAYS * 86_400
            > relay_core::config::MAX_QUEUE_LIFETIME.as_secs() + 86_400
    );
    let event = &r["RetryFunction"]["Properties"]["Events"]["Queue"]["Properties"];
    assert_eq!(
        event["FunctionResponseTypes"][0].as_str(),
        Some("ReportBatchItemFailures")
    );
    assert!(
        event["ScalingConfig"]["MaximumConcurrency"].is_tagged()
            || event["ScalingConfig"]["MaximumConcurrency"].is_number()
    );
    assert_eq!(
        r["RetryFunction"]["Properties"]["Runtime"].as_str(),
        Some("provided.al2023")
    );
    assert_eq!(
        r["RetryFunction"]["Metadata"]["BuildMethod"].as_str(),
        Some("rust-cargolambda")
    );
    let tg = r["IngestTargetGroup"]["Properties"]["TargetGroupAttributes"]
        .as_sequence()
        .unwrap();
    assert!(tg
        .iter()
        .any(|a| a["Key"] == "proxy_protocol_v2.enabled" && a["Value"] == "true"));
    assert_eq!(
        r["GreylistTable"]["Properties"]["TimeToLiveSpecification"]["AttributeName"].as_str(),
        Some("expires")
    );
    // Bodies outlive the longest queue lifetime, whatever QueueLifetime says.
    let rules = r["MessagesBucket"]["Properties"]["LifecycleConfiguration"]["Rules"]
        .as_sequence()
        .unwrap();
    for rule in rules {
        let days = rule["ExpirationInDays"].as_u64().unwrap();
        assert!(days >= 60 + 2, "bucket lifecycle {days} d < 60 d + margin");
    }
    let lifetime = t["Parameters"]["QueueLifetime"]["Default"]
        .as_str()
        .unwrap();
    let lifetime = relay_core::config::parse_duration(lifetime).unwrap();
    assert!(lifetime.as_secs() <= 60 * 86_400);
    // The binary the function is built from exists in the workspace.
    let binary = r["RetryFunction"]["Metadata"]["BuildProperties"]["Binary"]
        .as_str()
        .unwrap();
    let manifest = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../retry-fn/Cargo.toml"
    ))
    .unwrap();
    assert!(manifest.contains(&format!("name = \"{binary}\"")));
}

trait IsTagged {
    fn is_tagged(&self) -> bool;
}

impl IsTagged for Value {
    fn is_tagged(&self) -> bool {
        matches!(self, Value::Tagged(_))
    }
}

/// The queue table's indexes are the ones the code queries, and the
/// sweeper is scheduled: without it a lost SQS message would orphan a
/// record for good.
#[test]
fn the_queue_table_and_the_sweeper_match_the_code() {
    let t = template();
    let r = &t["Resources"];
    let table = &r["QueueTable"];
    assert_eq!(table["DeletionPolicy"].as_str(), Some("Retain"));
    let indexes: Vec<&str> = table["Properties"]["GlobalSecondaryIndexes"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|i| i["IndexName"].as_str().unwrap())
        .collect();
    assert_eq!(
        indexes,
        [
            relay_core::store::aws::queue::BY_DOMAIN,
            relay_core::store::aws::queue::BY_DUE
        ]
    );
    let by_due = &table["Properties"]["GlobalSecondaryIndexes"][1]["Projection"];
    let projected: Vec<&str> = by_due["NonKeyAttributes"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert_eq!(projected, relay_core::store::aws::queue::BY_DUE_ATTRIBUTES);
    // The queue-age alarm reads the sweeper's log line.
    assert_eq!(
        r["QueueAgeMetricFilter"]["Properties"]["MetricTransformations"][0]["MetricValue"].as_str(),
        Some("$.fields.oldest_overdue_secs")
    );
    assert!(
        table["Properties"]["TimeToLiveSpecification"].is_null(),
        "queue records must never expire on their own"
    );
    let sweep = &r["RetryFunction"]["Properties"]["Events"]["Sweep"];
    assert_eq!(sweep["Type"].as_str(), Some("Schedule"));
    assert_eq!(
        sweep["Properties"]["Schedule"].as_str(),
        Some("rate(1 minute)")
    );
    assert!(function_env(&t).contains("BACKUPMX_AWS__DEAD_LETTER_QUEUE_URL"));
}

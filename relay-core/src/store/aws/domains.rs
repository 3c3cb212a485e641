//! Hosted domains in the domains table.

use super::*;

pub(super) fn domain_item(d: &Domain) -> HashMap<String, AttributeValue> {
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
    if !d.bounce_storm_guard {
        item.insert("bounce_storm_guard".into(), AttributeValue::Bool(false));
    }
    if d.auth != crate::domain::AuthPolicy::Annotate {
        item.insert("auth".into(), s(d.auth.to_string()));
    }
    if d.tls != crate::domain::TlsPolicy::Opportunistic {
        item.insert("tls".into(), s(d.tls.to_string()));
    }
    item
}

pub(super) fn domain_from_item(
    item: &HashMap<String, AttributeValue>,
) -> Result<Domain, StoreError> {
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
        bounce_storm_guard: flag("bounce_storm_guard")?.unwrap_or(true),
        auth: match item.get("auth") {
            None => crate::domain::AuthPolicy::Annotate,
            Some(v) => v
                .as_s()
                .ok()
                .and_then(|v| v.parse().ok())
                .ok_or_else(corrupt)?,
        },
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

//! TLS report counters (RFC 8460) in the greylist table, the table of
//! short-lived state with a TTL: `x#DAY#DOMAIN#POLICY#MX#IP#RESULT` items
//! with an atomic `count` (ADD), and `xs#DAY#DOMAIN` marking a report
//! sent (a conditional put: one sender per report across processes).
//! Both expire after [`KEEP_DAYS`].

use super::*;
use crate::store::TlsReportStore;
use crate::tlsrpt::{SessionOutcome, DAY};

/// Days the counters and marks are kept.
const KEEP_DAYS: u64 = 8;

#[async_trait]
impl TlsReportStore for AwsStore {
    async fn count_session(
        &self,
        day: u64,
        domain: &DomainName,
        outcome: &SessionOutcome,
    ) -> Result<(), StoreError> {
        let pk = format!(
            "x#{day}#{domain}#{}#{}#{}#{}",
            outcome.policy.as_str(),
            outcome.mx_host,
            outcome.receiving_ip,
            outcome.result_name()
        );
        self.dynamodb
            .update_item()
            .table_name(&self.names.greylist_table)
            .key("pk", s(pk))
            .update_expression(
                "ADD #c :one SET #day = :day, #d = :d, policy = :p, mx = :mx, ip = :ip, #r = :r, expires = :exp",
            )
            .expression_attribute_names("#c", "count")
            .expression_attribute_names("#day", "day")
            .expression_attribute_names("#d", "domain")
            .expression_attribute_names("#r", "result")
            .expression_attribute_values(":one", n(1))
            .expression_attribute_values(":day", n(day))
            .expression_attribute_values(":d", s(domain.as_str().to_string()))
            .expression_attribute_values(":p", s(outcome.policy.as_str().to_string()))
            .expression_attribute_values(":mx", s(outcome.mx_host.clone()))
            .expression_attribute_values(":ip", s(outcome.receiving_ip.clone()))
            .expression_attribute_values(":r", s(outcome.result_name().to_string()))
            .expression_attribute_values(":exp", n((day + KEEP_DAYS) * DAY))
            .send()
            .await
            .map_err(|e| backend("DynamoDB count TLS session", e))?;
        Ok(())
    }

    /// A filtered scan: once a day, by the sender of the reports.
    async fn sessions_of_day(
        &self,
        day: u64,
    ) -> Result<Vec<(DomainName, SessionOutcome, u64)>, StoreError> {
        let mut found = Vec::new();
        let mut start: Option<HashMap<String, AttributeValue>> = None;
        let text = |item: &HashMap<String, AttributeValue>, key: &str| {
            item.get(key)
                .and_then(|v| v.as_s().ok())
                .cloned()
                .unwrap_or_default()
        };
        loop {
            let out = self
                .dynamodb
                .scan()
                .table_name(&self.names.greylist_table)
                .filter_expression("begins_with(pk, :prefix)")
                .expression_attribute_values(":prefix", s(format!("x#{day}#")))
                .consistent_read(true)
                .set_exclusive_start_key(start.take())
                .send()
                .await
                .map_err(|e| backend("DynamoDB scan TLS sessions", e))?;
            for item in out.items() {
                let outcome = SessionOutcome::from_parts(
                    &text(item, "policy"),
                    &text(item, "mx"),
                    &text(item, "ip"),
                    &text(item, "result"),
                );
                let domain = DomainName::parse(&text(item, "domain")).ok();
                if let (Some(outcome), Some(domain), Some(count)) =
                    (outcome, domain, get_n(item, "count"))
                {
                    found.push((domain, outcome, count));
                }
            }
            match out.last_evaluated_key() {
                Some(k) if !k.is_empty() => start = Some(k.clone()),
                _ => return Ok(found),
            }
        }
    }

    async fn claim_report(&self, day: u64, domain: &DomainName) -> Result<bool, StoreError> {
        let item = HashMap::from([
            ("pk".to_string(), s(format!("xs#{day}#{domain}"))),
            ("expires".to_string(), n((day + KEEP_DAYS) * DAY)),
        ]);
        self.put_greylist_if(item, "attribute_not_exists(pk)", HashMap::new())
            .await
    }
}

//! Counts the requests the AWS backend makes, by service and operation:
//! what AWS bills for. Each attempt of a request counts (a retried request
//! is billed twice). Exported as `backupmx_aws_requests_total` and kept in
//! the process for a summary (`retry-fn poll` logs one when it stops), so
//! the cost per message can be measured (infra/README.md).

use crate::sync::Mutex;
use std::collections::BTreeMap;

use aws_sdk_s3::config::interceptors::BeforeTransmitInterceptorContextRef;
use aws_sdk_s3::config::{ConfigBag, Intercept, RuntimeComponents};
use aws_smithy_runtime_api::box_error::BoxError;
use aws_smithy_runtime_api::client::orchestrator::Metadata;

static COUNTS: Mutex<BTreeMap<(String, String), u64>> = Mutex::new(BTreeMap::new());

/// The interceptor every AWS client of the backend carries.
#[derive(Debug, Clone, Copy, Default)]
pub struct RequestCounter;

impl Intercept for RequestCounter {
    fn name(&self) -> &'static str {
        "backupmx-request-counter"
    }

    fn read_before_attempt(
        &self,
        _context: &BeforeTransmitInterceptorContextRef<'_>,
        _components: &RuntimeComponents,
        cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        if let Some(m) = cfg.load::<Metadata>() {
            metrics::counter!(
                "backupmx_aws_requests_total",
                "service" => m.service().to_string(),
                "operation" => m.name().to_string()
            )
            .increment(1);
            let mut counts = COUNTS.lock();
            *counts
                .entry((m.service().to_string(), m.name().to_string()))
                .or_insert(0) += 1;
        }
        Ok(())
    }
}

/// Requests made by this process so far: `(service, operation) → count`.
pub fn snapshot() -> BTreeMap<(String, String), u64> {
    COUNTS.lock().clone()
}

/// One line: `DynamoDB.GetItem=3 S3.PutObject=1 …`, and the total.
pub fn summary() -> (u64, String) {
    let counts = snapshot();
    let total = counts.values().sum();
    let line = counts
        .iter()
        .map(|((service, op), n)| format!("{service}.{op}={n}"))
        .collect::<Vec<_>>()
        .join(" ");
    (total, line)
}

//! TLS report counters (RFC 8460).

use super::*;
use crate::tlsrpt::SessionOutcome;

#[async_trait]
impl TlsReportStore for LocalStore {
    async fn count_session(
        &self,
        day: u64,
        domain: &DomainName,
        outcome: &SessionOutcome,
    ) -> Result<(), StoreError> {
        self.write(WriteOp::CountTlsSession {
            day,
            domain: domain.clone(),
            outcome: outcome.clone(),
        })
        .await
        .map(|_| ())
    }

    async fn sessions_of_day(
        &self,
        day: u64,
    ) -> Result<Vec<(DomainName, SessionOutcome, u64)>, StoreError> {
        type Row = (String, String, String, String, String, i64);
        let rows: Vec<Row> = self.read(|c| {
            let mut st = c.prepare_cached(
                "SELECT domain, policy, mx, ip, result, count FROM tlsrpt_sessions WHERE day = ?1",
            )?;
            let rows = st.query_map([day as i64], |r| {
                Ok((
                    r.get(0)?,
                    r.get(1)?,
                    r.get(2)?,
                    r.get(3)?,
                    r.get(4)?,
                    r.get(5)?,
                ))
            })?;
            rows.collect()
        })?;
        Ok(rows
            .into_iter()
            .filter_map(|(domain, policy, mx, ip, result, count)| {
                let outcome = SessionOutcome::from_parts(&policy, &mx, &ip, &result)?;
                Some((DomainName::parse(&domain).ok()?, outcome, count as u64))
            })
            .collect())
    }

    async fn claim_report(&self, day: u64, domain: &DomainName) -> Result<bool, StoreError> {
        self.write(WriteOp::ClaimTlsReport {
            day,
            domain: domain.clone(),
        })
        .await
    }
}

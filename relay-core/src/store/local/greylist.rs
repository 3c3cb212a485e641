//! Greylisting triplets and client states.

use super::*;

#[async_trait]
impl GreylistStore for LocalStore {
    async fn triplet(&self, key: &str) -> Result<Option<TripletState>, StoreError> {
        let row: Option<String> =
            self.read_optional("SELECT state FROM greylist WHERE key = ?1", [key])?;
        row.map(|r| {
            serde_json::from_str(&r)
                .map_err(|_| StoreError::Invalid(format!("corrupt greylist record {key}")))
        })
        .transpose()
    }

    async fn insert_triplet(&self, key: &str, state: &TripletState) -> Result<bool, StoreError> {
        self.write(WriteOp::InsertTriplet {
            key: key.to_string(),
            state: *state,
        })
        .await
    }

    async fn replace_triplet(
        &self,
        key: &str,
        previous: &TripletState,
        state: &TripletState,
    ) -> Result<bool, StoreError> {
        self.write(WriteOp::ReplaceTriplet {
            key: key.to_string(),
            previous: *previous,
            state: *state,
        })
        .await
    }

    async fn client(&self, network: &str) -> Result<Option<ClientState>, StoreError> {
        let row: Option<String> = self.read_optional(
            "SELECT state FROM greylist_clients WHERE network = ?1",
            [network],
        )?;
        row.map(|r| {
            serde_json::from_str(&r).map_err(|_| {
                StoreError::Invalid(format!("corrupt greylist client record {network}"))
            })
        })
        .transpose()
    }

    async fn put_client(
        &self,
        network: &str,
        previous: Option<&ClientState>,
        state: &ClientState,
    ) -> Result<bool, StoreError> {
        self.write(WriteOp::PutClient {
            network: network.to_string(),
            previous: previous.copied(),
            state: *state,
        })
        .await
    }

    async fn sweep(&self, now: u64) -> Result<(), StoreError> {
        self.write(WriteOp::SweepGreylist(now)).await.map(|_| ())
    }
}

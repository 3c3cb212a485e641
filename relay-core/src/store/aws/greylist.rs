//! Greylisting triplets and client states in the greylist table.

use super::*;

pub(super) fn triplet_item(key: &str, t: &TripletState) -> HashMap<String, AttributeValue> {
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

pub(super) fn triplet_from_item(item: &HashMap<String, AttributeValue>) -> Option<TripletState> {
    Some(TripletState {
        first_seen: get_n(item, "first_seen")?,
        passed_until: get_n(item, "passed_until"),
        expires: get_n(item, "expires")?,
    })
}

impl AwsStore {
    pub(super) async fn get_greylist_item(
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
    pub(super) async fn put_greylist(
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

    /// Takes a turn named `key` until `expires` (Unix seconds): true for
    /// one caller among every process (a periodic pass that must not run
    /// twice at once).
    pub async fn take_turn(&self, key: &str, expires: u64) -> Result<bool, StoreError> {
        let item = HashMap::from([
            ("pk".to_string(), s(format!("turn#{key}"))),
            ("expires".to_string(), n(expires)),
        ]);
        let values = HashMap::from([(
            ":now".to_string(),
            n(crate::time::unix_seconds(std::time::SystemTime::now())),
        )]);
        self.put_greylist_if(item, "attribute_not_exists(pk) OR expires <= :now", values)
            .await
    }

    /// A conditional put: `Ok(false)` when the condition failed.
    pub(super) async fn put_greylist_if(
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

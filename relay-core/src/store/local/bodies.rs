//! Message bodies: written from a spool file, read in pieces.

use super::*;

#[async_trait]
impl MessageStore for LocalStore {
    async fn put(&self, id: &QueueId, body: &[u8]) -> Result<(), StoreError> {
        self.write(WriteOp::PutBody {
            id: id.clone(),
            body: body.to_vec(),
        })
        .await
        .map(|_| ())
    }

    async fn put_file(&self, id: &QueueId, body: &SpooledBody) -> Result<(), StoreError> {
        self.write(WriteOp::PutFile {
            id: id.clone(),
            body: body.clone(),
        })
        .await
        .map(|_| ())
    }

    async fn get(&self, id: &QueueId) -> Result<Option<Vec<u8>>, StoreError> {
        self.read_optional("SELECT body FROM messages WHERE id = ?1", [id.as_str()])
    }

    async fn read_chunk(
        &self,
        id: &QueueId,
        offset: u64,
        max: usize,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        self.read(|c| {
            let Some(rowid) = c
                .prepare_cached("SELECT rowid FROM messages WHERE id = ?1")?
                .query_row([id.as_str()], |r| r.get::<_, i64>(0))
                .optional()?
            else {
                return Ok(None);
            };
            // Only the pages of the piece are read, not the whole blob.
            let blob = c.blob_open(rusqlite::MAIN_DB, "messages", "body", rowid, true)?;
            let len = blob.len() as u64;
            let start = offset.min(len);
            let n = usize::try_from(len - start).unwrap_or(usize::MAX).min(max);
            let mut buf = vec![0u8; n];
            blob.read_at_exact(&mut buf, start as usize)?;
            Ok(Some(buf))
        })
    }

    async fn delete(&self, id: &QueueId) -> Result<(), StoreError> {
        self.write(WriteOp::DeleteBody(id.clone()))
            .await
            .map(|_| ())
    }
}

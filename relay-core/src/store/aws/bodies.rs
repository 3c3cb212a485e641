//! Message bodies in S3: put whole or from a spool file, read by range.

use super::*;

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

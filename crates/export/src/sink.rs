//! Where the bytes of one export file go: a temporary local file renamed on completion, or a
//! multipart upload completed on completion. Either is undone when dropped unfinished.

use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use object_store::path::Path as ObjectPath;
use object_store::{MultipartUpload, ObjectStore, ObjectStoreExt, PutPayloadMut};
use tokio::io::AsyncWriteExt;
use tokio::task::JoinSet;

use crate::ExportError;

/// Parts uploaded at once per file: enough to keep a link busy, while memory stays at
/// `UPLOAD_CONCURRENCY` parts.
const UPLOAD_CONCURRENCY: usize = 4;

/// A file being written.
pub(crate) enum Sink {
    Local(LocalSink),
    Upload(UploadSink),
}

impl Sink {
    /// Starts `name` in a local folder (as `name.tmp`).
    pub(crate) async fn local(dir: &std::path::Path, name: &str) -> Result<Self, ExportError> {
        let path = dir.join(name);
        let tmp = dir.join(format!("{name}.tmp"));
        let file = tokio::fs::File::create(&tmp)
            .await
            .map_err(|error| ExportError::Io {
                path: tmp.clone(),
                error,
            })?;
        Ok(Sink::Local(LocalSink {
            file: Some(file),
            tmp,
            path,
            bytes: 0,
        }))
    }

    /// Starts a multipart upload of `location` (so credentials and bucket are checked now).
    pub(crate) async fn upload(
        store: Arc<dyn ObjectStore>,
        location: ObjectPath,
        url: String,
        part_size: usize,
    ) -> Result<Self, ExportError> {
        let upload = store
            .put_multipart(&location)
            .await
            .map_err(|error| ExportError::Store {
                url: url.clone(),
                error,
            })?;
        Ok(Sink::Upload(UploadSink {
            upload: Some(upload),
            buffer: PutPayloadMut::new(),
            part_size,
            tasks: JoinSet::new(),
            url,
            bytes: 0,
        }))
    }

    /// Appends bytes.
    pub(crate) async fn write(&mut self, data: Bytes) -> Result<(), ExportError> {
        match self {
            Sink::Local(s) => s.write(&data).await,
            Sink::Upload(s) => s.write(data).await,
        }
    }

    /// Makes the file visible under its final name; returns its size.
    pub(crate) async fn finish(self) -> Result<u64, ExportError> {
        match self {
            Sink::Local(s) => s.finish().await,
            Sink::Upload(s) => s.finish().await,
        }
    }

    /// Discards the file now (dropping does the same, in the background for uploads).
    pub(crate) async fn abort(self) {
        match self {
            Sink::Local(s) => drop(s),
            Sink::Upload(s) => s.abort().await,
        }
    }
}

/// A local file written as `name.tmp` and renamed to `name` by [`LocalSink::finish`].
pub(crate) struct LocalSink {
    /// `None` once finished.
    file: Option<tokio::fs::File>,
    tmp: PathBuf,
    path: PathBuf,
    bytes: u64,
}

impl LocalSink {
    async fn write(&mut self, data: &[u8]) -> Result<(), ExportError> {
        let Some(file) = self.file.as_mut() else {
            return Err(ExportError::Aborted);
        };
        file.write_all(data)
            .await
            .map_err(|error| ExportError::Io {
                path: self.tmp.clone(),
                error,
            })?;
        self.bytes += data.len() as u64;
        Ok(())
    }

    async fn finish(mut self) -> Result<u64, ExportError> {
        let Some(mut file) = self.file.take() else {
            return Err(ExportError::Aborted);
        };
        let io = |path: &PathBuf| {
            let path = path.clone();
            move |error| ExportError::Io { path, error }
        };
        file.flush().await.map_err(io(&self.tmp))?;
        // Durable before it gets its final name: a crash must not leave a truncated file there.
        file.sync_all().await.map_err(io(&self.tmp))?;
        drop(file);
        if let Err(e) = tokio::fs::rename(&self.tmp, &self.path).await {
            let _ = std::fs::remove_file(&self.tmp);
            return Err(io(&self.path)(e));
        }
        Ok(self.bytes)
    }
}

impl Drop for LocalSink {
    fn drop(&mut self) {
        if self.file.take().is_some()
            && let Err(e) = std::fs::remove_file(&self.tmp)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(path = %self.tmp.display(), error = %e, "cannot remove unfinished export file");
        }
    }
}

/// A multipart upload fed in parts of exactly `part_size` bytes (some S3-compatible stores,
/// R2 for one, require equal parts), with at most [`UPLOAD_CONCURRENCY`] in flight.
///
/// Not object_store's `WriteMultipart`: when one of its parts fails, its `finish` returns without
/// aborting the upload, and an export must never leave one behind.
pub(crate) struct UploadSink {
    /// `None` once completed or aborted.
    upload: Option<Box<dyn MultipartUpload>>,
    /// The part being filled.
    buffer: PutPayloadMut,
    part_size: usize,
    tasks: JoinSet<object_store::Result<()>>,
    url: String,
    bytes: u64,
}

impl UploadSink {
    async fn write(&mut self, mut data: Bytes) -> Result<(), ExportError> {
        self.bytes += data.len() as u64;
        while !data.is_empty() {
            let room = self.part_size - self.buffer.content_length();
            if data.len() < room {
                self.buffer.push(data);
                break;
            }
            self.buffer.push(data.split_to(room));
            self.send_part().await?;
        }
        Ok(())
    }

    /// Uploads the buffered part once fewer than [`UPLOAD_CONCURRENCY`] are in flight.
    async fn send_part(&mut self) -> Result<(), ExportError> {
        self.wait_for_parts(UPLOAD_CONCURRENCY - 1).await?;
        let part = std::mem::take(&mut self.buffer);
        let Some(upload) = self.upload.as_mut() else {
            return Err(ExportError::Aborted);
        };
        self.tasks.spawn(upload.put_part(part.into()));
        Ok(())
    }

    /// Waits until at most `in_flight` parts are being uploaded.
    async fn wait_for_parts(&mut self, in_flight: usize) -> Result<(), ExportError> {
        while self.tasks.len() > in_flight {
            match self.tasks.join_next().await {
                Some(Ok(Ok(()))) | None => {}
                Some(Ok(Err(error))) => {
                    return Err(ExportError::Store {
                        url: self.url.clone(),
                        error,
                    });
                }
                Some(Err(join)) => return Err(ExportError::Task(join.to_string())),
            }
        }
        Ok(())
    }

    async fn finish(mut self) -> Result<u64, ExportError> {
        let result = self.complete().await;
        if result.is_err() {
            self.abort_now().await;
        }
        result.map(|()| self.bytes)
    }

    async fn complete(&mut self) -> Result<(), ExportError> {
        if !self.buffer.is_empty() {
            self.send_part().await?;
        }
        self.wait_for_parts(0).await?;
        let Some(upload) = self.upload.as_mut() else {
            return Err(ExportError::Aborted);
        };
        upload
            .complete()
            .await
            .map_err(|error| ExportError::Store {
                url: self.url.clone(),
                error,
            })?;
        self.upload = None;
        Ok(())
    }

    async fn abort(mut self) {
        self.abort_now().await;
    }

    async fn abort_now(&mut self) {
        self.tasks.shutdown().await;
        if let Some(mut upload) = self.upload.take()
            && let Err(e) = upload.abort().await
        {
            tracing::warn!(url = %self.url, error = %e, "cannot abort multipart upload");
        }
    }
}

impl Drop for UploadSink {
    fn drop(&mut self) {
        let Some(mut upload) = self.upload.take() else {
            return;
        };
        // The JoinSet aborts the part uploads as it drops; the upload itself needs a request.
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                let url = std::mem::take(&mut self.url);
                runtime.spawn(async move {
                    if let Err(e) = upload.abort().await {
                        tracing::warn!(%url, error = %e, "cannot abort multipart upload");
                    }
                });
            }
            Err(_) => tracing::warn!(
                url = %self.url,
                "export dropped outside a runtime: its multipart upload stays until the bucket's \
                 lifecycle rules remove it"
            ),
        }
    }
}

/// Deletes a finished object in the background (an abandoned export's earlier files).
pub(crate) fn delete_in_background(store: Arc<dyn ObjectStore>, location: ObjectPath, url: String) {
    match tokio::runtime::Handle::try_current() {
        Ok(runtime) => {
            runtime.spawn(async move {
                if let Err(e) = store.delete(&location).await {
                    tracing::warn!(%url, error = %e, "cannot delete file of an abandoned export");
                }
            });
        }
        Err(_) => tracing::warn!(%url, "export dropped outside a runtime: its file stays"),
    }
}

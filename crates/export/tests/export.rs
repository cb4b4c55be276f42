//! Exports to a local folder and to an in-memory object store, read back with the `parquet` and
//! `csv` crates' readers.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use common::{Row, assert_rows_equal, list_dir, read_csv, read_parquet, sample_rows, write_all};
use ferrohub_export::{Destination, ExportError, ExportFormat, ExportOptions, Exporter, RowBatch};
use ferrohub_types::telemetry::Value;
use futures_util::stream::BoxStream;
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    ObjectStoreExt, PutMultipartOptions, PutOptions, PutPayload, PutResult, UploadPart,
};

fn options(max_rows_per_file: u64, row_group_rows: usize) -> ExportOptions {
    ExportOptions {
        max_rows_per_file,
        row_group_rows,
        ..ExportOptions::new("acme, \"inc\"")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parquet_to_a_folder_with_rollover_and_small_row_groups() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("nested/exports"); // created on demand
    let rows = sample_rows(100_003);
    let opts = options(30_000, 7_000);
    let tenant = opts.tenant.clone();

    let mut exporter = Exporter::create(
        Destination::Local(out.clone()),
        ExportFormat::Parquet,
        "telemetry",
        opts,
    )
    .await
    .unwrap();
    let progress = exporter.progress();
    write_all(&mut exporter, &rows[..50_000], 4_093)
        .await
        .unwrap();
    assert_eq!(progress.rows(), 50_000);
    // Mid-export: the first file is complete, the second is still a temporary file.
    assert_eq!(
        list_dir(&out),
        ["telemetry-00001.parquet.tmp", "telemetry.parquet"]
    );
    write_all(&mut exporter, &rows[50_000..], 4_093)
        .await
        .unwrap();
    let summary = exporter.finish().await.unwrap();
    assert_eq!(progress.rows(), rows.len() as u64);

    let names = [
        "telemetry.parquet",
        "telemetry-00001.parquet",
        "telemetry-00002.parquet",
        "telemetry-00003.parquet",
    ];
    let out = out.canonicalize().unwrap();
    assert_eq!(summary.rows, rows.len() as u64);
    assert_eq!(
        summary.files,
        names
            .iter()
            .map(|n| out.join(n).display().to_string())
            .collect::<Vec<_>>()
    );
    let mut sorted = names.to_vec();
    sorted.sort();
    assert_eq!(list_dir(&out), sorted, "no temporary files left");

    let mut got = Vec::new();
    let mut bytes = 0;
    for (i, file) in summary.files.iter().enumerate() {
        let data = std::fs::read(file).unwrap();
        bytes += data.len() as u64;
        let (file_rows, groups) = read_parquet(Bytes::from(data), &tenant);
        let expected_groups: &[i64] = if i < 3 {
            &[7_000, 7_000, 7_000, 7_000, 2_000]
        } else {
            &[7_000, 3_003]
        };
        assert_eq!(groups, expected_groups, "{file}");
        got.extend(file_rows);
    }
    assert_eq!(summary.bytes, bytes);
    assert_rows_equal(&got, &rows);
}

#[tokio::test]
async fn csv_round_trips_quotes_commas_and_newlines() {
    let dir = tempfile::tempdir().unwrap();
    let mut rows = sample_rows(20_000);
    // The edges of the timestamp range and awkward names in every column.
    for (i, s) in common::AWKWARD.iter().enumerate() {
        rows.push(Row {
            device: format!("d{i}{s}"),
            metric: s.to_string(),
            ts_ms: if i % 2 == 0 { 0 } else { 253_402_300_799_999 },
            value: Value::Str(s.to_string()),
        });
    }
    let opts = options(8_000, 1_000);
    let tenant = opts.tenant.clone();
    let url = format!("file://{}", dir.path().display());
    let mut exporter = Exporter::create(
        Destination::parse(&url).unwrap(),
        ExportFormat::Csv,
        "t",
        opts,
    )
    .await
    .unwrap();
    write_all(&mut exporter, &rows, 1_000).await.unwrap();
    let summary = exporter.finish().await.unwrap();
    assert_eq!(summary.files.len(), 3);
    assert!(summary.files[1].ends_with("/t-00001.csv"));
    let mut got = Vec::new();
    for file in &summary.files {
        let data = std::fs::read(file).unwrap();
        got.extend(read_csv(&data, &tenant));
    }
    assert_rows_equal(&got, &rows);

    // One exact line, to pin the format down.
    let first = std::fs::read_to_string(&summary.files[0]).unwrap();
    let mut lines = first.lines();
    assert_eq!(lines.next(), Some("tenant,device,metric,ts,value,type"));
    let r = &rows[0];
    let expected_start = format!(
        "\"acme, \"\"inc\"\"\",{},",
        if r.device.contains(',') {
            "\"dev, \"\"three\"\"\"".to_owned()
        } else {
            r.device.clone()
        }
    );
    assert!(lines.next().unwrap().starts_with(&expected_start));
}

#[tokio::test]
async fn csv_writes_floats_timestamps_and_types_as_documented() {
    let dir = tempfile::tempdir().unwrap();
    let mut exporter = Exporter::create(
        Destination::Local(dir.path().to_owned()),
        ExportFormat::Csv,
        "one",
        ExportOptions::new("t1"),
    )
    .await
    .unwrap();
    let mut batch = RowBatch::new();
    let ts = 1_767_225_600_123;
    batch.push("d", "m", ts, &Value::Float(21.0));
    batch.push("d", "m", ts, &Value::Float(1e300));
    batch.push("d", "m", ts, &Value::Int(-3));
    batch.push("d", "m", ts, &Value::Bool(false));
    batch.push("d", "m", ts, &Value::Str("a,b".into()));
    exporter.write(&batch).await.unwrap();
    let summary = exporter.finish().await.unwrap();
    let text = std::fs::read_to_string(&summary.files[0]).unwrap();
    assert_eq!(
        text,
        "tenant,device,metric,ts,value,type\n\
         t1,d,m,2026-01-01T00:00:00.123Z,21.0,float\n\
         t1,d,m,2026-01-01T00:00:00.123Z,1e300,float\n\
         t1,d,m,2026-01-01T00:00:00.123Z,-3,int\n\
         t1,d,m,2026-01-01T00:00:00.123Z,false,bool\n\
         t1,d,m,2026-01-01T00:00:00.123Z,\"a,b\",string\n"
    );
    assert_eq!(summary.bytes, text.len() as u64);
}

#[tokio::test]
async fn an_empty_export_is_a_valid_empty_file() {
    let dir = tempfile::tempdir().unwrap();
    for format in [ExportFormat::Parquet, ExportFormat::Csv] {
        let exporter = Exporter::create(
            Destination::Local(dir.path().to_owned()),
            format,
            "empty",
            ExportOptions::new("t"),
        )
        .await
        .unwrap();
        let summary = exporter.finish().await.unwrap();
        assert_eq!((summary.rows, summary.files.len()), (0, 1));
        let data = std::fs::read(&summary.files[0]).unwrap();
        match format {
            ExportFormat::Parquet => assert!(read_parquet(Bytes::from(data), "t").0.is_empty()),
            ExportFormat::Csv => assert!(read_csv(&data, "t").is_empty()),
        }
    }
}

#[tokio::test]
async fn dropping_an_unfinished_export_leaves_no_file() {
    for format in [ExportFormat::Parquet, ExportFormat::Csv] {
        let dir = tempfile::tempdir().unwrap();
        let rows = sample_rows(25_000);
        let mut exporter = Exporter::create(
            Destination::Local(dir.path().to_owned()),
            format,
            "partial",
            options(10_000, 3_000),
        )
        .await
        .unwrap();
        write_all(&mut exporter, &rows, 2_500).await.unwrap();
        let ext = format.extension();
        // Two complete files from rollovers, the third in progress.
        assert_eq!(
            list_dir(dir.path()),
            [
                format!("partial-00001.{ext}"),
                format!("partial-00002.{ext}.tmp"),
                format!("partial.{ext}"),
            ]
        );
        drop(exporter);
        assert!(
            list_dir(dir.path()).is_empty(),
            "{format}: {:?}",
            list_dir(dir.path())
        );
    }
}

#[tokio::test]
async fn a_failed_export_removes_its_files_and_refuses_more_rows() {
    let dir = tempfile::tempdir().unwrap();
    let mut exporter = Exporter::create(
        Destination::Local(dir.path().to_owned()),
        ExportFormat::Csv,
        "bad",
        options(10, 1_000),
    )
    .await
    .unwrap();
    write_all(&mut exporter, &sample_rows(25), 25)
        .await
        .unwrap();
    let mut batch = RowBatch::new();
    batch.push("dev", "temp", -1, &Value::Int(1)); // before 1970: no RFC 3339 CSV timestamp
    for _ in 0..10 {
        batch.push("dev", "temp", 1, &Value::Int(1));
    }
    let err = exporter.write(&batch).await.unwrap_err();
    assert!(
        matches!(err, ExportError::TimestampOutOfRange { ts_ms: -1, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("export to Parquet"), "{err}");
    assert!(
        list_dir(dir.path()).is_empty(),
        "{:?}",
        list_dir(dir.path())
    );
    assert!(matches!(
        exporter.write(&batch).await,
        Err(ExportError::Aborted)
    ));
    assert!(matches!(exporter.finish().await, Err(ExportError::Aborted)));
}

#[tokio::test]
async fn bad_arguments_are_refused_with_a_hint() {
    let dir = tempfile::tempdir().unwrap();
    let dest = || Destination::Local(dir.path().to_owned());
    let err = Exporter::create(dest(), ExportFormat::Csv, "../x", ExportOptions::new("t"))
        .await
        .unwrap_err();
    assert!(matches!(err, ExportError::BadStem { .. }), "{err}");
    let err = Exporter::create(dest(), ExportFormat::Csv, "x", options(0, 1))
        .await
        .unwrap_err();
    assert!(matches!(err, ExportError::BadOptions(_)), "{err}");

    let s3 = Destination::parse_with("s3://bucket/p", Default::default).unwrap();
    let err = Exporter::create(s3, ExportFormat::Csv, "x", ExportOptions::new("t"))
        .await
        .unwrap_err();
    assert!(
        matches!(err, ExportError::MissingCredentials { .. }),
        "{err}"
    );

    // A local folder that cannot be created.
    let file = dir.path().join("a-file");
    std::fs::write(&file, b"x").unwrap();
    let err = Exporter::create(
        Destination::Local(file.join("sub")),
        ExportFormat::Csv,
        "x",
        ExportOptions::new("t"),
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("a-file/sub"), "{err}");
}

/// An in-memory store that counts multipart calls, to see the upload path at work.
#[derive(Debug, Default)]
struct CountingStore {
    inner: InMemory,
    parts: Arc<AtomicUsize>,
    completed: Arc<AtomicUsize>,
    aborted: Arc<AtomicUsize>,
}

impl fmt::Display for CountingStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CountingStore")
    }
}

#[derive(Debug)]
struct CountingUpload {
    inner: Box<dyn MultipartUpload>,
    parts: Arc<AtomicUsize>,
    completed: Arc<AtomicUsize>,
    aborted: Arc<AtomicUsize>,
}

#[async_trait::async_trait]
impl MultipartUpload for CountingUpload {
    fn put_part(&mut self, data: PutPayload) -> UploadPart {
        self.parts.fetch_add(1, Ordering::SeqCst);
        self.inner.put_part(data)
    }

    async fn complete(&mut self) -> object_store::Result<PutResult> {
        self.completed.fetch_add(1, Ordering::SeqCst);
        self.inner.complete().await
    }

    async fn abort(&mut self) -> object_store::Result<()> {
        self.aborted.fetch_add(1, Ordering::SeqCst);
        self.inner.abort().await
    }
}

#[async_trait::async_trait]
impl ObjectStore for CountingStore {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        self.inner.put_opts(location, payload, opts).await
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        Ok(Box::new(CountingUpload {
            inner: self.inner.put_multipart_opts(location, opts).await?,
            parts: self.parts.clone(),
            completed: self.completed.clone(),
            aborted: self.aborted.clone(),
        }))
    }

    async fn get_opts(
        &self,
        location: &Path,
        options: GetOptions,
    ) -> object_store::Result<GetResult> {
        self.inner.get_opts(location, options).await
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, object_store::Result<Path>>,
    ) -> BoxStream<'static, object_store::Result<Path>> {
        self.inner.delete_stream(locations)
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.inner.list(prefix)
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> object_store::Result<ListResult> {
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(
        &self,
        from: &Path,
        to: &Path,
        options: CopyOptions,
    ) -> object_store::Result<()> {
        self.inner.copy_opts(from, to, options).await
    }
}

async fn object_names(store: &dyn ObjectStore) -> Vec<String> {
    let result = store
        .list_with_delimiter(Some(&Path::from("exports/acme")))
        .await
        .unwrap();
    let mut names: Vec<String> = result
        .objects
        .iter()
        .map(|o| o.location.to_string())
        .collect();
    names.sort();
    names
}

fn memory_destination(store: &Arc<CountingStore>) -> Destination {
    Destination::Store {
        store: store.clone(),
        prefix: Path::from("exports/acme"),
        url: "memory://exports/acme/".into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn object_store_export_uploads_in_parts() {
    let rows = sample_rows(60_000);
    for format in [ExportFormat::Parquet, ExportFormat::Csv] {
        let store = Arc::new(CountingStore::default());
        let mut opts = options(25_000, 5_000);
        opts.upload_part_bytes = 4 * 1024;
        let tenant = opts.tenant.clone();
        let mut exporter = Exporter::create(memory_destination(&store), format, "t", opts)
            .await
            .unwrap();
        write_all(&mut exporter, &rows[..20_000], 3_000)
            .await
            .unwrap();
        // Parquet row groups are on their way as parts (CSV buffers 64k rows first), but nothing
        // is visible before the upload completes.
        if format == ExportFormat::Parquet {
            assert!(store.parts.load(Ordering::SeqCst) > 1);
        }
        assert!(object_names(store.as_ref()).await.is_empty());
        write_all(&mut exporter, &rows[20_000..], 3_000)
            .await
            .unwrap();
        let summary = exporter.finish().await.unwrap();

        let ext = format.extension();
        let names = [
            format!("t.{ext}"),
            format!("t-00001.{ext}"),
            format!("t-00002.{ext}"),
        ];
        assert_eq!(
            summary.files,
            names
                .iter()
                .map(|n| format!("memory://exports/acme/{n}"))
                .collect::<Vec<_>>()
        );
        assert_eq!(store.completed.load(Ordering::SeqCst), 3);
        assert_eq!(store.aborted.load(Ordering::SeqCst), 0);
        let parts = store.parts.load(Ordering::SeqCst) as u64;
        assert!(
            parts >= summary.bytes / (4 * 1024),
            "{parts} parts for {} bytes",
            summary.bytes
        );

        let mut got = Vec::new();
        let mut bytes = 0;
        for name in &names {
            let data = store
                .get(&Path::from(format!("exports/acme/{name}")))
                .await
                .unwrap()
                .bytes()
                .await
                .unwrap();
            bytes += data.len() as u64;
            match format {
                ExportFormat::Parquet => got.extend(read_parquet(data, &tenant).0),
                ExportFormat::Csv => got.extend(read_csv(&data, &tenant)),
            }
        }
        assert_eq!(summary.bytes, bytes);
        assert_rows_equal(&got, &rows);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_an_object_store_export_aborts_and_deletes() {
    let store = Arc::new(CountingStore::default());
    let mut opts = options(10_000, 5_000);
    opts.upload_part_bytes = 4 * 1024;
    let mut exporter = Exporter::create(memory_destination(&store), ExportFormat::Csv, "t", opts)
        .await
        .unwrap();
    write_all(&mut exporter, &sample_rows(15_000), 3_000)
        .await
        .unwrap();
    assert_eq!(object_names(store.as_ref()).await, ["exports/acme/t.csv"]);
    drop(exporter);
    // The abort and the delete run as background tasks.
    for _ in 0..200 {
        if store.aborted.load(Ordering::SeqCst) == 1
            && object_names(store.as_ref()).await.is_empty()
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!(
        "aborted {} uploads; objects left: {:?}",
        store.aborted.load(Ordering::SeqCst),
        object_names(store.as_ref()).await
    );
}

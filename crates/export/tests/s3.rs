//! Export to a real S3-compatible endpoint (moto in CI, or MinIO, or AWS).
//!
//! ```sh
//! pip install 'moto[server]'
//! moto_server -H 127.0.0.1 -p 5077 &
//! FERROHUB_TEST_S3_ENDPOINT=http://127.0.0.1:5077 FERROHUB_TEST_S3_BUCKET=ferrohub-test \
//!   cargo test -p ferrohub-export --test s3 -- --ignored
//! ```
//!
//! Credentials come from `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY` (moto accepts any; `test`
//! is used when unset) and the region from `AWS_REGION` (default `us-east-1`). The test creates
//! the bucket with an unsigned `PUT /bucket`, which moto accepts; stores that refuse it (MinIO,
//! AWS) need the bucket to exist already. Everything is written under a fresh prefix and deleted
//! afterwards.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{assert_rows_equal, read_csv, read_parquet, sample_rows, write_all};
use ferrohub_export::{
    Destination, ExportError, ExportFormat, ExportOptions, Exporter, S3Destination, S3Options,
};
use futures_util::TryStreamExt;
use object_store::aws::AmazonS3Builder;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};

struct Endpoint {
    url: String,
    bucket: String,
    options: S3Options,
}

fn endpoint() -> Endpoint {
    let url = std::env::var("FERROHUB_TEST_S3_ENDPOINT").unwrap_or_else(|_| {
        panic!("FERROHUB_TEST_S3_ENDPOINT is not set: point it at an S3 endpoint (see tests/s3.rs)")
    });
    let bucket =
        std::env::var("FERROHUB_TEST_S3_BUCKET").unwrap_or_else(|_| "ferrohub-test".to_owned());
    let var =
        |name: &str, default: &str| std::env::var(name).unwrap_or_else(|_| default.to_owned());
    let options = S3Options {
        endpoint: Some(url.clone()),
        region: Some(var("AWS_REGION", "us-east-1")),
        access_key_id: Some(var("AWS_ACCESS_KEY_ID", "test")),
        secret_access_key: Some(var("AWS_SECRET_ACCESS_KEY", "test")),
        session_token: None,
        allow_http: url.starts_with("http://"),
    };
    Endpoint {
        url,
        bucket,
        options,
    }
}

/// A client of our own, to read back and clean up.
fn client(e: &Endpoint) -> Arc<dyn ObjectStore> {
    let o = &e.options;
    Arc::new(
        AmazonS3Builder::new()
            .with_bucket_name(&e.bucket)
            .with_endpoint(&e.url)
            .with_region(o.region.clone().unwrap())
            .with_access_key_id(o.access_key_id.clone().unwrap())
            .with_secret_access_key(o.secret_access_key.clone().unwrap())
            .with_allow_http(o.allow_http)
            .with_virtual_hosted_style_request(false)
            .build()
            .unwrap(),
    )
}

async fn create_bucket(e: &Endpoint) {
    let url = format!("{}/{}", e.url.trim_end_matches('/'), e.bucket);
    match reqwest::Client::new().put(&url).send().await {
        Ok(r) if r.status().is_success() => eprintln!("created bucket {}", e.bucket),
        Ok(r) => eprintln!(
            "PUT {url} answered {}: expecting bucket {} to exist",
            r.status(),
            e.bucket
        ),
        Err(err) => panic!("cannot reach {url}: {err}"),
    }
}

/// Checks with an unsigned ListMultipartUploads (moto answers it; stores that want a signature
/// skip the check) that no upload under `prefix` was left open.
async fn assert_no_pending_uploads(e: &Endpoint, prefix: &str) {
    let url = format!(
        "{}/{}?uploads&prefix={prefix}/",
        e.url.trim_end_matches('/'),
        e.bucket
    );
    let mut body = String::new();
    for _ in 0..100 {
        let response = reqwest::get(&url).await.unwrap();
        if !response.status().is_success() {
            eprintln!(
                "ListMultipartUploads answered {}: not checked",
                response.status()
            );
            return;
        }
        body = response.text().await.unwrap();
        if !body.contains("<Upload>") {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("multipart uploads left open: {body}");
}

async fn list(store: &dyn ObjectStore, prefix: &str) -> Vec<String> {
    let mut names: Vec<String> = store
        .list(Some(&Path::from(prefix)))
        .map_ok(|m| m.location.to_string())
        .try_collect()
        .await
        .unwrap();
    names.sort();
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs an S3 endpoint: run with FERROHUB_TEST_S3_ENDPOINT=http://127.0.0.1:5077 \
            (and FERROHUB_TEST_S3_BUCKET) -- --ignored; see tests/s3.rs"]
async fn export_to_s3_endpoint() {
    let e = endpoint();
    create_bucket(&e).await;
    let store = client(&e);
    let run = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let prefix = format!("ferrohub-export-test/{run}");
    let destination = |sub: &str| {
        Destination::S3(S3Destination {
            bucket: e.bucket.clone(),
            prefix: format!("{prefix}/{sub}"),
            options: e.options.clone(),
        })
    };
    // Enough CSV for several 5 MiB parts per file, and a rollover.
    let rows = sample_rows(300_000);
    let tenant = "acme";

    for format in [ExportFormat::Parquet, ExportFormat::Csv] {
        let mut options = ExportOptions::new(tenant);
        options.max_rows_per_file = 200_000;
        options.row_group_rows = 50_000;
        options.upload_part_bytes = 5 * 1024 * 1024;
        let parsed =
            Destination::parse_with(&format!("s3://{}/{prefix}/{format}", e.bucket), || {
                e.options.clone()
            })
            .unwrap();
        let mut exporter = Exporter::create(parsed, format, "data", options)
            .await
            .unwrap();
        write_all(&mut exporter, &rows, 10_000).await.unwrap();
        let summary = exporter.finish().await.unwrap();
        let ext = format.extension();
        let base = format!("s3://{}/{prefix}/{format}", e.bucket);
        assert_eq!(
            summary.files,
            [
                format!("{base}/data.{ext}"),
                format!("{base}/data-00001.{ext}")
            ]
        );
        if format == ExportFormat::Csv {
            assert!(
                summary.bytes > 10 * 1024 * 1024,
                "{} bytes: several parts",
                summary.bytes
            );
        }
        let mut got = Vec::new();
        let mut bytes = 0;
        for name in [format!("data.{ext}"), format!("data-00001.{ext}")] {
            let data = store
                .get(&Path::from(format!("{prefix}/{format}/{name}")))
                .await
                .unwrap()
                .bytes()
                .await
                .unwrap();
            bytes += data.len() as u64;
            match format {
                ExportFormat::Parquet => got.extend(read_parquet(data, tenant).0),
                ExportFormat::Csv => got.extend(read_csv(&data, tenant)),
            }
        }
        assert_eq!(bytes, summary.bytes);
        assert_rows_equal(&got, &rows);
    }

    // Dropped before finish: the open upload is aborted and the finished file deleted.
    let mut options = ExportOptions::new(tenant);
    options.max_rows_per_file = 20_000;
    let mut exporter = Exporter::create(destination("dropped"), ExportFormat::Csv, "d", options)
        .await
        .unwrap();
    write_all(&mut exporter, &rows[..30_000], 10_000)
        .await
        .unwrap();
    let dropped = format!("{prefix}/dropped");
    assert_eq!(
        list(store.as_ref(), &dropped).await,
        [format!("{dropped}/d.csv")]
    );
    drop(exporter);
    let mut left = Vec::new();
    for _ in 0..100 {
        left = list(store.as_ref(), &dropped).await;
        if left.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(left.is_empty(), "left behind: {left:?}");
    assert_no_pending_uploads(&e, &dropped).await;

    // A missing bucket fails at create, naming the URL.
    let missing = Destination::S3(S3Destination {
        bucket: format!("ferrohub-missing-{run}"),
        prefix: String::new(),
        options: e.options.clone(),
    });
    let err = Exporter::create(missing, ExportFormat::Csv, "x", ExportOptions::new(tenant))
        .await
        .unwrap_err();
    assert!(matches!(err, ExportError::Store { .. }), "{err}");
    assert!(err.to_string().contains("s3://ferrohub-missing-"), "{err}");

    // Clean up.
    for name in list(store.as_ref(), &prefix).await {
        store.delete(&Path::from(name)).await.unwrap();
    }
}

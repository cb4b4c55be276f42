//! Export jobs end to end: points written through the service, exported to Parquet and CSV in the
//! export folder, read back.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use ferrohub_export::ExportFormat;
use ferrohub_telemetry::export::{ExportRequest, ExportState};
use ferrohub_telemetry::service::{Telemetry, TelemetryConfig};
use ferrohub_tsdb::{Engine, EngineConfig};
use ferrohub_types::TenantId;
use ferrohub_types::telemetry::{Point, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exports_a_selection_to_csv_and_parquet() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = EngineConfig::new(dir.path().join("telemetry"));
    cfg.fsync = false;
    cfg.default_retention_days = None;
    let engine = Engine::open(cfg).unwrap();
    let t = Telemetry::start(
        engine,
        TelemetryConfig::default(),
        dir.path().join("telemetry/settings.json"),
    )
    .unwrap();
    let tenant = TenantId::new("acme");
    let base = 1_767_225_600_000; // 2026-01-01
    let mut pts = Vec::new();
    for d in 0..3 {
        for i in 0..50_000i64 {
            pts.push(Point {
                device: format!("dev-{d}"),
                metric: "temp".into(),
                ts_ms: base + i * 10_000,
                value: Value::Float(20.0 + (i % 100) as f64 / 10.0),
            });
        }
        pts.push(Point {
            device: format!("dev-{d}"),
            metric: "state".into(),
            ts_ms: base,
            value: Value::Str("on, \"really\"".into()),
        });
    }
    t.write_points(&tenant, pts).await.unwrap();
    t.engine().flush().await.unwrap();
    let run = |format, devices: Option<Vec<String>>| {
        t.start_export(
            &tenant,
            ExportRequest {
                destination: "q1".into(),
                format: Some(format),
                name: None,
                devices,
                metrics: None,
                from: base,
                to: base + 40_000 * 10_000,
            },
        )
        .unwrap()
    };
    let wait = |id| {
        let (t, tenant) = (t.clone(), tenant.clone());
        async move {
            for _ in 0..600 {
                let j = t.export_job(&tenant, id).unwrap();
                if j.state != ExportState::Running {
                    return j;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            panic!("export did not finish");
        }
    };
    let csv = run(ExportFormat::Csv, Some(vec!["dev-1".into()]));
    assert_eq!(csv.series_total, 2);
    let csv = wait(csv.id).await;
    assert_eq!(csv.state, ExportState::Succeeded, "{:?}", csv.error);
    assert_eq!(csv.rows, 40_001);
    assert_eq!(csv.series_done, 2);
    let mut r = csv::Reader::from_path(&csv.files[0]).unwrap();
    let rows: Vec<csv::StringRecord> = r.records().map(|r| r.unwrap()).collect();
    assert_eq!(rows.len(), 40_001);
    assert!(
        rows.iter()
            .any(|r| &r[4] == "on, \"really\"" && &r[5] == "string")
    );
    assert!(rows.iter().all(|r| &r[0] == "acme" && &r[1] == "dev-1"));
    let pq = wait(run(ExportFormat::Parquet, None).id).await;
    assert_eq!(pq.state, ExportState::Succeeded, "{:?}", pq.error);
    assert_eq!(pq.rows, 3 * 40_001);
    assert!(pq.files[0].ends_with(".parquet") && pq.bytes > 0);
    assert!(std::path::Path::new(&pq.files[0]).starts_with(t.export_dir()));
    assert_eq!(t.export_jobs(&tenant).len(), 2);
    assert!(t.export_jobs(&TenantId::new("other")).is_empty());
    // Outside the export folder: refused before anything starts.
    let bad = t.start_export(
        &tenant,
        ExportRequest {
            destination: "/etc".into(),
            format: None,
            name: None,
            devices: None,
            metrics: None,
            from: 0,
            to: 1,
        },
    );
    assert!(bad.is_err());
    // A file name that is not one: refused up front (not a job that fails later).
    let bad = t.start_export(
        &tenant,
        ExportRequest {
            destination: "q1".into(),
            format: None,
            name: Some("../x".into()),
            devices: None,
            metrics: None,
            from: 0,
            to: 1,
        },
    );
    assert!(matches!(
        bad,
        Err(ferrohub_telemetry::service::TelemetryError::BadRequest(_))
    ));
    // A series without points in the range still counts as done once the export is through.
    let empty_range = t
        .start_export(
            &tenant,
            ExportRequest {
                destination: "q1".into(),
                format: Some(ExportFormat::Csv),
                name: Some("old".into()),
                devices: None,
                metrics: Some(vec!["state".into()]),
                from: base - 10_000,
                to: base + 1,
            },
        )
        .unwrap();
    let job = wait(empty_range.id).await;
    assert_eq!(job.state, ExportState::Succeeded, "{:?}", job.error);
    assert_eq!((job.series_done, job.series_total), (3, 3));
}

#[tokio::test]
async fn settings_are_saved_before_they_apply_and_forgotten_with_their_tenant() {
    use ferrohub_telemetry::service::TenantSettings;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = EngineConfig::new(dir.path().join("telemetry"));
    cfg.fsync = false;
    let engine = Engine::open(cfg).unwrap();
    let path = dir.path().join("telemetry/settings.json");
    let t = Telemetry::start(engine, TelemetryConfig::default(), path.clone()).unwrap();
    let tenant = TenantId::new("acme");
    let custom = TenantSettings {
        topics: Some(vec!["plant/+/data".into()]),
        format: None,
    };
    t.set_settings(&tenant, custom.clone()).unwrap();
    assert!(
        std::fs::read_to_string(&path)
            .unwrap()
            .contains("plant/+/data")
    );
    // A save that fails (the directory is gone) leaves the settings in effect unchanged.
    std::fs::remove_dir_all(dir.path().join("telemetry")).unwrap();
    assert!(t.set_settings(&tenant, TenantSettings::default()).is_err());
    assert_eq!(t.settings(&tenant), custom);
    std::fs::create_dir_all(dir.path().join("telemetry")).unwrap();
    t.forget_tenant(&tenant).unwrap();
    assert_eq!(t.settings(&tenant), TenantSettings::default());
    assert!(!std::fs::read_to_string(&path).unwrap().contains("plant"));
}

//! Test data and readers shared by the export tests.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use bytes::Bytes;
use ferrohub_export::{ExportError, Exporter, PARQUET_SCHEMA, RowBatch};
use ferrohub_types::telemetry::Value;
use parquet::basic::{Compression, Encoding, LogicalType, TimeUnit};
use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::record::Field;

/// A row as the tests know it.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub device: String,
    pub metric: String,
    pub ts_ms: i64,
    pub value: Value,
}

/// Names and strings that CSV must quote, and one that Parquet must keep byte for byte.
pub const AWKWARD: [&str; 6] = [
    "plain",
    "with, comma",
    "with \"quotes\"",
    "multi\nline\r\nvalue",
    "ünïcödé ✓",
    "",
];

/// `n` rows of all four value kinds, several devices and metrics, mostly in runs of one
/// series (as the time-series engine produces them) with interleaved rows between runs.
pub fn sample_rows(n: usize) -> Vec<Row> {
    let devices: Vec<String> = (0..7)
        .map(|d| {
            if d == 3 {
                "dev, \"three\"".to_owned()
            } else {
                format!("dev-{d}")
            }
        })
        .collect();
    let metrics = [
        "temp",
        "humidity",
        "door.open",
        "fw \"ver\",\nsion",
        "counter",
    ];
    let mut rows = Vec::with_capacity(n);
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = move || {
        // xorshift: deterministic, no dependency.
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let base = 1_767_225_600_000i64; // 2026-01-01T00:00:00Z
    while rows.len() < n {
        let d = (next() % devices.len() as u64) as usize;
        let m = (next() % metrics.len() as u64) as usize;
        let run = 1 + (next() % 400) as usize;
        for _ in 0..run.min(n - rows.len()) {
            let i = rows.len();
            let r = next();
            let value = match (m + i) % 4 {
                0 => Value::Float(match r % 5 {
                    0 => -0.0,
                    1 => 1e300,
                    2 => 1.0e-7,
                    3 => 21.0,
                    _ => (r % 100_000) as f64 / 7.0 - 5000.0,
                }),
                1 => Value::Int(match r % 4 {
                    0 => i64::MIN,
                    1 => i64::MAX,
                    _ => (r % 1_000_000) as i64 - 500_000,
                }),
                2 => Value::Bool(r % 2 == 0),
                _ => Value::Str(AWKWARD[(r % AWKWARD.len() as u64) as usize].to_owned()),
            };
            rows.push(Row {
                device: devices[d].clone(),
                metric: metrics[m].to_owned(),
                ts_ms: base + i as i64 * 1_000 + (r % 997) as i64,
                value,
            });
        }
    }
    rows
}

/// Writes `rows` through one reused batch of `batch_rows` rows.
pub async fn write_all(
    exporter: &mut Exporter,
    rows: &[Row],
    batch_rows: usize,
) -> Result<(), ExportError> {
    let mut batch = RowBatch::new();
    for chunk in rows.chunks(batch_rows) {
        batch.clear();
        for r in chunk {
            batch.push(&r.device, &r.metric, r.ts_ms, &r.value);
        }
        exporter.write(&batch).await?;
    }
    Ok(())
}

/// Values compare bit for bit (so -0.0 and 0.0 differ).
pub fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Float(x), Value::Float(y)) => x.to_bits() == y.to_bits(),
        _ => a == b,
    }
}

pub fn assert_rows_equal(got: &[Row], want: &[Row]) {
    assert_eq!(got.len(), want.len(), "row count");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            g.device == w.device
                && g.metric == w.metric
                && g.ts_ms == w.ts_ms
                && same(&g.value, &w.value),
            "row {i}: got {g:?}, want {w:?}"
        );
    }
}

/// Reads a Parquet file back with the `parquet` crate's row reader, checking its schema, its
/// encodings and its tenant column on the way. Returns its rows and row-group sizes.
pub fn read_parquet(bytes: Bytes, tenant: &str) -> (Vec<Row>, Vec<i64>) {
    let reader = SerializedFileReader::new(bytes).unwrap();
    let meta = reader.metadata();
    let schema = meta.file_metadata().schema_descr();

    let expected = parquet::schema::parser::parse_message_type(PARQUET_SCHEMA).unwrap();
    assert_eq!(schema.root_schema(), &expected);
    let columns: Vec<_> = schema
        .columns()
        .iter()
        .map(|c| c.name().to_owned())
        .collect();
    assert_eq!(
        columns,
        [
            "tenant",
            "device",
            "metric",
            "ts",
            "value_float",
            "value_int",
            "value_bool",
            "value_str"
        ]
    );
    for c in schema.columns() {
        let logical = c.logical_type_ref().cloned();
        match c.name() {
            "tenant" | "device" | "metric" | "value_str" => {
                assert_eq!(logical, Some(LogicalType::String), "{}", c.name())
            }
            "ts" => assert_eq!(
                logical,
                Some(LogicalType::timestamp(true, TimeUnit::MILLIS))
            ),
            _ => assert_eq!(logical, None, "{}", c.name()),
        }
        assert_eq!(
            c.self_type().is_optional(),
            c.name().starts_with("value_"),
            "{}",
            c.name()
        );
    }
    let kv = meta.file_metadata().key_value_metadata().unwrap();
    assert!(
        kv.iter()
            .any(|kv| kv.key == "ferrohub.schema" && kv.value.as_deref() == Some("telemetry/1"))
    );
    let mut groups = Vec::new();
    for rg in meta.row_groups() {
        groups.push(rg.num_rows());
        for (i, col) in rg.columns().iter().enumerate() {
            let expected_compression = if cfg!(feature = "zstd") {
                matches!(col.compression(), Compression::ZSTD(_))
            } else {
                col.compression() == Compression::SNAPPY
            };
            assert!(expected_compression, "{:?}", col.compression());
            let encodings: Vec<Encoding> = col.encodings().collect();
            match columns[i].as_str() {
                "tenant" | "device" | "metric" => assert!(
                    encodings.contains(&Encoding::RLE_DICTIONARY),
                    "{}: {encodings:?}",
                    columns[i]
                ),
                "ts" => assert!(
                    encodings.contains(&Encoding::DELTA_BINARY_PACKED),
                    "{encodings:?}"
                ),
                _ => {}
            }
        }
    }

    let mut rows = Vec::new();
    for row in reader.get_row_iter(None).unwrap() {
        let row = row.unwrap();
        let fields: Vec<(String, Field)> = row
            .get_column_iter()
            .map(|(n, f)| (n.clone(), f.clone()))
            .collect();
        let get = |name: &str| &fields.iter().find(|(n, _)| n == name).unwrap().1;
        let string = |name: &str| match get(name) {
            Field::Str(s) => s.clone(),
            other => panic!("{name}: {other:?}"),
        };
        assert_eq!(string("tenant"), tenant);
        let ts_ms = match get("ts") {
            Field::TimestampMillis(t) => *t,
            other => panic!("ts: {other:?}"),
        };
        let mut values = Vec::new();
        for (name, field) in &fields[4..] {
            match (name.as_str(), field) {
                (_, Field::Null) => {}
                ("value_float", Field::Double(f)) => values.push(Value::Float(*f)),
                ("value_int", Field::Long(i)) => values.push(Value::Int(*i)),
                ("value_bool", Field::Bool(b)) => values.push(Value::Bool(*b)),
                ("value_str", Field::Str(s)) => values.push(Value::Str(s.clone())),
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(
            values.len(),
            1,
            "exactly one value column per row: {fields:?}"
        );
        rows.push(Row {
            device: string("device"),
            metric: string("metric"),
            ts_ms,
            value: values.remove(0),
        });
    }
    (rows, groups)
}

/// Reads a CSV export back with the `csv` crate's reader.
pub fn read_csv(bytes: &[u8], tenant: &str) -> Vec<Row> {
    let mut reader = csv::Reader::from_reader(bytes);
    assert_eq!(
        reader.headers().unwrap(),
        &csv::StringRecord::from(vec!["tenant", "device", "metric", "ts", "value", "type"])
    );
    let mut rows = Vec::new();
    for record in reader.records() {
        let record = record.unwrap();
        assert_eq!(record.len(), 6);
        assert_eq!(&record[0], tenant);
        let ts = &record[3];
        assert_eq!(ts.len(), "2026-01-01T00:00:00.000Z".len(), "{ts}");
        let time = humantime::parse_rfc3339(ts).unwrap();
        let ts_ms = time
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64;
        let raw = &record[4];
        let value = match &record[5] {
            "float" => {
                assert!(
                    raw.contains(['.', 'e']),
                    "float keeps a point or exponent: {raw}"
                );
                Value::Float(raw.parse().unwrap())
            }
            "int" => Value::Int(raw.parse().unwrap()),
            "bool" => Value::Bool(raw.parse().unwrap()),
            "string" => Value::Str(raw.to_owned()),
            other => panic!("type {other}"),
        };
        rows.push(Row {
            device: record[1].to_owned(),
            metric: record[2].to_owned(),
            ts_ms,
            value,
        });
    }
    rows
}

/// The names of the files in `dir`, sorted.
pub fn list_dir(dir: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

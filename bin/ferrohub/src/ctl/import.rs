//! `ferrohub ctl devices import`: a CSV or JSON file split into chunks (CSV chunks repeat the
//! header), one `POST .../devices/import` per chunk under a progress bar, and one report whose
//! rejected rows are numbered as in the original file.
//!
//! CSV record boundaries are found with the same `csv` reader (same settings) the hub parses
//! with, so a quoted field spanning lines stays in one chunk and the hub's row numbers, offset by
//! the chunk's first row, are the file's.

use std::io::Read;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use reqwest::Method;
use serde_json::{Value, json};

use super::client::{Body, Failure};
use super::output::{Output, Table, emit, emit_json};
use super::{Ctx, ImportFormat};

/// Rejected rows shown in the table report.
const SHOWN_REJECTIONS: usize = 20;

/// A file split into requests.
pub(crate) struct Chunks {
    /// Rows (CSV records after the header, or array elements) in the file.
    pub(crate) rows: usize,
    /// Each request: rows before it in the file, its row count, its body.
    pub(crate) parts: Vec<(usize, usize, Vec<u8>)>,
    /// The body's content type.
    pub(crate) content_type: &'static str,
}

/// Splits CSV into chunks of `size` records, each with the header line(s) in front.
pub(crate) fn csv_chunks(data: &[u8], size: usize) -> Result<Chunks> {
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(true)
        .flexible(true)
        .from_reader(data);
    reader
        .byte_headers()
        .map_err(|e| Failure::new(format!("the CSV header could not be read: {e}"), None))?;
    let mut starts = Vec::new();
    let mut record = csv::ByteRecord::new();
    loop {
        match reader.read_byte_record(&mut record) {
            Ok(false) => break,
            Ok(true) => {
                let start = record
                    .position()
                    .map(|p| p.byte())
                    .and_then(|b| usize::try_from(b).ok())
                    .context("the CSV reader gave no record position")?;
                starts.push(start);
            }
            Err(e) => {
                return Err(Failure::new(
                    format!(
                        "the CSV file could not be read at row {}: {e}",
                        starts.len() + 1
                    ),
                    None,
                )
                .into());
            }
        }
    }
    let rows = starts.len();
    let Some(&first) = starts.first() else {
        // Only a header: one request, so the hub still checks the header.
        return Ok(Chunks {
            rows: 0,
            parts: vec![(0, 0, data.to_vec())],
            content_type: "text/csv",
        });
    };
    let header = data
        .get(..first)
        .context("CSV record positions out of range")?;
    let mut parts = Vec::new();
    for (i, chunk) in starts.chunks(size).enumerate() {
        let from = chunk[0];
        let to = starts.get((i + 1) * size).copied().unwrap_or(data.len());
        let slice = data
            .get(from..to)
            .context("CSV record positions out of range")?;
        let mut body = Vec::with_capacity(header.len() + slice.len() + 1);
        body.extend_from_slice(header);
        if !header.ends_with(b"\n") && !header.ends_with(b"\r") {
            body.push(b'\n');
        }
        body.extend_from_slice(slice);
        parts.push((i * size, chunk.len(), body));
    }
    Ok(Chunks {
        rows,
        parts,
        content_type: "text/csv",
    })
}

/// Splits a JSON array into arrays of `size` elements.
pub(crate) fn json_chunks(data: &[u8], size: usize) -> Result<Chunks> {
    let items: Vec<Value> = serde_json::from_slice(data).map_err(|e| {
        Failure::new(
            format!("the file is not a JSON array of devices: {e}"),
            Some(r#"write [{"id": "d1", "tags": {"site": "a"}}, {"id": "d2"}]"#.into()),
        )
    })?;
    let mut parts = Vec::new();
    for (i, chunk) in items.chunks(size).enumerate() {
        let body = serde_json::to_vec(chunk).context("rendering JSON")?;
        parts.push((i * size, chunk.len(), body));
    }
    if parts.is_empty() {
        parts.push((0, 0, b"[]".to_vec()));
    }
    Ok(Chunks {
        rows: items.len(),
        parts,
        content_type: "application/json",
    })
}

fn read_input(file: &Path) -> Result<Vec<u8>> {
    let mut data = Vec::new();
    if file.as_os_str() == "-" {
        std::io::stdin()
            .read_to_end(&mut data)
            .context("reading standard input")?;
    } else {
        data = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
    }
    Ok(data)
}

fn format_of(file: &Path, format: Option<ImportFormat>) -> Result<ImportFormat> {
    if let Some(f) = format {
        return Ok(f);
    }
    let ext = file
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    match ext.as_deref() {
        Some("csv") => Ok(ImportFormat::Csv),
        Some("json") => Ok(ImportFormat::Json),
        _ => Err(Failure::new(
            format!(
                "cannot tell the format of {} from its name",
                if file.as_os_str() == "-" {
                    "standard input".to_string()
                } else {
                    file.display().to_string()
                }
            ),
            Some("name the file .csv or .json, or pass --format csv|json".into()),
        )
        .into()),
    }
}

fn progress(rows: usize) -> ProgressBar {
    let bar = ProgressBar::new(rows as u64);
    let style = ProgressStyle::with_template(
        "{spinner} importing [{elapsed_precise}] [{bar:40}] {pos}/{len} rows ({eta} left)",
    )
    .map(|s| s.progress_chars("=> "))
    .unwrap_or_else(|_| ProgressStyle::default_bar());
    bar.set_style(style);
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

/// Imports `file` into the tenant; returns the exit status (1 when rows were rejected).
pub(crate) async fn run(
    ctx: &Ctx,
    file: &Path,
    format: Option<ImportFormat>,
    chunk_size: usize,
) -> Result<i32> {
    let format = format_of(file, format)?;
    let data = read_input(file)?;
    let chunks = match format {
        ImportFormat::Csv => csv_chunks(&data, chunk_size)?,
        ImportFormat::Json => json_chunks(&data, chunk_size)?,
    };
    drop(data);
    let bar = progress(chunks.rows);
    let mut total = 0u64;
    let mut imported = 0u64;
    let mut rejected: Vec<Value> = Vec::new();
    for (offset, rows, body) in chunks.parts {
        let answer = ctx
            .client
            .call(
                Method::POST,
                &["tenants", &ctx.tenant, "devices", "import"],
                &[],
                Body::Raw(chunks.content_type, body),
            )
            .await;
        let report = match answer {
            Ok(r) => r,
            Err(e) => {
                bar.finish_and_clear();
                let what = if rows == 0 {
                    String::new()
                } else {
                    format!(
                        " at rows {}-{} of {}",
                        offset + 1,
                        offset + rows,
                        chunks.rows
                    )
                };
                if offset > 0 {
                    eprintln!(
                        "rows 1-{offset} were sent: {imported} imported, {} rejected",
                        rejected.len()
                    );
                }
                return Err(e.context(format!("the import stopped{what}")));
            }
        };
        let chunk_total = report.get("total").and_then(Value::as_u64).unwrap_or(0);
        if chunk_total != rows as u64 {
            bar.suspend(|| {
                eprintln!(
                    "warning: the hub counted {chunk_total} rows in rows {}-{}, not {rows}; \
                     rejected row numbers may be off",
                    offset + 1,
                    offset + rows
                )
            });
        }
        total += chunk_total;
        imported += report.get("imported").and_then(Value::as_u64).unwrap_or(0);
        for r in report
            .get("rejected")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let row = r.get("row").and_then(Value::as_u64).unwrap_or(0) + offset as u64;
            rejected.push(json!({
                "row": row,
                "id": r.get("id").cloned().unwrap_or(Value::Null),
                "error": r.get("error").cloned().unwrap_or(Value::Null),
            }));
        }
        bar.inc(rows as u64);
    }
    bar.finish_and_clear();
    let code = i32::from(!rejected.is_empty());
    match ctx.output {
        Output::Json => emit_json(&json!({
            "total": total,
            "imported": imported,
            "rejected": rejected,
        }))?,
        Output::Table => {
            let mut out = format!(
                "imported {imported} of {total} devices into tenant {}; rejected {}\n",
                ctx.tenant,
                rejected.len()
            );
            if !rejected.is_empty() {
                let mut t = Table::new(&["ROW", "ID", "ERROR"]);
                for r in rejected.iter().take(SHOWN_REJECTIONS) {
                    t.row(vec![
                        super::output::text(r, "row"),
                        super::output::text(r, "id"),
                        super::output::text(r, "error"),
                    ]);
                }
                out.push_str(&t.render());
                if rejected.len() > t.len() {
                    out.push_str(&format!(
                        "... and {} more rejected rows (--output json lists them all)\n",
                        rejected.len() - t.len()
                    ));
                }
            }
            emit(&out)?;
        }
    }
    Ok(code)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bodies(c: &Chunks) -> Vec<String> {
        c.parts
            .iter()
            .map(|(_, _, b)| String::from_utf8_lossy(b).into_owned())
            .collect()
    }

    /// Header and records of a CSV body, as the hub reads them.
    fn parse(body: &[u8]) -> (Vec<String>, Vec<Vec<String>>) {
        let mut r = csv::ReaderBuilder::new()
            .has_headers(true)
            .flexible(true)
            .from_reader(body);
        let header = r
            .headers()
            .map(|h| h.iter().map(str::to_string).collect())
            .unwrap_or_default();
        let records = r
            .records()
            .filter_map(|rec| rec.ok())
            .map(|rec| rec.iter().map(str::to_string).collect())
            .collect();
        (header, records)
    }

    #[test]
    fn csv_chunks_keep_the_header_and_quoted_newlines() {
        for data in [
            &b"id,name\r\na,\"A\nmulti\"\r\nb,B\r\n\r\nc,C,extra\r\nd,D"[..],
            &b"\xef\xbb\xbfid,name\na,\"A,\r\nmulti\"\nb,B\n\nc,C,extra\nd,D\n"[..],
        ] {
            let c = csv_chunks(data, 2).unwrap_or_else(|_| Chunks {
                rows: 0,
                parts: vec![],
                content_type: "",
            });
            assert_eq!(c.rows, 4);
            let offsets: Vec<(usize, usize)> = c.parts.iter().map(|(o, n, _)| (*o, *n)).collect();
            assert_eq!(offsets, vec![(0, 2), (2, 2)]);
            let (header, records) = parse(data);
            let mut joined = Vec::new();
            for (_, n, body) in &c.parts {
                let (h, r) = parse(body);
                assert_eq!(h, header);
                assert_eq!(r.len(), *n);
                joined.extend(r);
            }
            assert_eq!(joined, records);
            assert_eq!(joined[0][1].lines().count(), 2, "{joined:?}");
        }
    }

    #[test]
    fn csv_with_only_a_header_is_sent_once() {
        let c = csv_chunks(b"id,name", 10).map(|c| (c.rows, c.parts.len()));
        assert_eq!(c.ok(), Some((0, 1)));
    }

    #[test]
    fn json_chunks_split_arrays() {
        let c = json_chunks(br#"[{"id":"a"},{"id":"b"},{"id":"c"}]"#, 2);
        let c = c.map(|c| bodies(&c)).unwrap_or_default();
        assert_eq!(c, vec![r#"[{"id":"a"},{"id":"b"}]"#, r#"[{"id":"c"}]"#]);
        assert!(json_chunks(br#"{"id":"a"}"#, 2).is_err());
    }
}

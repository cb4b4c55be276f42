//! Rows to export, stored column by column so a producer can stream millions of them through one
//! reused [`RowBatch`] without an allocation per row.

use std::ops::Range;

use ferrohub_types::telemetry::Value;

/// A borrowed sample value: what [`Value`] holds, without owning the string.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ValueRef<'a> {
    /// A boolean.
    Bool(bool),
    /// A 64-bit signed integer.
    Int(i64),
    /// A 64-bit float.
    Float(f64),
    /// A string.
    Str(&'a str),
}

impl<'a> ValueRef<'a> {
    /// The name of the value's type in exports: `float`, `int`, `bool` or `string` (the CSV `type`
    /// column).
    pub fn type_name(&self) -> &'static str {
        match self {
            ValueRef::Bool(_) => "bool",
            ValueRef::Int(_) => "int",
            ValueRef::Float(_) => "float",
            ValueRef::Str(_) => "string",
        }
    }

    /// An owned copy.
    pub fn to_value(&self) -> Value {
        match *self {
            ValueRef::Bool(b) => Value::Bool(b),
            ValueRef::Int(i) => Value::Int(i),
            ValueRef::Float(f) => Value::Float(f),
            ValueRef::Str(s) => Value::Str(s.to_owned()),
        }
    }
}

impl<'a> From<&'a Value> for ValueRef<'a> {
    fn from(value: &'a Value) -> Self {
        match value {
            Value::Bool(b) => ValueRef::Bool(*b),
            Value::Int(i) => ValueRef::Int(*i),
            Value::Float(f) => ValueRef::Float(*f),
            Value::Str(s) => ValueRef::Str(s),
        }
    }
}

/// One row of an export, borrowed from a [`RowBatch`] (or built by a producer for
/// [`RowBatch::push_row`]). The tenant is the export's ([`crate::ExportOptions::tenant`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ExportRow<'a> {
    /// The device.
    pub device: &'a str,
    /// The metric.
    pub metric: &'a str,
    /// Milliseconds since the Unix epoch (UTC).
    pub ts_ms: i64,
    /// The value.
    pub value: ValueRef<'a>,
}

/// A value as stored in a batch: strings are spans of the batch's text buffer.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Slot {
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(usize),
}

/// A batch of rows, stored column by column.
///
/// All strings go into one text buffer; a device or metric equal to the previous row's is not
/// stored again (rows usually come series by series, so a batch of a million points of a few
/// series holds a few names). [`RowBatch::clear`] keeps every buffer's capacity, so a producer
/// that fills, writes and clears one batch allocates nothing per row once the buffers have grown.
#[derive(Debug, Default, Clone)]
pub struct RowBatch {
    /// Device names, metric names and string values, back to back.
    text: String,
    /// Byte ranges of `text`, referenced by index from the columns below.
    spans: Vec<Range<usize>>,
    /// Per row: index into `spans` of the device.
    devices: Vec<usize>,
    /// Per row: index into `spans` of the metric.
    metrics: Vec<usize>,
    /// Per row: timestamp in milliseconds.
    ts: Vec<i64>,
    /// Per row: the value.
    values: Vec<Slot>,
}

impl RowBatch {
    /// An empty batch.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty batch with room for `rows` rows.
    pub fn with_capacity(rows: usize) -> Self {
        Self {
            text: String::new(),
            spans: Vec::new(),
            devices: Vec::with_capacity(rows),
            metrics: Vec::with_capacity(rows),
            ts: Vec::with_capacity(rows),
            values: Vec::with_capacity(rows),
        }
    }

    /// Appends a row.
    pub fn push(&mut self, device: &str, metric: &str, ts_ms: i64, value: &Value) {
        self.push_row(ExportRow {
            device,
            metric,
            ts_ms,
            value: value.into(),
        });
    }

    /// Appends a row given as borrowed parts (no [`Value`] needed).
    pub fn push_row(&mut self, row: ExportRow<'_>) {
        let device = self.intern_after(self.devices.last().copied(), row.device);
        let metric = self.intern_after(self.metrics.last().copied(), row.metric);
        let value = match row.value {
            ValueRef::Bool(b) => Slot::Bool(b),
            ValueRef::Int(i) => Slot::Int(i),
            ValueRef::Float(f) => Slot::Float(f),
            ValueRef::Str(s) => Slot::Str(self.store(s)),
        };
        self.devices.push(device);
        self.metrics.push(metric);
        self.ts.push(row.ts_ms);
        self.values.push(value);
    }

    /// Number of rows.
    pub fn len(&self) -> usize {
        self.ts.len()
    }

    /// Whether the batch has no rows.
    pub fn is_empty(&self) -> bool {
        self.ts.is_empty()
    }

    /// Removes every row, keeping the allocated buffers.
    pub fn clear(&mut self) {
        self.text.clear();
        self.spans.clear();
        self.devices.clear();
        self.metrics.clear();
        self.ts.clear();
        self.values.clear();
    }

    /// The row at `index`.
    pub fn get(&self, index: usize) -> Option<ExportRow<'_>> {
        let ts_ms = *self.ts.get(index)?;
        Some(ExportRow {
            device: self.span(self.devices[index]),
            metric: self.span(self.metrics[index]),
            ts_ms,
            value: self.value(index),
        })
    }

    /// The rows in order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = ExportRow<'_>> + '_ {
        (0..self.len()).map(|i| ExportRow {
            device: self.span(self.devices[i]),
            metric: self.span(self.metrics[i]),
            ts_ms: self.ts[i],
            value: self.value(i),
        })
    }

    /// Appends the rows `range` of `other`.
    pub(crate) fn extend_from(&mut self, other: &RowBatch, range: Range<usize>) {
        for i in range {
            let device = self.intern_after(self.devices.last().copied(), other.device(i));
            let metric = self.intern_after(self.metrics.last().copied(), other.metric(i));
            let value = match other.values[i] {
                Slot::Str(span) => Slot::Str(self.store(other.span(span))),
                other => other,
            };
            self.devices.push(device);
            self.metrics.push(metric);
            self.ts.push(other.ts[i]);
            self.values.push(value);
        }
    }

    /// Bytes of text held (names and string values); with the row count, what the batch weighs.
    pub(crate) fn text_len(&self) -> usize {
        self.text.len()
    }

    pub(crate) fn device(&self, row: usize) -> &str {
        self.span(self.devices[row])
    }

    pub(crate) fn metric(&self, row: usize) -> &str {
        self.span(self.metrics[row])
    }

    pub(crate) fn ts(&self) -> &[i64] {
        &self.ts
    }

    pub(crate) fn slots(&self) -> &[Slot] {
        &self.values
    }

    pub(crate) fn device_spans(&self) -> &[usize] {
        &self.devices
    }

    pub(crate) fn metric_spans(&self) -> &[usize] {
        &self.metrics
    }

    /// The byte range of `text` behind a span index.
    pub(crate) fn span_range(&self, span: usize) -> Range<usize> {
        self.spans[span].clone()
    }

    /// Hands over the text buffer (leaving this batch's empty); span ranges index into it.
    pub(crate) fn take_text(&mut self) -> String {
        std::mem::take(&mut self.text)
    }

    pub(crate) fn value(&self, row: usize) -> ValueRef<'_> {
        match self.values[row] {
            Slot::Bool(b) => ValueRef::Bool(b),
            Slot::Int(i) => ValueRef::Int(i),
            Slot::Float(f) => ValueRef::Float(f),
            Slot::Str(span) => ValueRef::Str(self.span(span)),
        }
    }

    pub(crate) fn span(&self, span: usize) -> &str {
        &self.text[self.spans[span].clone()]
    }

    /// The span of `s`: `previous` again when it holds the same text, else a new one.
    fn intern_after(&mut self, previous: Option<usize>, s: &str) -> usize {
        match previous {
            Some(span) if self.span(span) == s => span,
            _ => self.store(s),
        }
    }

    fn store(&mut self, s: &str) -> usize {
        let start = self.text.len();
        self.text.push_str(s);
        self.spans.push(start..self.text.len());
        self.spans.len() - 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_round_trip_and_repeated_names_are_stored_once() {
        let mut batch = RowBatch::new();
        let values = [
            Value::Float(1.5),
            Value::Int(-7),
            Value::Bool(true),
            Value::Str("on, \"really\"".into()),
        ];
        for (i, v) in values.iter().enumerate() {
            batch.push("dev-1", "temp", i as i64, v);
        }
        batch.push("dev-2", "temp", 9, &Value::Int(1));
        assert_eq!(batch.len(), 5);
        // dev-1, temp, the string value, dev-2: repeats of the previous row are not stored.
        assert_eq!(batch.spans.len(), 4);
        let rows: Vec<_> = batch.iter().collect();
        for (i, v) in values.iter().enumerate() {
            assert_eq!(rows[i].device, "dev-1");
            assert_eq!(rows[i].metric, "temp");
            assert_eq!(rows[i].ts_ms, i as i64);
            assert_eq!(rows[i].value.to_value(), *v);
        }
        assert_eq!(batch.get(4).map(|r| r.device), Some("dev-2"));
        assert_eq!(batch.get(5), None);

        let mut copy = RowBatch::new();
        copy.extend_from(&batch, 1..5);
        assert_eq!(copy.iter().collect::<Vec<_>>(), rows[1..].to_vec());

        let capacity = batch.ts.capacity();
        batch.clear();
        assert!(batch.is_empty());
        assert_eq!(batch.ts.capacity(), capacity);
    }
}

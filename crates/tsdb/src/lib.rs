//! Ferrohub's time-series engine: telemetry stored inside the one binary.
//!
//! Writes go to a write-ahead log with group commit ([`wal`]) and an in-memory head ([`head`]);
//! the head is sealed into immutable parts of compressed columnar chunks ([`part`], [`column`]:
//! pco-encoded timestamps and values) with precomputed 1-minute and 1-hour rollups ([`rollup`]),
//! one part per tenant and UTC day, so that retention deletes whole directories. Background
//! compaction merges a day's parts ([`maintain`]). Queries ([`query`]) merge parts and heads, with
//! the later write of a timestamp winning, and serve aggregates from rollups where they cover the
//! range. [`Engine`] ties it together.

mod bin_io;
pub mod catalog;
pub mod column;
pub mod engine;
mod error;
pub mod head;
pub mod maintain;
pub mod merge;
pub mod part;
mod purge;
pub mod query;
pub mod rollup;
pub mod wal;

pub use engine::{Engine, EngineConfig, RecoveryReport, Stats, WriteSummary};
pub use error::TsdbError;
pub use maintain::RetentionOutcome;
pub use purge::PurgeOutcome;
pub use query::{
    AggregateQuery, GroupBuckets, LatestPoint, RawPage, RawQuery, SeriesGroup, SeriesSummary,
};
pub use rollup::{Agg, AggFn};

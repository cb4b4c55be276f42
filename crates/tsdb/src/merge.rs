//! Merging one series' points from several sources (parts, heads) into one sorted, unique run.
//!
//! Sources come in precedence order (oldest part first, the active head last); for a timestamp
//! present in several, the latest source's value wins — a rewrite of a point replaces it.

use crate::column::Values;
use crate::head::sort_dedup_last;
use crate::maintain::append;

/// Merges sorted, unique sources (in precedence order) into one sorted, unique run.
pub fn merge_sources(mut sources: Vec<(Vec<i64>, Values)>) -> (Vec<i64>, Values) {
    sources.retain(|(ts, _)| !ts.is_empty());
    match sources.len() {
        0 => return (Vec::new(), Values::Int(Vec::new())),
        1 => {
            return sources
                .pop()
                .unwrap_or_else(|| (Vec::new(), Values::Int(Vec::new())));
        }
        _ => {}
    }
    // Common case: sources cover disjoint time ranges; concatenate them in time order.
    let mut by_time: Vec<usize> = (0..sources.len()).collect();
    by_time.sort_by_key(|&i| sources[i].0[0]);
    let disjoint = by_time
        .windows(2)
        .all(|w| sources[w[0]].0.last() < sources[w[1]].0.first());
    let mut ts = Vec::with_capacity(sources.iter().map(|s| s.0.len()).sum());
    let mut values: Option<Values> = None;
    let order: Vec<usize> = if disjoint {
        by_time
    } else {
        (0..sources.len()).collect()
    };
    for &i in &order {
        let (t, v) = &sources[i];
        ts.extend_from_slice(t);
        match &mut values {
            None => values = Some(v.clone()),
            Some(acc) => append(acc, v),
        }
    }
    let values = values.unwrap_or(Values::Int(Vec::new()));
    if disjoint {
        return (ts, values);
    }
    let mut idx: Vec<usize> = (0..ts.len()).collect();
    sort_dedup_last(&ts, &mut idx);
    (idx.iter().map(|&i| ts[i]).collect(), values.gather(&idx))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn later_sources_win_and_disjoint_sources_concatenate() {
        let a = (vec![1, 2, 3], Values::Int(vec![10, 20, 30]));
        let b = (vec![2, 4], Values::Int(vec![99, 40]));
        let (ts, v) = merge_sources(vec![a.clone(), b]);
        assert_eq!(ts, vec![1, 2, 3, 4]);
        assert_eq!(v, Values::Int(vec![10, 99, 30, 40]));
        let c = (vec![-5, 0], Values::Int(vec![1, 2]));
        let (ts, v) = merge_sources(vec![a, c]);
        assert_eq!(ts, vec![-5, 0, 1, 2, 3]);
        assert_eq!(v, Values::Int(vec![1, 2, 10, 20, 30]));
    }
}

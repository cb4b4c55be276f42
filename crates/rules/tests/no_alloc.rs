//! The WHERE-false path of common filters allocates nothing (counted by a wrapping allocator).

#![allow(unsafe_code)] // The counting global allocator below: a thin wrapper around `System`.
#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests may panic on failure.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};

use ferrohub_rules::{MessageContext, NoLookup, Rule};
use serde_json::json;

struct Counting;

static ALLOCS: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    static COUNTING: Cell<bool> = const { Cell::new(false) };
}

fn note() {
    if COUNTING.with(Cell::get) {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
    }
}

// SAFETY: every call is forwarded unchanged to the system allocator.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note();
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note();
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[test]
fn filter_false_path_does_not_allocate() {
    let payload = json!({
        "temperature": 21.5, "status": "ok", "humidity": 40,
        "battery": {"level": 80, "charging": true}, "pos": [48.0, 2.3], "s_num": "12"
    });
    let wheres = [
        "temperature > 30",
        "temperature > 30.5 OR humidity >= 90",
        "battery.level < 5 AND NOT battery.charging",
        "status = 'warn'",
        "status <> 'ok'",
        "abs(temperature) > 100",
        "pos[0] > 50",
        "temperature IS NULL",
        "missing IS NOT UNDEFINED",
        "s_num > 100",
        "CASE WHEN temperature > 30 THEN true ELSE false END",
        "st_distance(pos[0], pos[1], 0, 0) < 1",
        "startswith(status, 'x')",
        "topic(2) = 'zz'",
        "clientid() = 'x' AND timestamp() > 0",
        "temperature + 10 > 40 * 2",
        "get_or_default(missing, 0) > 1",
    ];
    for w in wheres {
        let rule =
            Rule::compile(&format!("SELECT * FROM 'devices/+/telemetry' WHERE {w}")).unwrap();
        let msg = MessageContext::new("acme", "devices/d1/telemetry", &payload);
        assert_eq!(rule.evaluate(&msg, &NoLookup).unwrap(), None, "{w}");
        ALLOCS.store(0, Ordering::Relaxed);
        COUNTING.with(|c| c.set(true));
        for _ in 0..100 {
            let matched = rule.matches_topic(msg.topic);
            let out = rule.evaluate(&msg, &NoLookup);
            std::hint::black_box((matched, &out));
        }
        COUNTING.with(|c| c.set(false));
        assert_eq!(ALLOCS.load(Ordering::Relaxed), 0, "`{w}` allocated");
    }
    // The counter works: an output is built (and so allocated) when WHERE holds.
    let rule = Rule::compile("SELECT * FROM 'devices/+/telemetry' WHERE temperature < 30").unwrap();
    let msg = MessageContext::new("acme", "devices/d1/telemetry", &payload);
    COUNTING.with(|c| c.set(true));
    let out = rule.evaluate(&msg, &NoLookup).unwrap();
    COUNTING.with(|c| c.set(false));
    assert!(out.is_some());
    assert!(ALLOCS.load(Ordering::Relaxed) > 0);
}

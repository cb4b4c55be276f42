//! Damaged files: torn or corrupted log tails, damaged headers and snapshots. Opening must
//! always succeed, report a warning, keep everything before the damage, and work afterwards.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::fs::OpenOptions;
use std::io::Write;
use std::path::Path;

use common::*;
use ferrohub_store::{BrokerStore, FsyncPolicy, RecoveredState, StoreOp};

const HEADER_LEN: u64 = 32;

/// One session, then one batch per enqueued message (so one record each).
fn batches(n: u64) -> Vec<Vec<StoreOp>> {
    let mut v = vec![vec![put_session("a")]];
    for id in 1..=n {
        v.push(vec![enqueue("a", id, &[id as u8; 64])]);
    }
    v
}

/// The log of a store that never compacted.
const LOG1: &str = "wal-0000000000000001.log";

/// The current (highest epoch) log of a store.
fn log_name(dir: &Path) -> String {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("wal-") && n.ends_with(".log"))
        .max()
        .expect("a log file")
}

fn log_path(dir: &Path) -> std::path::PathBuf {
    dir.join(log_name(dir))
}

fn log_len(dir: &Path) -> u64 {
    std::fs::metadata(log_path(dir)).unwrap().len()
}

/// Byte offsets where each record of the log starts, and the end.
fn record_offsets(dir: &Path) -> Vec<u64> {
    let data = std::fs::read(log_path(dir)).unwrap();
    let mut at = HEADER_LEN as usize;
    let mut v = vec![];
    while at < data.len() {
        v.push(at as u64);
        let len = u32::from_le_bytes(data[at..at + 4].try_into().unwrap()) as usize;
        at += 8 + len;
    }
    v.push(at as u64);
    v
}

fn pending_ids(rec: &RecoveredState) -> Vec<u64> {
    rec.sessions
        .iter()
        .flat_map(|s| s.pending.iter().map(|d| d.message_id))
        .collect()
}

/// Reopens after damage: the state must be `expected`, with a warning; then new writes must
/// survive the next reopen without warnings.
async fn reopen_after_damage(dir: &Path, expected: RecoveredState, what: &str) {
    let (store, rec) = BrokerStore::open(dir, config(FsyncPolicy::Always)).unwrap();
    assert!(!rec.warnings.is_empty(), "{what}: no warning");
    eprintln!("{what}: {:?}", rec.warnings);
    assert_eq!(without_warnings(rec.clone()), expected, "{what}");
    let new_id = rec.next_message_id;
    store
        .submit(vec![
            put_session("a"),
            enqueue("a", new_id, b"after the repair"),
        ])
        .await
        .unwrap()
        .await
        .unwrap();
    store.close().await.unwrap();
    let (store, rec2) = BrokerStore::open(dir, config(FsyncPolicy::Always)).unwrap();
    assert!(rec2.warnings.is_empty(), "{what}: {:?}", rec2.warnings);
    let mut ids = pending_ids(&expected);
    ids.push(new_id);
    assert_eq!(pending_ids(&rec2), ids, "{what}");
    store.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_appended_to_the_log_is_cut_off() {
    for garbage in [
        &b"\x01"[..],
        &b"\x00\x00\x00"[..],
        &[0xAB; 37][..],
        &[0u8; 4096][..],
    ] {
        let dir = tempfile::tempdir().unwrap();
        let b = batches(5);
        write_batches(dir.path(), config(FsyncPolicy::Always), &b).await;
        let clean_len = log_len(dir.path());
        OpenOptions::new()
            .append(true)
            .open(log_path(dir.path()))
            .unwrap()
            .write_all(garbage)
            .unwrap();
        let (store, rec) = BrokerStore::open(dir.path(), config(FsyncPolicy::Always)).unwrap();
        store.close().await.unwrap();
        assert_eq!(
            log_len(dir.path()),
            clean_len,
            "truncated to the last good record"
        );
        assert_eq!(without_warnings(rec.clone()), model_of(&b));
        // Start over with fresh damage for the full check.
        OpenOptions::new()
            .append(true)
            .open(log_path(dir.path()))
            .unwrap()
            .write_all(garbage)
            .unwrap();
        reopen_after_damage(dir.path(), model_of(&b), "garbage").await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncation_inside_the_last_record_loses_only_it() {
    let b = batches(5);
    let dir = tempfile::tempdir().unwrap();
    write_batches(dir.path(), config(FsyncPolicy::Always), &b).await;
    let offsets = record_offsets(dir.path());
    let last = offsets[offsets.len() - 2];
    let end = *offsets.last().unwrap();
    // Each cut point: inside the record header, and inside the payload.
    for cut in [last + 3, last + 8, last + 20, end - 1] {
        let d = tempfile::tempdir().unwrap();
        for f in [LOG1, "LOCK"] {
            std::fs::copy(dir.path().join(f), d.path().join(f)).unwrap();
        }
        OpenOptions::new()
            .write(true)
            .open(log_path(d.path()))
            .unwrap()
            .set_len(cut)
            .unwrap();
        reopen_after_damage(d.path(), model_of(&b[..b.len() - 1]), "truncated").await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flipped_byte_drops_its_record_and_everything_after() {
    let b = batches(6);
    let dir = tempfile::tempdir().unwrap();
    write_batches(dir.path(), config(FsyncPolicy::Never), &b).await;
    let offsets = record_offsets(dir.path());
    assert_eq!(offsets.len(), b.len() + 1);
    // (record index to damage, byte within it): payload, CRC field, length field.
    for (rec, within) in [(6, 30), (6, 5), (3, 30), (3, 1), (0, 12)] {
        let d = tempfile::tempdir().unwrap();
        let mut data = std::fs::read(log_path(dir.path())).unwrap();
        let at = (offsets[rec] + within) as usize;
        data[at] ^= 0x40;
        std::fs::write(d.path().join(LOG1), &data).unwrap();
        reopen_after_damage(d.path(), model_of(&b[..rec]), "flipped byte").await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_length_field_is_corruption_not_an_allocation() {
    let b = batches(2);
    let dir = tempfile::tempdir().unwrap();
    write_batches(dir.path(), config(FsyncPolicy::Never), &b).await;
    let offsets = record_offsets(dir.path());
    let mut data = std::fs::read(log_path(dir.path())).unwrap();
    let at = offsets[2] as usize;
    data[at..at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
    std::fs::write(log_path(dir.path()), &data).unwrap();
    reopen_after_damage(dir.path(), model_of(&b[..2]), "huge length").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_log_header_sets_the_log_aside() {
    let dir = tempfile::tempdir().unwrap();
    let b = batches(3);
    write_batches(dir.path(), config(FsyncPolicy::Never), &b).await;
    let mut data = std::fs::read(log_path(dir.path())).unwrap();
    data[3] ^= 1;
    std::fs::write(log_path(dir.path()), &data).unwrap();
    let (store, rec) = BrokerStore::open(dir.path(), config(FsyncPolicy::Never)).unwrap();
    assert_eq!(rec.warnings.len(), 1, "{:?}", rec.warnings);
    assert!(rec.sessions.is_empty());
    store.close().await.unwrap();
    let aside: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(&format!("{LOG1}.bad-")))
        .collect();
    assert_eq!(aside.len(), 1);

    // An empty log file (as if created but never written) is handled the same way.
    std::fs::write(log_path(dir.path()), b"").unwrap();
    let (store, rec) = BrokerStore::open(dir.path(), config(FsyncPolicy::Never)).unwrap();
    assert_eq!(rec.warnings.len(), 1, "{:?}", rec.warnings);
    store.close().await.unwrap();
    let (store, rec) = BrokerStore::open(dir.path(), config(FsyncPolicy::Never)).unwrap();
    assert!(rec.warnings.is_empty(), "{:?}", rec.warnings);
    store.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupted_snapshot_is_set_aside_and_the_log_replayed() {
    for damage in ["flip", "truncate", "garbage"] {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = BrokerStore::open(dir.path(), config(FsyncPolicy::Always)).unwrap();
        // Compacted into the snapshot:
        let before = vec![put_session("old"), enqueue("old", 50, &[1u8; 200])];
        store.submit(before).await.unwrap().await.unwrap();
        store.compact().await.unwrap();
        // In the log after it:
        let after = vec![put_session("a"), enqueue("a", 7, b"in the log")];
        store.submit(after.clone()).await.unwrap().await.unwrap();
        store.close().await.unwrap();

        let snap = dir.path().join("snapshot.bin");
        let mut data = std::fs::read(&snap).unwrap();
        match damage {
            "flip" => {
                let i = data.len() / 2;
                data[i] ^= 0xff;
            }
            "truncate" => data.truncate(data.len() - 10),
            _ => data = vec![0x5a; 100],
        }
        std::fs::write(&snap, &data).unwrap();

        let (store, rec) = BrokerStore::open(dir.path(), config(FsyncPolicy::Always)).unwrap();
        assert_eq!(rec.warnings.len(), 1, "{damage}: {:?}", rec.warnings);
        assert!(rec.warnings[0].contains("snapshot"), "{:?}", rec.warnings);
        // Only the log's ops, applied to an empty state; ids still do not go backwards.
        let mut expected = model_of(std::slice::from_ref(&after));
        expected.next_message_id = 51;
        assert_eq!(without_warnings(rec), expected, "{damage}");
        store.close().await.unwrap();
        // A fresh snapshot of the recovered state replaces it, so the warning is not repeated.
        assert!(snap.exists());
        let aside = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("snapshot.bin.bad-"))
            .count();
        assert_eq!(aside, 1, "{damage}");
        let (store, rec) = BrokerStore::open(dir.path(), config(FsyncPolicy::Always)).unwrap();
        assert!(rec.warnings.is_empty(), "{:?}", rec.warnings);
        assert_eq!(rec.sessions.len(), 1);
        store.close().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_crash_point_of_a_compaction_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let a = batches(3);
    write_batches(dir.path(), config(FsyncPolicy::Never), &a).await;
    let log1 = std::fs::read(dir.path().join(LOG1)).unwrap();
    let (store, _) = BrokerStore::open(dir.path(), config(FsyncPolicy::Never)).unwrap();
    store.compact().await.unwrap();
    // A dequeue: replaying log 1 twice would bring message 1 back.
    let b = vec![dequeue("a", 1), enqueue("a", 4, b"four")];
    store.submit(b.clone()).await.unwrap().await.unwrap();
    store.close().await.unwrap();
    assert!(
        !dir.path().join(LOG1).exists(),
        "log 1 is deleted once in the snapshot"
    );
    let mut all = a.clone();
    all.push(b);
    let snapshot = std::fs::read(dir.path().join("snapshot.bin")).unwrap();

    // Crash after the snapshot was renamed, before log 1 was deleted: log 1 is not replayed.
    std::fs::write(dir.path().join(LOG1), &log1).unwrap();
    std::fs::write(dir.path().join("snapshot.bin.tmp"), b"half a snapshot").unwrap();
    std::fs::write(dir.path().join("wal-0000000000000003.log.tmp"), b"half").unwrap();
    let (store, rec) = BrokerStore::open(dir.path(), config(FsyncPolicy::Never)).unwrap();
    assert!(rec.warnings.is_empty(), "{:?}", rec.warnings);
    assert_eq!(rec, model_of(&all));
    store.close().await.unwrap();
    assert!(!dir.path().join(LOG1).exists());
    assert!(!dir.path().join("snapshot.bin.tmp").exists());
    assert!(!dir.path().join("wal-0000000000000003.log.tmp").exists());

    // Crash after log 2 was started, before the snapshot was written: logs 1 and 2 replayed.
    std::fs::remove_file(dir.path().join("snapshot.bin")).unwrap();
    std::fs::write(dir.path().join(LOG1), &log1).unwrap();
    let (store, rec) = BrokerStore::open(dir.path(), config(FsyncPolicy::Never)).unwrap();
    assert!(rec.warnings.is_empty(), "{:?}", rec.warnings);
    assert_eq!(rec, model_of(&all));
    store.close().await.unwrap();

    // A snapshot with its log deleted by hand: a warning, the snapshot's state.
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("snapshot.bin"), &snapshot).unwrap();
    let (store, rec) = BrokerStore::open(d.path(), config(FsyncPolicy::Never)).unwrap();
    assert_eq!(rec.warnings.len(), 1, "{:?}", rec.warnings);
    assert_eq!(without_warnings(rec), model_of(&a));
    store.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damage_in_an_older_log_sets_the_later_ones_aside() {
    let dir = tempfile::tempdir().unwrap();
    let a = batches(3);
    write_batches(dir.path(), config(FsyncPolicy::Never), &a).await;
    let log1 = std::fs::read(dir.path().join(LOG1)).unwrap();
    let (store, _) = BrokerStore::open(dir.path(), config(FsyncPolicy::Never)).unwrap();
    store.compact().await.unwrap();
    store
        .submit(vec![enqueue("a", 9, b"nine")])
        .await
        .unwrap()
        .await
        .unwrap();
    store.close().await.unwrap();
    // No snapshot, log 1 with a torn tail, log 2 intact: log 2 must not be applied after the hole.
    std::fs::remove_file(dir.path().join("snapshot.bin")).unwrap();
    std::fs::write(dir.path().join(LOG1), &log1[..log1.len() - 3]).unwrap();
    let (store, rec) = BrokerStore::open(dir.path(), config(FsyncPolicy::Never)).unwrap();
    assert_eq!(rec.warnings.len(), 2, "{:?}", rec.warnings);
    assert_eq!(without_warnings(rec), model_of(&a[..3]));
    store.close().await.unwrap();
    let (store, rec) = BrokerStore::open(dir.path(), config(FsyncPolicy::Never)).unwrap();
    assert!(rec.warnings.is_empty(), "{:?}", rec.warnings);
    assert_eq!(rec, model_of(&a[..3]));
    store.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_damage_never_panics() {
    // Deterministic pseudo-random damage over a log and a snapshot with every kind of record.
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = BrokerStore::open(dir.path(), config(FsyncPolicy::Never)).unwrap();
    store
        .submit(vec![
            put_session("a"),
            enqueue("a", 1, b"one"),
            StoreOp::PutRetained {
                tenant: tenant(),
                message: rich_message("r/1", b"x"),
            },
        ])
        .await
        .unwrap()
        .await
        .unwrap();
    store.compact().await.unwrap();
    for id in 2..6 {
        drop(store.submit(vec![enqueue("a", id, b"more")]).await.unwrap());
    }
    store.close().await.unwrap();
    let name = log_name(dir.path());
    let log = std::fs::read(dir.path().join(&name)).unwrap();
    let snap = std::fs::read(dir.path().join("snapshot.bin")).unwrap();
    let mut seed = 0x9E37_79B9_7F4A_7C15u64;
    let mut rnd = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for round in 0..60 {
        let d = tempfile::tempdir().unwrap();
        let (mut l, mut s) = (log.clone(), snap.clone());
        let target = if round % 2 == 0 { &mut l } else { &mut s };
        for _ in 0..(1 + rnd() % 3) {
            let i = (rnd() as usize) % target.len();
            target[i] = rnd() as u8;
        }
        if round % 5 == 0 {
            let keep = (rnd() as usize) % target.len();
            target.truncate(keep);
        }
        std::fs::write(d.path().join(&name), &l).unwrap();
        std::fs::write(d.path().join("snapshot.bin"), &s).unwrap();
        let (store, _) = BrokerStore::open(d.path(), config(FsyncPolicy::Never)).unwrap();
        store.close().await.unwrap();
        let (store, rec) = BrokerStore::open(d.path(), config(FsyncPolicy::Never)).unwrap();
        assert!(rec.warnings.is_empty(), "round {round}: {:?}", rec.warnings);
        store.close().await.unwrap();
    }
}

//! Crash safety: concurrent writers and deleters, `kill -9` at random moments, many rounds,
//! alternating the io_uring and pread engines.
//! After every restart each acknowledged chunk must read back verified, each acknowledged
//! delete must stay deleted, and an unacknowledged write may be absent but never wrong.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use rand::{Rng, SeedableRng};
use sov_testkit::{Storaged, TestDir};
use tonic::Code;

#[derive(Debug, Clone, Copy, PartialEq)]
enum State {
    /// Put acknowledged: must read back with this seed's bytes.
    Acked { seed: u64, len: usize },
    /// Put sent, no answer: absent or exactly these bytes.
    Maybe { seed: u64, len: usize },
    /// Delete acknowledged: must be absent.
    Deleted,
    /// Delete sent, no answer: absent or the acknowledged bytes.
    MaybeDeleted { seed: u64, len: usize },
}

type Book = Arc<Mutex<HashMap<String, State>>>;

async fn writer(mut c: Client, book: Book, round: u32, w: u32, seed: u64) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    for n in 0.. {
        if rng.gen_ratio(1, 5) {
            // Delete something acknowledged earlier.
            let victim = {
                let b = book.lock().unwrap();
                b.iter()
                    .filter_map(|(id, s)| match s {
                        State::Acked { seed, len } => Some((id.clone(), *seed, *len)),
                        _ => None,
                    })
                    .nth(rng.gen_range(0..8))
            };
            if let Some((id, s, len)) = victim {
                book.lock()
                    .unwrap()
                    .insert(id.clone(), State::MaybeDeleted { seed: s, len });
                match delete(&mut c, &id).await {
                    Ok(()) => {
                        book.lock().unwrap().insert(id, State::Deleted);
                    }
                    Err(_) => return,
                }
                continue;
            }
        }
        let id = format!("r{round:02}/w{w}/{n:05}");
        let len = match rng.gen_range(0..100) {
            0..=4 => rng.gen_range(512 * 1024..2 * 1024 * 1024),
            5..=9 => 0,
            _ => rng.gen_range(1..64 * 1024),
        };
        let s = rng.r#gen::<u64>();
        book.lock()
            .unwrap()
            .insert(id.clone(), State::Maybe { seed: s, len });
        match put(&mut c, &id, &pattern(s, len)).await {
            Ok(r) => {
                assert_eq!(r.length, len as u64);
                book.lock()
                    .unwrap()
                    .insert(id, State::Acked { seed: s, len });
            }
            Err(_) => return, // the node was killed
        }
    }
}

/// Checks every entry of the book against the node; returns how many acknowledged operations
/// were checked and how many unacknowledged ones were resolved to what the node holds.
async fn verify(c: &Client, book: &Book) -> (usize, usize) {
    use futures::StreamExt;
    let entries: Vec<(String, State)> = book
        .lock()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), *v))
        .collect();
    let results: Vec<(String, State, bool)> = futures::stream::iter(entries)
        .map(|(id, state)| {
            let mut c = c.clone();
            async move {
                let got = get(&mut c, &id).await;
                let (resolved, was_acked) = match (state, got) {
                    (State::Acked { seed, len }, Ok(d)) => {
                        assert!(
                            d == pattern(seed, len),
                            "acknowledged chunk {id} has wrong bytes"
                        );
                        (state, true)
                    }
                    (State::Acked { .. }, Err(e)) => panic!("acknowledged chunk {id} lost: {e:?}"),
                    (State::Deleted, Err(e)) if e.code() == Code::NotFound => (state, true),
                    (State::Deleted, other) => {
                        panic!("acknowledged delete of {id} undone: {other:?}")
                    }
                    (State::Maybe { seed, len } | State::MaybeDeleted { seed, len }, Ok(d)) => {
                        assert!(d == pattern(seed, len), "chunk {id} returned wrong bytes");
                        (State::Acked { seed, len }, false)
                    }
                    (State::Maybe { .. } | State::MaybeDeleted { .. }, Err(e))
                        if e.code() == Code::NotFound =>
                    {
                        (State::Deleted, false)
                    }
                    (s, Err(e)) => panic!("chunk {id} in state {s:?}: unexpected error {e:?}"),
                };
                (id, resolved, was_acked)
            }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    let mut b = book.lock().unwrap();
    let mut acked = 0;
    let mut unacked = 0;
    for (id, state, was_acked) in results {
        if was_acked {
            acked += 1;
        } else {
            unacked += 1;
        }
        b.insert(id, state);
    }
    (acked, unacked)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_at_random_moments_loses_nothing_acknowledged() {
    let dir = TestDir::new("crash");
    let disk = dir.path().join("disk");
    // Small segments and eager compaction, so crashes also hit rollovers and compaction.
    let mut node = Storaged::start(
        dir.path(),
        &[disk],
        &[
            "--segment-size",
            "4MiB",
            "--max-chunk-size",
            "2MiB",
            "--garbage-ratio",
            "0.3",
            "--compaction-interval",
            "50ms",
            "--scrub-rate",
            "0",
            "--scrub-interval",
            "1s",
        ],
    )
    .unwrap();
    let book: Book = Arc::new(Mutex::new(HashMap::new()));
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
    let rounds = 22;
    let mut checked_acked = 0usize;
    let mut checked_unacked = 0usize;
    for round in 0..rounds {
        let c = node.client().await.unwrap();
        let writers: Vec<_> = (0..6u32)
            .map(|w| {
                tokio::spawn(writer(
                    c.clone(),
                    book.clone(),
                    round,
                    w,
                    rng.r#gen::<u64>(),
                ))
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(rng.gen_range(50..600))).await;
        node.kill9();
        for w in writers {
            tokio::time::timeout(Duration::from_secs(30), w)
                .await
                .expect("writers notice the kill")
                .unwrap();
        }
        // Alternate the I/O engines, so both write paths are crashed and both recover.
        let engine = if round % 2 == 0 { "pread" } else { "io_uring" };
        node.restart_with(&["--io-engine", engine]).unwrap();
        assert_eq!(node.ready.io_engine, engine);
        let c = node.client().await.unwrap();
        let (a, u) = verify(&c, &book).await;
        checked_acked += a;
        checked_unacked += u;
    }
    let total_acked = book
        .lock()
        .unwrap()
        .values()
        .filter(|s| matches!(s, State::Acked { .. }))
        .count();
    eprintln!(
        "crash test: {rounds} kill -9 rounds, {checked_acked} acknowledged-operation checks, \
         {checked_unacked} unacknowledged outcomes resolved, {total_acked} chunks live at the end"
    );
    assert!(
        total_acked > 100,
        "the writers made progress: {total_acked}"
    );
}

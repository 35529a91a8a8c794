#![allow(dead_code)] // each test binary uses a different part of these helpers
//! Helpers of the data-path tests: deterministic payloads and a ledger of every acknowledged
//! write, checked against what the cluster returns.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use sov_client::pgcheck::{self, Check};
use sov_client::{Client, ClientConfig, ClientError, PutOptions, PutResult};
use sov_testkit::DataCluster;

pub const MIB: usize = 1 << 20;

/// `len` pseudo-random bytes determined by `seed`.
pub fn payload(seed: &str, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    blake3::Hasher::new()
        .update(seed.as_bytes())
        .finalize_xof()
        .fill(&mut out);
    out
}

/// metad and six storage nodes in three zones (`storaged_extra` flags on each), pools and
/// buckets `rep3` (replicated{3}) and `ec42` (ec{4,2}) with `pgs` PGs, and a client.
pub async fn two_pools(
    dir: &sov_testkit::TestDir,
    storaged_extra: &[&str],
    pgs: u32,
) -> (DataCluster, Client) {
    let cl = DataCluster::start(dir.path(), 3, 2, &[], storaged_extra)
        .await
        .expect("cluster");
    cl.pool_and_bucket("rep3", "replicated:3", pgs)
        .await
        .unwrap();
    cl.pool_and_bucket("ec42", "ec:4+2", pgs).await.unwrap();
    let c = client(&cl);
    (cl, c)
}

pub fn client(c: &DataCluster) -> Client {
    Client::new(std::slice::from_ref(&c.metad.addr), ClientConfig::default()).expect("client")
}

/// Every acknowledged write: (bucket, key) → blake3 of what was written (None = deleted).
#[derive(Default)]
pub struct Ledger {
    pub acked: BTreeMap<(String, String), Option<[u8; 32]>>,
    pub writes: usize,
}

impl Ledger {
    /// Writes `len` bytes to bucket/key; records it when acknowledged.
    pub async fn put(
        &mut self,
        c: &Client,
        bucket: &str,
        key: &str,
        len: usize,
    ) -> Result<PutResult, ClientError> {
        let data = payload(&format!("{bucket}/{key}/{}", self.writes), len);
        let r = c
            .put_object(bucket, key, &data[..], PutOptions::default())
            .await?;
        assert_eq!(r.object.size, len as u64);
        self.writes += 1;
        self.acked.insert(
            (bucket.to_string(), key.to_string()),
            Some(*blake3::hash(&data).as_bytes()),
        );
        Ok(r)
    }

    pub async fn delete(&mut self, c: &Client, bucket: &str, key: &str) {
        c.delete_object(bucket, key).await.expect("delete");
        self.acked
            .insert((bucket.to_string(), key.to_string()), None);
    }

    /// Reads every acknowledged object back and compares it; returns how many were checked.
    pub async fn verify(&self, c: &Client) -> usize {
        let mut n = 0;
        for ((bucket, key), want) in &self.acked {
            match want {
                Some(h) => {
                    let (_, data) = c
                        .read_all(bucket, key)
                        .await
                        .unwrap_or_else(|e| panic!("reading {bucket}/{key}: {e}"));
                    assert_eq!(
                        blake3::hash(&data).as_bytes(),
                        h,
                        "{bucket}/{key} came back different"
                    );
                }
                None => {
                    let e = c
                        .head_object(bucket, key)
                        .await
                        .expect_err("deleted object");
                    assert!(e.is_not_found(), "{bucket}/{key}: {e}");
                }
            }
            n += 1;
        }
        n
    }
}

/// Polls the full PG audit until it is clean; panics with the last audit otherwise.
pub async fn wait_clean(c: &Client, timeout: Duration) -> Check {
    let deadline = Instant::now() + timeout;
    loop {
        let check = pgcheck::check(c).await.expect("pg check");
        if check.clean() && check.pools.iter().all(|p| p.tombstoned == 0) {
            return check;
        }
        if Instant::now() > deadline {
            panic!("not clean after {timeout:?}:\n{check}");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

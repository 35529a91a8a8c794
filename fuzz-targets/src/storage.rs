//! Stored formats: storaged's segment records and the recovery scan over segment files, the
//! extent metadata and fence files of block volumes, erasure-coded shard headers, object
//! manifests and chunk ids.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::OnceLock;

use bytes::Bytes;
use prost::Message;
use sov_client::manifest;
use sov_common::layout::ChunkId;
use sov_common::stripe;
use sov_proto::storaged as pb;
use storaged::disk::{Disk, DiskConfig};
use storaged::extents::{self, Extents};
use storaged::index::Location;
use storaged::io::{Io, IoEngineKind};
use storaged::metrics::Metrics;
use storaged::record::{self, HEADER_LEN, RecordKind};

use crate::rt::{Input, scratch, threaded};

fn io() -> Io {
    static IO: OnceLock<Io> = OnceLock::new();
    IO.get_or_init(|| Io::start(IoEngineKind::Pread).expect("the pread I/O engine"))
        .clone()
}

/// Record headers, shard headers and stripes, manifests and chunk ids, all from the same
/// bytes: each parser refuses or accepts, and what it accepts re-encodes to the same thing.
pub fn chunk_record(data: &[u8]) {
    record_header(data);
    shard_header(data);
    stripe_decode(data);
    manifest_decode(data);
    chunk_id(data);
}

/// A segment record header: the check accepts exactly what `encode_head` writes.
fn record_header(data: &[u8]) {
    let Ok(h) = record::parse_fixed(data) else {
        return;
    };
    let len = h.record_len();
    assert!(len >= HEADER_LEN as u64);
    let Some(id) = data.get(HEADER_LEN..HEADER_LEN + h.id_len) else {
        return;
    };
    let ok = record::verify_check(data, id).is_ok();
    let head = record::encode_head(h.kind, id, h.data_len, &h.blake3);
    assert_eq!(
        ok,
        head[..] == data[..head.len()],
        "the header check accepts exactly what encode_head writes"
    );
    assert_eq!(record::parse_fixed(&head), Ok(h));
}

/// A stored shard's header: what it accepts is consistent.
fn shard_header(data: &[u8]) {
    if let Ok(h) = stripe::Header::parse(data) {
        assert!(h.k > 0 && h.m > 0 && u16::from(h.index) < u16::from(h.k) + u16::from(h.m));
        assert_eq!(
            data.len() - stripe::HEADER_LEN,
            stripe::shard_len(h.sealed_len as usize, usize::from(h.k))
        );
    }
}

/// A stripe made from the bytes, then damaged as the bytes say (shards lost, header and body
/// bytes flipped): decoding gives the chunk back exactly or fails, and must give it back when
/// `k` shards are whole, at most one more has a rotten body, and fewer have a rotten header
/// than are whole.
fn stripe_decode(data: &[u8]) {
    let mut inp = Input(data);
    if inp.u8() != b'E' {
        return;
    }
    let k = 1 + usize::from(inp.u8() % 6);
    let m = 1 + usize::from(inp.u8() % 4);
    let lost = inp.u8();
    let flips = usize::from(inp.u8() % 8);
    let mut damage = Vec::new();
    for _ in 0..flips {
        damage.push((usize::from(inp.u8()), usize::from(inp.u16()), inp.u8() | 1));
    }
    let sealed = inp.rest();
    let whole_shards = stripe::encode(k, m, sealed).expect("a usable profile");
    let mut shards = whole_shards.clone();
    let n = k + m;
    for (s, at, x) in damage {
        let s = s % n;
        let at = at % shards[s].len();
        shards[s][at] ^= x;
    }
    // What differs in the end (two flips of one byte cancel); bytes 9..12 are reserved and
    // read by nothing.
    let differs = |s: usize, r: std::ops::Range<usize>| shards[s][r.clone()] != whole_shards[s][r];
    let h = stripe::HEADER_LEN;
    let header_rot: Vec<bool> = (0..n)
        .map(|s| differs(s, 0..9) || differs(s, 12..h))
        .collect();
    let body_rot: Vec<bool> = (0..n).map(|s| differs(s, h..shards[s].len())).collect();
    let view: Vec<Option<&[u8]>> = (0..n)
        .map(|i| (lost & (1 << (i % 8)) == 0).then(|| shards[i].as_slice()))
        .collect();
    let present = |i: usize| view[i].is_some();
    let whole = (0..n)
        .filter(|&i| present(i) && !header_rot[i] && !body_rot[i])
        .count();
    let rotten_bodies = (0..n)
        .filter(|&i| present(i) && !header_rot[i] && body_rot[i])
        .count();
    let rotten_headers = (0..n).filter(|&i| present(i) && header_rot[i]).count();
    match stripe::decode(k, m, &view) {
        Ok(back) => assert_eq!(back, sealed, "a stripe decoded to other bytes"),
        Err(e) => assert!(
            !(whole >= k && rotten_bodies <= 1 && rotten_headers < whole),
            "{k}+{m}: {whole} whole, {rotten_bodies} rotten bodies, {rotten_headers} rotten \
             headers, yet: {e}"
        ),
    }
}

/// A manifest: what `decode` accepts re-encodes to the same manifest, and everything derived
/// from it (chunk lengths, checksums, stored ids) is computable and consistent.
fn manifest_decode(data: &[u8]) {
    let Ok(m) = manifest::decode(data) else {
        return;
    };
    let again = manifest::decode(&m.encode_to_vec()).expect("a re-encoded manifest decodes");
    assert_eq!(again, m);
    for leaf in manifest::leaves(&m) {
        let n = manifest::chunk_count(leaf);
        let mut total = 0u64;
        for i in 0..n {
            let len = manifest::chunk_len(leaf, i);
            assert!(len > 0 && len <= u64::from(leaf.chunk_size));
            total += len;
            manifest::chunk_blake3(leaf, i);
            manifest::chunk_id(leaf, i);
        }
        assert_eq!(total, leaf.size, "chunk lengths add up to the object");
    }
    for id in manifest::stored_ids(&m) {
        assert!(
            ChunkId::parse(&id).is_ok(),
            "stored id {id:?} does not parse"
        );
    }
}

/// A chunk id: what parses prints back to the same string.
fn chunk_id(data: &[u8]) {
    if let Ok(s) = std::str::from_utf8(data)
        && let Ok(id) = ChunkId::parse(s)
    {
        assert_eq!(id.to_string(), s);
    }
}

/// One record of a segment as the harness wrote it (for the model of recovery).
struct Written {
    seg: u64,
    offset: u64,
    id: String,
    /// None for a tombstone; Some(whether its data matches its checksum) for a put.
    put: Option<bool>,
}

/// Builds segment files from the bytes, then opens a disk on them (recovery replays them into
/// a new index). Recovery must succeed; every chunk it indexed reads back verified or is
/// reported corrupt; when the segments hold only whole records, the index is exactly what
/// replaying them means; a put then works; and opening the disk again changes nothing.
pub fn segment_recovery(data: &[u8]) {
    let dir = scratch();
    let (segs, written, clean) = build_segments(data);
    std::fs::create_dir_all(dir.path().join("segments")).expect("segments folder");
    std::fs::write(dir.path().join("FORMAT"), "sov-storaged-disk 1\n").expect("FORMAT");
    for (n, bytes) in &segs {
        let path = dir.path().join(format!("segments/seg-{n:016x}.dat"));
        std::fs::write(path, bytes).expect("a segment file");
    }
    let cfg = DiskConfig {
        segment_size: 64 << 10,
        reserved_space: 0,
        max_batch_bytes: 1 << 20,
    };
    let disk = Disk::open(dir.path(), cfg.clone(), io(), Metrics::new())
        .expect("recovery failed on a disk of readable files");
    let index = indexed(&disk);
    let rt = threaded();
    rt.block_on(async {
        for (id, loc) in &index {
            match disk.read(id, "fuzz").await {
                Ok((at, bytes)) => {
                    assert_eq!(at, *loc);
                    assert_eq!(blake3::hash(&bytes).as_bytes(), &loc.blake3);
                }
                Err(storaged::error::StoreError::Corrupt { .. }) => {}
                Err(e) => panic!("reading {id:?} after recovery: {e}"),
            }
        }
    });
    if clean {
        assert_eq!(
            index
                .iter()
                .map(|(id, l)| (id.clone(), (l.segment, l.offset)))
                .collect::<BTreeMap<_, _>>(),
            model(&segs, &written),
            "the index after recovery is not what the records say"
        );
    }
    let fresh = Bytes::from_static(b"written after recovery");
    rt.block_on(async {
        disk.put(
            "fresh".into(),
            vec![fresh.clone()],
            *blake3::hash(&fresh).as_bytes(),
        )
        .await
        .expect("a put after recovery");
        assert_eq!(
            disk.read("fresh", "fuzz").await.expect("reading it").1,
            fresh
        );
    });
    let before = indexed(&disk);
    drop(disk);
    let disk = Disk::open(dir.path(), cfg, io(), Metrics::new()).expect("a second recovery");
    assert_eq!(
        indexed(&disk),
        before,
        "a second recovery changed the index"
    );
}

fn indexed(disk: &Disk) -> BTreeMap<String, Location> {
    let mut out = BTreeMap::new();
    disk.index()
        .for_each_chunk(|id, loc| {
            out.insert(id.to_string(), *loc);
        })
        .expect("walking the index");
    out
}

/// The segment files the bytes describe, the records written in them, and whether the files
/// hold nothing but whole records.
fn build_segments(data: &[u8]) -> (BTreeMap<u64, Vec<u8>>, Vec<Written>, bool) {
    let mut inp = Input(data);
    let mut segs: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
    let mut written = Vec::new();
    if inp.u8() & 1 == 0 {
        // The bytes are the segment, as they are.
        segs.insert(1, inp.rest().to_vec());
        return (segs, written, false);
    }
    let mut clean = true;
    let mut cur = 1u64;
    segs.insert(cur, Vec::new());
    while !inp.is_empty() {
        let op = inp.u8();
        let seg = segs.get_mut(&cur).expect("current segment");
        match op % 8 {
            0..=3 => {
                let b = inp.u8();
                let id: Vec<u8> = if b & 0x80 != 0 {
                    inp.bytes(usize::from(b & 0x1f)).to_vec()
                } else {
                    format!("c{}", b % 8).into_bytes()
                };
                let offset = seg.len() as u64;
                let id_str = String::from_utf8_lossy(&id).into_owned();
                if op % 8 == 2 {
                    seg.extend(record::encode_head(RecordKind::Tombstone, &id, 0, &[0; 32]));
                    written.push(Written {
                        seg: cur,
                        offset,
                        id: id_str,
                        put: None,
                    });
                } else {
                    let n = usize::from(inp.u8());
                    let body = inp.bytes(n);
                    let good = op % 8 != 3;
                    let mut sum = *blake3::hash(body).as_bytes();
                    if !good {
                        sum[0] ^= 1;
                    }
                    seg.extend(record::encode_head(
                        RecordKind::Put,
                        &id,
                        body.len() as u64,
                        &sum,
                    ));
                    seg.extend_from_slice(body);
                    written.push(Written {
                        seg: cur,
                        offset,
                        id: id_str,
                        put: Some(good),
                    });
                }
            }
            4 => {
                let n = usize::from(inp.u8());
                seg.extend_from_slice(inp.bytes(n));
                clean = false;
            }
            5 => {
                cur += 1 + u64::from(inp.u8() % 2);
                segs.insert(cur, Vec::new());
            }
            6 => {
                let n = usize::from(inp.u8());
                seg.truncate(seg.len().saturating_sub(n));
                clean = false;
            }
            _ => {
                let at = usize::from(inp.u16());
                let x = inp.u8() | 1;
                if !seg.is_empty() {
                    let at = at % seg.len();
                    seg[at] ^= x;
                    clean = false;
                }
            }
        }
    }
    (segs, written, clean)
}

/// What replaying whole records must leave in the index: id → (segment, offset).
fn model(segs: &BTreeMap<u64, Vec<u8>>, written: &[Written]) -> BTreeMap<String, (u64, u64)> {
    let last = segs.keys().next_back().copied();
    let mut state: HashMap<String, (u64, u64)> = HashMap::new();
    for (i, w) in written.iter().enumerate() {
        match w.put {
            None => {
                state.remove(&w.id);
            }
            Some(true) => {
                state.insert(w.id.clone(), (w.seg, w.offset));
            }
            Some(false) => {
                let last_record =
                    Some(w.seg) == last && written.get(i + 1).is_none_or(|next| next.seg != w.seg);
                // A rotten last record of the last segment is a torn append: cut. Elsewhere it
                // replaces nothing, and is indexed (as corrupt) only for a new id.
                if !last_record {
                    state.entry(w.id.clone()).or_insert((w.seg, w.offset));
                }
            }
        }
    }
    state.into_iter().collect()
}

/// Extent metadata and the fence file, decoded on their own and through the extent store:
/// decoding re-encodes to the same bytes; reads answer with what the metadata says (or
/// refuse it as data loss); a write is refused exactly when its lease epoch is older than the
/// fence, and otherwise applies exactly when its version is at least the sector's.
pub fn extent_meta(data: &[u8]) {
    let mut inp = Input(data);
    let fence_len = usize::from(inp.u8() % 24);
    let fence = inp.bytes(fence_len).to_vec();
    let sector = u32::from(inp.u16()) % 1024;
    let epoch = u64::from(inp.u32());
    let seq = inp.u64();
    let meta = inp.rest();

    let decoded = extents::fuzzing::meta_round_trip(meta);
    if let Ok(enc) = &decoded {
        assert_eq!(enc.len(), 64 + 32 * 1024);
        assert_eq!(&enc[..24], &meta[..24], "magic, born, last_snap");
        for i in 0..1024 {
            let at = 64 + 32 * i;
            if let Some(rec) = meta.get(at..at + 32) {
                assert_eq!(&enc[at..at + 32], rec, "sector record {i}");
            }
        }
        assert_eq!(
            extents::fuzzing::meta_round_trip(enc).as_ref(),
            Ok(enc),
            "encode then decode is the identity"
        );
    }

    let dir = scratch();
    let vol = "abcd";
    let vdir = dir.path().join(vol);
    std::fs::create_dir_all(&vdir).expect("volume folder");
    std::fs::write(vdir.join("00000000.meta"), meta).expect("meta file");
    if !fence.is_empty() {
        std::fs::write(vdir.join("fence"), &fence).expect("fence file");
    }
    let fence_epoch = std::str::from_utf8(&fence)
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(0);
    threaded().block_on(extent_store(
        dir.path(),
        vol,
        decoded.as_deref().ok(),
        fence_epoch,
        (sector, epoch, seq),
    ));
}

fn addr(vol: &str) -> Option<pb::ExtentAddr> {
    Some(pb::ExtentAddr {
        volume_id: vol.into(),
        index: 0,
    })
}

async fn extent_store(
    root: &Path,
    vol: &str,
    meta: Option<&[u8]>,
    fence: u64,
    (sector, epoch, seq): (u32, u64, u64),
) {
    let x = Extents::open(root, io()).expect("opening the extent store");
    let rec = |i: usize| {
        meta.map(|m| {
            let r = &m[64 + 32 * i..96 + 32 * i];
            let epoch = u32::from_le_bytes(r[0..4].try_into().expect("4 bytes"));
            let seq = u64::from_le_bytes(r[8..16].try_into().expect("8 bytes"));
            (epoch, seq)
        })
    };
    let read = x
        .read(pb::ReadExtentRequest {
            extent: addr(vol),
            first_sector: 0,
            count: 1024,
            snap_id: 0,
            versions_only: true,
        })
        .await;
    match (&read, meta) {
        (Ok(r), Some(_)) => {
            assert!(r.exists);
            for (i, v) in r.versions.iter().enumerate() {
                assert_eq!(Some((v.epoch, v.seq)), rec(i), "version of sector {i}");
            }
        }
        (Err(e), None) => assert_eq!(e.code(), tonic::Code::DataLoss, "{e}"),
        (r, m) => panic!(
            "reading an extent whose metadata decodes ({}): {r:?}",
            m.is_some()
        ),
    }
    if let Err(e) = x.list("").await {
        assert!(
            meta.is_none(),
            "listing failed although the metadata decodes: {e}"
        );
    }
    let data = Bytes::from(vec![0x5a; 4096]);
    let tag = Bytes::from(vec![0xa5; 16]);
    let write = x
        .write(pb::WriteExtentRequest {
            extent: addr(vol),
            lease_epoch: epoch,
            first_sector: sector,
            count: 1,
            seq,
            data: data.clone(),
            tags: tag.clone(),
            ..Default::default()
        })
        .await;
    let new = (epoch as u32, seq);
    match write {
        Err(e) if epoch == 0 || epoch > u64::from(u32::MAX) => {
            assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}")
        }
        Err(e) if epoch < fence => assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e}"),
        Err(e) => {
            assert!(epoch >= fence, "a write under the fence: {e}");
            assert!(
                meta.is_none(),
                "a write failed although the metadata decodes: {e}"
            );
            assert_eq!(e.code(), tonic::Code::DataLoss, "{e}");
        }
        Ok(n) => {
            assert!(
                epoch >= fence && epoch > 0,
                "a write of epoch {epoch} under fence {fence}"
            );
            let cur = rec(sector as usize).expect("a write succeeded on a decodable extent");
            assert_eq!(
                n == 1,
                new >= cur,
                "applied {n} of version {new:?} over {cur:?}"
            );
            let back = x
                .read(pb::ReadExtentRequest {
                    extent: addr(vol),
                    first_sector: sector,
                    count: 1,
                    snap_id: 0,
                    versions_only: false,
                })
                .await
                .expect("reading back a written sector");
            let v = &back.versions[0];
            if n == 1 {
                assert_eq!((v.epoch, v.seq), new);
                assert_eq!(back.data, data);
                assert_eq!(back.tags, tag);
            } else {
                assert_eq!((v.epoch, v.seq), cur);
            }
        }
    }
}

//! Writes the seed corpus of every fuzz target into `fuzz/corpus/<target>/seed-*`: small,
//! valid inputs (handshakes, records, configs, requests) the fuzzer starts from.
//! Run: `cargo run -p sov-fuzz-targets --example seeds`.

use std::path::Path;

use prost::Message;
use sov_common::stripe;
use sov_proto::manifest::Manifest;
use storaged::record::{self, RecordKind};

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus");
    let mut n = 0;
    for (target, seeds) in [
        ("nbd_session", nbd_session()),
        ("nbd_transmission", nbd_transmission()),
        ("vhost_user_messages", vhost_user_messages()),
        ("virtio_descriptors", virtio_descriptors()),
        ("chunk_record", chunk_record()),
        ("segment_recovery", segment_recovery()),
        ("extent_meta", extent_meta()),
        ("config_files", config_files()),
        ("s3_request", s3_request()),
        ("s3_http", s3_http()),
    ] {
        let dir = root.join(target);
        std::fs::create_dir_all(&dir).expect("corpus folder");
        for (name, bytes) in seeds {
            std::fs::write(dir.join(format!("seed-{name}")), bytes).expect("a seed");
            n += 1;
        }
    }
    println!("{n} seeds written under {}", root.display());
}

type Seeds = Vec<(&'static str, Vec<u8>)>;

// --- NBD --------------------------------------------------------------------------------------

const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const REQUEST_MAGIC: u32 = 0x2560_9513;

fn opt(v: &mut Vec<u8>, opt: u32, data: &[u8]) {
    v.extend_from_slice(&IHAVEOPT.to_be_bytes());
    v.extend_from_slice(&opt.to_be_bytes());
    v.extend_from_slice(&(data.len() as u32).to_be_bytes());
    v.extend_from_slice(data);
}

fn name_and(name: &str, tail: &[u8]) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(tail);
    d
}

fn meta_query(name: &str, queries: &[&str]) -> Vec<u8> {
    let mut tail = (queries.len() as u32).to_be_bytes().to_vec();
    for q in queries {
        tail.extend_from_slice(&(q.len() as u32).to_be_bytes());
        tail.extend_from_slice(q.as_bytes());
    }
    name_and(name, &tail)
}

fn req(cmd: u16, flags: u16, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
    let mut v = REQUEST_MAGIC.to_be_bytes().to_vec();
    v.extend_from_slice(&flags.to_be_bytes());
    v.extend_from_slice(&cmd.to_be_bytes());
    v.extend_from_slice(&cookie.to_be_bytes());
    v.extend_from_slice(&offset.to_be_bytes());
    v.extend_from_slice(&len.to_be_bytes());
    v
}

/// READ, WRITE (FUA), BLOCK_STATUS, FLUSH, TRIM, WRITE_ZEROES, an out-of-range READ, DISC.
fn requests() -> Vec<u8> {
    let mut v = req(0, 0, 1, 0, 4096);
    v.extend(req(1, 1, 2, 512, 16));
    v.extend_from_slice(b"sixteen bytes!!!");
    v.extend(req(7, 0, 3, 0, 65536));
    v.extend(req(3, 0, 4, 0, 0));
    v.extend(req(4, 0, 5, 4096, 4096));
    v.extend(req(6, 1, 6, 8192, 512));
    v.extend(req(0, 0, 7, u64::MAX - 10, 512));
    v.extend(req(2, 0, 8, 0, 0));
    v
}

fn nbd_session() -> Seeds {
    let mut full = 3u32.to_be_bytes().to_vec();
    opt(&mut full, 3, &[]); // LIST
    opt(&mut full, 6, &name_and("disk", &[0, 2, 0, 1, 0, 2])); // INFO, NAME + DESCRIPTION
    opt(&mut full, 8, &[]); // STRUCTURED_REPLY
    opt(&mut full, 9, &meta_query("disk", &[])); // LIST_META_CONTEXT
    opt(&mut full, 10, &meta_query("disk", &["base:allocation"])); // SET_META_CONTEXT
    opt(&mut full, 7, &name_and("disk", &[0, 0])); // GO
    full.extend(requests());

    let mut export_name = 1u32.to_be_bytes().to_vec();
    opt(&mut export_name, 1, b"ro");
    export_name.extend(req(0, 0, 1, 0, 512));
    export_name.extend(req(1, 0, 2, 0, 4));
    export_name.extend_from_slice(b"nope");

    let mut abort = 3u32.to_be_bytes().to_vec();
    opt(&mut abort, 42, b"unknown option");
    opt(&mut abort, 7, &name_and("missing", &[0, 0]));
    opt(&mut abort, 6, b"\x00\x00\x01\x00short");
    opt(&mut abort, 2, &[]); // ABORT

    vec![
        ("full", full),
        ("export-name", export_name),
        ("abort", abort),
        ("bad-flags", 0x8000_0003u32.to_be_bytes().to_vec()),
    ]
}

fn nbd_transmission() -> Seeds {
    let mut seeds = Vec::new();
    for (name, b) in [
        ("simple", 0u8),
        ("structured", 0x03),
        ("block-status", 0x07),
        ("read-only", 0x0b),
        ("export-name", 0x11),
    ] {
        let mut v = vec![b];
        v.extend(requests());
        seeds.push((name, v));
    }
    seeds
}

// --- vhost-user ---------------------------------------------------------------------------------

fn msg(code: u32, body: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    for w in [code, 1, body.len() as u32] {
        v.extend_from_slice(&w.to_le_bytes());
    }
    v.extend_from_slice(body);
    v
}

fn vhost_user_messages() -> Seeds {
    let mut frontend = msg(1, &[]); // GET_FEATURES
    frontend.extend(msg(3, &[])); // SET_OWNER
    frontend.extend(msg(15, &[])); // GET_PROTOCOL_FEATURES
    frontend.extend(msg(16, &(1u64 | 1 << 3 | 1 << 9).to_le_bytes())); // SET_PROTOCOL_FEATURES
    frontend.extend(msg(17, &[])); // GET_QUEUE_NUM
    frontend.extend(msg(2, &(1u64 << 32 | 1 << 30 | 1 << 9).to_le_bytes())); // SET_FEATURES
    let mut cfg: Vec<u8> = [0u32, 60, 0].iter().flat_map(|v| v.to_le_bytes()).collect();
    cfg.resize(72, 0);
    frontend.extend(msg(24, &cfg)); // GET_CONFIG
    frontend.extend(msg(8, &[0, 0, 0, 0, 128, 0, 0, 0])); // SET_VRING_NUM
    frontend.extend(msg(10, &[0, 0, 0, 0, 0, 0, 0, 0])); // SET_VRING_BASE
    frontend.extend(msg(18, &[0, 0, 0, 0, 1, 0, 0, 0])); // SET_VRING_ENABLE
    frontend.extend(msg(11, &[0, 0, 0, 0, 0, 0, 0, 0])); // GET_VRING_BASE
    frontend.extend(msg(4, &[])); // RESET_OWNER

    let mut bad_config: Vec<u8> = [250u32, 16, 0]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    bad_config.resize(28, 0);
    vec![
        ("frontend", frontend),
        ("get-config-past-the-end", msg(24, &bad_config)),
        ("bad-queue", msg(8, &[200, 0, 0, 0, 128, 0, 0, 0])),
        ("oversized", {
            let mut v = msg(1, &[]);
            v[8..12].copy_from_slice(&0x7fff_ffffu32.to_le_bytes());
            v
        }),
    ]
}

// --- virtio descriptors ---------------------------------------------------------------------------

/// The layout of `virtio_descriptors`: queue size, features, descriptors, avail ring, data
/// (at guest address 0x3000).
struct Queue {
    descs: Vec<(u64, u32, u16, u16)>,
    heads: Vec<u16>,
    data: Vec<u8>,
}

const DATA: u64 = 0x3000;
const NEXT: u16 = 1;
const WRITE: u16 = 2;
const INDIRECT: u16 = 4;

impl Queue {
    fn bytes(&self, features: u8) -> Vec<u8> {
        let size = 8usize;
        let mut v = vec![3, features];
        for i in 0..size {
            let (a, l, f, n) = self.descs.get(i).copied().unwrap_or_default();
            v.extend_from_slice(&a.to_le_bytes());
            v.extend_from_slice(&l.to_le_bytes());
            v.extend_from_slice(&f.to_le_bytes());
            v.extend_from_slice(&n.to_le_bytes());
        }
        v.extend_from_slice(&0u16.to_le_bytes());
        v.extend_from_slice(&(self.heads.len() as u16).to_le_bytes());
        for i in 0..size {
            v.extend_from_slice(&self.heads.get(i).copied().unwrap_or(0).to_le_bytes());
        }
        v.extend_from_slice(&self.data);
        v
    }
}

/// A virtio-blk request header at `DATA + at`.
fn blk_header(data: &mut Vec<u8>, at: usize, ty: u32, sector: u64) {
    if data.len() < at + 16 {
        data.resize(at + 16, 0);
    }
    data[at..at + 4].copy_from_slice(&ty.to_le_bytes());
    data[at + 8..at + 16].copy_from_slice(&sector.to_le_bytes());
}

fn virtio_descriptors() -> Seeds {
    // Chain 0: READ sector 1 (header, 512 data, status). Chain 3: WRITE (header + 512 data,
    // status). Chain 5: GET_ID (header, 20 bytes, status). Chain 7: FLUSH through an indirect
    // table at DATA + 0x800.
    let mut data = Vec::new();
    blk_header(&mut data, 0, 0, 1);
    blk_header(&mut data, 0x20, 1, 2);
    blk_header(&mut data, 0x40, 8, 0);
    blk_header(&mut data, 0x60, 4, 0);
    data.resize(0x800, 0);
    for (a, l, f, n) in [
        (DATA + 0x60, 16u32, NEXT, 1u16),
        (DATA + 0x700, 1, WRITE, 0),
    ] {
        data.extend_from_slice(&a.to_le_bytes());
        data.extend_from_slice(&l.to_le_bytes());
        data.extend_from_slice(&f.to_le_bytes());
        data.extend_from_slice(&n.to_le_bytes());
    }
    let io = Queue {
        descs: vec![
            (DATA, 16, NEXT, 1),
            (DATA + 0x100, 512, NEXT | WRITE, 2),
            (DATA + 0x300, 1, WRITE, 0),
            (DATA + 0x20, 16 + 512, NEXT, 4),
            (DATA + 0x301, 1, WRITE, 0),
            (DATA + 0x40, 16, NEXT, 6),
            (DATA + 0x400, 21, WRITE, 0),
            (DATA + 0x800, 32, INDIRECT, 0),
        ],
        heads: vec![0, 3, 5, 7],
        data,
    };
    // DISCARD and WRITE_ZEROES: header + one segment, status.
    let mut data = Vec::new();
    blk_header(&mut data, 0, 11, 0);
    blk_header(&mut data, 0x20, 13, 0);
    data.resize(0x40, 0);
    data[0x10..0x18].copy_from_slice(&8u64.to_le_bytes());
    data[0x18..0x1c].copy_from_slice(&16u32.to_le_bytes());
    data[0x30..0x38].copy_from_slice(&0u64.to_le_bytes());
    data[0x38..0x3c].copy_from_slice(&8u32.to_le_bytes());
    data[0x3c..0x40].copy_from_slice(&1u32.to_le_bytes()); // UNMAP
    let discard = Queue {
        descs: vec![
            (DATA, 32, NEXT, 1),
            (DATA + 0x100, 1, WRITE, 0),
            (DATA + 0x20, 32, NEXT, 3),
            (DATA + 0x101, 1, WRITE, 0),
        ],
        heads: vec![0, 2],
        data,
    };
    vec![
        ("io", io.bytes(1)),
        ("io-event-idx", io.bytes(3)),
        ("discard", discard.bytes(0)),
    ]
}

// --- stored formats -----------------------------------------------------------------------------

fn manifest(size: u64, replicas: u32) -> Manifest {
    let chunk_size = 1024u32;
    let n = size.div_ceil(u64::from(chunk_size));
    Manifest {
        format: 1,
        pool_id: 7,
        pg_count: 32,
        replicas,
        ec_k: if replicas == 0 { 4 } else { 0 },
        ec_m: if replicas == 0 { 2 } else { 0 },
        codec: u32::from(replicas == 0),
        data_key_id: "k".into(),
        uid: vec![0x11; 16].into(),
        size,
        chunk_size,
        chunk_blake3: vec![0x22; 32 * n as usize].into(),
        parts: Vec::new(),
    }
}

fn chunk_record() -> Seeds {
    let shard = stripe::encode(2, 1, b"a sealed chunk of some length").expect("a stripe");
    let composite = Manifest {
        format: 1,
        size: 3000,
        parts: vec![manifest(1000, 3), manifest(2000, 0)],
        ..Default::default()
    };
    let mut stripe_seed = b"E\x03\x01\x02\x02\x05\x30\x00\x01\x09\x00\x00\x40".to_vec();
    stripe_seed.extend_from_slice(b"the sealed bytes of a chunk, cut into shards");
    vec![
        (
            "put",
            record::encode_put(b"o1/0000000000000007/0000000a/chunk", b"hello"),
        ),
        (
            "tombstone",
            record::encode_head(RecordKind::Tombstone, b"c1", 0, &[0; 32]),
        ),
        ("shard", shard[0].clone()),
        ("stripe", stripe_seed),
        ("manifest-replicated", manifest(5000, 3).encode_to_vec()),
        ("manifest-ec", manifest(4096, 0).encode_to_vec()),
        ("manifest-composite", composite.encode_to_vec()),
        (
            "chunk-id",
            b"o1/0000000000000007/0000000a/11111111111111111111111111111111/00000003.04".to_vec(),
        ),
    ]
}

fn segment_recovery() -> Seeds {
    // Structured: put c0, put c1, tombstone c0, new segment, put c0 again, put c2 with a
    // rotten body last (a torn append).
    let mut ops = vec![1u8];
    ops.extend([0, 0, 5]);
    ops.extend_from_slice(b"hello");
    ops.extend([0, 1, 3]);
    ops.extend_from_slice(b"abc");
    ops.extend([2, 0]);
    ops.extend([5, 0]);
    ops.extend([0, 0, 2]);
    ops.extend_from_slice(b"hi");
    ops.extend([3, 2, 4]);
    ops.extend_from_slice(b"torn");
    // The same, with a byte flipped and a raw tail.
    let mut rotten = ops.clone();
    rotten.extend([7, 30, 0, 0x40, 4, 3, 1, 2, 3]);
    // Raw: one segment of two whole records and half a header.
    let mut raw = vec![0u8];
    raw.extend(record::encode_put(b"c0", b"hello"));
    raw.extend(record::encode_put(b"c1", b"world"));
    raw.extend_from_slice(&record::encode_head(RecordKind::Put, b"c2", 9, &[0; 32])[..20]);
    vec![("ops", ops), ("ops-rotten", rotten), ("raw", raw)]
}

fn extent_meta() -> Seeds {
    /// Fence, sector, epoch, seq, then the `.meta` file.
    fn seed(fence: &[u8], sector: u16, epoch: u32, seq: u64, meta: &[u8]) -> Vec<u8> {
        let mut v = vec![fence.len() as u8];
        v.extend_from_slice(fence);
        v.extend_from_slice(&sector.to_le_bytes());
        v.extend_from_slice(&epoch.to_le_bytes());
        v.extend_from_slice(&seq.to_le_bytes());
        v.extend_from_slice(meta);
        v
    }
    let mut meta = b"SOVEXT01".to_vec();
    meta.extend_from_slice(&3u64.to_le_bytes()); // born
    meta.extend_from_slice(&5u64.to_le_bytes()); // last_snap
    meta.resize(64, 0);
    // Sector 0: epoch 4, written, seq 9, a tag; sector 1: zeroed.
    for (epoch, flags, seq) in [(4u32, 1u32, 9u64), (4, 3, 10)] {
        meta.extend_from_slice(&epoch.to_le_bytes());
        meta.extend_from_slice(&flags.to_le_bytes());
        meta.extend_from_slice(&seq.to_le_bytes());
        meta.extend_from_slice(&[0xab; 16]);
    }
    vec![
        ("newer", seed(b"4", 0, 4, 10, &meta)),
        ("older", seed(b"4\n", 1, 4, 2, &meta)),
        ("fenced", seed(b"7", 0, 5, 0, &meta)),
        ("bad-magic", seed(b"", 2, 1, 1, b"SOVEXT02\x00\x00\x00")),
    ]
}

fn config_files() -> Seeds {
    let storaged = r#"listen = "0.0.0.0:7100"
metrics_listen = "127.0.0.1:9100"
disks = ["/a", "/b"]
zone = "eu-1a"
metad = ["127.0.0.1:7400"]
io_engine = "pread"
max_chunk_size = "8MiB"
segment_size = "128MiB"
reserved_space = "1.5GiB"
put_memory = 1073741824
request_idle_timeout = "30s"
[scrub]
rate = "10MiB/s"
interval = "1h"
[compaction]
garbage_ratio = 0.3
interval = "1500ms"
[recovery]
rate = "0"
"#;
    let metad = r#"id = 2
listen = "127.0.0.1:7401"
data_dir = "/var/lib/metad"
peers = ["1=127.0.0.1:7400", "2=127.0.0.1:7401", "3=127.0.0.1:7402"]
master_key_file = "/etc/sov/master.key"
[raft]
heartbeat_interval = "250ms"
election_timeout_min = "1s"
election_timeout_max = "2s"
snapshot_logs = 20000
max_inflight = 2
[nodes]
down_after = "10s"
out_after = "10m"
delete_grace = 60
upload_expiry = "7d"
"#;
    let vhost = r#"listen = "127.0.0.1:10809"
metad = ["127.0.0.1:7400"]
id = "vhost-blk-1"
data = "/tmp/vhost"
lease_ttl_ms = 10000
vhost_queues = 2
"#;
    vec![
        ("storaged", storaged.into()),
        ("metad", metad.into()),
        ("vhost-blk", vhost.into()),
        (
            "units",
            "4MiB\n1.5GiB\n64 MiB/s\n0\n2.5d\n100us\n1µs\n10GB".into(),
        ),
    ]
}

// --- S3 -----------------------------------------------------------------------------------------

fn s3_request() -> Seeds {
    fn seed(size: u64, fields: &[&str], body: &[u8]) -> Vec<u8> {
        let mut v = size.to_le_bytes().to_vec();
        for f in fields {
            v.extend_from_slice(f.as_bytes());
            v.push(b'\n');
        }
        v.extend_from_slice(body);
        v
    }
    vec![
        (
            "md5",
            seed(
                1000,
                &[
                    "bytes=0-99",
                    "bytes=10-19",
                    "dir/a key+é.txt",
                    "GetObject",
                    "XUFAKrxLKna5cZ2REBfFkg==",
                    "",
                    "",
                    "",
                    "\"abc\"",
                    "*",
                    "Wed, 21 Oct 2015 07:28:00 GMT",
                    "Thu, 01 Jan 1970 00:00:00 GMT",
                    "bucket/key?versionId=1",
                ],
                b"hello",
            ),
        ),
        (
            "crc32c",
            seed(
                1,
                &[
                    "bytes=-500",
                    "bytes=5-",
                    "%2F/x",
                    "PutBucketAcl",
                    "",
                    "CRC32C",
                    "yZRlqg==",
                    "yZRlqg==",
                    "",
                    "",
                    "",
                    "",
                    "/bucket/dir/key",
                ],
                b"hello",
            ),
        ),
        (
            "sha256-trailer",
            seed(
                u64::MAX,
                &[
                    "bytes=9223372036854775806-9223372036854775807",
                    "bytes=0-0",
                    "",
                    "ListBuckets",
                    "",
                    "SHA256",
                    "",
                    "LPJNul+wow4m6DsqxbninhsWHlwfp0JecwQzYpOLmCQ=",
                    "",
                    "",
                    "",
                    "",
                    "",
                ],
                b"hello",
            ),
        ),
    ]
}

fn s3_http() -> Seeds {
    let auth = "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/s3/aws4_request, \
                SignedHeaders=host;x-amz-content-sha256;x-amz-date, \
                Signature=5d672d79c15b13162d9279b0855cfba6789a8edb4c82c400e06b5924a6f2b5d7";
    let empty_sha = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
    vec![
        ("list-buckets", b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n".to_vec()),
        (
            "get-range",
            b"GET /bucket/key HTTP/1.1\r\nHost: localhost\r\nRange: bytes=0-99\r\nIf-None-Match: \"x\"\r\n\r\n"
                .to_vec(),
        ),
        (
            "signed-put",
            format!(
                "PUT /bucket/key HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5\r\n\
                 Content-MD5: XUFAKrxLKna5cZ2REBfFkg==\r\nx-amz-date: 20150830T123600Z\r\n\
                 x-amz-content-sha256: UNSIGNED-PAYLOAD\r\nAuthorization: {auth}\r\n\r\nhello"
            )
            .into_bytes(),
        ),
        (
            "presigned",
            b"GET /bucket/key?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKID%2F20150830%2Fus-east-1%2Fs3%2Faws4_request&X-Amz-Date=20150830T123600Z&X-Amz-Expires=86400&X-Amz-SignedHeaders=host&X-Amz-Signature=abcd HTTP/1.1\r\nHost: localhost\r\n\r\n"
                .to_vec(),
        ),
        (
            "delete-objects",
            {
                let body = "<Delete><Object><Key>a</Key></Object><Object><Key>b</Key></Object><Quiet>true</Quiet></Delete>";
                format!(
                    "POST /bucket?delete HTTP/1.1\r\nHost: localhost\r\nContent-Length: {}\r\n\
                     x-amz-date: 20150830T123600Z\r\nx-amz-content-sha256: {empty_sha}\r\n\
                     Authorization: {auth}\r\n\r\n{body}",
                    body.len()
                )
                .into_bytes()
            },
        ),
        (
            "complete-multipart",
            {
                let body = "<CompleteMultipartUpload><Part><PartNumber>1</PartNumber><ETag>\"a\"</ETag></Part></CompleteMultipartUpload>";
                format!(
                    "POST /bucket/key?uploadId=xyz HTTP/1.1\r\nHost: localhost\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                )
                .into_bytes()
            },
        ),
        (
            "copy-part",
            b"PUT /bucket/key?partNumber=2&uploadId=xyz HTTP/1.1\r\nHost: localhost\r\nx-amz-copy-source: /src/obj%20x?versionId=1\r\nx-amz-copy-source-range: bytes=0-1023\r\nContent-Length: 0\r\n\r\n"
                .to_vec(),
        ),
        (
            "chunked-pipelined",
            b"PUT /bucket/key HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\nx-amz-checksum-crc32: NhCmhg==\r\n\r\n5\r\nhello\r\n0\r\n\r\nHEAD /bucket/key HTTP/1.1\r\nHost: b.localhost\r\n\r\n"
                .to_vec(),
        ),
    ]
}

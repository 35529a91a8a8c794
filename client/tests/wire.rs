//! What the wire between a client and the daemons shows: recording proxies sit between the
//! data path (sov-client, as the gateway uses it) and metad and a storage node. Over mutual
//! TLS no connection carries a bucket name, an object key or object bytes, each one starts
//! with a TLS handshake and agrees on X25519MLKEM768; the same run without TLS shows the
//! names, which proves the proxies would have seen them.

mod common;

use sov_client::{Client, ClientConfig, PutOptions};
use sov_testkit::{DataCluster, Tap, TapStream, TestDir};

const BUCKET: &str = "wire-secret-bucket";
const KEY: &str = "wire-secret-object-key";

struct Wire {
    metad: Vec<TapStream>,
    storaged: Vec<TapStream>,
    data: Vec<u8>,
}

async fn put_and_get_through_taps(name: &str, plain: bool) -> Wire {
    let dir = TestDir::new(name);
    let to_metad = Tap::start().await.unwrap();
    let to_node = Tap::start().await.unwrap();
    let advertise = to_node.addr.to_string();
    let mut extra = vec!["--advertise", advertise.as_str()];
    let mut metad_extra = vec![];
    if plain {
        extra.push("--insecure-plaintext");
        metad_extra.push("--insecure-plaintext");
    }
    let cl = DataCluster::start(dir.path(), 1, 1, &metad_extra, &extra)
        .await
        .expect("cluster");
    to_node.set_target(cl.nodes[0].ready.listen);
    to_metad.set_target(cl.metad.addr.parse().unwrap());
    cl.pool_and_bucket(BUCKET, "replicated:1", 8).await.unwrap();
    let c = Client::new(&[to_metad.addr.to_string()], ClientConfig::default()).unwrap();
    let data = common::payload("wire", 3 << 20);
    c.put_object(BUCKET, KEY, &data[..], PutOptions::default())
        .await
        .expect("put through the taps");
    let (_, back) = c.read_all(BUCKET, KEY).await.expect("get through the taps");
    assert!(back == data, "the object came back different");
    Wire {
        metad: to_metad.recorded(),
        storaged: to_node.recorded(),
        data,
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// A TLS 1.3 ServerHello's key_share extension (type 0x0033) naming group 0x11EC.
fn agreed_ml_kem(down: &[u8]) -> bool {
    down.windows(6)
        .any(|w| w[0] == 0x00 && w[1] == 0x33 && w[4] == 0x11 && w[5] == 0xec)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn over_mutual_tls_the_wire_shows_no_names_and_no_object_bytes() {
    let w = put_and_get_through_taps("wire-tls", false).await;
    assert!(!w.metad.is_empty(), "nothing went through the metad tap");
    assert!(
        !w.storaged.is_empty(),
        "nothing went through the storaged tap"
    );
    let samples: Vec<&[u8]> = (0..8)
        .map(|i| &w.data[i * (w.data.len() / 8)..][..32])
        .collect();
    let mut bytes = 0;
    for (link, s) in w
        .metad
        .iter()
        .map(|s| ("metad", s))
        .chain(w.storaged.iter().map(|s| ("storaged", s)))
    {
        bytes += s.up.len() + s.down.len();
        assert_eq!(&s.up[..2], &[0x16, 0x03], "{link}: not a TLS ClientHello");
        assert_eq!(&s.down[..2], &[0x16, 0x03], "{link}: not a TLS ServerHello");
        assert!(
            agreed_ml_kem(&s.down),
            "{link}: no X25519MLKEM768 key share"
        );
        for dir in [&s.up, &s.down] {
            assert!(
                !contains(dir, BUCKET.as_bytes()),
                "{link}: bucket name in clear"
            );
            assert!(
                !contains(dir, KEY.as_bytes()),
                "{link}: object key in clear"
            );
            for x in &samples {
                assert!(!contains(dir, x), "{link}: object bytes in clear");
            }
        }
    }
    assert!(bytes > w.data.len() * 2, "the taps saw {bytes} bytes only");
}

/// The control: the same run without TLS, and the taps do see the names.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_tls_the_same_taps_see_the_names() {
    let w = put_and_get_through_taps("wire-plain", true).await;
    assert!(
        w.metad
            .iter()
            .any(|s| contains(&s.up, BUCKET.as_bytes()) && contains(&s.up, KEY.as_bytes())),
        "the tap did not see the names in clear"
    );
    assert!(w.metad.iter().all(|s| s.up[..2] != [0x16, 0x03]));
}

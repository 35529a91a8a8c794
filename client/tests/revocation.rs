//! Revocation through metad: `sov cert revoke --metad` publishes the new CRL in metad, and
//! metad and a storage node fetch it into their TLS folders by themselves (no file copied by
//! hand): within seconds both refuse the revoked certificate, on a connection opened before
//! and on new ones, while other certificates are still served.

use std::time::{Duration, Instant};

use sov_common::tls::{self, Role};
use sov_proto::metad::GetClusterMapRequest;
use sov_proto::metad::metad_client::MetadClient;
use sov_proto::storaged::NodeInfoRequest;
use sov_proto::storaged::chunk_store_client::ChunkStoreClient;
use sov_testkit::{DataCluster, TestDir, pki, sov_ok};
use tonic::transport::{Channel, Endpoint};

fn ep(addr: &str) -> Endpoint {
    Channel::from_shared(format!("http://{}", addr.trim_start_matches("http://")))
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(10))
}

async fn both(
    storaged: &Channel,
    metad: &Channel,
) -> (Result<(), tonic::Status>, Result<(), tonic::Status>) {
    let s = ChunkStoreClient::new(storaged.clone())
        .node_info(NodeInfoRequest {})
        .await
        .map(|_| ());
    let m = MetadClient::new(metad.clone())
        .get_cluster_map(GetClusterMapRequest { consistency: 0 })
        .await
        .map(|_| ());
    (s, m)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_revoked_in_metad_is_refused_everywhere() {
    let dir = TestDir::new("revocation");
    let cl = DataCluster::start(dir.path(), 1, 1, &[], &[])
        .await
        .unwrap();
    let node = cl.nodes[0].addr();
    let (gateway, serial) = pki().peer(Role::Gateway, None, "gw-revoked").unwrap();
    let s = tls::channel_with(ep(&node), Role::Storaged, gateway.clone());
    let m = tls::channel_with(ep(&cl.metad.addr), Role::Metad, gateway.clone());
    let (a, b) = both(&s, &m).await;
    a.expect("storaged serves the gateway");
    b.expect("metad serves the gateway");

    let ca = pki().ca().dir().display().to_string();
    sov_ok(&[
        "cert",
        "revoke",
        &serial,
        "--ca",
        &ca,
        "--metad",
        &cl.metad.addr,
    ]);

    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (a, b) = both(&s, &m).await;
        match (a, b) {
            (Err(a), Err(b)) => {
                assert_eq!(a.code(), tonic::Code::Unauthenticated, "{a:?}");
                assert_eq!(b.code(), tonic::Code::Unauthenticated, "{b:?}");
                break;
            }
            other => assert!(
                Instant::now() < deadline,
                "still served 20 s after the revocation: {other:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // New connections are refused at the handshake; the operator is still served.
    let fresh = tls::channel_with(ep(&node), Role::Storaged, gateway);
    assert!(
        ChunkStoreClient::new(fresh)
            .node_info(NodeInfoRequest {})
            .await
            .is_err()
    );
    let admin = tls::channel(ep(&node), Role::Storaged);
    ChunkStoreClient::new(admin)
        .node_info(NodeInfoRequest {})
        .await
        .expect("the operator is still served");
}

//! storaged speaks only mutual TLS with certificates of the cluster CA, and only to the roles
//! each method allows: a client without a certificate, with another CA's, with a role that
//! may not call the method, or with a revoked one is refused.

use std::time::Duration;

use sov_common::tls::{self, Role, Transport};
use sov_proto::storaged::chunk_store_client::ChunkStoreClient;
use sov_proto::storaged::extent_store_client::ExtentStoreClient;
use sov_proto::storaged::{ExtentAddr, NodeInfoRequest, ReadExtentRequest};
use sov_testkit::{Storaged, TestDir, pki};
use tonic::Code;
use tonic::transport::{Channel, Endpoint};

fn ep(s: &Storaged) -> Endpoint {
    Channel::from_shared(s.endpoint())
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(10))
}

async fn node_info(ch: Channel) -> Result<(), tonic::Status> {
    ChunkStoreClient::new(ch)
        .node_info(NodeInfoRequest {})
        .await
        .map(|_| ())
}

fn chunks_as(s: &Storaged, t: Transport) -> Channel {
    tls::channel_with(ep(s), Role::Storaged, t)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storaged_refuses_peers_without_a_valid_certificate_of_an_allowed_role() {
    let dir = TestDir::new("storaged-mtls");
    let disk = dir.path().join("disk");
    std::fs::create_dir_all(&disk).unwrap();
    let s = Storaged::start(&dir.path().join("s1"), &[disk], &[]).unwrap();
    let pki = pki();

    // The operator (this test's own certificate) and a gateway may call the chunk API.
    node_info(tls::channel(ep(&s), Role::Storaged))
        .await
        .expect("the operator is served");
    let (gateway, gateway_serial) = pki.peer(Role::Gateway, None, "gw-1").unwrap();
    let gw = chunks_as(&s, gateway.clone());
    node_info(gw.clone()).await.expect("a gateway is served");

    // No TLS at all.
    let e = node_info(chunks_as(&s, Transport::Plain))
        .await
        .unwrap_err();
    assert_ne!(e.code(), Code::Ok);
    // TLS without a client certificate: an alert, never the HTTP/2 server's first frame.
    match pki
        .read_without_client_cert(&s.addr(), Role::Storaged)
        .await
    {
        Err(_) => {}
        Ok(b) => assert!(
            b.is_empty(),
            "served {} bytes to a client with no certificate",
            b.len()
        ),
    }
    // A storaged certificate from another CA.
    let foreign = pki.foreign_peer(Role::Storaged, "s9").unwrap();
    assert!(node_info(chunks_as(&s, foreign)).await.is_err());

    // Roles that may not call the method: a metad and a vhost-blk on chunks, a gateway on
    // extents.
    for role in [Role::Metad, Role::VhostBlk] {
        let (t, _) = pki.peer(role, None, "wrong-role").unwrap();
        let e = node_info(chunks_as(&s, t)).await.unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied, "{role}: {e:?}");
    }
    let e = ExtentStoreClient::new(gw.clone())
        .read_extent(ReadExtentRequest {
            extent: Some(ExtentAddr::default()),
            first_sector: 0,
            count: 1,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");

    // Revoked: the open connection's next call and every new connection are refused, with
    // no restart.
    pki.revoke(&gateway_serial, &[&s.work.join("tls")]).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let e = loop {
        tokio::time::sleep(Duration::from_millis(300)).await;
        match node_info(gw.clone()).await {
            Err(e) => break e,
            Ok(()) => assert!(
                std::time::Instant::now() < deadline,
                "a revoked certificate is still served after 10 s"
            ),
        }
    };
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    assert!(node_info(chunks_as(&s, gateway)).await.is_err());
    // Others are still served.
    node_info(tls::channel(ep(&s), Role::Storaged))
        .await
        .expect("the operator is still served");
}

#[test]
fn storaged_refuses_to_start_with_a_key_others_can_read() {
    use std::os::unix::fs::PermissionsExt;
    let dir = TestDir::new("storaged-open-key");
    let disk = dir.path().join("disk");
    std::fs::create_dir_all(&disk).unwrap();
    let tls = pki()
        .issue(Role::Storaged, None, "open-key", &dir.path().join("tls"))
        .unwrap();
    std::fs::set_permissions(tls.join("key.pem"), std::fs::Permissions::from_mode(0o644)).unwrap();
    let tls = tls.display().to_string();
    let e = match Storaged::start(&dir.path().join("s"), &[disk], &["--tls-dir", &tls]) {
        Ok(_) => panic!("storaged started with a world-readable key"),
        Err(e) => format!("{e:#}"),
    };
    assert!(e.contains("group or others"), "{e}");
}

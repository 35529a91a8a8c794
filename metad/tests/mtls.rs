//! metad speaks only mutual TLS with certificates of the cluster CA and checks the caller's
//! role per method and a storage node's name and zone against what it claims: a client
//! without a certificate, with another CA's, with a role that may not call the method, or with
//! a revoked one is refused.

use std::time::{Duration, Instant};

use sov_common::tls::{self, Role, Transport};
use sov_proto::metad::metad_client::MetadClient;
use sov_proto::metad::raft_client::RaftClient;
use sov_proto::metad::*;
use sov_testkit::{Metad, TestDir, free_port, pki};
use tonic::Code;
use tonic::transport::{Channel, Endpoint};

fn ep(m: &Metad) -> Endpoint {
    Channel::from_shared(format!("http://{}", m.addr))
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(10))
}

fn as_peer(m: &Metad, t: Transport) -> MetadClient<Channel> {
    MetadClient::new(tls::channel_with(ep(m), Role::Metad, t))
}

fn node(id: &str, zone: &str) -> RegisterNodeRequest {
    RegisterNodeRequest {
        node: Some(Node {
            id: id.into(),
            addr: "127.0.0.1:7999".into(),
            zone: zone.into(),
            disks: vec![Disk {
                path: "/d1".into(),
                capacity_bytes: 1 << 40,
                ..Default::default()
            }],
            ..Default::default()
        }),
    }
}

fn heartbeat(id: &str) -> HeartbeatRequest {
    HeartbeatRequest {
        node_id: id.into(),
        disks: vec![],
    }
}

fn denied<T: std::fmt::Debug>(r: Result<T, tonic::Status>, what: &str) {
    let e = r.expect_err(what);
    assert_eq!(e.code(), Code::PermissionDenied, "{what}: {e:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metad_refuses_peers_without_a_valid_certificate_of_an_allowed_role() {
    let dir = TestDir::new("metad-mtls");
    let m = Metad::start(
        &dir.path().join("m1"),
        1,
        &format!("127.0.0.1:{}", free_port()),
        &[],
    )
    .unwrap();
    let pki = pki();
    // The operator (this test's certificate) is served once the member leads.
    let mut admin = m.client().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while admin.list_members(ListMembersRequest {}).await.is_err() {
        assert!(Instant::now() < deadline, "metad never answered");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // A storage node registers and heartbeats as itself, in its own zone...
    let (storaged, storaged_serial) = pki.peer(Role::Storaged, Some("z1"), "n1").unwrap();
    let mut n1 = as_peer(&m, storaged.clone());
    n1.register_node(node("n1", "z1"))
        .await
        .expect("n1 registers");
    n1.heartbeat(heartbeat("n1")).await.expect("n1 heartbeats");
    // ... but cannot speak for another node or zone, nor read data keys or add members.
    denied(
        n1.register_node(node("n2", "z1")).await,
        "n1 registering n2",
    );
    denied(n1.register_node(node("n1", "z2")).await, "n1 moving to z2");
    denied(
        n1.heartbeat(heartbeat("n2")).await,
        "n1 heartbeating for n2",
    );
    denied(
        n1.get_data_key(GetDataKeyRequest { id: "k".into() }).await,
        "a storage node reading a data key",
    );

    // A gateway cannot pose as a storage node, a member or an operator.
    let (gateway, _) = pki.peer(Role::Gateway, None, "gw-1").unwrap();
    let mut gw = as_peer(&m, gateway.clone());
    gw.get_cluster_map(GetClusterMapRequest { consistency: 0 })
        .await
        .expect("a gateway reads the map");
    denied(
        gw.register_node(node("n1", "z1")).await,
        "a gateway registering a node",
    );
    denied(
        gw.create_access_key(CreateAccessKeyRequest {
            name: "x".into(),
            ..Default::default()
        })
        .await,
        "a gateway creating an access key",
    );
    let mut raft = RaftClient::new(tls::channel_with(ep(&m), Role::Metad, gateway));
    denied(
        raft.vote(RaftPayload {
            data: b"{}".to_vec().into(),
        })
        .await,
        "a gateway voting in Raft",
    );
    // Nor can the operator's certificate take part in Raft.
    let mut raft = RaftClient::new(tls::channel(ep(&m), Role::Metad));
    denied(
        raft.vote(RaftPayload {
            data: b"{}".to_vec().into(),
        })
        .await,
        "an operator voting in Raft",
    );

    // No TLS, no client certificate, another CA.
    let plain = as_peer(&m, Transport::Plain)
        .list_members(ListMembersRequest {})
        .await;
    assert!(plain.is_err(), "served without TLS");
    match pki.read_without_client_cert(&m.addr, Role::Metad).await {
        Err(_) => {}
        Ok(b) => assert!(
            b.is_empty(),
            "served {} bytes to a client with no certificate",
            b.len()
        ),
    }
    let foreign = pki.foreign_peer(Role::Admin, "op").unwrap();
    assert!(
        as_peer(&m, foreign)
            .list_members(ListMembersRequest {})
            .await
            .is_err(),
        "served another CA's operator"
    );

    // Revoked: the node's open connection and new ones are refused within seconds.
    pki.revoke(&storaged_serial, &[&m.work.join("tls")])
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let e = loop {
        tokio::time::sleep(Duration::from_millis(300)).await;
        match n1.heartbeat(heartbeat("n1")).await {
            Err(e) => break e,
            Ok(_) => assert!(
                Instant::now() < deadline,
                "a revoked certificate is still served after 10 s"
            ),
        }
    };
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    assert!(
        as_peer(&m, storaged)
            .heartbeat(heartbeat("n1"))
            .await
            .is_err()
    );
    admin
        .list_members(ListMembersRequest {})
        .await
        .expect("the operator is still served");
}

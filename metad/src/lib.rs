//! metad, the sov metadata service on Raft (openraft + RocksDB). Built so far: the Raft storage
//! (`store`): the replicated log and a key-value state machine in one RocksDB, checked against
//! openraft's own storage conformance suite. The service, the tables (cluster map, pools,
//! buckets, objects, keys) and the network come next; see `docs/design/metad-plan.md`.

pub mod store;

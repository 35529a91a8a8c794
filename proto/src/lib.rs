//! gRPC definitions (tonic/prost) shared by the sov daemons. No logic lives here.

/// The storage node API (`sov.storaged.v1`).
pub mod storaged {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("sov.storaged.v1");
}

/// The metadata service API and the Raft transport between its members (`sov.metad.v1`).
pub mod metad {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("sov.metad.v1");
}

/// The stored description of an object's chunks (`sov.manifest.v1`).
pub mod manifest {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("sov.manifest.v1");
}

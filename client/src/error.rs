//! What the data path can fail with, and the gRPC status each maps to.

use tonic::{Code, Status};

/// Why an object operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// metad answered with an error (no such bucket or key, precondition, ...).
    #[error("{}", .0.message())]
    Meta(Status),
    /// Too few members of a placement group were reachable to write safely.
    #[error("{0}")]
    Unavailable(String),
    /// A chunk could not be read back correct from any member.
    #[error("{0}")]
    DataLoss(String),
    /// The request itself is wrong (bad range, no pool, ...).
    #[error("{0}")]
    Invalid(String),
    /// Reading the caller's body failed.
    #[error("reading the object body: {0}")]
    Body(#[from] std::io::Error),
    /// Anything else (a malformed manifest, a task that died).
    #[error("{0}")]
    Internal(String),
}

impl From<Status> for ClientError {
    fn from(s: Status) -> ClientError {
        ClientError::Meta(s)
    }
}

impl ClientError {
    /// The gRPC status a caller of a service built on this client should see.
    pub fn to_status(&self) -> Status {
        match self {
            ClientError::Meta(s) => s.clone(),
            ClientError::Unavailable(m) => Status::unavailable(m.clone()),
            ClientError::DataLoss(m) => Status::data_loss(m.clone()),
            ClientError::Invalid(m) => Status::invalid_argument(m.clone()),
            ClientError::Body(e) => Status::new(Code::Aborted, e.to_string()),
            ClientError::Internal(m) => Status::internal(m.clone()),
        }
    }

    /// Whether metad said the bucket or key does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(self, ClientError::Meta(s) if s.code() == Code::NotFound)
    }
}

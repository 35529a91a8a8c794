//! The errors of the chunk store, mapped to gRPC statuses in one place ([`StoreError::to_status`]).

/// Why a chunk operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("chunk {0} not found")]
    NotFound(String),
    #[error("invalid chunk id: {0}")]
    InvalidId(String),
    #[error("chunk of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge { len: u64, max: u64 },
    #[error("{0}")]
    InvalidArgument(String),
    #[error("range {offset}+{length} is outside the chunk of {size} bytes")]
    InvalidRange { offset: u64, length: u64, size: u64 },
    #[error("disk {disk} is full: {needed} bytes needed, {available} available above the reserve")]
    OutOfSpace {
        disk: String,
        needed: u64,
        available: u64,
    },
    #[error("disk {disk} is full: no space left on device")]
    DiskFull { disk: String },
    #[error("chunk {id} failed verification: {reason}")]
    Corrupt { id: String, reason: String },
    #[error("disk {disk} has failed: {reason}")]
    DiskFailed { disk: String, reason: String },
    #[error("no disk can take the chunk")]
    NoDisk,
    #[error("I/O error on {disk}: {source}")]
    Io {
        disk: String,
        source: std::io::Error,
    },
    #[error("index error: {0}")]
    Index(#[from] crate::index::IndexError),
    #[error("storaged is shutting down")]
    ShuttingDown,
    #[error("stale epoch: the request was placed at epoch {request}, this node is at {node}")]
    StaleEpoch { request: u64, node: u64 },
}

impl StoreError {
    /// The gRPC status a client sees.
    pub fn to_status(&self) -> tonic::Status {
        use tonic::Code;
        let code = match self {
            StoreError::NotFound(_) => Code::NotFound,
            StoreError::InvalidId(_)
            | StoreError::TooLarge { .. }
            | StoreError::InvalidArgument(_) => Code::InvalidArgument,
            StoreError::InvalidRange { .. } => Code::OutOfRange,
            StoreError::OutOfSpace { .. } | StoreError::DiskFull { .. } => Code::ResourceExhausted,
            StoreError::Corrupt { .. } => Code::DataLoss,
            StoreError::DiskFailed { .. } | StoreError::ShuttingDown | StoreError::NoDisk => {
                Code::Unavailable
            }
            StoreError::Io { .. } | StoreError::Index(_) => Code::Internal,
            StoreError::StaleEpoch { .. } => Code::FailedPrecondition,
        };
        tonic::Status::new(code, self.to_string())
    }

    /// A short label for metrics.
    pub fn code(&self) -> &'static str {
        match self {
            StoreError::NotFound(_) => "not_found",
            StoreError::InvalidId(_)
            | StoreError::TooLarge { .. }
            | StoreError::InvalidArgument(_) => "invalid_argument",
            StoreError::InvalidRange { .. } => "out_of_range",
            StoreError::OutOfSpace { .. } | StoreError::DiskFull { .. } => "out_of_space",
            StoreError::Corrupt { .. } => "corrupt",
            StoreError::DiskFailed { .. } | StoreError::ShuttingDown | StoreError::NoDisk => {
                "unavailable"
            }
            StoreError::Io { .. } | StoreError::Index(_) => "internal",
            StoreError::StaleEpoch { .. } => "stale_epoch",
        }
    }

    pub(crate) fn io(disk: &str, source: std::io::Error) -> StoreError {
        if source.raw_os_error() == Some(libc::ENOSPC) {
            return StoreError::DiskFull {
                disk: disk.to_string(),
            };
        }
        StoreError::Io {
            disk: disk.to_string(),
            source,
        }
    }
}

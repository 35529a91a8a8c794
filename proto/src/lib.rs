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

/// `Debug` of the messages that hold secrets: everything but the secret.
mod redacted {
    use super::metad::{AccessKeySecret, CreateAccessKeyRequest, DataKey};
    use std::fmt;

    const HIDDEN: &str = "<redacted>";

    impl fmt::Debug for AccessKeySecret {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.debug_struct("AccessKeySecret")
                .field("key", &self.key)
                .field("secret_access_key", &HIDDEN)
                .finish()
        }
    }

    impl fmt::Debug for CreateAccessKeyRequest {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.debug_struct("CreateAccessKeyRequest")
                .field("name", &self.name)
                .field("access_key_id", &self.access_key_id)
                .field("secret_access_key", &HIDDEN)
                .field("admin", &self.admin)
                .finish()
        }
    }

    impl fmt::Debug for DataKey {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.debug_struct("DataKey")
                .field("id", &self.id)
                .field("key", &HIDDEN)
                .field("purpose", &self.purpose)
                .field("created_unix_ms", &self.created_unix_ms)
                .finish()
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn debug_output_hides_secrets() {
            let s = format!(
                "{:?} {:?} {:?}",
                AccessKeySecret {
                    key: None,
                    secret_access_key: "s3cr3t-value".into()
                },
                CreateAccessKeyRequest {
                    secret_access_key: "s3cr3t-value".into(),
                    ..Default::default()
                },
                DataKey {
                    key: vec![0x5a; 32].into(),
                    ..Default::default()
                }
            );
            assert!(!s.contains("s3cr3t"), "{s}");
            assert!(!s.contains("90, 90") && !s.contains("5a5a"), "{s}");
            assert!(s.contains("<redacted>"), "{s}");
        }
    }
}

/// The stored description of an object's chunks (`sov.manifest.v1`).
pub mod manifest {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("sov.manifest.v1");
}

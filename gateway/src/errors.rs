//! metad's and sov-client's errors as S3 errors.

use s3s::{S3Error, S3ErrorCode, s3_error};
use sov_client::ClientError;
use tonic::{Code, Status};

/// S3 codes metad names at the start of a message ("InvalidPart: ...").
const NAMED: &[&str] = &[
    "NoSuchUpload",
    "InvalidPart",
    "InvalidPartOrder",
    "EntityTooSmall",
    "MalformedXML",
    "InvalidArgument",
];

/// A metad status as the S3 error a client expects.
pub fn meta_err(s: Status) -> S3Error {
    let msg = s.message();
    if let Some((code, rest)) = msg.split_once(": ")
        && NAMED.contains(&code)
    {
        let code: S3ErrorCode = code.parse().expect("infallible");
        return S3Error::with_message(code, rest.to_string());
    }
    match s.code() {
        Code::NotFound if msg.starts_with("no such bucket") => {
            s3_error!(NoSuchBucket, "The specified bucket does not exist")
        }
        Code::NotFound if msg.starts_with("no such key") => {
            s3_error!(NoSuchKey, "The specified key does not exist.")
        }
        Code::NotFound => S3Error::with_message(S3ErrorCode::NoSuchKey, msg.to_string()),
        Code::InvalidArgument => {
            S3Error::with_message(S3ErrorCode::InvalidArgument, msg.to_string())
        }
        Code::FailedPrecondition => {
            S3Error::with_message(S3ErrorCode::PreconditionFailed, msg.to_string())
        }
        Code::Unavailable | Code::DeadlineExceeded => {
            S3Error::with_message(S3ErrorCode::ServiceUnavailable, msg.to_string())
        }
        _ => S3Error::with_message(S3ErrorCode::InternalError, msg.to_string()),
    }
}

/// An error of the body stream, by what s3s's message says (its error types are private).
pub fn body_err(e: &std::io::Error) -> S3Error {
    let text = format!("{e} {e:?}");
    if text.contains("Sha256Mismatch") {
        let code: S3ErrorCode = "XAmzContentSHA256Mismatch".parse().expect("infallible");
        let mut err = S3Error::with_message(
            code,
            "The provided 'x-amz-content-sha256' header does not match what was computed.",
        );
        err.set_status_code(http::StatusCode::BAD_REQUEST);
        err
    } else if text.contains("SignatureMismatch") {
        s3_error!(
            SignatureDoesNotMatch,
            "The request signature we calculated does not match the signature you provided."
        )
    } else {
        s3_error!(IncompleteBody, "The request body ended early: {e}")
    }
}

/// A data-path error as an S3 error.
pub fn client_err(e: ClientError) -> S3Error {
    match e {
        ClientError::Meta(s) => meta_err(s),
        ClientError::Body(io) => body_err(&io),
        ClientError::Unavailable(m) => S3Error::with_message(S3ErrorCode::ServiceUnavailable, m),
        ClientError::Invalid(m) => S3Error::with_message(S3ErrorCode::InvalidArgument, m),
        ClientError::DataLoss(m) | ClientError::Internal(m) => {
            S3Error::with_message(S3ErrorCode::InternalError, m)
        }
    }
}

//! Request and response bodies: the request body as an `AsyncRead` that hashes what passes
//! (MD5 for the ETag and Content-MD5, the checksum the client asked for), and an object's
//! chunks as a bounded response stream.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures::StreamExt;
use md5::{Digest, Md5};
use s3s::checksum::ChecksumHasher;
use s3s::dto::StreamingBlob;
use sov_client::ObjectReader;
use tokio::io::{AsyncRead, ReadBuf};

/// Wraps a reader and hashes every byte read.
pub struct Hashing<R> {
    inner: R,
    pub md5: Md5,
    pub sums: ChecksumHasher,
    pub len: u64,
}

impl<R> Hashing<R> {
    pub fn new(inner: R, sums: ChecksumHasher) -> Hashing<R> {
        Hashing {
            inner,
            md5: Md5::new(),
            sums,
            len: 0,
        }
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for Hashing<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = &r {
            let new = &buf.filled()[before..];
            if !new.is_empty() {
                let this = &mut *self;
                this.md5.update(new);
                this.sums.update(new);
                this.len += new.len() as u64;
            }
        }
        r
    }
}

/// The request body as an `AsyncRead` (errors keep s3s's message, which names the cause).
pub fn reader(body: StreamingBlob) -> impl AsyncRead + Unpin + Send {
    tokio_util::io::StreamReader::new(body.map(|r| r.map_err(std::io::Error::other)))
}

/// An object's data as a response body: a task reads chunks ahead into a channel of two, so
/// memory stays bounded whatever the size.
pub fn response(mut reader: ObjectReader) -> StreamingBlob {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(2);
    tokio::spawn(async move {
        while let Some(chunk) = reader.next_chunk().await {
            let item = chunk.map_err(|e| std::io::Error::other(e.to_string()));
            let failed = item.is_err();
            if tx.send(item).await.is_err() || failed {
                return;
            }
        }
    });
    StreamingBlob::wrap(tokio_stream::wrappers::ReceiverStream::new(rx))
}

/// An object's data as an `AsyncRead` (for copies).
pub fn object_reader(reader: ObjectReader) -> impl AsyncRead + Unpin + Send {
    let s = futures::stream::unfold(reader, |mut r| async move {
        r.next_chunk()
            .await
            .map(|c| (c.map_err(|e| std::io::Error::other(e.to_string())), r))
    });
    tokio_util::io::StreamReader::new(Box::pin(s))
}

//! The sov client library. [`meta`] calls metad (retries, leader hints); the rest is the data
//! path: an object is cut into chunks, each sealed (AES-256-GCM under the bucket's data key,
//! blake3 over the ciphertext) before it leaves the process, and written to every member of its
//! placement group's acting set: whole copies for `replicated{n}` pools, Reed-Solomon shards for
//! `ec{k,m}` pools ([`object`]). Reads verify every byte and reconstruct around missing or bad
//! copies. [`map`] caches the cluster map, [`nodes`] holds storaged connections, [`manifest`]
//! derives chunk ids from an object's manifest and [`pgcheck`] audits every placement group.

// tonic::Status (176 bytes) is the error of every gRPC call; boxing it everywhere would only
// move the cost.
#![allow(clippy::result_large_err)]

pub mod audit;
pub mod error;
pub mod manifest;
pub mod map;
pub mod meta;
pub mod nodes;
pub mod object;
pub mod pgcheck;
pub mod volume;

pub use error::ClientError;
pub use object::{Client, ClientConfig, ObjectReader, PutOptions, PutResult, Written};

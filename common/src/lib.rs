//! Shared building blocks of the sov daemons: config units, telemetry, shutdown, background
//! workers, the chunk codec, and the stored formats of objects (chunk ids, erasure-coded
//! stripes). Small on purpose: anything with a protocol lives elsewhere.

pub mod codec;
pub mod config;
pub mod daemon;
pub mod layout;
pub mod pki;
pub mod placement;
pub mod shutdown;
pub mod stripe;
pub mod telemetry;
pub mod tls;
pub mod units;
pub mod worker;

//! Shared building blocks of the sov daemons: config units, telemetry, shutdown, background
//! workers and the chunk codec. Small on purpose: anything with a protocol lives elsewhere.

pub mod codec;
pub mod config;
pub mod placement;
pub mod shutdown;
pub mod telemetry;
pub mod units;
pub mod worker;

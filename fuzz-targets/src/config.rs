//! The TOML config files of storaged, metad and vhost-blk, and the human units in them.
//! (gateway-s3 takes flags only: it has no config file.)

use std::str::FromStr;

use metad::config::MetadConfig;
use sov_common::config::parse_toml;
use sov_common::units::{ByteSize, HumanDuration, Rate};
use storaged::config::StoragedConfig;

/// The bytes as each daemon's config file: parsing and validation refuse or accept, never
/// panic. Every line and the whole text as a size, a duration and a rate: what parses prints
/// in a form that parses back to the same value.
pub fn config_files(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(c) = parse_toml::<StoragedConfig>(text) {
        let _ = c.validate();
    }
    if let Ok(c) = parse_toml::<MetadConfig>(text) {
        let _ = c.validate();
        let _ = c.parsed_peers();
    }
    let _ = parse_toml::<vhost_blk::FileConfig>(text);
    for piece in std::iter::once(text).chain(text.lines()) {
        units(piece);
        if let Some((_, value)) = piece.split_once('=') {
            units(value.trim().trim_matches('"'));
        }
    }
}

fn units(s: &str) {
    round_trip::<ByteSize>(s);
    round_trip::<HumanDuration>(s);
    round_trip::<Rate>(s);
}

fn round_trip<T>(s: &str)
where
    T: FromStr + std::fmt::Display + PartialEq + std::fmt::Debug,
    T::Err: std::fmt::Debug,
{
    if let Ok(v) = s.parse::<T>() {
        let printed = v.to_string();
        assert_eq!(
            printed.parse::<T>().ok(),
            Some(v),
            "{s:?} parsed, printed as {printed:?}, which does not parse back"
        );
    }
}

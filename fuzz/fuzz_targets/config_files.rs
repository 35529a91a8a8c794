#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| sov_fuzz_targets::config_files(data));

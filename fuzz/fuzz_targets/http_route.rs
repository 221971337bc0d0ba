#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| narmesh_fuzz_checks::http_route(data));

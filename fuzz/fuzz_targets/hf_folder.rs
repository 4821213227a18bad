#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| edgefusion_fuzz::entries::hf_folder(data));

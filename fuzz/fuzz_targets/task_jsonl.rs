#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| edgefusion_fuzz::entries::task_jsonl(data));

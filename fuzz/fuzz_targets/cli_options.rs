//! The CLI option strings (`--cpus boot=N`, `--memory size=512M`, `--serial file=PATH`,
//! `--api-socket path=PATH`, `--clock-policy`, and the comma option lists of ch-remote):
//! any string becomes a value or an error naming the option, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let _ = vmm::config::parse_size("memory", s);
    let _ = vmm::config::parse_cpus(s);
    let _ = vmm::config::parse_memory(s);
    let _ = vmm::config::parse_serial(s);
    let _ = vmm::config::parse_api_socket(s);
    let _ = vmm::config::parse_clock_policy(s);
    let _ = vmm::api::options::split(s);
});

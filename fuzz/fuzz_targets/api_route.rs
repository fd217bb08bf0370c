//! The HTTP API router: any method, path and body becomes a request or an API error, never a
//! panic; every error carries a 4xx/5xx status and at least one cause.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
struct Input<'a> {
    method: u8,
    path: &'a str,
    body: &'a [u8],
}

const METHODS: [&str; 5] = ["GET", "PUT", "POST", "DELETE", "PATCH"];

fuzz_target!(|input: Input<'_>| {
    let method = METHODS[usize::from(input.method) % METHODS.len()];
    // Half the time aim at a real endpoint so the body decoders get exercised.
    let path = if input.method & 0x80 != 0 {
        const PATHS: [&str; 10] = [
            "/api/v1/vm.snapshot",
            "/api/v1/vm.restore",
            "/api/v1/vm.send-migration",
            "/api/v1/vm.receive-migration",
            "/api/v1/vm.resume",
            "/api/v1/vm.pause",
            "/api/v1/vm.info",
            "/api/v1/vmm.ping",
            "/api/v1/vm.shutdown",
            "/api/v1/vmm.shutdown",
        ];
        PATHS[input.path.len() % PATHS.len()]
    } else {
        input.path
    };
    let method = if input.method & 0x80 != 0 { "PUT" } else { method };
    if let Err(e) = vmm::api::route(method, path, input.body) {
        assert!((400..600).contains(&e.status), "status {}", e.status);
        assert!(!e.causes.is_empty());
    }
});

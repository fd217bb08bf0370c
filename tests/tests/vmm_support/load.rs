//! A small load client for the API socket: `clients` threads share `requests` requests
//! (`vm.info` and `vmm.ping` alternating), one request per connection like every Cloud
//! Hypervisor client. Used by the `vmm_api_robust` load test and by `vmm/benches/api_load.rs`
//! (which includes this file by path), so that both measure the same thing.
//!
//! Depends only on `std` and `vmm::api::client`.

use std::path::Path;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

/// What one load run measured.
#[derive(Debug, Clone)]
pub struct LoadReport {
    /// Concurrent clients.
    pub clients: usize,
    /// Requests sent in all.
    pub requests: usize,
    /// Requests without a 200 answer (connection or protocol errors included).
    pub failures: usize,
    /// The first few failures, described.
    pub failure_samples: Vec<String>,
    /// Wall time from the start barrier to the last answer.
    pub elapsed: Duration,
    /// Every answered request's latency (connect to last byte), sorted, in microseconds.
    pub latencies_us: Vec<f64>,
}

impl LoadReport {
    /// Requests per second over the whole run.
    pub fn rate(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// The `p`th percentile (0..=100) of the latencies in microseconds (NaN when none).
    pub fn percentile_us(&self, p: f64) -> f64 {
        let v = &self.latencies_us;
        if v.is_empty() {
            return f64::NAN;
        }
        let idx = ((p / 100.0) * (v.len() - 1) as f64).round() as usize;
        v[idx.min(v.len() - 1)]
    }

    /// One table row: clients, requests, req/s, p50 (ms), p99 (ms), failures.
    pub fn row(&self) -> String {
        format!(
            "{:>7} {:>8} {:>9.0} {:>9.3} {:>9.3} {:>8}",
            self.clients,
            self.requests,
            self.rate(),
            self.percentile_us(50.0) / 1000.0,
            self.percentile_us(99.0) / 1000.0,
            self.failures
        )
    }

    /// The header of [`LoadReport::row`].
    pub fn header() -> &'static str {
        "clients requests     req/s   p50(ms)   p99(ms) failures"
    }
}

/// Send `requests` requests from `clients` concurrent threads to the API socket `socket`.
pub fn run_load(socket: &Path, clients: usize, requests: usize) -> LoadReport {
    let clients = clients.max(1);
    let start = Arc::new(Barrier::new(clients + 1));
    let handles: Vec<_> = (0..clients)
        .map(|c| {
            let socket = socket.to_path_buf();
            let start = Arc::clone(&start);
            // Client c sends requests c, c + clients, c + 2 * clients, ...
            let mine = (c..requests).step_by(clients).collect::<Vec<_>>();
            std::thread::spawn(move || {
                let mut lat = Vec::with_capacity(mine.len());
                let mut failures = Vec::new();
                start.wait();
                for i in mine {
                    let path = if i % 2 == 0 { "vm.info" } else { "vmm.ping" };
                    let t = Instant::now();
                    match vmm::api::client::api_request(&socket, "GET", path, None) {
                        Ok((200, body)) if !body.is_empty() => {
                            lat.push(t.elapsed().as_secs_f64() * 1e6)
                        }
                        Ok((code, body)) => failures.push(format!("{path}: {code} {body}")),
                        Err(e) => failures.push(format!("{path}: {e}")),
                    }
                }
                (lat, failures)
            })
        })
        .collect();
    start.wait();
    let t0 = Instant::now();
    let mut latencies_us = Vec::with_capacity(requests);
    let mut failure_samples = Vec::new();
    let mut failures = 0;
    for h in handles {
        let (lat, fail) = h.join().expect("a load client thread panicked");
        latencies_us.extend(lat);
        failures += fail.len();
        failure_samples.extend(fail.into_iter().take(5));
    }
    let elapsed = t0.elapsed();
    latencies_us.sort_by(|a, b| a.total_cmp(b));
    failure_samples.truncate(5);
    LoadReport {
        clients,
        requests,
        failures,
        failure_samples,
        elapsed,
        latencies_us,
    }
}

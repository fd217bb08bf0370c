//! The HTTP API: Cloud Hypervisor's REST API over a Unix socket, for what Hourglass implements.
//!
//! Wire-compatible with Cloud Hypervisor (same methods, paths, JSON bodies and status codes) so
//! that its `ch-remote` drives Hourglass and ours is a drop-in; the OpenAPI description is
//! `openapi/hourglass.yaml` beside this file. Hourglass extensions are extra optional fields
//! (`clock_policy` on `vm.resume`, `vm.restore` and `vm.receive-migration`).
//!
//! Layers, each usable alone:
//! - [`route`]: method + path + body -> [`ApiRequest`] or [`ApiError`]; pure, fuzzable.
//! - [`start_api_server`]: the listener, one short-lived thread per connection, which calls an
//!   [`ApiHandler`] (implemented by the VMM) and writes the response.
//! - [`client::api_request`]: the client side, used by `ch-remote` and the tests.
//!
//! Status codes: 200 (with a JSON body) and 204 are the only successes. Errors carry a JSON
//! array of strings, the chain of causes from the most general to the root. As in Cloud
//! Hypervisor: a malformed request or body is 400, an unknown path 404 (also an action on a VM
//! that does not exist), and a VM action that fails (pausing a paused VM, snapshotting a running
//! one) is 500. Beyond Cloud Hypervisor, which answers 400 to every wrong method, a wrong method
//! is 405 with an `Allow` header, a body over the limit is 413, and an unsupported transfer
//! encoding 501.

pub mod client;
pub mod config;
pub mod http;
pub mod options;
mod router;
mod socket;
pub mod url;

use std::error::Error as StdError;
use std::fmt;

use serde::{Deserialize, Serialize};

pub use config::{
    ClockPolicy, ConfigError, MemoryRestoreMode, MigrationMode, MigrationUrl,
    ReceiveMigrationConfig, RestoreConfig, ResumeConfig, SendMigrationConfig, SnapshotConfig,
    TimeoutStrategy,
};
pub use http::{
    start_api_server, start_api_server_with_limits, ApiServer, ApiServerError, ServerLimits,
};
pub use router::{allowed_method, endpoints, route, API_ROOT};

/// A decoded API request, handed to the VMM's [`ApiHandler`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiRequest {
    /// `GET /api/v1/vmm.ping`: answer with [`VmmPingResponse`] as JSON.
    VmmPing,
    /// `PUT /api/v1/vmm.shutdown`: stop the VMM process (after this response is written).
    VmmShutdown,
    /// `GET /api/v1/vm.info`: answer with the VM information as JSON.
    VmInfo,
    /// `PUT /api/v1/vm.pause`.
    VmPause,
    /// `PUT /api/v1/vm.resume`, with an optional Hourglass body.
    VmResume(ResumeConfig),
    /// `PUT /api/v1/vm.shutdown`.
    VmShutdown,
    /// `PUT /api/v1/vm.snapshot`.
    VmSnapshot(SnapshotConfig),
    /// `PUT /api/v1/vm.restore`.
    VmRestore(RestoreConfig),
    /// `PUT /api/v1/vm.send-migration`: answer when the migration has finished or failed.
    VmSendMigration(SendMigrationConfig),
    /// `PUT /api/v1/vm.receive-migration`: answer when the VM has been received or it failed.
    VmReceiveMigration(ReceiveMigrationConfig),
}

/// A successful answer.
#[derive(Debug, Clone, PartialEq)]
pub enum ApiResponse {
    /// 204, no body.
    Empty,
    /// 200 with this JSON body.
    Json(serde_json::Value),
}

/// A failed request: the HTTP status and the chain of causes, most general first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// HTTP status code (400, 404, 405, 409, 413, 500, ...).
    pub status: u16,
    /// Messages from the most general to the root cause; sent as a JSON array of strings.
    pub causes: Vec<String>,
}

impl ApiError {
    /// An error with one message.
    pub fn new(status: u16, message: impl Into<String>) -> Self {
        Self {
            status,
            causes: vec![message.into()],
        }
    }

    /// 400: the request or its body is malformed or invalid.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, message)
    }

    /// 404: unknown path, or the VM the action needs does not exist (Cloud Hypervisor's
    /// `VmNotCreated`).
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(404, message)
    }

    /// 409: the request conflicts with existing state (e.g. restoring over an existing VM where
    /// Cloud Hypervisor reports a duplicate).
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(409, message)
    }

    /// 500: the VM action failed (Cloud Hypervisor's answer to, e.g., pausing a paused VM).
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(500, message)
    }

    /// An error whose causes are `context` followed by `err` and each of its sources.
    pub fn from_error(status: u16, context: impl Into<String>, err: &dyn StdError) -> Self {
        let mut causes = vec![context.into()];
        let mut next: Option<&dyn StdError> = Some(err);
        while let Some(e) = next {
            causes.push(e.to_string());
            next = e.source();
        }
        Self { status, causes }
    }

    /// Adds a root cause at the end of the chain.
    pub fn caused_by(mut self, cause: impl Into<String>) -> Self {
        self.causes.push(cause.into());
        self
    }

    /// The JSON body sent to the client: an array of strings, never empty.
    pub fn body(&self) -> String {
        let causes = if self.causes.is_empty() {
            vec![format!("Request failed with status {}", self.status)]
        } else {
            self.causes.clone()
        };
        serde_json::Value::from(causes).to_string()
    }
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.status, self.causes.join(": "))
    }
}

impl StdError for ApiError {}

impl From<ConfigError> for ApiError {
    fn from(e: ConfigError) -> Self {
        Self::bad_request(e.to_string())
    }
}

/// The VMM side of the API. The server calls it on the connection's thread, possibly from
/// several connections at once. The `hourglass` binary's handler only forwards each request to
/// its control thread (so that API threads, under seccomp, need nothing but socket I/O), which
/// runs it, or hands a migration to a thread of its own; a long operation blocks only its own
/// connection.
pub trait ApiHandler: Send + Sync {
    /// Performs the request and answers it.
    fn handle(&self, req: ApiRequest) -> Result<ApiResponse, ApiError>;
}

/// The body of `GET /api/v1/vmm.ping`, as Cloud Hypervisor spells it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmmPingResponse {
    /// Build identification (crate version, optionally with a revision).
    pub build_version: String,
    /// Version string.
    pub version: String,
    /// Process id of the VMM.
    pub pid: i64,
    /// Enabled features (Hourglass lists e.g. "kvm", "clock_policy").
    pub features: Vec<String>,
}

impl VmmPingResponse {
    /// This build's answer: crate version, the current process id and the given features.
    pub fn current(features: &[&str]) -> Self {
        Self {
            build_version: format!("hourglass {}", env!("CARGO_PKG_VERSION")),
            version: env!("CARGO_PKG_VERSION").to_string(),
            pid: i64::from(std::process::id()),
            features: features.iter().map(|s| s.to_string()).collect(),
        }
    }

    /// As an [`ApiResponse`].
    pub fn to_response(&self) -> ApiResponse {
        ApiResponse::Json(serde_json::to_value(self).unwrap_or_default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Outer(Inner);
    #[derive(Debug)]
    struct Inner;
    impl fmt::Display for Outer {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("cannot pause vCPUs")
        }
    }
    impl fmt::Display for Inner {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("VM is already paused")
        }
    }
    impl StdError for Outer {
        fn source(&self) -> Option<&(dyn StdError + 'static)> {
            Some(&self.0)
        }
    }
    impl StdError for Inner {}

    #[test]
    fn error_chain_becomes_json_array() {
        let e = ApiError::from_error(500, "The VM could not be paused", &Outer(Inner));
        assert_eq!(
            e.body(),
            r#"["The VM could not be paused","cannot pause vCPUs","VM is already paused"]"#
        );
        let empty = ApiError {
            status: 500,
            causes: vec![],
        };
        assert_eq!(empty.body(), r#"["Request failed with status 500"]"#);
        assert_eq!(
            ApiError::bad_request("a").caused_by("b \"q\"").body(),
            r#"["a","b \"q\""]"#
        );
    }

    #[test]
    fn ping_response_has_cloud_hypervisor_fields() {
        let v = serde_json::to_value(VmmPingResponse::current(&["kvm"])).unwrap();
        let obj = v.as_object().unwrap();
        let mut keys: Vec<_> = obj.keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(keys, ["build_version", "features", "pid", "version"]);
        assert_eq!(obj["pid"], i64::from(std::process::id()));
    }
}

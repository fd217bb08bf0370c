//! Method + path + body -> [`ApiRequest`]. Pure: no I/O, never panics, fuzzable.

use serde_json::{Map, Value};

use super::config::{
    parse_body, ConfigError, ReceiveMigrationConfig, RestoreConfig, ResumeConfig,
    SendMigrationConfig, SnapshotConfig,
};
use super::{ApiError, ApiRequest};

/// Prefix of every endpoint.
pub const API_ROOT: &str = "/api/v1/";

/// What an endpoint does with a request body.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Body {
    /// Ignored (GET).
    Ignored,
    /// Must be absent or empty (Cloud Hypervisor answers 400 otherwise).
    None,
    /// A JSON object, which may be absent.
    Optional,
    /// A JSON object, which must be present.
    Required,
}

/// A body decoder: the body (`null` where the endpoint takes none) to the request.
type Decoder = fn(&str, &Value) -> Result<ApiRequest, ConfigError>;

struct Endpoint {
    method: &'static str,
    name: &'static str,
    body: Body,
    decode: Decoder,
}

/// Builds [`ENDPOINTS`] and [`ApiRequest::endpoint`] from one row per endpoint:
/// `METHOD "name" Body => Variant` or `=> Variant(Config)` (decoded by `Config::from_value`).
macro_rules! endpoints {
    ($($method:ident $name:literal $body:ident => $variant:ident $(($config:ty))?;)*) => {
        const ENDPOINTS: &[Endpoint] = &[$(Endpoint {
            method: stringify!($method),
            name: $name,
            body: Body::$body,
            decode: endpoints!(@decode $variant $($config)?),
        }),*];

        impl ApiRequest {
            /// The endpoint name, as in the path (`vm.pause`).
            pub fn endpoint(&self) -> &'static str {
                match self {
                    $(ApiRequest::$variant { .. } => $name,)*
                }
            }
        }
    };
    (@decode $variant:ident) => {
        |_, _| Ok(ApiRequest::$variant)
    };
    (@decode $variant:ident $config:ty) => {
        |what, v| Ok(ApiRequest::$variant(<$config>::from_value(what, v)?))
    };
}

endpoints! {
    GET "vmm.ping" Ignored => VmmPing;
    PUT "vmm.shutdown" None => VmmShutdown;
    GET "vm.info" Ignored => VmInfo;
    PUT "vm.pause" None => VmPause;
    PUT "vm.resume" Optional => VmResume(ResumeConfig);
    PUT "vm.shutdown" None => VmShutdown;
    PUT "vm.snapshot" Required => VmSnapshot(SnapshotConfig);
    PUT "vm.restore" Required => VmRestore(RestoreConfig);
    PUT "vm.send-migration" Required => VmSendMigration(SendMigrationConfig);
    PUT "vm.receive-migration" Required => VmReceiveMigration(ReceiveMigrationConfig);
}

fn endpoint(path: &str) -> Option<&'static Endpoint> {
    let path = path.split_once('?').map_or(path, |(p, _)| p);
    let name = path.strip_prefix(API_ROOT)?;
    ENDPOINTS.iter().find(|e| e.name == name)
}

/// Every endpoint served, as `(method, name)` (`("PUT", "vm.pause")`).
pub fn endpoints() -> impl Iterator<Item = (&'static str, &'static str)> {
    ENDPOINTS.iter().map(|e| (e.method, e.name))
}

/// The one method the endpoint at `path` accepts, for a 405's `Allow` header.
pub fn allowed_method(path: &str) -> Option<&'static str> {
    endpoint(path).map(|e| e.method)
}

/// Decodes a request. Errors: 404 unknown path, 405 wrong method, 400 bad body.
/// A query string on the path is ignored.
pub fn route(method: &str, path: &str, body: &[u8]) -> Result<ApiRequest, ApiError> {
    let ep = endpoint(path).ok_or_else(|| {
        ApiError::not_found(format!(
            "Unknown API endpoint {}",
            path.escape_debug().take(200).collect::<String>()
        ))
    })?;
    if method != ep.method {
        return Err(ApiError::new(
            405,
            format!(
                "Method {} is not allowed on {}{}; use {}",
                method.escape_debug().take(20).collect::<String>(),
                API_ROOT,
                ep.name,
                ep.method
            ),
        ));
    }
    let empty = body.iter().all(u8::is_ascii_whitespace);
    let what = format!("{} body", ep.name);
    match ep.body {
        Body::None if !empty => {
            return Err(ApiError::bad_request(format!(
                "{} takes no request body",
                ep.name
            )))
        }
        Body::Required if empty => {
            return Err(ApiError::bad_request(format!(
                "{} needs a JSON request body",
                ep.name
            )))
        }
        _ => {}
    }
    let v = match ep.body {
        Body::Optional | Body::Required => {
            match parse_body(&what, body, ep.body == Body::Optional)? {
                // An optional body given as JSON `null` means "no options".
                Value::Null if ep.body == Body::Optional => Value::Object(Map::new()),
                v => v,
            }
        }
        Body::Ignored | Body::None => Value::Null,
    };
    Ok((ep.decode)(&what, &v)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{ClockPolicy, MemoryRestoreMode, MigrationMode, TimeoutStrategy};

    #[test]
    fn each_request_names_its_row() {
        let bodies = [
            ("vm.snapshot", r#"{"destination_url": "file:///s"}"#),
            ("vm.restore", r#"{"source_url": "file:///s"}"#),
            ("vm.send-migration", r#"{"destination_url": "unix:/m"}"#),
            ("vm.receive-migration", r#"{"receiver_url": "unix:/m"}"#),
        ];
        for (method, name) in endpoints() {
            let body = bodies.iter().find(|(n, _)| *n == name).map_or("", |b| b.1);
            let req = route(method, &format!("{API_ROOT}{name}"), body.as_bytes()).unwrap();
            assert_eq!(req.endpoint(), name);
        }
        assert_eq!(endpoints().count(), 10);
    }

    #[test]
    fn every_endpoint_routes() {
        let ok = |m: &str, p: &str, b: &str| route(m, p, b.as_bytes()).unwrap();
        assert_eq!(ok("GET", "/api/v1/vmm.ping", ""), ApiRequest::VmmPing);
        assert_eq!(
            ok("PUT", "/api/v1/vmm.shutdown", ""),
            ApiRequest::VmmShutdown
        );
        assert_eq!(ok("GET", "/api/v1/vm.info", ""), ApiRequest::VmInfo);
        assert_eq!(ok("PUT", "/api/v1/vm.pause", ""), ApiRequest::VmPause);
        assert_eq!(
            ok("PUT", "/api/v1/vm.shutdown", " \r\n"),
            ApiRequest::VmShutdown
        );
        assert_eq!(
            ok("PUT", "/api/v1/vm.resume", ""),
            ApiRequest::VmResume(ResumeConfig { clock_policy: None })
        );
        assert_eq!(
            ok("PUT", "/api/v1/vm.resume", "null"),
            ApiRequest::VmResume(ResumeConfig { clock_policy: None })
        );
        assert_eq!(
            ok("PUT", "/api/v1/vm.resume", r#"{"clock_policy":"frozen"}"#),
            ApiRequest::VmResume(ResumeConfig {
                clock_policy: Some(ClockPolicy::Frozen)
            })
        );
        assert_eq!(
            ok(
                "PUT",
                "/api/v1/vm.snapshot?x=1",
                r#"{"destination_url":"file:///s"}"#
            ),
            ApiRequest::VmSnapshot(SnapshotConfig {
                destination_url: "file:///s".into()
            })
        );
        assert_eq!(
            ok(
                "PUT",
                "/api/v1/vm.restore",
                r#"{"source_url":"file:///s","resume":true,"iommufd_fd":null}"#
            ),
            ApiRequest::VmRestore(RestoreConfig {
                source_url: "file:///s".into(),
                prefault: false,
                memory_restore_mode: MemoryRestoreMode::Copy,
                resume: true,
                clock_policy: None,
            })
        );
        let ApiRequest::VmSendMigration(s) = ok(
            "PUT",
            "/api/v1/vm.send-migration",
            r#"{"destination_url":"tcp:192.0.2.2:6000","downtime_ms":50,"timeout_s":9,"timeout_strategy":"Ignore","connections":4}"#,
        ) else {
            panic!("wrong request");
        };
        assert_eq!(
            (
                s.downtime_ms,
                s.timeout_s,
                s.timeout_strategy,
                s.connections
            ),
            (50, 9, TimeoutStrategy::Ignore, 4)
        );
        assert_eq!(
            ok(
                "PUT",
                "/api/v1/vm.receive-migration",
                r#"{"receiver_url":"unix:/r","memory_mode":"Precopy"}"#
            ),
            ApiRequest::VmReceiveMigration(ReceiveMigrationConfig {
                receiver_url: "unix:/r".into(),
                memory_mode: MigrationMode::Precopy,
                clock_policy: None,
            })
        );
    }

    #[test]
    fn errors_have_cloud_hypervisor_status_codes() {
        let err = |m: &str, p: &str, b: &str| route(m, p, b.as_bytes()).unwrap_err();
        assert_eq!(err("GET", "/api/v1/vm.nope", "").status, 404);
        assert_eq!(err("GET", "/api/v2/vm.info", "").status, 404);
        assert_eq!(err("GET", "/api/v1/", "").status, 404);
        let e = err("GET", "/api/v1/vm.pause", "");
        assert_eq!(e.status, 405);
        assert_eq!(
            e.causes,
            ["Method GET is not allowed on /api/v1/vm.pause; use PUT"]
        );
        assert_eq!(allowed_method("/api/v1/vm.pause"), Some("PUT"));
        assert_eq!(err("put", "/api/v1/vm.pause", "").status, 405);
        let e = err("PUT", "/api/v1/vm.pause", "{}");
        assert_eq!(
            (e.status, e.causes[0].as_str()),
            (400, "vm.pause takes no request body")
        );
        let e = err("PUT", "/api/v1/vm.snapshot", "");
        assert_eq!(e.status, 400);
        let e = err("PUT", "/api/v1/vm.snapshot", "{\"destination_url\":");
        assert_eq!(e.status, 400);
        assert!(
            e.causes[0].starts_with("vm.snapshot body: body is not valid JSON: EOF"),
            "{e}"
        );
        let e = err("PUT", "/api/v1/vm.resume", "[]");
        assert_eq!(
            e.causes,
            ["vm.resume body: body must be a JSON object, got an array"]
        );
    }

    /// A small deterministic fuzz loop: mutated inputs never panic and errors carry a message.
    #[test]
    fn mutated_bodies_never_panic() {
        let seeds: [&[u8]; 4] = [
            br#"{"source_url":"file:///s","prefault":true,"memory_restore_mode":"OnDemand","resume":true}"#,
            br#"{"destination_url":"tcp:[::1]:6000","downtime_ms":5,"connections":2}"#,
            br#"{"receiver_url":"unix:/r","memory_mode":"Precopy","clock_policy":"frozen"}"#,
            br#"{"destination_url":"file:///s"}"#,
        ];
        let paths = [
            "/api/v1/vm.restore",
            "/api/v1/vm.send-migration",
            "/api/v1/vm.receive-migration",
            "/api/v1/vm.snapshot",
            "/api/v1/vm.resume",
        ];
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for i in 0..20_000 {
            let mut b = seeds[i % seeds.len()].to_vec();
            for _ in 0..(next() % 4 + 1) {
                let pos = (next() as usize) % (b.len() + 1);
                match next() % 3 {
                    0 if pos < b.len() => b[pos] = next() as u8,
                    1 if pos < b.len() => {
                        b.remove(pos);
                    }
                    _ => b.insert(pos, b"\"{}[]:,0-e\\\xff"[(next() % 12) as usize]),
                }
            }
            if let Err(e) = route("PUT", paths[i % paths.len()], &b) {
                assert!(!e.causes.is_empty() && !e.causes[0].is_empty());
            }
        }
    }
}

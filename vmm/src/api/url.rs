//! The URLs of API bodies: migration endpoints (`unix:/path`, `tcp:host:port`) and snapshot
//! directories (`file:///dir`).

use std::path::PathBuf;

/// A migration endpoint: `unix:/path` or `tcp:host:port`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MigrationUrl {
    /// A Unix stream socket at this path.
    Unix(PathBuf),
    /// A TCP endpoint; `host` has no brackets (an IPv6 literal is written `tcp:[::1]:6000`).
    Tcp {
        /// Host name or address.
        host: String,
        /// Port, never 0.
        port: u16,
    },
}

impl MigrationUrl {
    /// Parses `unix:/path` or `tcp:host:port`; the error says what is wrong.
    pub fn parse(url: &str) -> Result<Self, String> {
        if let Some(path) = url.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(format!("`{url}`: unix: URL has an empty path"));
            }
            return Ok(Self::Unix(PathBuf::from(path)));
        }
        if let Some(rest) = url.strip_prefix("tcp:") {
            let (host, port) = rest
                .rsplit_once(':')
                .ok_or_else(|| format!("`{url}`: expected tcp:<host>:<port>"))?;
            let host = host
                .strip_prefix('[')
                .and_then(|h| h.strip_suffix(']'))
                .unwrap_or(host);
            if host.is_empty() {
                return Err(format!("`{url}`: tcp: URL has an empty host"));
            }
            let port: u16 = port
                .parse()
                .map_err(|_| format!("`{url}`: port `{port}` is not a number from 1 to 65535"))?;
            if port == 0 {
                return Err(format!("`{url}`: port 0 is not allowed"));
            }
            return Ok(Self::Tcp {
                host: host.to_string(),
                port,
            });
        }
        Err(format!(
            "`{url}`: expected unix:<path> or tcp:<host>:<port>"
        ))
    }

    /// The `host:port` string for `ToSocketAddrs` (IPv6 literals bracketed); `None` for Unix.
    pub fn tcp_address(&self) -> Option<String> {
        match self {
            Self::Unix(_) => None,
            Self::Tcp { host, port } if host.contains(':') => Some(format!("[{host}]:{port}")),
            Self::Tcp { host, port } => Some(format!("{host}:{port}")),
        }
    }
}

/// Parses a `file:///absolute/dir` URL into the directory path.
pub fn parse_file_url(url: &str) -> Result<PathBuf, String> {
    let path = url
        .strip_prefix("file://")
        .ok_or_else(|| format!("`{url}`: expected a file:///<absolute directory> URL"))?;
    if !path.starts_with('/') {
        return Err(format!(
            "`{url}`: the path after file:// must be absolute (file:///dir)"
        ));
    }
    if path.len() == 1 {
        return Err(format!("`{url}`: the snapshot directory cannot be /"));
    }
    Ok(PathBuf::from(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_urls() {
        assert_eq!(
            parse_file_url("file:///a/b").unwrap(),
            PathBuf::from("/a/b")
        );
        assert!(parse_file_url("file://a/b").is_err());
        assert!(parse_file_url("file:///").is_err());
        assert!(parse_file_url("/a/b").is_err());
    }
}

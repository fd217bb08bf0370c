//! The VM configuration and the pure parsers of `hourglass`'s option strings
//! (`--cpus boot=4`, `--memory size=512M`, `--serial file=PATH`, ...).
//!
//! Every parser returns an error naming the option and the value that was wrong; none panics
//! (they are fuzz targets).

use std::path::PathBuf;

use devices::SerialOutput;
use hypervisor::tsc::ClockPolicy;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::api::options;

/// The most vCPUs a VM may have (xAPIC IDs, one byte).
pub const MAX_VCPUS: u32 = 254;
/// The default guest memory size.
pub const DEFAULT_MEMORY: u64 = 512 << 20;

/// An invalid command-line option value.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[error("--{option} {value:?}: {reason}")]
pub struct OptionValueError {
    /// The option (without dashes).
    pub option: &'static str,
    /// The value given.
    pub value: String,
    /// What is wrong with it.
    pub reason: String,
}

fn err(option: &'static str, value: &str, reason: impl Into<String>) -> OptionValueError {
    OptionValueError {
        option,
        value: value.to_string(),
        reason: reason.into(),
    }
}

fn pairs(
    option: &'static str,
    s: &str,
    main: Option<&str>,
    known: &[&str],
) -> Result<Vec<(String, String)>, OptionValueError> {
    options::parse(s, main, known).map_err(|e| err(option, s, e.to_string()))
}

/// vCPU configuration (Cloud Hypervisor's `CpusConfig` fields).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpusConfig {
    /// vCPUs at boot.
    pub boot_vcpus: u32,
    /// Maximum vCPUs (equal to `boot_vcpus`: no hotplug).
    pub max_vcpus: u32,
}

/// Guest memory configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryConfig {
    /// Bytes of RAM.
    pub size: u64,
}

/// The whole VM configuration, as `vm.info` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmConfig {
    /// vCPUs.
    pub cpus: CpusConfig,
    /// Memory.
    pub memory: MemoryConfig,
    /// The kernel image (`None`: the built-in test guest): an ELF with a PVH entry note or a
    /// bzImage.
    pub kernel: Option<PathBuf>,
    /// The initramfs given to `kernel` (Cloud Hypervisor's `--initramfs`). Absent from the
    /// configurations of older snapshots: `None`.
    #[serde(default)]
    pub initramfs: Option<PathBuf>,
    /// The kernel command line (Cloud Hypervisor's `--cmdline`). Absent from the
    /// configurations of older snapshots: `None`.
    #[serde(default)]
    pub cmdline: Option<String>,
    /// Serial output.
    pub serial: SerialOutput,
    /// The clock policy for resumes that do not name one.
    pub clock_policy: ClockPolicy,
    /// MiB of RAM the test guest dirties in a loop.
    pub dirty_mib: u32,
    /// Test guest idle mode: µs each vCPU halts between samples (0: busy sampling loop).
    #[serde(default)]
    pub guest_idle_us: u32,
    /// Passes the test guest makes over its `dirty_mib` MiB before it stops writing them (0:
    /// it dirties them forever). Absent from the configurations of older snapshots: 0.
    #[serde(default)]
    pub dirty_passes: u32,
}

impl Default for VmConfig {
    fn default() -> Self {
        Self {
            cpus: CpusConfig {
                boot_vcpus: 1,
                max_vcpus: 1,
            },
            memory: MemoryConfig {
                size: DEFAULT_MEMORY,
            },
            kernel: None,
            initramfs: None,
            cmdline: None,
            serial: SerialOutput::Tty,
            clock_policy: ClockPolicy::Wallclock,
            dirty_mib: 0,
            guest_idle_us: 0,
            dirty_passes: 0,
        }
    }
}

/// Parse a size with an optional K/M/G/T suffix (powers of 1024): `512M`, `1G`, `4096`.
pub fn parse_size(option: &'static str, s: &str) -> Result<u64, OptionValueError> {
    let t = s.trim();
    let (digits, shift) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => {
                    return Err(err(
                        option,
                        s,
                        format!("unknown size suffix `{c}` (K, M, G or T)"),
                    ))
                }
            };
            (&t[..i], shift)
        }
        _ => (t, 0),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(err(option, s, "expected a size such as 512M"));
    }
    let n: u64 = digits
        .parse()
        .map_err(|_| err(option, s, "size too large"))?;
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| err(option, s, "size too large"))
}

/// `--cpus boot=N[,max=N]`.
pub fn parse_cpus(s: &str) -> Result<CpusConfig, OptionValueError> {
    let mut boot = None;
    let mut max = None;
    for (k, v) in pairs("cpus", s, None, &["boot", "max"])? {
        let n: u32 = v
            .parse()
            .map_err(|_| err("cpus", s, format!("`{k}={v}` is not a number of vCPUs")))?;
        if k == "boot" {
            boot = Some(n);
        } else {
            max = Some(n);
        }
    }
    let boot = boot.unwrap_or(1);
    let max = max.unwrap_or(boot);
    if boot == 0 || boot > MAX_VCPUS {
        return Err(err("cpus", s, format!("boot must be 1..={MAX_VCPUS}")));
    }
    if max != boot {
        return Err(err("cpus", s, "max must equal boot (no vCPU hotplug)"));
    }
    Ok(CpusConfig {
        boot_vcpus: boot,
        max_vcpus: max,
    })
}

/// `--memory size=512M`.
pub fn parse_memory(s: &str) -> Result<MemoryConfig, OptionValueError> {
    let mut size = DEFAULT_MEMORY;
    for (_, v) in pairs("memory", s, None, &["size"])? {
        size = parse_size("memory", &v)?;
    }
    arch::layout::ram_regions(size).map_err(|e| err("memory", s, e.to_string()))?;
    Ok(MemoryConfig { size })
}

/// `--serial tty|file=PATH|off` (also `null` for off).
pub fn parse_serial(s: &str) -> Result<SerialOutput, OptionValueError> {
    match s.trim() {
        "tty" => Ok(SerialOutput::Tty),
        "off" | "null" => Ok(SerialOutput::Off),
        t => match t.strip_prefix("file=") {
            Some(p) if !p.is_empty() => Ok(SerialOutput::File(PathBuf::from(p))),
            Some(_) => Err(err("serial", s, "file= needs a path")),
            None => Err(err("serial", s, "expected tty, off or file=PATH")),
        },
    }
}

/// `--api-socket path=PATH` or a bare `PATH`.
pub fn parse_api_socket(s: &str) -> Result<PathBuf, OptionValueError> {
    let p = if s.trim_start().starts_with("path=") || s.contains(",fd=") || s.starts_with("fd=") {
        let mut path = None;
        for (k, v) in pairs("api-socket", s, None, &["path", "fd"])? {
            if k == "fd" {
                return Err(err("api-socket", s, "fd= is not supported; give path=PATH"));
            }
            path = Some(v);
        }
        path.unwrap_or_default()
    } else {
        s.trim().to_string()
    };
    if p.is_empty() {
        return Err(err("api-socket", s, "empty socket path"));
    }
    Ok(PathBuf::from(p))
}

/// A file path option (`--kernel PATH`, `--initramfs PATH`): not empty. Whether the file is
/// there and what it holds is checked when the VM is built, before it is created.
pub fn parse_path(option: &'static str, s: &str) -> Result<PathBuf, OptionValueError> {
    if s.is_empty() {
        return Err(err(option, s, "empty path"));
    }
    Ok(PathBuf::from(s))
}

/// `--kernel PATH`.
pub fn parse_kernel(s: &str) -> Result<PathBuf, OptionValueError> {
    parse_path("kernel", s)
}

/// `--initramfs PATH`.
pub fn parse_initramfs(s: &str) -> Result<PathBuf, OptionValueError> {
    parse_path("initramfs", s)
}

/// `--cmdline "..."`: at most what fits where Hourglass puts it (64 KiB with the NUL), no NUL
/// byte; the kernel's own limit (a bzImage's `cmdline_size`, 2047 bytes for PVH) is checked
/// against the image when the VM is built.
pub fn parse_cmdline(s: &str) -> Result<String, OptionValueError> {
    let max = arch::layout::CMDLINE_MAX_SIZE as usize - 1;
    if s.len() > max {
        let shown = s.chars().take(40).collect::<String>() + "...";
        return Err(err(
            "cmdline",
            &shown,
            format!("{} bytes, more than any kernel here takes ({max})", s.len()),
        ));
    }
    if s.contains('\0') {
        return Err(err("cmdline", s, "holds a NUL byte"));
    }
    Ok(s.to_string())
}

/// `--clock-policy wallclock|frozen`, spelled as [`ClockPolicy`]'s `FromStr` wants it.
pub fn parse_clock_policy(s: &str) -> Result<ClockPolicy, OptionValueError> {
    s.parse()
        .map_err(|e: hypervisor::tsc::ParsePolicyError| err("clock-policy", s, e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("memory", "512M").unwrap(), 512 << 20);
        assert_eq!(parse_size("memory", "1g").unwrap(), 1 << 30);
        assert_eq!(parse_size("memory", "4096").unwrap(), 4096);
        assert_eq!(parse_size("memory", "2T").unwrap(), 2 << 40);
        for bad in [
            "",
            "M",
            "12X",
            "-1M",
            "1.5G",
            "99999999999999999999",
            "18446744073709551615K",
        ] {
            let e = parse_size("memory", bad).unwrap_err();
            assert_eq!(e.option, "memory");
            assert_eq!(e.value, bad);
        }
    }

    #[test]
    fn cpus() {
        assert_eq!(parse_cpus("boot=4").unwrap().boot_vcpus, 4);
        assert_eq!(parse_cpus("boot=2,max=2").unwrap().max_vcpus, 2);
        let e = parse_cpus("boot=0").unwrap_err();
        assert!(e.to_string().contains("--cpus \"boot=0\""), "{e}");
        assert!(parse_cpus("boot=four")
            .unwrap_err()
            .reason
            .contains("boot=four"));
        assert!(parse_cpus("boot=2,max=4").is_err());
        assert!(parse_cpus("boot=255").is_err());
        assert!(parse_cpus("bogus=1").unwrap_err().reason.contains("bogus"));
        assert!(parse_cpus("boot=1,boot=2").is_err());
    }

    #[test]
    fn memory() {
        assert_eq!(parse_memory("size=512M").unwrap().size, 512 << 20);
        assert_eq!(parse_memory("size=1G").unwrap().size, 1 << 30);
        assert!(parse_memory("size=1M").is_err(), "below the minimum");
        assert!(parse_memory("size=1000").is_err());
        assert!(parse_memory("512M").is_err(), "needs size=");
        let e = parse_memory("size=lots").unwrap_err();
        assert_eq!((e.option, e.value.as_str()), ("memory", "lots"));
    }

    #[test]
    fn serial() {
        assert_eq!(parse_serial("tty").unwrap(), SerialOutput::Tty);
        assert_eq!(parse_serial("off").unwrap(), SerialOutput::Off);
        assert_eq!(
            parse_serial("file=/tmp/s.log").unwrap(),
            SerialOutput::File("/tmp/s.log".into())
        );
        assert!(parse_serial("file=").is_err());
        assert!(parse_serial("pty").unwrap_err().to_string().contains("pty"));
    }

    #[test]
    fn api_socket() {
        assert_eq!(
            parse_api_socket("path=/tmp/a.sock").unwrap(),
            PathBuf::from("/tmp/a.sock")
        );
        assert_eq!(
            parse_api_socket("/tmp/b.sock").unwrap(),
            PathBuf::from("/tmp/b.sock")
        );
        assert!(parse_api_socket("").is_err());
        assert!(parse_api_socket("path=").is_err());
        assert!(parse_api_socket("fd=3").is_err());
        assert!(parse_api_socket("path=/a,bogus=1").is_err());
    }

    #[test]
    fn clock_policy() {
        assert_eq!(parse_clock_policy("frozen").unwrap(), ClockPolicy::Frozen);
        assert_eq!(
            parse_clock_policy("wallclock").unwrap(),
            ClockPolicy::Wallclock
        );
        assert_eq!(
            parse_clock_policy("Wallclock").unwrap_err().to_string(),
            "--clock-policy \"Wallclock\": clock policy: `Wallclock` is not one of wallclock, frozen"
        );
        assert!(parse_clock_policy(" frozen").is_err());
    }

    #[test]
    fn payload_options_name_the_flag() {
        assert_eq!(parse_kernel("/k").unwrap(), PathBuf::from("/k"));
        let e = parse_kernel("").unwrap_err();
        assert_eq!(e.to_string(), "--kernel \"\": empty path");
        let e = parse_initramfs("").unwrap_err();
        assert!(e.to_string().starts_with("--initramfs "), "{e}");
        assert_eq!(parse_cmdline("console=ttyS0").unwrap(), "console=ttyS0");
        assert_eq!(parse_cmdline("").unwrap(), "");
        let e = parse_cmdline(&"x".repeat(70_000)).unwrap_err();
        assert!(e.to_string().starts_with("--cmdline \"xxx"), "{e}");
        assert!(e.reason.contains("70000 bytes"), "{e}");
        assert!(parse_cmdline("a\0b")
            .unwrap_err()
            .to_string()
            .contains("NUL"));
    }

    #[test]
    fn old_configs_decode_without_the_payload_fields() {
        let mut v = serde_json::to_value(VmConfig::default()).unwrap();
        let o = v.as_object_mut().unwrap();
        o.remove("initramfs");
        o.remove("cmdline");
        let c: VmConfig = serde_json::from_value(v).unwrap();
        assert_eq!(c, VmConfig::default());
    }

    #[test]
    fn arbitrary_input_never_panics() {
        let samples = [
            "\"",
            "[",
            "]",
            ",,,",
            "boot=\"1,2\"",
            "size=[1",
            "=",
            "é",
            "\0",
        ];
        for s in samples {
            let _ = parse_cpus(s);
            let _ = parse_memory(s);
            let _ = parse_serial(s);
            let _ = parse_api_socket(s);
            let _ = parse_clock_policy(s);
            let _ = parse_kernel(s);
            let _ = parse_initramfs(s);
            let _ = parse_cmdline(s);
            let _ = parse_size("x", s);
        }
    }
}

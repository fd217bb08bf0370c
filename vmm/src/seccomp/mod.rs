//! Per-thread seccomp filters (Cloud Hypervisor's `--seccomp true|false|log`).
//!
//! Each thread kind ([`ThreadKind`]) has its own allow list, written below as data: one
//! function per kind returns the system calls it may make, and for `ioctl` the exact request
//! numbers (the KVM ioctls that kind issues, matched on the request argument, never "any
//! ioctl"). A thread installs its kind's filter first thing ([`apply`], or [`enter`] for the
//! mode the process chose with [`set_mode`]).
//!
//! # Inheritance
//!
//! A seccomp filter belongs to a thread and is inherited by every thread it spawns; a thread
//! that installs its own filter on top is then bound by both (the intersection). So a kind's
//! list must hold everything the threads it spawns need before they install their own:
//!
//! - the control thread (the main thread of `hourglass`) spawns vCPU threads (boot, restore),
//!   the migration sender and receiver threads, the `vm-events` forwarder and the `stdin`
//!   thread, so its list is the union of its own needs and those of [`ThreadKind::Vcpu`],
//!   [`ThreadKind::MigrationSend`], [`ThreadKind::MigrationRecv`], [`ThreadKind::Signal`] and
//!   [`ThreadKind::Stdin`];
//! - the migration receiver spawns the received VM's vCPU threads, its `vm-events` forwarder and
//!   (the first VM with a terminal console) the `stdin` thread: its list includes
//!   [`ThreadKind::Vcpu`]'s, [`ThreadKind::Signal`]'s and [`ThreadKind::Stdin`]'s;
//! - the API accept thread spawns connection threads of its own kind (nothing more: API
//!   connection threads only speak HTTP and hand each request to the control thread);
//! - vCPU, migration sender, signal and stdin threads spawn nothing.
//!
//! [`union_is_closed`] checks these inclusions, and a unit test runs it.
//!
//! # Violations
//!
//! Under [`SeccompMode::Trap`] (`--seccomp true`) a syscall outside the filter raises SIGSYS;
//! the handler [`install_sigsys_handler`] installs writes `hourglass: seccomp: thread <name>
//! made syscall <nr>` (and the ioctl request for an ioctl) to stderr with async-signal-safe
//! writes, then ends the process with SIGSYS. Under [`SeccompMode::Log`] the kernel allows the
//! call and logs it (SECCOMP_RET_LOG, in the kernel log where audit records are printed).
//!
//! # Test hook
//!
//! `HOURGLASS_SECCOMP_SELFTEST=<kind>` (read once by [`set_mode`]; kind names as in
//! [`ThreadKind::name`]) makes the first thread of that kind, right after installing its
//! filter, issue one `sysinfo(2)`, a harmless call that no filter allows, and then carry on.
//! It exists for the integration tests (tests/tests/vmm_seccomp.rs).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter};

mod rules;
mod sigsys;
#[cfg(test)]
mod tests;

pub use rules::{
    api_rules, control_rules, migration_recv_rules, migration_send_rules, signal_rules,
    stdin_rules, vcpu_rules, KindRules,
};
pub use sigsys::install_sigsys_handler;
use sigsys::remember_thread_name;

/// What a syscall outside a thread's filter does (`--seccomp`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeccompMode {
    /// `false`: no filters are installed.
    Off,
    /// `true` (the default): the call raises SIGSYS and the process ends.
    Trap,
    /// `log`: the call is allowed and the kernel logs it.
    Log,
}

impl std::str::FromStr for SeccompMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "true" => Ok(Self::Trap),
            "false" => Ok(Self::Off),
            "log" => Ok(Self::Log),
            other => Err(format!(
                "invalid seccomp mode {other:?}: expected true, false or log"
            )),
        }
    }
}

/// The kinds of threads, each with its own filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum ThreadKind {
    /// A vCPU thread (`KVM_RUN`, the devices it emulates, parking for a pause).
    Vcpu,
    /// The API accept thread and the API connection threads (HTTP only).
    Api,
    /// The VMM control thread (`hourglass`'s main thread): runs every API request.
    Control,
    /// The thread that runs `vm.send-migration`.
    MigrationSend,
    /// The thread that runs `vm.receive-migration`.
    MigrationRecv,
    /// The signal thread and the small event forwarders (`vm-events`).
    Signal,
    /// The thread that reads the VMM's standard input into the serial port (`--serial tty`).
    Stdin,
}

impl ThreadKind {
    /// Every kind.
    pub const ALL: [ThreadKind; 7] = [
        Self::Vcpu,
        Self::Api,
        Self::Control,
        Self::MigrationSend,
        Self::MigrationRecv,
        Self::Signal,
        Self::Stdin,
    ];

    /// The kind's name (as `HOURGLASS_SECCOMP_SELFTEST` spells it).
    pub fn name(self) -> &'static str {
        match self {
            Self::Vcpu => "vcpu",
            Self::Api => "api",
            Self::Control => "control",
            Self::MigrationSend => "migration-send",
            Self::MigrationRecv => "migration-recv",
            Self::Signal => "signal",
            Self::Stdin => "stdin",
        }
    }

    /// The kind named `name`.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.name() == name)
    }

    /// The kinds whose threads this kind spawns (see the module documentation).
    pub fn spawns(self) -> &'static [ThreadKind] {
        match self {
            Self::Control => &[
                Self::Vcpu,
                Self::MigrationSend,
                Self::MigrationRecv,
                Self::Signal,
                Self::Api,
                Self::Stdin,
            ],
            Self::MigrationRecv => &[Self::Vcpu, Self::Signal, Self::Stdin],
            Self::Api => &[Self::Api],
            Self::Vcpu | Self::MigrationSend | Self::Signal | Self::Stdin => &[],
        }
    }

    /// The kind's allow list.
    pub fn rules(self) -> KindRules {
        match self {
            Self::Vcpu => vcpu_rules(),
            Self::Api => api_rules(),
            Self::Control => control_rules(),
            Self::MigrationSend => migration_send_rules(),
            Self::MigrationRecv => migration_recv_rules(),
            Self::Signal => signal_rules(),
            Self::Stdin => stdin_rules(),
        }
    }
}

/// Why a filter could not be built or installed.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// seccompiler refused the rule table.
    #[error("cannot build the {kind} seccomp filter: {source}")]
    Build {
        /// The thread kind.
        kind: &'static str,
        /// Why.
        #[source]
        source: seccompiler::BackendError,
    },
    /// This build's architecture is not one seccompiler knows.
    #[error("seccomp: unsupported architecture {0}")]
    Arch(&'static str),
    /// The kernel refused the filter.
    #[error("cannot install the {kind} seccomp filter: {source}")]
    Install {
        /// The thread kind.
        kind: &'static str,
        /// Why.
        #[source]
        source: seccompiler::Error,
    },
    /// The SIGSYS handler could not be installed.
    #[error("cannot install the SIGSYS handler: {0}")]
    Handler(#[source] std::io::Error),
}

/// Whether every kind's list includes the lists of the kinds it spawns (the inheritance rule of
/// the module documentation); the first offending pair otherwise.
pub fn union_is_closed() -> Result<(), (ThreadKind, ThreadKind)> {
    for k in ThreadKind::ALL {
        let rules = k.rules();
        for &child in k.spawns() {
            if !rules.includes(&child.rules()) {
                return Err((k, child));
            }
        }
    }
    Ok(())
}

/// The syscall the test hook issues: outside every filter.
pub const SELFTEST_SYSCALL: i64 = libc::SYS_sysinfo;

struct Config {
    mode: SeccompMode,
    selftest: Option<ThreadKind>,
}

static CONFIG: OnceLock<Config> = OnceLock::new();
static SELFTEST_DONE: AtomicBool = AtomicBool::new(false);

/// Set the process-wide mode that [`enter`] applies (once; `hourglass`'s main does it). Also
/// reads the `HOURGLASS_SECCOMP_SELFTEST` test hook. Library users that never call this get
/// no filters. Returns false if a mode was already set.
pub fn set_mode(mode: SeccompMode) -> bool {
    let selftest = std::env::var("HOURGLASS_SECCOMP_SELFTEST")
        .ok()
        .and_then(|s| ThreadKind::from_name(&s));
    CONFIG.set(Config { mode, selftest }).is_ok()
}

/// The mode [`set_mode`] set, if any.
pub fn mode() -> Option<SeccompMode> {
    CONFIG.get().map(|c| c.mode)
}

/// Install `kind`'s filter on the calling thread under `mode` (nothing for
/// [`SeccompMode::Off`]).
pub fn apply(kind: ThreadKind, mode: SeccompMode) -> Result<(), SeccompError> {
    remember_thread_name(kind);
    let mismatch = match mode {
        SeccompMode::Off => return Ok(()),
        SeccompMode::Trap => SeccompAction::Trap,
        SeccompMode::Log => SeccompAction::Log,
    };
    let rules = kind.rules();
    let install = |filter: SeccompFilter| {
        let bpf: BpfProgram = filter.try_into().map_err(|source| SeccompError::Build {
            kind: kind.name(),
            source,
        })?;
        seccompiler::apply_filter(&bpf).map_err(|source| SeccompError::Install {
            kind: kind.name(),
            source,
        })
    };
    if let Some(refusal) = rules.refusal_filter(kind)? {
        install(refusal)?;
    }
    install(rules.filter(kind, mismatch)?)
}

/// Install `kind`'s filter under the process-wide mode ([`set_mode`]; none if unset), then run
/// the test hook. A thread that cannot install its filter must not run unfiltered: the process
/// ends with an error message.
pub fn enter(kind: ThreadKind) {
    let Some(cfg) = CONFIG.get() else {
        return;
    };
    if let Err(e) = apply(kind, cfg.mode) {
        eprintln!("hourglass: {e}");
        std::process::exit(1);
    }
    if cfg.selftest == Some(kind) && !SELFTEST_DONE.swap(true, Ordering::SeqCst) {
        let mut info = std::mem::MaybeUninit::<libc::sysinfo>::uninit();
        // SAFETY: sysinfo(2) writes one `struct sysinfo` into the buffer, which is exactly that
        // size and lives across the call. The test hook issues it only to trip the filter.
        let r = unsafe { libc::syscall(SELFTEST_SYSCALL, info.as_mut_ptr()) };
        log::warn!(
            "seccomp self-test: {} thread issued sysinfo (returned {r})",
            kind.name()
        );
    }
}

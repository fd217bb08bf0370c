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
//!   the migration sender and receiver threads and the `vm-events` forwarder, so its list is the
//!   union of its own needs and those of [`ThreadKind::Vcpu`], [`ThreadKind::MigrationSend`],
//!   [`ThreadKind::MigrationRecv`] and [`ThreadKind::Signal`];
//! - the migration receiver spawns the received VM's vCPU threads and its `vm-events` forwarder:
//!   its list includes [`ThreadKind::Vcpu`]'s and [`ThreadKind::Signal`]'s;
//! - the API accept thread spawns connection threads of its own kind (nothing more: API
//!   connection threads only speak HTTP and hand each request to the control thread);
//! - vCPU, migration sender and signal threads spawn nothing.
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

use std::cell::Cell;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

use libc::{c_int, c_void, siginfo_t};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

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
}

impl ThreadKind {
    /// Every kind.
    pub const ALL: [ThreadKind; 6] = [
        Self::Vcpu,
        Self::Api,
        Self::Control,
        Self::MigrationSend,
        Self::MigrationRecv,
        Self::Signal,
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
            ],
            Self::MigrationRecv => &[Self::Vcpu, Self::Signal],
            Self::Api => &[Self::Api],
            Self::Vcpu | Self::MigrationSend | Self::Signal => &[],
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

/// A kind's allow list: plain syscalls, and the ioctl requests allowed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KindRules {
    /// Syscall numbers allowed with any arguments.
    pub syscalls: Vec<i64>,
    /// `ioctl` request numbers allowed (matched on the second argument), with their names.
    pub ioctls: Vec<(&'static str, u64)>,
    /// Syscalls answered with EACCES instead of being run or stopped: `open`/`openat` in the
    /// kinds that open no files, because glibc opens files of its own at arbitrary moments in
    /// any thread (/proc/sys/vm/overcommit_memory the first time a heap shrinks,
    /// /sys/devices/system/cpu/online when it first counts arenas) and copes with a refusal.
    /// Installed as a second filter, so it binds the threads of this kind and those they spawn.
    pub refused: Vec<i64>,
}

impl KindRules {
    /// The union of both allow lists (`other`'s refusals are not carried over: a kind that
    /// spawns another allows at least what the other allows).
    fn with(mut self, other: KindRules) -> Self {
        self.syscalls.extend(other.syscalls);
        self.ioctls.extend(other.ioctls);
        self.syscalls.sort_unstable();
        self.syscalls.dedup();
        self.ioctls.sort_unstable_by_key(|&(_, nr)| nr);
        self.ioctls.dedup_by_key(|&mut (_, nr)| nr);
        self
    }

    fn sys(mut self, calls: &[i64]) -> Self {
        self.syscalls.extend_from_slice(calls);
        self.with(KindRules::default())
    }

    fn io(mut self, ioctls: &[(&'static str, u64)]) -> Self {
        self.ioctls.extend_from_slice(ioctls);
        self.with(KindRules::default())
    }

    /// Whether `nr` is allowed (with any arguments, or as an ioctl at all).
    pub fn allows_syscall(&self, nr: i64) -> bool {
        self.syscalls.contains(&nr) || (nr == libc::SYS_ioctl && !self.ioctls.is_empty())
    }

    fn refuse(mut self, calls: &[i64]) -> Self {
        self.refused.extend_from_slice(calls);
        self.refused.sort_unstable();
        self.refused.dedup();
        self
    }

    /// Whether a thread with these rules can spawn one with `other`'s: every syscall and ioctl
    /// `other` allows is allowed here, and what is refused here is refused there too.
    pub fn includes(&self, other: &KindRules) -> bool {
        self.refused.iter().all(|s| other.refused.contains(s))
            && other.syscalls.iter().all(|s| self.syscalls.contains(s))
            && other
                .ioctls
                .iter()
                .all(|(_, nr)| self.ioctls.iter().any(|(_, n)| n == nr))
    }

    /// The seccompiler filter: `mismatch` for anything not listed.
    pub fn filter(
        &self,
        kind: ThreadKind,
        mismatch: SeccompAction,
    ) -> Result<SeccompFilter, SeccompError> {
        let build = |source| SeccompError::Build {
            kind: kind.name(),
            source,
        };
        let mut map: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
        // The refused calls pass this filter; the refusal filter answers them.
        for &s in self.syscalls.iter().chain(&self.refused) {
            map.insert(s, vec![]);
        }
        if !self.ioctls.is_empty() {
            let mut rules = Vec::with_capacity(self.ioctls.len());
            for &(_, nr) in &self.ioctls {
                let cond = SeccompCondition::new(1, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, nr)
                    .map_err(build)?;
                rules.push(SeccompRule::new(vec![cond]).map_err(build)?);
            }
            map.insert(libc::SYS_ioctl, rules);
        }
        let arch = TargetArch::try_from(std::env::consts::ARCH)
            .map_err(|_| SeccompError::Arch(std::env::consts::ARCH))?;
        SeccompFilter::new(map, mismatch, SeccompAction::Allow, arch).map_err(build)
    }

    /// The filter that answers [`Self::refused`] with EACCES (None if nothing is refused).
    pub fn refusal_filter(&self, kind: ThreadKind) -> Result<Option<SeccompFilter>, SeccompError> {
        if self.refused.is_empty() {
            return Ok(None);
        }
        let map = self.refused.iter().map(|&s| (s, vec![])).collect();
        let arch = TargetArch::try_from(std::env::consts::ARCH)
            .map_err(|_| SeccompError::Arch(std::env::consts::ARCH))?;
        SeccompFilter::new(
            map,
            SeccompAction::Allow,
            SeccompAction::Errno(libc::EACCES as u32),
            arch,
        )
        .map(Some)
        .map_err(|source| SeccompError::Build {
            kind: kind.name(),
            source,
        })
    }
}

/// `open` and `openat`, refused (EACCES) in the kinds that open no files.
const OPEN_CALLS: &[i64] = &[libc::SYS_open, libc::SYS_openat];

/// The KVM ioctl request numbers (include/uapi/linux/kvm.h), built with vmm-sys-util's macros
/// from kvm-bindings' types, so they match what kvm-ioctls issues. Each function returns the
/// request number of the ioctl it is named after.
#[allow(missing_docs)]
pub mod kvm_ioctls {
    use kvm_bindings::*;
    use vmm_sys_util::{ioctl_io_nr, ioctl_ior_nr, ioctl_iow_nr, ioctl_iowr_nr};

    // /dev/kvm
    ioctl_io_nr!(KVM_GET_API_VERSION, KVMIO, 0x00);
    ioctl_io_nr!(KVM_CREATE_VM, KVMIO, 0x01);
    ioctl_iowr_nr!(KVM_GET_MSR_INDEX_LIST, KVMIO, 0x02, kvm_msr_list);
    ioctl_io_nr!(KVM_CHECK_EXTENSION, KVMIO, 0x03);
    ioctl_io_nr!(KVM_GET_VCPU_MMAP_SIZE, KVMIO, 0x04);
    ioctl_iowr_nr!(KVM_GET_SUPPORTED_CPUID, KVMIO, 0x05, kvm_cpuid2);
    ioctl_iowr_nr!(KVM_GET_MSR_FEATURE_INDEX_LIST, KVMIO, 0x0a, kvm_msr_list);
    // VM
    ioctl_io_nr!(KVM_CREATE_VCPU, KVMIO, 0x41);
    ioctl_iow_nr!(KVM_GET_DIRTY_LOG, KVMIO, 0x42, kvm_dirty_log);
    ioctl_iow_nr!(
        KVM_SET_USER_MEMORY_REGION,
        KVMIO,
        0x46,
        kvm_userspace_memory_region
    );
    ioctl_io_nr!(KVM_SET_TSS_ADDR, KVMIO, 0x47);
    ioctl_iow_nr!(KVM_SET_IDENTITY_MAP_ADDR, KVMIO, 0x48, u64);
    ioctl_io_nr!(KVM_CREATE_IRQCHIP, KVMIO, 0x60);
    ioctl_iow_nr!(KVM_SET_CLOCK, KVMIO, 0x7b, kvm_clock_data);
    ioctl_ior_nr!(KVM_GET_CLOCK, KVMIO, 0x7c, kvm_clock_data);
    ioctl_iow_nr!(KVM_ENABLE_CAP, KVMIO, 0xa3, kvm_enable_cap);
    // vCPU
    ioctl_io_nr!(KVM_RUN, KVMIO, 0x80);
    ioctl_ior_nr!(KVM_GET_REGS, KVMIO, 0x81, kvm_regs);
    ioctl_iow_nr!(KVM_SET_REGS, KVMIO, 0x82, kvm_regs);
    ioctl_ior_nr!(KVM_GET_SREGS, KVMIO, 0x83, kvm_sregs);
    ioctl_iow_nr!(KVM_SET_SREGS, KVMIO, 0x84, kvm_sregs);
    ioctl_iowr_nr!(KVM_GET_MSRS, KVMIO, 0x88, kvm_msrs);
    ioctl_iow_nr!(KVM_SET_MSRS, KVMIO, 0x89, kvm_msrs);
    ioctl_ior_nr!(KVM_GET_LAPIC, KVMIO, 0x8e, kvm_lapic_state);
    ioctl_iow_nr!(KVM_SET_LAPIC, KVMIO, 0x8f, kvm_lapic_state);
    ioctl_iow_nr!(KVM_SET_CPUID2, KVMIO, 0x90, kvm_cpuid2);
    ioctl_ior_nr!(KVM_GET_MP_STATE, KVMIO, 0x98, kvm_mp_state);
    ioctl_iow_nr!(KVM_SET_MP_STATE, KVMIO, 0x99, kvm_mp_state);
    ioctl_ior_nr!(KVM_GET_VCPU_EVENTS, KVMIO, 0x9f, kvm_vcpu_events);
    ioctl_iow_nr!(KVM_SET_VCPU_EVENTS, KVMIO, 0xa0, kvm_vcpu_events);
    ioctl_io_nr!(KVM_SET_TSC_KHZ, KVMIO, 0xa2);
    ioctl_io_nr!(KVM_GET_TSC_KHZ, KVMIO, 0xa3);
    ioctl_ior_nr!(KVM_GET_XSAVE, KVMIO, 0xa4, kvm_xsave);
    ioctl_iow_nr!(KVM_SET_XSAVE, KVMIO, 0xa5, kvm_xsave);
    ioctl_ior_nr!(KVM_GET_XCRS, KVMIO, 0xa6, kvm_xcrs);
    ioctl_iow_nr!(KVM_SET_XCRS, KVMIO, 0xa7, kvm_xcrs);
    ioctl_io_nr!(KVM_KVMCLOCK_CTRL, KVMIO, 0xad);
    ioctl_iowr_nr!(KVM_GET_NESTED_STATE, KVMIO, 0xbe, kvm_nested_state);
    ioctl_iow_nr!(KVM_SET_NESTED_STATE, KVMIO, 0xbf, kvm_nested_state);
    ioctl_ior_nr!(KVM_GET_XSAVE2, KVMIO, 0xcf, kvm_xsave);
    ioctl_iow_nr!(KVM_SET_DEVICE_ATTR, KVMIO, 0xe1, kvm_device_attr);
    ioctl_iow_nr!(KVM_GET_DEVICE_ATTR, KVMIO, 0xe2, kvm_device_attr);
    ioctl_iow_nr!(KVM_HAS_DEVICE_ATTR, KVMIO, 0xe3, kvm_device_attr);
}

macro_rules! ioctl_list {
    ($($name:ident),* $(,)?) => {
        &[$((stringify!($name), u64::from(kvm_ioctls::$name()))),*]
    };
}

/// Terminal ioctls of the control thread (is stderr a terminal, for the logger's colours).
const TTY_IOCTLS: &[(&str, u64)] = &[("TCGETS", libc::TCGETS), ("TIOCGWINSZ", libc::TIOCGWINSZ)];

/// What every thread needs: memory, locks and sleeps, time, thread exit, and the calls the
/// SIGSYS handler and the logger make (write to stderr, reset and raise the signal).
fn base_rules() -> KindRules {
    use libc::*;
    KindRules::default().sys(&[
        SYS_brk,
        SYS_mmap,
        SYS_munmap,
        SYS_mprotect,
        SYS_madvise,
        SYS_mremap,
        SYS_futex,
        SYS_sched_yield,
        SYS_nanosleep,
        SYS_clock_nanosleep,
        SYS_clock_gettime,
        SYS_gettimeofday,
        SYS_getrandom,
        SYS_rt_sigaction,
        SYS_rt_sigprocmask,
        SYS_rt_sigreturn,
        SYS_sigaltstack,
        SYS_tgkill,
        SYS_getpid,
        SYS_gettid,
        SYS_write,
        SYS_writev,
        SYS_close,
        SYS_fcntl,
        SYS_exit,
        SYS_exit_group,
        SYS_sched_getaffinity,
        SYS_sched_getattr,
        SYS_sched_setattr,
        // Installing the thread's own filter on top of the inherited one.
        SYS_seccomp,
        SYS_prctl,
    ])
}

/// Starting a thread (for the kinds that spawn).
fn spawn_rules() -> KindRules {
    use libc::*;
    KindRules::default().sys(&[
        SYS_clone,
        SYS_clone3,
        SYS_set_robust_list,
        SYS_rseq,
        SYS_prctl,
        SYS_getrlimit,
        SYS_prlimit64,
    ])
}

/// A vCPU thread: `KVM_RUN`, what it reads as it parks for a pause (its TSC offset attribute
/// and IA32_TSC_ADJUST, then `KVM_KVMCLOCK_CTRL`), and the devices it emulates (serial output
/// written to a tty or file, the time-probe device in guest memory). It spawns nothing.
pub fn vcpu_rules() -> KindRules {
    use libc::*;
    base_rules()
        .sys(&[SYS_read])
        .io(ioctl_list![
            KVM_RUN,
            KVM_KVMCLOCK_CTRL,
            KVM_GET_MSRS,
            KVM_HAS_DEVICE_ATTR,
            KVM_GET_DEVICE_ATTR,
        ])
        .refuse(OPEN_CALLS)
}

/// The API accept and connection threads: accept, read the request, hand it to the control
/// thread, write the answer. The accept thread spawns connection threads (this kind).
pub fn api_rules() -> KindRules {
    use libc::*;
    base_rules()
        .with(spawn_rules())
        .sys(&[
            SYS_accept,
            SYS_accept4,
            SYS_read,
            SYS_readv,
            SYS_recvfrom,
            SYS_recvmsg,
            SYS_sendto,
            SYS_sendmsg,
            SYS_setsockopt,
            SYS_getsockopt,
            SYS_getsockname,
            SYS_getpeername,
            SYS_shutdown,
            SYS_poll,
            SYS_ppoll,
            SYS_fcntl,
        ])
        .refuse(OPEN_CALLS)
}

/// The signal thread and the event forwarders: read the eventfd the SIGINT/SIGTERM handler
/// writes, pass events on. They spawn nothing.
pub fn signal_rules() -> KindRules {
    use libc::*;
    base_rules()
        .sys(&[SYS_read, SYS_poll, SYS_ppoll])
        .refuse(OPEN_CALLS)
}

/// Sockets of a migration (either end; `unix:` and `tcp:`).
fn socket_rules() -> KindRules {
    use libc::*;
    KindRules::default().sys(&[
        SYS_socket,
        SYS_connect,
        SYS_bind,
        SYS_listen,
        SYS_accept,
        SYS_accept4,
        SYS_read,
        SYS_readv,
        SYS_recvfrom,
        SYS_recvmsg,
        SYS_sendto,
        SYS_sendmsg,
        SYS_setsockopt,
        SYS_getsockopt,
        SYS_getsockname,
        SYS_getpeername,
        SYS_shutdown,
        SYS_poll,
        SYS_ppoll,
        SYS_fcntl,
        SYS_unlink,
        SYS_unlinkat,
        SYS_newfstatat,
        SYS_statx,
        SYS_fstat,
        SYS_socketpair,
    ])
}

/// The vCPU state a paused VM's snapshot or migration reads (the TSC and clock ones included).
fn state_get_ioctls() -> KindRules {
    KindRules::default().io(ioctl_list![
        KVM_GET_REGS,
        KVM_GET_SREGS,
        KVM_GET_MSRS,
        KVM_GET_LAPIC,
        KVM_GET_MP_STATE,
        KVM_GET_VCPU_EVENTS,
        KVM_GET_XSAVE,
        KVM_GET_XSAVE2,
        KVM_GET_XCRS,
        KVM_GET_NESTED_STATE,
        KVM_GET_TSC_KHZ,
        KVM_GET_CLOCK,
        KVM_SET_CLOCK,
        KVM_SET_MSRS,
        KVM_KVMCLOCK_CTRL,
        KVM_HAS_DEVICE_ATTR,
        KVM_GET_DEVICE_ATTR,
        KVM_SET_DEVICE_ATTR,
        KVM_CHECK_EXTENSION,
    ])
}

/// Everything that creates a VM and puts state into it (boot, restore, a received migration).
fn create_ioctls() -> KindRules {
    KindRules::default().io(ioctl_list![
        KVM_GET_API_VERSION,
        KVM_CREATE_VM,
        KVM_GET_MSR_INDEX_LIST,
        KVM_GET_MSR_FEATURE_INDEX_LIST,
        KVM_CHECK_EXTENSION,
        KVM_GET_VCPU_MMAP_SIZE,
        KVM_GET_SUPPORTED_CPUID,
        KVM_CREATE_VCPU,
        KVM_SET_USER_MEMORY_REGION,
        KVM_SET_TSS_ADDR,
        KVM_SET_IDENTITY_MAP_ADDR,
        KVM_CREATE_IRQCHIP,
        KVM_ENABLE_CAP,
        KVM_SET_CPUID2,
        KVM_SET_REGS,
        KVM_SET_SREGS,
        KVM_SET_MSRS,
        KVM_SET_LAPIC,
        KVM_SET_MP_STATE,
        KVM_SET_VCPU_EVENTS,
        KVM_SET_XSAVE,
        KVM_SET_XCRS,
        KVM_SET_NESTED_STATE,
        KVM_SET_TSC_KHZ,
        KVM_GET_TSC_KHZ,
        KVM_GET_CLOCK,
        KVM_SET_CLOCK,
        KVM_KVMCLOCK_CTRL,
        KVM_HAS_DEVICE_ATTR,
        KVM_GET_DEVICE_ATTR,
        KVM_SET_DEVICE_ATTR,
        KVM_GET_MSRS,
    ])
}

/// The migration sender: pre-copy with dirty logging, pause, the vCPU and clock state, the
/// socket; on failure it resumes the VM (time thawed: KVM_SET_CLOCK, TSC offsets, MSRs). It
/// spawns nothing.
pub fn migration_send_rules() -> KindRules {
    base_rules()
        .with(socket_rules())
        .with(state_get_ioctls())
        .io(ioctl_list![KVM_GET_DIRTY_LOG, KVM_SET_USER_MEMORY_REGION])
        .refuse(OPEN_CALLS)
}

/// The migration receiver: listens, builds the VM from the frames (guest RAM, vCPUs, state),
/// thaws its time. It spawns the received VM's vCPU threads and `vm-events` forwarder, so it
/// includes [`vcpu_rules`] and [`signal_rules`].
pub fn migration_recv_rules() -> KindRules {
    use libc::*;
    base_rules()
        .with(spawn_rules())
        .with(socket_rules())
        .with(vcpu_rules())
        .with(signal_rules())
        .sys(&[
            SYS_openat,
            SYS_open,
            SYS_eventfd2,
            SYS_memfd_create,
            SYS_ftruncate,
        ])
        .with(create_ioctls())
}

/// The control thread (`hourglass`'s main thread): boots or restores the VM, runs every API
/// request (pause and resume with their time freeze and thaw, snapshot files, shutdown), and
/// spawns the vCPU, migration and forwarder threads, so it includes [`vcpu_rules`],
/// [`migration_send_rules`], [`migration_recv_rules`] and [`signal_rules`].
pub fn control_rules() -> KindRules {
    use libc::*;
    base_rules()
        .with(spawn_rules())
        .with(vcpu_rules())
        .with(migration_send_rules())
        .with(migration_recv_rules())
        .with(signal_rules())
        .with(api_rules())
        .sys(&[
            SYS_openat,
            SYS_open,
            SYS_read,
            SYS_pread64,
            SYS_pwrite64,
            SYS_lseek,
            SYS_fstat,
            SYS_newfstatat,
            SYS_statx,
            SYS_fsync,
            SYS_fdatasync,
            SYS_rename,
            SYS_renameat,
            SYS_renameat2,
            SYS_mkdir,
            SYS_mkdirat,
            SYS_rmdir,
            SYS_unlink,
            SYS_unlinkat,
            SYS_link,
            SYS_linkat,
            SYS_getdents64,
            SYS_ftruncate,
            SYS_fallocate,
            SYS_chmod,
            SYS_fchmod,
            SYS_fchmodat,
            SYS_getcwd,
            SYS_readlink,
            SYS_readlinkat,
            SYS_copy_file_range,
            SYS_sendfile,
            SYS_eventfd2,
            SYS_memfd_create,
            SYS_munlock,
            SYS_mlock,
            // Siblings a static glibc may use instead.
            SYS_stat,
            SYS_lstat,
            SYS_access,
            SYS_faccessat,
        ])
        .with(state_get_ioctls())
        .with(create_ioctls())
        .io(TTY_IOCTLS)
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

thread_local! {
    /// The thread's name for the SIGSYS report (fixed size: read from a signal handler).
    static THREAD_NAME: Cell<[u8; 16]> = const { Cell::new([0; 16]) };
}

fn remember_thread_name(kind: ThreadKind) {
    let mut buf = [0u8; 16];
    let cur = std::thread::current();
    let name = cur.name().unwrap_or(kind.name());
    let n = name.len().min(15);
    buf[..n].copy_from_slice(&name.as_bytes()[..n]);
    THREAD_NAME.with(|c| c.set(buf));
}

/// A fixed buffer that a signal handler can format into.
struct SigBuf {
    buf: [u8; 160],
    len: usize,
}

impl SigBuf {
    fn push(&mut self, s: &[u8]) {
        for &b in s {
            if self.len < self.buf.len() {
                self.buf[self.len] = b;
                self.len += 1;
            }
        }
    }

    fn push_dec(&mut self, mut v: u64) {
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        self.push(&digits[i..]);
    }

    fn push_hex(&mut self, mut v: u64) {
        let mut digits = [0u8; 16];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b"0123456789abcdef"[(v & 0xf) as usize];
            v >>= 4;
            if v == 0 {
                break;
            }
        }
        self.push(b"0x");
        self.push(&digits[i..]);
    }
}

/// Offset of `si_syscall` in a SIGSYS `siginfo_t` (x86_64: after signo, errno, code, padding
/// and `si_call_addr`).
const SI_SYSCALL_OFFSET: usize = 24;

extern "C" fn sigsys_handler(_: c_int, info: *mut siginfo_t, ctx: *mut c_void) {
    // SAFETY: the kernel passes a valid siginfo_t for SIGSYS (SA_SIGINFO); si_syscall is the
    // int at SI_SYSCALL_OFFSET of its union.
    let nr = unsafe {
        std::ptr::read_unaligned((info as *const u8).add(SI_SYSCALL_OFFSET).cast::<i32>())
    };
    let mut out = SigBuf {
        buf: [0; 160],
        len: 0,
    };
    out.push(b"hourglass: seccomp: thread ");
    let mut name = THREAD_NAME.with(|c| c.get());
    if name[0] == 0 {
        // A thread that did not install a filter itself (it runs under its spawner's): ask the
        // kernel for its name.
        // SAFETY: prctl(PR_GET_NAME) writes at most 16 bytes into `name`, which has 16.
        unsafe { libc::prctl(libc::PR_GET_NAME, name.as_mut_ptr()) };
    }
    let n = name.iter().position(|&b| b == 0).unwrap_or(name.len());
    out.push(if n == 0 { b"?" } else { &name[..n] });
    out.push(b" made syscall ");
    out.push_dec(u64::from(nr as u32));
    #[cfg(target_arch = "x86_64")]
    if i64::from(nr) == libc::SYS_ioctl && !ctx.is_null() {
        // SAFETY: with SA_SIGINFO the third argument is the interrupted context; RSI holds the
        // ioctl request.
        let req = unsafe {
            (*(ctx as *const libc::ucontext_t)).uc_mcontext.gregs[libc::REG_RSI as usize]
        };
        out.push(b" (ioctl request ");
        out.push_hex(req as u64 & 0xffff_ffff);
        out.push(b")");
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = ctx;
    out.push(b"\n");
    // SAFETY: write(2), signal(2), raise(3) and pthread_sigmask(3) are async-signal-safe; the
    // buffer is a live local. SIGSYS is reset to its default action (end the process), raised
    // (pending while the handler runs) and unblocked, so the process ends by SIGSYS.
    unsafe {
        libc::write(2, out.buf.as_ptr().cast(), out.len);
        libc::signal(libc::SIGSYS, libc::SIG_DFL);
        libc::raise(libc::SIGSYS);
        let mut set = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
        libc::sigemptyset(set.as_mut_ptr());
        libc::sigaddset(set.as_mut_ptr(), libc::SIGSYS);
        libc::pthread_sigmask(libc::SIG_UNBLOCK, set.as_ptr(), std::ptr::null_mut());
        libc::_exit(128 + libc::SIGSYS);
    }
}

/// Install the SIGSYS handler that reports a violation under [`SeccompMode::Trap`] (once, by
/// `hourglass`'s main thread, before any filter).
pub fn install_sigsys_handler() -> Result<(), SeccompError> {
    vmm_sys_util::signal::register_signal_handler(libc::SIGSYS, sigsys_handler)
        .map_err(|e| SeccompError::Handler(std::io::Error::from_raw_os_error(e.errno())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_parse_like_cloud_hypervisor() {
        assert_eq!("true".parse::<SeccompMode>(), Ok(SeccompMode::Trap));
        assert_eq!("false".parse::<SeccompMode>(), Ok(SeccompMode::Off));
        assert_eq!("log".parse::<SeccompMode>(), Ok(SeccompMode::Log));
        let e = "bogus".parse::<SeccompMode>().unwrap_err();
        assert!(e.contains("\"bogus\""), "{e}");
    }

    #[test]
    fn spawners_include_what_they_spawn() {
        assert_eq!(union_is_closed(), Ok(()));
        for k in ThreadKind::ALL {
            let r = k.rules();
            println!(
                "{}: {} syscalls, {} ioctl requests, {} refused",
                k.name(),
                r.syscalls.len(),
                r.ioctls.len(),
                r.refused.len()
            );
        }
        // And the check can fail: the vCPU list does not include the control list.
        assert!(!vcpu_rules().includes(&control_rules()));
    }

    #[test]
    fn file_opening_is_refused_only_where_no_file_is_opened() {
        for k in [
            ThreadKind::Vcpu,
            ThreadKind::Api,
            ThreadKind::Signal,
            ThreadKind::MigrationSend,
        ] {
            let r = k.rules();
            assert!(r.refused.contains(&libc::SYS_openat), "{k:?}");
            assert!(!r.syscalls.contains(&libc::SYS_openat), "{k:?}");
            assert!(r.refusal_filter(k).unwrap().is_some());
        }
        for k in [ThreadKind::Control, ThreadKind::MigrationRecv] {
            let r = k.rules();
            assert!(r.refused.is_empty(), "{k:?}");
            assert!(r.syscalls.contains(&libc::SYS_openat), "{k:?}");
            assert!(r.refusal_filter(k).unwrap().is_none());
        }
        // A spawner that refused opening could not spawn a kind that opens files.
        assert!(!vcpu_rules().includes(&migration_recv_rules()));
    }

    #[test]
    fn selftest_syscall_is_outside_every_filter() {
        for k in ThreadKind::ALL {
            assert!(!k.rules().allows_syscall(SELFTEST_SYSCALL), "{k:?}");
            assert_eq!(ThreadKind::from_name(k.name()), Some(k));
        }
    }

    #[test]
    fn ioctl_numbers_match_the_kernel_header() {
        // Values from include/uapi/linux/kvm.h on x86_64 (computed by hand from _IO* there).
        assert_eq!(kvm_ioctls::KVM_RUN(), 0xae80);
        assert_eq!(kvm_ioctls::KVM_GET_MSRS(), 0xc008_ae88);
        assert_eq!(kvm_ioctls::KVM_SET_MSRS(), 0x4008_ae89);
        assert_eq!(kvm_ioctls::KVM_SET_TSC_KHZ(), 0xaea2);
        assert_eq!(kvm_ioctls::KVM_GET_CLOCK(), 0x8030_ae7c);
        assert_eq!(kvm_ioctls::KVM_SET_CLOCK(), 0x4030_ae7b);
        assert_eq!(kvm_ioctls::KVM_KVMCLOCK_CTRL(), 0xaead);
        assert_eq!(kvm_ioctls::KVM_HAS_DEVICE_ATTR(), 0x4018_aee3);
    }

    #[test]
    fn ioctls_are_matched_on_the_request() {
        // Only vCPU ioctls for a vCPU thread: creating a VM is not among them.
        let v = vcpu_rules();
        let create = kvm_ioctls::KVM_CREATE_VM() as u64;
        assert!(!v.ioctls.iter().any(|&(_, nr)| nr == create));
        assert!(v.ioctls.iter().any(|&(_, nr)| nr == 0xae80));
        // Every filter compiles.
        for k in ThreadKind::ALL {
            let f = k.rules().filter(k, SeccompAction::Trap).unwrap();
            let bpf: BpfProgram = f.try_into().unwrap();
            assert!(!bpf.is_empty());
        }
    }
}

//! The allow lists, one function per thread kind, as data.

use std::collections::BTreeMap;

use seccompiler::{
    SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule,
    TargetArch,
};

use super::{SeccompError, ThreadKind};

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

/// What the thread that creates a VM with a terminal console (`--serial tty`) does to the
/// VMM's stdin the first time: is it a terminal, is this process in its foreground (`tcgetpgrp`
/// against `getpgrp`, which glibc may make as `getpgid(0)`), and raw mode (`tcgetattr`,
/// `tcsetattr`); the control thread restores the mode at exit.
fn console_setup_rules() -> KindRules {
    KindRules::default()
        .sys(&[libc::SYS_getpgrp, libc::SYS_getpgid])
        .io(&[
            ("TCGETS", libc::TCGETS),
            ("TCSETS", libc::TCSETS),
            ("TIOCGPGRP", libc::TIOCGPGRP),
        ])
}

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
        // What the kernel itself makes a thread call: after SIGSTOP/SIGCONT (Ctrl-Z and `fg`,
        // `strace -p`) an interrupted sleep is resumed through restart_syscall(2).
        SYS_restart_syscall,
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
/// and IA32_TSC_ADJUST, then `KVM_KVMCLOCK_CTRL`), its registers for the report of an exit
/// that ends the guest (`KVM_GET_REGS`: the rip of an internal error; with `KVM_GET_SREGS`,
/// where a shutdown left the vCPU, see `vcpu::shutdown`), and the devices it
/// emulates (serial output written to a tty or file, the time-probe device in guest memory).
/// It spawns nothing.
pub fn vcpu_rules() -> KindRules {
    use libc::*;
    base_rules()
        .sys(&[SYS_read])
        .io(ioctl_list![
            KVM_RUN,
            KVM_KVMCLOCK_CTRL,
            KVM_GET_REGS,
            KVM_GET_SREGS,
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

/// The stdin thread: reads the VMM's standard input and queues it for the serial port (blocking
/// on the device's queue while it is full, raising its interrupt through the eventfd). It
/// spawns nothing.
pub fn stdin_rules() -> KindRules {
    base_rules().sys(&[libc::SYS_read]).refuse(OPEN_CALLS)
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
        // Memory frames: guest pages gathered straight into the socket.
        SYS_writev,
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
    KindRules::default()
        .io(&[("KVM_GET_IRQCHIP", KVM_GET_IRQCHIP)])
        .io(ioctl_list![
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

/// An ioctl number of KVM's (`KVMIO`, 0xae): direction (1 write, 2 read, 3 both), number and
/// argument size, as `_IOC` builds it.
const fn kvm_ioc(dir: u64, nr: u64, size: usize) -> u64 {
    (dir << 30) | ((size as u64) << 16) | (0xae << 8) | nr
}

// Numbers kvm-ioctls keeps private.
/// `KVM_IRQFD`: `_IOW(KVMIO, 0x76, struct kvm_irqfd)`.
pub const KVM_IRQFD: u64 = kvm_ioc(1, 0x76, size_of::<kvm_bindings::kvm_irqfd>());
/// `KVM_GET_IRQCHIP`: `_IOWR(KVMIO, 0x62, struct kvm_irqchip)`.
pub const KVM_GET_IRQCHIP: u64 = kvm_ioc(3, 0x62, size_of::<kvm_bindings::kvm_irqchip>());
/// `KVM_SET_IRQCHIP`: `_IOR(KVMIO, 0x63, struct kvm_irqchip)`.
pub const KVM_SET_IRQCHIP: u64 = kvm_ioc(2, 0x63, size_of::<kvm_bindings::kvm_irqchip>());

/// Everything that creates a VM and puts state into it (boot, restore, a received migration):
/// and wires the devices' interrupts (`KVM_IRQFD`).
fn create_ioctls() -> KindRules {
    KindRules::default()
        .io(&[
            ("KVM_IRQFD", KVM_IRQFD),
            ("KVM_SET_IRQCHIP", KVM_SET_IRQCHIP),
        ])
        .io(ioctl_list![
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
            // Setting the CPUID reads and may seed XCR0 (the XSAVE area's size, see the KVM
            // backend's vCPU).
            KVM_GET_XCRS,
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

/// The migration sender: pre-copy with dirty logging (which pages hold data: `mincore` and
/// `pread` of files opened earlier), pause, the vCPU and clock state, the socket; on failure it resumes the VM (time thawed: KVM_SET_CLOCK, TSC offsets, MSRs). It
/// spawns nothing.
pub fn migration_send_rules() -> KindRules {
    base_rules()
        .with(socket_rules())
        .with(state_get_ioctls())
        .io(ioctl_list![KVM_GET_DIRTY_LOG, KVM_SET_USER_MEMORY_REGION])
        // Which guest pages were never populated (residency): the page tables, and
        // /proc/self/maps and pagemap opened beforehand by the control thread.
        .sys(&[libc::SYS_mincore, libc::SYS_pread64])
        .io(&[("PAGEMAP_SCAN", crate::residency::PAGEMAP_SCAN)])
        .refuse(OPEN_CALLS)
}

/// The migration receiver: listens, builds the VM from the frames (guest RAM, vCPUs, state),
/// thaws its time. It spawns the received VM's vCPU threads and `vm-events` forwarder, and the
/// stdin thread (with the terminal in raw mode) if it builds the first VM with a terminal
/// console, so it includes [`vcpu_rules`], [`signal_rules`] and [`stdin_rules`]. It fills
/// fresh guest RAM with `userfaultfd`'s copies ([`crate::fresh_ram`]).
pub fn migration_recv_rules() -> KindRules {
    use libc::*;
    base_rules()
        .with(spawn_rules())
        .with(socket_rules())
        .with(vcpu_rules())
        .with(signal_rules())
        .with(stdin_rules())
        .with(console_setup_rules())
        .sys(&[
            SYS_openat,
            SYS_open,
            SYS_eventfd2,
            SYS_memfd_create,
            SYS_ftruncate,
            // Fresh RAM: is it anonymous private (/proc/self/maps through crate::residency),
            // then userfaultfd's copies.
            SYS_pread64,
            SYS_userfaultfd,
        ])
        .io(crate::fresh_ram::IOCTLS)
        .with(create_ioctls())
}

/// The control thread (`hourglass`'s main thread): boots or restores the VM, runs every API
/// request (pause and resume with their time freeze and thaw, snapshot files, shutdown), and
/// spawns the vCPU, migration, forwarder and stdin threads, so it includes [`vcpu_rules`],
/// [`migration_send_rules`], [`migration_recv_rules`], [`signal_rules`] and [`stdin_rules`]. It
/// puts the terminal in raw mode for a terminal console and restores it at exit.
pub fn control_rules() -> KindRules {
    use libc::*;
    base_rules()
        .with(spawn_rules())
        .with(vcpu_rules())
        .with(migration_send_rules())
        .with(migration_recv_rules())
        .with(signal_rules())
        .with(api_rules())
        .with(stdin_rules())
        .with(console_setup_rules())
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

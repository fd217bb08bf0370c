use super::rules::*;
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
        ThreadKind::Stdin,
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
    // KVM_IRQFD as <linux/kvm.h> numbers it, allowed where VMs are assembled.
    assert_eq!(super::rules::KVM_IRQFD, 0x4020_ae76);
    assert_eq!(super::rules::KVM_GET_IRQCHIP, 0xc208_ae62);
    assert_eq!(super::rules::KVM_SET_IRQCHIP, 0x8208_ae63);
    // KVM_GET_REGS: the rip in the report of an internal-error exit.
    assert!(v.ioctls.iter().any(|&(_, nr)| nr == 0x8090_ae81));
    // KVM_GET_SREGS: with it, where a guest shutdown left the vCPU (vcpu::shutdown).
    assert!(v.ioctls.iter().any(|&(_, nr)| nr == 0x8138_ae83));
    // Every filter compiles.
    for k in ThreadKind::ALL {
        let f = k.rules().filter(k, SeccompAction::Trap).unwrap();
        let bpf: BpfProgram = f.try_into().unwrap();
        assert!(!bpf.is_empty());
    }
}

#[test]
fn every_kind_allows_what_the_kernel_injects_after_a_stop() {
    for k in ThreadKind::ALL {
        assert!(
            k.rules().allows_syscall(libc::SYS_restart_syscall),
            "{} thread would die on SIGSTOP/SIGCONT",
            k.name()
        );
    }
}

#[test]
fn the_stdin_thread_reads_and_nothing_more_and_its_spawners_set_up_the_terminal() {
    let r = stdin_rules();
    assert!(r.allows_syscall(libc::SYS_read));
    assert!(
        r.ioctls.is_empty(),
        "no ioctl: raw mode is set by the spawner"
    );
    for nr in [
        libc::SYS_socket,
        libc::SYS_clone,
        libc::SYS_clone3,
        libc::SYS_eventfd2,
    ] {
        assert!(!r.allows_syscall(nr), "{nr}");
    }
    // Control and the migration receiver create VMs with a terminal console: they spawn the
    // stdin thread and put the terminal in raw mode (and control restores it).
    for k in [ThreadKind::Control, ThreadKind::MigrationRecv] {
        assert!(k.spawns().contains(&ThreadKind::Stdin), "{k:?}");
        let r = k.rules();
        for (name, nr) in [
            ("TCGETS", libc::TCGETS),
            ("TCSETS", libc::TCSETS),
            ("TIOCGPGRP", libc::TIOCGPGRP),
        ] {
            assert!(r.ioctls.iter().any(|&(_, n)| n == nr), "{k:?}: {name}");
        }
    }
    assert!(!vcpu_rules().ioctls.iter().any(|&(_, n)| n == libc::TCSETS));
}

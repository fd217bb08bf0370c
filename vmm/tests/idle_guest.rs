//! The test guest's idle mode (`VmConfig::guest_idle_us`, the probe's idle register) on the real
//! /dev/kvm: the vCPUs halt between samples (the process uses a fraction of a core where the
//! busy loop would use every core it can get), they keep sampling, a pause parks them out of
//! their halt, and after the resume they sample again with no violation.

use std::sync::mpsc;
use std::time::{Duration, Instant};

use hypervisor::tsc::ClockPolicy;
use serde_json::Value;
use vmm::config::{CpusConfig, MemoryConfig, VmConfig};
use vmm::Vmm;

const VCPUS: u32 = 4;
/// A 100 Hz tick. (Each wake-up of a halted vCPU costs this nested kvm_pvm host about 100 µs of
/// CPU, so a 1 kHz tick on 4 vCPUs is already half a core.)
const IDLE_US: u32 = 10_000;

fn kvm_absent(test: &str) -> bool {
    if std::path::Path::new("/dev/kvm").exists() {
        return false;
    }
    println!("{test}: skipped: /dev/kvm is absent");
    true
}

fn samples(info: &Value) -> Vec<u64> {
    info["time_probe"]["vcpus"]
        .as_array()
        .map(|v| {
            v.iter()
                .map(|r| r["samples"].as_u64().unwrap_or(0))
                .collect()
        })
        .unwrap_or_default()
}

/// Wait (bounded) until every vCPU's sample counter is above `before`'s.
fn wait_progress(vmm: &Vmm, before: &[u64], what: &str) -> Vec<u64> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let now = samples(&vmm.info());
        if now.len() == before.len() && now.iter().zip(before).all(|(a, b)| a > b) {
            return now;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: samples {now:?}, before {before:?}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// CPU time (user + system) used by this process so far.
fn cpu_time() -> Duration {
    let mut ru = std::mem::MaybeUninit::<libc::rusage>::uninit();
    // SAFETY: getrusage(2) fills the rusage it is given, a live local of the right type.
    let r = unsafe { libc::getrusage(libc::RUSAGE_SELF, ru.as_mut_ptr()) };
    assert_eq!(r, 0, "getrusage: {}", std::io::Error::last_os_error());
    // SAFETY: getrusage returned 0, so it initialised the whole struct.
    let ru = unsafe { ru.assume_init() };
    let tv = |t: libc::timeval| {
        Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
    };
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

#[test]
fn idle_guest_halts_keeps_sampling_and_survives_pause_resume() {
    if kvm_absent("idle_guest_halts_keeps_sampling_and_survives_pause_resume") {
        return;
    }
    vmm::signal::install_vcpu_kick_handler().expect("vCPU kick signal");
    let hv = hypervisor::new().expect("open /dev/kvm");
    let (tx, _rx) = mpsc::channel::<vmm::VmmEvent>();
    let config = VmConfig {
        cpus: CpusConfig {
            boot_vcpus: VCPUS,
            max_vcpus: VCPUS,
        },
        memory: MemoryConfig { size: 64 << 20 },
        serial: devices::SerialOutput::Off,
        guest_idle_us: IDLE_US,
        ..VmConfig::default()
    };
    let vmm = Vmm::boot(hv, config, tx).expect("boot");
    let up = wait_progress(&vmm, &[0; VCPUS as usize], "every vCPU reporting");

    // Halting, not spinning: 4 busy vCPU threads would use every core they can get; 4 vCPUs
    // waking 100 times a second use a small fraction of one.
    let (c0, t0) = (cpu_time(), Instant::now());
    let before = samples(&vmm.info());
    std::thread::sleep(Duration::from_millis(500));
    let (used, wall) = (cpu_time() - c0, t0.elapsed());
    let after = wait_progress(&vmm, &before, "sampling while idle");
    let cores = used.as_secs_f64() / wall.as_secs_f64();
    assert!(
        cores < 0.5,
        "the idle guest used {cores:.2} cores ({used:?} in {wall:?}); samples {before:?} -> {after:?}"
    );
    // And sampling at about the idle period, not faster (100/s, with slack).
    for (a, b) in after.iter().zip(&before) {
        let rate = (a - b) as f64 / t0.elapsed().as_secs_f64();
        assert!(
            rate < 200.0,
            "{rate:.0} samples/s on one vCPU: not idle ({after:?})"
        );
    }
    assert!(up.iter().all(|&n| n > 0));

    for cycle in 0..20 {
        vmm.vm()
            .pause()
            .unwrap_or_else(|e| panic!("pause {cycle}: {e}"));
        let frozen = samples(&vmm.info());
        vmm.vm()
            .resume(Some(ClockPolicy::Wallclock))
            .unwrap_or_else(|e| panic!("resume {cycle}: {e}"));
        wait_progress(&vmm, &frozen, &format!("sampling after resume {cycle}"));
    }
    let info = vmm.info();
    let totals = &info["time_probe"]["totals"];
    assert_eq!(totals["tsc_backwards"], 0, "{totals}");
    assert_eq!(totals["cross_vcpu"], 0, "{totals}");
    vmm.shutdown_vm();
}

/// A guest that idles (halted vCPUs waiting for their TSC-deadline timer) must wake after a
/// restore under either policy: the thaw has to put IA32_TSC_DEADLINE back once the TSC is in
/// place, also on a host that ignores TSC offsets (where the thaw writes no offset at all).
#[test]
fn idle_guest_wakes_after_snapshot_and_restore() {
    if kvm_absent("idle_guest_wakes_after_snapshot_and_restore") {
        return;
    }
    vmm::signal::install_vcpu_kick_handler().expect("vCPU kick signal");
    let hv = hypervisor::new().expect("open /dev/kvm");
    let (tx, _rx) = mpsc::channel::<vmm::VmmEvent>();
    let config = VmConfig {
        cpus: CpusConfig {
            boot_vcpus: 2,
            max_vcpus: 2,
        },
        memory: MemoryConfig { size: 64 << 20 },
        serial: devices::SerialOutput::Off,
        guest_idle_us: IDLE_US,
        ..VmConfig::default()
    };
    let vmm = Vmm::boot(hv.clone(), config, tx.clone()).expect("boot");
    let up = wait_progress(&vmm, &[0; 2], "every vCPU reporting");
    // Let every vCPU go through several halts, so that each is parked halted with its timer
    // armed, as a real idle guest is.
    wait_progress(&vmm, &up, "sampling while idle");
    vmm.vm().pause().expect("pause");
    let dir = tempdir("idle-restore");
    vmm.vm().snapshot(&dir.join("snap")).expect("snapshot");
    vmm.shutdown_vm();

    for policy in ["wallclock", "frozen"] {
        let cfg = vmm::api::RestoreConfig::from_options(&format!(
            "source_url=file://{},resume=true,clock_policy={policy}",
            dir.join("snap").display()
        ))
        .expect("restore options");
        let restored = Vmm::restore(hv.clone(), &cfg, None, tx.clone())
            .unwrap_or_else(|e| panic!("restore ({policy}): {e:#}"));
        let at_restore = samples(&restored.info());
        wait_progress(
            &restored,
            &at_restore,
            &format!("the idle guest sampling after a restore under {policy}"),
        );
        let info = restored.info();
        assert_eq!(info["time_probe"]["totals"]["tsc_backwards"], 0, "{info}");
        restored.shutdown_vm();
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A fresh directory under the system's temporary directory.
fn tempdir(what: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("hourglass-{what}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("temporary directory");
    d
}

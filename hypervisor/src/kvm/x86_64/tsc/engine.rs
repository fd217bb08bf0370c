//! The TSC engine: freeze and thaw on a `&VmFd` and one `&VcpuFd` per vCPU.
//!
//! One implementation for both ways in: [`crate::kvm::KvmVm`]'s `TscState` (vCPUs that are
//! [`crate::kvm::KvmVcpu`]s) and [`crate::kvm::tsc`] (file descriptors borrowed from another
//! VMM). Everything it knows about the host comes in a [`TscContext`]; everything it does to a
//! vCPU goes through [`TimeVcpu`], whose only hook is [`TimeVcpu::tsc_in_place`] (where
//! `KvmVcpu` writes the TSC_DEADLINE that `set_state` held back).

use kvm_ioctls::{VcpuFd, VmFd};

use super::verify::{clock_error_warning, effective_offset, set_clock_verified, within};
use crate::arch::{msr, MsrEntry};
use crate::error::HypervisorError;
use crate::host::rdtsc;
use crate::kvm::x86_64::attr;
use crate::kvm::x86_64::convert;
use crate::kvm::{bracketed_guest_tsc, clock};
use crate::tsc::{
    self, capture, compute_ratio, plan_for_actual_tsc, plan_thaw, plan_thaw_elapsed, scale_tsc,
    tsc_ratio, Capture, ClockPolicy, ClockReport, Elapsed, HostSample, HostTsc, ThawOrigin,
    ThawPlan, TscSnapshot, VcpuTscReading, Vendor,
};

/// The warning every report on a host that ignores offsets carries (in the log).
pub const IGNORED_OFFSETS_WARNING: &str =
    "this host ignores TSC offsets: the guest keeps the host TSC and kvmclock was made to agree with it";

/// What the engine knows about the host and the VM: probed or derived, never assumed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct TscContext {
    /// Host CPU vendor (the scaling arithmetic).
    pub vendor: Vendor,
    /// Host TSC kHz.
    pub host_tsc_khz: u32,
    /// Guest TSC kHz the vCPUs run at.
    pub guest_tsc_khz: u32,
    /// The per-vCPU KVM_VCPU_TSC_OFFSET attribute exists.
    pub tsc_offset_attr: bool,
    /// Hardware TSC scaling (KVM_CAP_TSC_CONTROL).
    pub tsc_scaling: bool,
    /// KVM_SET_CLOCK understands KVM_CLOCK_REALTIME.
    pub clock_realtime: bool,
    /// Whether written offsets take effect (a probe, or a thaw's read-back); `None` until
    /// known, and a thaw then writes them and verifies. A thaw sets it to what it saw.
    pub offsets_honoured: Option<bool>,
}

/// One vCPU as the engine sees it.
pub(crate) trait TimeVcpu {
    /// The vCPU's file descriptor.
    fn vcpu_fd(&self) -> &VcpuFd;
    /// Called right after this vCPU's TSC is in place, before anything is read back: the
    /// place for MSRs interpreted against the TSC (TSC_DEADLINE).
    fn tsc_in_place(&self) -> Result<(), HypervisorError> {
        Ok(())
    }
}

impl TimeVcpu for VcpuFd {
    fn vcpu_fd(&self) -> &VcpuFd {
        self
    }
}

/// Result of writing a vCPU's TSC offset: what the host reports afterwards.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct TscWriteBack {
    /// The offset (`O + A_i`) read back after the write.
    offset_read_back: u64,
    /// The guest TSC read back via a host-initiated read of MSR_IA32_TSC.
    guest_tsc: u64,
    /// Host TSC just before that read.
    host_tsc_before: u64,
    /// Host TSC just after that read.
    host_tsc_after: u64,
}

/// Write MSRs (host-initiated) to one vCPU, all or an error naming the refused one.
pub(crate) fn write_msrs(fd: &VcpuFd, entries: &[MsrEntry]) -> Result<(), HypervisorError> {
    if entries.is_empty() {
        return Ok(());
    }
    let k: Vec<_> = entries.iter().map(convert::msr_to_kvm).collect();
    let m = kvm_bindings::Msrs::from_entries(&k)
        .map_err(|_| HypervisorError::InvalidArgument("too many MSRs".into()))?;
    let n = fd
        .set_msrs(&m)
        .map_err(|e| HypervisorError::ioctl("KVM_SET_MSRS", e.errno()))?;
    if n != entries.len() {
        return Err(HypervisorError::Unsupported(format!(
            "KVM_SET_MSRS refused MSR {:#x} (wrote {n} of {})",
            entries[n].index,
            entries.len()
        )));
    }
    Ok(())
}

fn read_msr(fd: &VcpuFd, index: u32) -> Result<u64, HypervisorError> {
    let mut m = kvm_bindings::Msrs::from_entries(&[kvm_bindings::kvm_msr_entry {
        index,
        ..Default::default()
    }])
    .map_err(|_| HypervisorError::InvalidArgument("MSR list".into()))?;
    let n = fd
        .get_msrs(&mut m)
        .map_err(|e| HypervisorError::ioctl("KVM_GET_MSRS", e.errno()))?;
    if n != 1 {
        return Err(HypervisorError::Unsupported(format!(
            "KVM_GET_MSRS refused MSR {index:#x}"
        )));
    }
    Ok(m.as_slice()[0].data)
}

/// `O + A_i` from KVM_VCPU_TSC_OFFSET (`attr`), and `A_i` from a host-initiated TSC_ADJUST
/// read. Without the attribute the offset is derived from a bracketed MSR_IA32_TSC read against
/// the host TSC, which is only exact for an unscaled guest.
pub(crate) fn tsc_reading(fd: &VcpuFd, attr: bool) -> Result<VcpuTscReading, HypervisorError> {
    let offset = if attr {
        attr::tsc_offset(fd)?
    } else {
        let (h0, g, h1) = bracketed_guest_tsc(fd)?;
        g.wrapping_sub(h0.wrapping_add(h1.wrapping_sub(h0) / 2))
    };
    Ok(VcpuTscReading {
        offset,
        tsc_adjust: read_msr(fd, msr::IA32_TSC_ADJUST)?,
    })
}

/// Write one vCPU's offset (`O' + A_i`) and host-initiated TSC_ADJUST (`A_i`), then read back.
fn set_tsc<V: TimeVcpu + ?Sized>(
    v: &V,
    offset: u64,
    tsc_adjust: u64,
) -> Result<TscWriteBack, HypervisorError> {
    let fd = v.vcpu_fd();
    attr::set_tsc_offset(fd, offset)?;
    write_msrs(
        fd,
        &[MsrEntry {
            index: msr::IA32_TSC_ADJUST,
            data: tsc_adjust,
        }],
    )?;
    v.tsc_in_place()?;
    let offset_read_back = attr::tsc_offset(fd)?;
    let (host_tsc_before, guest_tsc, host_tsc_after) = bracketed_guest_tsc(fd)?;
    Ok(TscWriteBack {
        offset_read_back,
        guest_tsc,
        host_tsc_before,
        host_tsc_after,
    })
}

impl TscContext {
    fn frac_bits(&self) -> u32 {
        self.vendor.scaling().frac_bits
    }

    /// The host's TSC parameters for the current guest frequency.
    fn host_tsc(&self) -> Result<HostTsc, HypervisorError> {
        let choice = tsc_ratio(self.vendor, self.host_tsc_khz, self.guest_tsc_khz)?;
        Ok(HostTsc {
            vendor: self.vendor,
            host_khz: self.host_tsc_khz,
            ratio: choice.ratio,
        })
    }
}

/// Ask every vCPU for `khz`; refused before anything changes when the host cannot run it
/// within KVM's 250 ppm window. On success `ctx.guest_tsc_khz` is `khz`.
pub(crate) fn set_guest_tsc_khz<V: TimeVcpu + ?Sized>(
    ctx: &mut TscContext,
    vcpus: &[&V],
    khz: u32,
) -> Result<(), HypervisorError> {
    let host_khz = ctx.host_tsc_khz;
    if khz == 0 {
        return Err(tsc::TscError::ZeroFrequency { which: "guest_khz" }.into());
    }
    let outcome = compute_ratio(ctx.vendor, host_khz, khz);
    if outcome.choice.scaling && !ctx.tsc_scaling {
        return Err(HypervisorError::TscFrequencyRefused {
            host_khz,
            guest_khz: khz,
            window_lo: outcome.window_lo,
            window_hi: outcome.window_hi,
        });
    }
    // Refuses a ratio the vendor's hardware cannot hold, naming the window.
    tsc_ratio(ctx.vendor, host_khz, khz)?;
    let old = ctx.guest_tsc_khz;
    let set = |v: &V, k: u32| {
        v.vcpu_fd()
            .set_tsc_khz(k)
            .map_err(|e| HypervisorError::ioctl("KVM_SET_TSC_KHZ", e.errno()))
    };
    for (i, v) in vcpus.iter().enumerate() {
        if let Err(e) = set(v, khz) {
            // Put back the ones already changed; KVM_GET_TSC_KHZ is not trusted here.
            for w in &vcpus[..i] {
                let _ = set(w, old);
            }
            return Err(e);
        }
    }
    for (i, v) in vcpus.iter().enumerate() {
        let got = v
            .vcpu_fd()
            .get_tsc_khz()
            .map_err(|e| HypervisorError::ioctl("KVM_GET_TSC_KHZ", e.errno()))?;
        if got != khz {
            for w in vcpus {
                let _ = set(w, old);
            }
            return Err(HypervisorError::ReadBack {
                what: format!("vCPU {i} TSC kHz"),
                wrote: u64::from(khz),
                read: u64::from(got),
            });
        }
    }
    ctx.guest_tsc_khz = khz;
    Ok(())
}

/// Capture guest time: one host sample, then each vCPU's reading (taken now where `readings`
/// has none). With `stopped_at` (the host TSC when the last vCPU stopped), the sample is moved
/// back to that instant ([`HostSample::rewound_to`]).
pub(crate) fn freeze<V: TimeVcpu + ?Sized>(
    vm: &VmFd,
    ctx: &TscContext,
    vcpus: &[&V],
    readings: &[Option<VcpuTscReading>],
    stopped_at: Option<u64>,
) -> Result<Capture, HypervisorError> {
    if readings.len() > vcpus.len() {
        return Err(HypervisorError::InvalidArgument(format!(
            "{} TSC readings for {} vCPUs",
            readings.len(),
            vcpus.len()
        )));
    }
    let host = ctx.host_tsc()?;
    let sample = clock::sample(vm)?;
    let readings = vcpus
        .iter()
        .enumerate()
        .map(|(i, v)| match readings.get(i).copied().flatten() {
            Some(r) => Ok(r),
            None => tsc_reading(v.vcpu_fd(), ctx.tsc_offset_attr),
        })
        .collect::<Result<Vec<_>, _>>()?;
    let at = HostSample::from(&sample);
    let at = stopped_at
        .and_then(|h| at.rewound_to(h, host.host_khz))
        .unwrap_or(at);
    Ok(capture(
        &at,
        &host,
        ctx.guest_tsc_khz,
        &readings,
        sample.tsc_stable(),
        ctx.offsets_honoured.unwrap_or(true),
    )?)
}

/// Restore guest time under `policy` (see the module doc of [`super`]), verify, report.
/// `ctx.offsets_honoured` is updated with what the read-back showed, even on failure.
pub(crate) fn thaw<V: TimeVcpu + ?Sized>(
    vm: &VmFd,
    ctx: &mut TscContext,
    vcpus: &[&V],
    snap: &TscSnapshot,
    origin: ThawOrigin,
    policy: ClockPolicy,
) -> Result<ClockReport, HypervisorError> {
    let mut report = thaw_inner(vm, ctx, vcpus, snap, origin, policy)?;
    report.origin = Some(origin);
    Ok(report)
}

fn thaw_inner<V: TimeVcpu + ?Sized>(
    vm: &VmFd,
    ctx: &mut TscContext,
    vcpus: &[&V],
    snap: &TscSnapshot,
    origin: ThawOrigin,
    policy: ClockPolicy,
) -> Result<ClockReport, HypervisorError> {
    snap.check_vcpus(vcpus.len())?;
    if snap.tsc_khz() != ctx.guest_tsc_khz {
        // Refused here, before anything else changes, when the host cannot run it.
        set_guest_tsc_khz(ctx, vcpus, snap.tsc_khz())?;
    }
    // What is there now, to put it back if the thaw has to be refused: read before the sample,
    // because from the sample's instant on the guest's time runs (a `frozen` guest would see
    // every ioctl between the sample and its vCPU's next entry).
    let before = if ctx.offsets_honoured == Some(false) {
        Vec::new()
    } else {
        vcpus
            .iter()
            .map(|v| tsc_reading(v.vcpu_fd(), ctx.tsc_offset_attr))
            .collect::<Result<Vec<_>, _>>()?
    };
    let host = ctx.host_tsc()?;
    let sample = clock::sample(vm)?;
    let now = HostSample::from(&sample);
    let plan = match policy {
        // Resuming our own freeze: the host TSC measures the pause exactly (O' = O).
        ClockPolicy::Wallclock if origin.same_host() => {
            plan_thaw_elapsed(snap, &now, &host, Elapsed::SameHostTsc)
                .or_else(|_| plan_thaw(snap, &now, &host, policy))?
        }
        _ => plan_thaw(snap, &now, &host, policy)?,
    };

    if ctx.offsets_honoured == Some(false) {
        return thaw_host_tsc(vm, ctx, vcpus, snap, policy, &now, &host, plan.vm_offset);
    }

    let fb = ctx.frac_bits();
    let slack = u64::from(snap.tsc_khz()); // 1 ms of cycles
    let mut honoured = true;
    let mut warnings = Vec::new();
    let mut applied = None;
    if ctx.tsc_offset_attr {
        for (i, v) in vcpus.iter().enumerate() {
            let wb = set_tsc(*v, plan.vcpu_offsets[i], plan.tsc_adjust[i])?;
            let lo =
                scale_tsc(wb.host_tsc_before, host.ratio, fb).wrapping_add(plan.vcpu_offsets[i]);
            let hi =
                scale_tsc(wb.host_tsc_after, host.ratio, fb).wrapping_add(plan.vcpu_offsets[i]);
            if wb.offset_read_back != plan.vcpu_offsets[i] || !within(wb.guest_tsc, lo, hi, slack) {
                honoured = false;
            }
            if i == 0 {
                applied = Some(wb.offset_read_back.wrapping_sub(plan.tsc_adjust[0]));
            }
        }
    } else {
        write_tsc_msrs(vcpus, &plan, &now, &host)?;
        warnings.push(
            "KVM_VCPU_TSC_OFFSET is missing on this kernel: the TSC was restored by \
             MSR_IA32_TSC writes computed for one instant (vCPUs written later lag by the \
             write latency)"
                .to_string(),
        );
        let h = rdtsc();
        let expect =
            plan.guest_tsc
                .wrapping_add(scale_tsc(h, host.ratio, fb).wrapping_sub(scale_tsc(
                    now.host_tsc,
                    host.ratio,
                    fb,
                )));
        for (i, v) in vcpus.iter().enumerate() {
            let (_, g, h1) = bracketed_guest_tsc(v.vcpu_fd())?;
            let upper = expect
                .wrapping_add(
                    scale_tsc(h1, host.ratio, fb).wrapping_sub(scale_tsc(h, host.ratio, fb)),
                )
                .wrapping_add(plan.tsc_adjust[i]);
            if !within(g, expect.wrapping_add(plan.tsc_adjust[i]), upper, slack) {
                honoured = false;
            }
        }
        applied = Some(plan.vm_offset);
    }
    ctx.offsets_honoured = Some(honoured);

    if !honoured {
        log::warn!("{IGNORED_OFFSETS_WARNING}");
        return thaw_host_tsc(vm, ctx, vcpus, snap, policy, &now, &host, plan.vm_offset)
            .inspect_err(|_| {
                // Put the offsets and TSC_ADJUST back as they were.
                for (v, b) in vcpus.iter().zip(&before) {
                    let adjust = MsrEntry {
                        index: msr::IA32_TSC_ADJUST,
                        data: b.tsc_adjust,
                    };
                    if ctx.tsc_offset_attr {
                        let _ = attr::set_tsc_offset(v.vcpu_fd(), b.offset);
                    }
                    let _ = write_msrs(v.vcpu_fd(), &[adjust]);
                }
            });
    }

    let check = set_clock_verified(vm, ctx.clock_realtime, snap, &plan, &now, &host)?;
    let mut report = ClockReport::from_plan(
        policy,
        &plan,
        ctx.vendor,
        snap.tsc_khz(),
        plan.vm_offset,
        applied,
        true,
    );
    report.warnings.extend(warnings);
    report.warnings.extend(clock_error_warning(&check));
    report.kvmclock_check = Some(check);
    Ok(report)
}

/// Thaw where offsets are not honoured: no offset writes, kvmclock follows the real TSC.
#[allow(clippy::too_many_arguments)]
fn thaw_host_tsc<V: TimeVcpu + ?Sized>(
    vm: &VmFd,
    ctx: &TscContext,
    vcpus: &[&V],
    snap: &TscSnapshot,
    policy: ClockPolicy,
    now: &HostSample,
    host: &HostTsc,
    planned_vm_offset: u64,
) -> Result<ClockReport, HypervisorError> {
    // The VM TSC (`G`, without TSC_ADJUST) the guest really has at the sample instant:
    // `scale(H') + effective offset of vCPU 0 - A_0`.
    let fd0 = vcpus[0].vcpu_fd();
    // The offset KVM reports, as a hint (one ioctl; where there is no attribute the bracketed
    // reads below are all there is).
    let hint = if ctx.tsc_offset_attr {
        attr::tsc_offset(fd0).ok()
    } else {
        None
    };
    let eff = effective_offset(fd0, host, hint)?;
    let actual = scale_tsc(now.host_tsc, host.ratio, ctx.frac_bits())
        .wrapping_add(eff)
        .wrapping_sub(snap.tsc_adjust()[0]);
    // Refused before anything is written.
    let plan = plan_for_actual_tsc(snap, now, actual)?;
    for (v, a) in vcpus.iter().zip(&plan.tsc_adjust) {
        write_msrs(
            v.vcpu_fd(),
            &[MsrEntry {
                index: msr::IA32_TSC_ADJUST,
                data: *a,
            }],
        )?;
        // The TSC is what it is: MSRs held back for it can go in now.
        v.tsc_in_place()?;
    }
    let check = set_clock_verified(vm, ctx.clock_realtime, snap, &plan, now, host)?;
    let mut report = ClockReport::from_plan(
        policy,
        &plan,
        ctx.vendor,
        snap.tsc_khz(),
        planned_vm_offset,
        Some(plan.vm_offset),
        false,
    );
    // The plan (tsc::plan_for_actual_tsc) already carries the "host ignores TSC offsets"
    // warning with the elapsed time it gave kvmclock; one warning per fact.
    report.warnings.extend(clock_error_warning(&check));
    report.kvmclock_check = Some(check);
    Ok(report)
}

/// Kernels without KVM_VCPU_TSC_OFFSET: MSR_IA32_TSC = G' + A_i, computed for one instant.
fn write_tsc_msrs<V: TimeVcpu + ?Sized>(
    vcpus: &[&V],
    plan: &ThawPlan,
    now: &HostSample,
    host: &HostTsc,
) -> Result<(), HypervisorError> {
    let fb = host.vendor.scaling().frac_bits;
    let h = rdtsc();
    let g_now = plan
        .guest_tsc
        .wrapping_add(scale_tsc(h, host.ratio, fb).wrapping_sub(scale_tsc(
            now.host_tsc,
            host.ratio,
            fb,
        )));
    for (v, a) in vcpus.iter().zip(&plan.tsc_adjust) {
        write_msrs(
            v.vcpu_fd(),
            &[
                MsrEntry {
                    index: msr::IA32_TSC,
                    data: g_now.wrapping_add(*a),
                },
                MsrEntry {
                    index: msr::IA32_TSC_ADJUST,
                    data: *a,
                },
            ],
        )?;
        v.tsc_in_place()?;
    }
    Ok(())
}

impl From<&clock::ClockSample> for HostSample {
    fn from(s: &clock::ClockSample) -> Self {
        HostSample {
            kvmclock_ns: s.kvmclock_ns,
            realtime_ns: s.realtime_ns,
            host_tsc: s.host_tsc,
            bracket_ns: s.bracket_ns,
        }
    }
}

//! [`KvmVcpu`]: one KVM vCPU, its run loop, its kicker and its saved state.

use std::ptr::NonNull;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use kvm_bindings::{kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_run, Msrs};
use kvm_ioctls::{VcpuExit, VcpuFd};

use crate::arch::{msr, CpuIdEntry, MsrEntry, SpecialRegisters, StandardRegisters};
use crate::cpu::{Vcpu, VcpuKicker, VmExit};
use crate::error::HypervisorError;
use crate::kvm::x86_64::convert;
use crate::kvm::x86_64::tsc::engine::{self, TimeVcpu};
use crate::kvm::x86_64::vendor::AFTER_TSC_MSRS;
use crate::state::VcpuState;
use crate::tsc::VcpuTscReading;

/// What a VM's vCPUs may use, probed once per VM.
#[derive(Debug)]
pub(crate) struct VcpuCaps {
    pub tsc_offset_attr: bool,
    pub saved_msrs: Vec<u32>,
    pub xsave: bool,
    pub xcrs: bool,
    pub events: bool,
    pub nested_state: bool,
    pub mmap_size: usize,
}

/// Sets `kvm_run.immediate_exit` of one vCPU from any thread.
///
/// It owns its **own** shared mapping of the vCPU's `kvm_run` page (a second `mmap` of the vCPU
/// fd), so it stays valid for as long as the kicker lives, whether or not the `KvmVcpu` (and its
/// own mapping) has been dropped: the mapping holds a reference to the vCPU file.
pub struct KvmKicker {
    base: NonNull<libc::c_void>,
    len: usize,
}

// SAFETY: the mapping is owned by this value and only accessed through an atomic byte store;
// the kernel and the vCPU thread read the byte concurrently, which is what it is for.
unsafe impl Send for KvmKicker {}
// SAFETY: as above; `set` takes `&self` and performs a single atomic store.
unsafe impl Sync for KvmKicker {}

impl KvmKicker {
    fn new(fd: &VcpuFd, mmap_size: usize) -> Result<Self, HypervisorError> {
        use std::os::unix::io::AsRawFd;
        let len = std::mem::size_of::<kvm_run>().min(mmap_size);
        // SAFETY: mapping `len` bytes of the vCPU fd at offset 0 is how KVM exposes kvm_run;
        // we check the result and unmap it in Drop.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(HypervisorError::ioctl(
                "mmap(kvm_run)",
                std::io::Error::last_os_error().raw_os_error().unwrap_or(0),
            ));
        }
        let base =
            NonNull::new(p).ok_or_else(|| HypervisorError::ioctl("mmap(kvm_run)", libc::ENOMEM))?;
        Ok(KvmKicker { base, len })
    }
}

impl KvmKicker {
    /// The `internal` member of `kvm_run` (suberror and the `ndata` words, at most 16), read
    /// from this mapping after KVM_RUN returned `KVM_EXIT_INTERNAL_ERROR`. Read here rather than
    /// through the `VcpuFd` because the exit that `VcpuFd::run` returns still borrows it.
    fn internal_error(&self) -> (u32, Vec<u64>) {
        let off = std::mem::offset_of!(kvm_run, __bindgen_anon_1);
        // SAFETY: the union sits inside the mapped kvm_run (len >= size_of::<kvm_run>() or the
        // whole mmap), the mapping lives as long as `self`; KVM wrote the `internal` member
        // before KVM_RUN returned on this thread, and a volatile read of plain integers from
        // the shared page cannot produce an invalid value.
        let internal = unsafe {
            std::ptr::read_volatile(
                self.base
                    .as_ptr()
                    .cast::<u8>()
                    .add(off)
                    .cast::<kvm_bindings::kvm_run__bindgen_ty_1__bindgen_ty_13>(),
            )
        };
        let n = (internal.ndata as usize).min(internal.data.len());
        (internal.suberror, internal.data[..n].to_vec())
    }
}

impl VcpuKicker for KvmKicker {
    fn set(&self, exit: bool) {
        let off = std::mem::offset_of!(kvm_run, immediate_exit);
        // SAFETY: `off` is inside the mapped kvm_run (len >= size_of::<kvm_run>() or the whole
        // mmap), the mapping lives as long as `self`, and the byte is only accessed atomically
        // from user space.
        let byte = unsafe { AtomicU8::from_ptr(self.base.as_ptr().cast::<u8>().add(off)) };
        byte.store(u8::from(exit), Ordering::SeqCst);
    }
}

impl Drop for KvmKicker {
    fn drop(&mut self) {
        // SAFETY: `base`/`len` are exactly the mapping made in `new`, unmapped once here.
        unsafe { libc::munmap(self.base.as_ptr(), self.len) };
    }
}

/// XCR0 at reset: x87 only.
const XCR0_RESET: u64 = 1;

/// One KVM vCPU.
pub struct KvmVcpu {
    id: u32,
    fd: VcpuFd,
    caps: Arc<VcpuCaps>,
    kicker: Arc<KvmKicker>,
    /// MSRs from `set_state` that must wait until the TSC is in place (TSC_DEADLINE).
    after_tsc: Mutex<Vec<MsrEntry>>,
    /// The CPUID last set, applied again once XCR0 is final (see [`KvmVcpu::size_xsave_area`]);
    /// dropped at the first KVM_RUN, after which KVM accepts only the CPUID it already has.
    cpuid: Mutex<Option<kvm_bindings::CpuId>>,
}

impl KvmVcpu {
    pub(crate) fn new(id: u32, fd: VcpuFd, caps: Arc<VcpuCaps>) -> Result<Self, HypervisorError> {
        let kicker = Arc::new(KvmKicker::new(&fd, caps.mmap_size)?);
        Ok(KvmVcpu {
            id,
            fd,
            caps,
            kicker,
            after_tsc: Mutex::new(Vec::new()),
            cpuid: Mutex::new(None),
        })
    }

    /// The CPUID as the guest reads it now (KVM_GET_CPUID2: with what KVM computes at run
    /// time, such as the XSAVE area's size for the current XCR0).
    pub fn cpuid_as_seen(&self) -> Result<Vec<CpuIdEntry>, HypervisorError> {
        let c = self
            .fd
            .get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| HypervisorError::ioctl("KVM_GET_CPUID2", e.errno()))?;
        Ok(c.as_slice().iter().map(convert::cpuid_from_kvm).collect())
    }

    /// XCR0, the user state components enabled for XSAVE.
    fn xcr0(&self) -> Result<u64, HypervisorError> {
        let x = self
            .fd
            .get_xcrs()
            .map_err(|e| HypervisorError::ioctl("KVM_GET_XCRS", e.errno()))?;
        Ok(x.xcrs[..(x.nr_xcrs as usize).min(x.xcrs.len())]
            .iter()
            .find(|x| x.xcr == 0)
            .map_or(XCR0_RESET, |x| x.value))
    }

    /// Make CPUID.(0xD,0).EBX, the XSAVE area size the guest reads, match its XCR0.
    ///
    /// KVM computes that size at KVM_SET_CPUID2 and again when the guest changes an XCR0 bit
    /// other than x87, SSE and AVX (its XFEATURE_MASK_EXTEND), not when only those change. A
    /// guest that enables exactly x87|SSE|AVX, which is all a host without AVX-512 or PKRU
    /// offers, would keep reading the size for XCR0 = 1 (576 bytes) while its area is 832:
    /// Linux prints "XSAVE consistency problem" (seen on the nested kvm_amd host) and user space
    /// that sizes its save buffers from EBX allocates too little. So a fresh vCPU (XCR0 still
    /// at its reset value) starts with XCR0 = every user component the CPUID offers, the value
    /// the guest's kernel will write, and the CPUID is applied again for KVM to size the area
    /// for it; a restored vCPU gets its own XCR0 back first ([`Vcpu::set_state`]) and then the
    /// same second application.
    fn size_xsave_area(&self, seed: bool) -> Result<(), HypervisorError> {
        let guard = self.cpuid.lock().unwrap_or_else(|e| e.into_inner());
        let Some(cpuid) = guard.as_ref() else {
            return Ok(());
        };
        if !self.caps.xcrs {
            return Ok(());
        }
        let Some(leaf) = cpuid
            .as_slice()
            .iter()
            .find(|e| e.function == 0xd && e.index == 0)
        else {
            return Ok(());
        };
        let offered = u64::from(leaf.eax) | (u64::from(leaf.edx) << 32);
        if seed {
            if offered & XCR0_RESET == 0 || self.xcr0()? != XCR0_RESET {
                return Ok(());
            }
            let mut x = kvm_bindings::kvm_xcrs {
                nr_xcrs: 1,
                ..Default::default()
            };
            x.xcrs[0].xcr = 0;
            x.xcrs[0].value = offered;
            self.fd
                .set_xcrs(&x)
                .map_err(|e| HypervisorError::ioctl("KVM_SET_XCRS", e.errno()))?;
        }
        self.fd
            .set_cpuid2(cpuid)
            .map_err(|e| HypervisorError::ioctl("KVM_SET_CPUID2", e.errno()))
    }

    /// The kvm-ioctls vCPU handle (for embedders that need more than the traits).
    pub fn fd(&self) -> &VcpuFd {
        &self.fd
    }

    /// Read MSRs; with `lenient`, skip the ones the host refuses instead of failing.
    fn read_msrs(&self, indices: &[u32], lenient: bool) -> Result<Vec<MsrEntry>, HypervisorError> {
        let mut out = Vec::with_capacity(indices.len());
        let mut rest = indices;
        while !rest.is_empty() {
            let chunk = &rest[..rest.len().min(kvm_bindings::KVM_MAX_MSR_ENTRIES)];
            let entries: Vec<kvm_msr_entry> = chunk
                .iter()
                .map(|i| kvm_msr_entry {
                    index: *i,
                    ..Default::default()
                })
                .collect();
            let mut m = Msrs::from_entries(&entries)
                .map_err(|_| HypervisorError::InvalidArgument("too many MSRs".into()))?;
            let n = self
                .fd
                .get_msrs(&mut m)
                .map_err(|e| HypervisorError::ioctl("KVM_GET_MSRS", e.errno()))?;
            out.extend(m.as_slice()[..n].iter().map(|e| MsrEntry {
                index: e.index,
                data: e.data,
            }));
            if n < chunk.len() {
                if !lenient {
                    return Err(HypervisorError::Unsupported(format!(
                        "vCPU {}: KVM_GET_MSRS refused MSR {:#x}",
                        self.id, chunk[n]
                    )));
                }
                log::debug!(
                    "vCPU {}: MSR {:#x} not readable, skipped",
                    self.id,
                    chunk[n]
                );
                rest = &rest[n + 1..];
            } else {
                rest = &rest[chunk.len()..];
            }
        }
        Ok(out)
    }

    fn write_msrs(&self, entries: &[MsrEntry]) -> Result<(), HypervisorError> {
        // In order, at most KVM_MAX_MSR_ENTRIES a call (a host may list more saveable MSRs).
        for chunk in entries.chunks(kvm_bindings::KVM_MAX_MSR_ENTRIES) {
            let k: Vec<kvm_msr_entry> = chunk.iter().map(convert::msr_to_kvm).collect();
            let m = Msrs::from_entries(&k)
                .map_err(|_| HypervisorError::InvalidArgument("too many MSRs".into()))?;
            let n = self
                .fd
                .set_msrs(&m)
                .map_err(|e| HypervisorError::ioctl("KVM_SET_MSRS", e.errno()))?;
            if n != chunk.len() {
                return Err(HypervisorError::Unsupported(format!(
                    "vCPU {}: KVM_SET_MSRS refused MSR {:#x} (wrote {n} of {})",
                    self.id,
                    chunk[n].index,
                    chunk.len()
                )));
            }
        }
        Ok(())
    }

    /// Write the MSRs `set_state` held back until the TSC was in place.
    fn flush_after_tsc(&self) -> Result<(), HypervisorError> {
        let pending =
            std::mem::take(&mut *self.after_tsc.lock().unwrap_or_else(|e| e.into_inner()));
        self.write_msrs(&pending)
    }
}

impl Vcpu for KvmVcpu {
    fn id(&self) -> u32 {
        self.id
    }

    /// Runs until the next exit. `EINTR`/`EAGAIN` (a signal, or the kicker's immediate exit)
    /// give [`VmExit::Interrupted`], and the immediate-exit flag is cleared here: a caller sets
    /// its own "pause/stop requested" state *before* kicking and checks it on `Interrupted`.
    ///
    /// MSRs that `set_state` held back for a TSC write that never came (a state set without a
    /// thaw, as a VMM does at boot to make application processors runnable) are dropped here:
    /// a TSC_DEADLINE only means something against the TSC it was saved with, which no thaw
    /// restored, and left pending the next thaw would write it over the deadline the guest
    /// armed since (its vCPU would sleep for good). Dropped, not written: this runs on the
    /// vCPU thread, which has no business writing MSRs (and a VMM's seccomp filter may say so).
    fn run(&mut self) -> Result<VmExit<'_>, HypervisorError> {
        // From the first KVM_RUN on KVM refuses a different CPUID: nothing to re-apply.
        self.cpuid
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let pending = self.after_tsc.get_mut().unwrap_or_else(|e| e.into_inner());
        if !pending.is_empty() {
            log::debug!(
                "vCPU {}: runs before any thaw; dropping {} MSR(s) held back for the TSC",
                self.id,
                pending.len()
            );
            pending.clear();
        }
        let kicker = &self.kicker;
        let id = self.id;
        match self.fd.run() {
            Ok(exit) => Ok(match exit {
                VcpuExit::IoIn(port, data) => VmExit::IoIn { port, data },
                VcpuExit::IoOut(port, data) => VmExit::IoOut { port, data },
                VcpuExit::MmioRead(addr, data) => VmExit::MmioRead { addr, data },
                VcpuExit::MmioWrite(addr, data) => VmExit::MmioWrite { addr, data },
                VcpuExit::Hlt => VmExit::Hlt,
                VcpuExit::Shutdown => VmExit::Shutdown,
                VcpuExit::Intr => {
                    kicker.set(false);
                    VmExit::Interrupted
                }
                VcpuExit::SystemEvent(kind, _) => match kind {
                    kvm_bindings::KVM_SYSTEM_EVENT_RESET => VmExit::Reset,
                    kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => VmExit::Shutdown,
                    other => VmExit::Other(format!("vCPU {id}: system event {other}")),
                },
                VcpuExit::InternalError => {
                    let (suberror, data) = kicker.internal_error();
                    VmExit::InternalError { suberror, data }
                }
                other => VmExit::Other(format!("vCPU {id}: {other:?}")),
            }),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                kicker.set(false);
                Ok(VmExit::Interrupted)
            }
            Err(e) => Err(HypervisorError::ioctl("KVM_RUN", e.errno())),
        }
    }

    fn kicker(&mut self) -> Arc<dyn VcpuKicker> {
        self.kicker.clone()
    }

    fn set_cpuid(&self, entries: &[CpuIdEntry]) -> Result<(), HypervisorError> {
        let k: Vec<_> = entries.iter().map(convert::cpuid_to_kvm).collect();
        let c = kvm_bindings::CpuId::from_entries(&k).map_err(|_| {
            HypervisorError::InvalidArgument(format!("{} CPUID entries is too many", k.len()))
        })?;
        self.fd
            .set_cpuid2(&c)
            .map_err(|e| HypervisorError::ioctl("KVM_SET_CPUID2", e.errno()))?;
        *self.cpuid.lock().unwrap_or_else(|e| e.into_inner()) = Some(c);
        self.size_xsave_area(true)
    }

    fn regs(&self) -> Result<StandardRegisters, HypervisorError> {
        let r = self
            .fd
            .get_regs()
            .map_err(|e| HypervisorError::ioctl("KVM_GET_REGS", e.errno()))?;
        Ok(convert::regs_from_kvm(&r))
    }

    fn set_regs(&self, regs: &StandardRegisters) -> Result<(), HypervisorError> {
        self.fd
            .set_regs(&convert::regs_to_kvm(regs))
            .map_err(|e| HypervisorError::ioctl("KVM_SET_REGS", e.errno()))
    }

    fn sregs(&self) -> Result<SpecialRegisters, HypervisorError> {
        let s = self
            .fd
            .get_sregs()
            .map_err(|e| HypervisorError::ioctl("KVM_GET_SREGS", e.errno()))?;
        Ok(convert::sregs_from_kvm(&s))
    }

    fn set_sregs(&self, sregs: &SpecialRegisters) -> Result<(), HypervisorError> {
        self.fd
            .set_sregs(&convert::sregs_to_kvm(sregs))
            .map_err(|e| HypervisorError::ioctl("KVM_SET_SREGS", e.errno()))
    }

    fn msrs(&self, indices: &[u32]) -> Result<Vec<MsrEntry>, HypervisorError> {
        self.read_msrs(indices, false)
    }

    /// Writes all entries or fails naming the refused MSR. A write of MSR_IA32_TSC (the
    /// fallback TSC restore) also writes the MSRs held back by `set_state`, after it.
    fn set_msrs(&self, entries: &[MsrEntry]) -> Result<(), HypervisorError> {
        self.write_msrs(entries)?;
        if entries.iter().any(|e| e.index == msr::IA32_TSC) {
            self.flush_after_tsc()?;
        }
        Ok(())
    }

    fn notify_guest_clock_paused(&self) -> Result<(), HypervisorError> {
        match self.fd.kvmclock_ctrl() {
            Ok(()) => Ok(()),
            // EINVAL: the guest has not enabled kvmclock; nothing to tell it.
            Err(e) if e.errno() == libc::EINVAL => Ok(()),
            Err(e) => Err(HypervisorError::ioctl("KVM_KVMCLOCK_CTRL", e.errno())),
        }
    }

    /// `O + A_i` and `A_i`, as the TSC engine reads them (`engine::tsc_reading`).
    fn tsc_reading(&self) -> Result<VcpuTscReading, HypervisorError> {
        engine::tsc_reading(&self.fd, self.caps.tsc_offset_attr)
    }

    fn state(&self) -> Result<VcpuState, HypervisorError> {
        let regs = self.regs()?;
        let sregs = self.sregs()?;
        let msrs = self.read_msrs(&self.caps.saved_msrs, true)?;
        let lapic = self
            .fd
            .get_lapic()
            .map_err(|e| HypervisorError::ioctl("KVM_GET_LAPIC", e.errno()))?;
        let xsave = if self.caps.xsave {
            let x = self
                .fd
                .get_xsave()
                .map_err(|e| HypervisorError::ioctl("KVM_GET_XSAVE", e.errno()))?;
            Some(x.region.to_vec())
        } else {
            None
        };
        let xcrs = if self.caps.xcrs {
            let x = self
                .fd
                .get_xcrs()
                .map_err(|e| HypervisorError::ioctl("KVM_GET_XCRS", e.errno()))?;
            Some(convert::xcrs_from_kvm(&x))
        } else {
            None
        };
        let events = if self.caps.events {
            let e = self
                .fd
                .get_vcpu_events()
                .map_err(|e| HypervisorError::ioctl("KVM_GET_VCPU_EVENTS", e.errno()))?;
            Some(convert::events_from_kvm(&e))
        } else {
            None
        };
        let mp = self
            .fd
            .get_mp_state()
            .map_err(|e| HypervisorError::ioctl("KVM_GET_MP_STATE", e.errno()))?;
        // Only where KVM_CAP_NESTED_STATE says the host has it: KVM_GET_NESTED_STATE fails with
        // EINVAL on hosts that report 0.
        let nested = if self.caps.nested_state {
            let mut buf = kvm_bindings::nested::KvmNestedStateBuffer::empty();
            match self.fd.nested_state(&mut buf) {
                Ok(Some(_)) => Some(serde_json::to_vec(&buf).map_err(|e| {
                    HypervisorError::InvalidArgument(format!("nested state encoding: {e}"))
                })?),
                Ok(None) => None,
                Err(e) => return Err(HypervisorError::ioctl("KVM_GET_NESTED_STATE", e.errno())),
            }
        } else {
            None
        };
        Ok(VcpuState {
            id: self.id,
            regs,
            sregs,
            msrs,
            lapic: Some(lapic.regs.iter().map(|b| *b as u8).collect()),
            xsave,
            xcrs,
            events,
            mp_state: Some(mp.mp_state),
            nested,
        })
    }

    /// Restores registers, LAPIC, events and MSRs. MSRs interpreted against the TSC
    /// (TSC_DEADLINE) are held back and written right after the TSC is in place, by the thaw
    /// (`TimeVcpu::tsc_in_place`) or a `set_msrs` of MSR_IA32_TSC: KVM converts the deadline
    /// against the guest TSC current when it is written. If the vCPU runs
    /// first they are dropped (see `run`).
    fn set_state(&self, state: &VcpuState) -> Result<(), HypervisorError> {
        state.validate()?;
        if state.nested.is_some() && !self.caps.nested_state {
            return Err(HypervisorError::Unsupported(format!(
                "vCPU {}: the state holds nested-virtualisation state but this host has no \
                 KVM_CAP_NESTED_STATE",
                self.id
            )));
        }
        self.set_sregs(&state.sregs)?;
        self.set_regs(&state.regs)?;
        if let Some(x) = &state.xsave {
            let mut k = kvm_bindings::kvm_xsave::default();
            k.region.copy_from_slice(x);
            // SAFETY: `k` is a full legacy kvm_xsave (4 KiB region, no extra area), which is
            // what KVM_SET_XSAVE reads.
            unsafe { self.fd.set_xsave(&k) }
                .map_err(|e| HypervisorError::ioctl("KVM_SET_XSAVE", e.errno()))?;
        }
        if let Some(x) = &state.xcrs {
            let k = convert::xcrs_to_kvm(x)
                .ok_or_else(|| HypervisorError::InvalidArgument("more than 16 XCRs".into()))?;
            self.fd
                .set_xcrs(&k)
                .map_err(|e| HypervisorError::ioctl("KVM_SET_XCRS", e.errno()))?;
            // The restored XCR0 is the guest's: size its XSAVE area for it.
            self.size_xsave_area(false)?;
        }
        if let Some(l) = &state.lapic {
            let mut k = kvm_lapic_state::default();
            for (d, s) in k.regs.iter_mut().zip(l) {
                *d = *s as _;
            }
            self.fd
                .set_lapic(&k)
                .map_err(|e| HypervisorError::ioctl("KVM_SET_LAPIC", e.errno()))?;
        }
        let (after, now): (Vec<MsrEntry>, Vec<MsrEntry>) = state
            .msrs
            .iter()
            .partition(|m| AFTER_TSC_MSRS.contains(&m.index));
        self.write_msrs(&now)?;
        *self.after_tsc.lock().unwrap_or_else(|e| e.into_inner()) = after;
        if let Some(e) = &state.events {
            self.fd
                .set_vcpu_events(&convert::events_to_kvm(e))
                .map_err(|e| HypervisorError::ioctl("KVM_SET_VCPU_EVENTS", e.errno()))?;
        }
        if let Some(n) = &state.nested {
            let buf: kvm_bindings::nested::KvmNestedStateBuffer = serde_json::from_slice(n)
                .map_err(|e| HypervisorError::InvalidArgument(format!("vcpu_state.nested: {e}")))?;
            self.fd
                .set_nested_state(&buf)
                .map_err(|e| HypervisorError::ioctl("KVM_SET_NESTED_STATE", e.errno()))?;
        }
        if let Some(mp) = state.mp_state {
            self.fd
                .set_mp_state(kvm_mp_state { mp_state: mp })
                .map_err(|e| HypervisorError::ioctl("KVM_SET_MP_STATE", e.errno()))?;
        }
        Ok(())
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

impl TimeVcpu for KvmVcpu {
    fn vcpu_fd(&self) -> &VcpuFd {
        &self.fd
    }

    /// Writes the MSRs `set_state` held back until the TSC was in place.
    fn tsc_in_place(&self) -> Result<(), HypervisorError> {
        self.flush_after_tsc()
    }
}

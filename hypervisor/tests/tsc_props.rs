//! Property tests of the time model against an independent host model.
//!
//! A simulated host computes what its hardware gives a vCPU itself:
//! `((H * ratio) >> F) + kvm_offset (mod 2^64)`, with F written here per
//! vendor. The planner only sees what KVM would report; continuity is judged
//! from the simulated guest TSC before the freeze and after the thaw.

use hypervisor::tsc::*;
use proptest::prelude::*;

/// A simulated host: vendor, TSC kHz, and the ratio KVM picks for the guest.
#[derive(Debug, Clone, Copy)]
struct SimHost {
    vendor: Vendor,
    khz: u32,
    ratio: u64,
}

impl SimHost {
    fn new(vendor: Vendor, khz: u32, f_g: u32) -> Self {
        let ratio = tsc_ratio(vendor, khz, f_g)
            .expect("test hosts are within range")
            .ratio;
        SimHost { vendor, khz, ratio }
    }
    fn params(&self) -> HostTsc {
        HostTsc {
            vendor: self.vendor,
            host_khz: self.khz,
            ratio: self.ratio,
        }
    }
    /// The guest TSC the hardware produces from host TSC `h` and KVM offset `off`.
    fn guest_tsc(&self, h: u64, off: u64) -> u64 {
        let frac = match self.vendor {
            Vendor::Intel => 48,
            Vendor::Amd => 32,
        };
        ((((h as u128) * (self.ratio as u128)) >> frac) as u64).wrapping_add(off)
    }
}

fn vendor() -> impl Strategy<Value = Vendor> {
    prop_oneof![Just(Vendor::Intel), Just(Vendor::Amd)]
}

fn khz() -> impl Strategy<Value = u32> {
    100_000u32..10_000_000
}

/// A VM frozen on host `a` and thawed on host `b`.
#[derive(Debug, Clone)]
struct Scenario {
    f_g: u32,
    a: SimHost,
    b: SimHost,
    h: u64,
    h2: u64,
    vm_offset: u64,
    adjust: Vec<u64>,
    k: u64,
    t: u64,
    dt: u64,
    k2: u64,
}

fn scenario() -> impl Strategy<Value = Scenario> {
    (
        (khz(), vendor(), khz(), vendor(), khz()),
        (any::<u64>(), any::<u64>(), any::<u64>()),
        prop::collection::vec(any::<u64>(), 1..6),
        (
            0u64..1 << 62,
            0u64..1 << 62,
            0u64..10_000_000_000_000,
            any::<u64>(),
        ),
    )
        .prop_map(
            |((f_g, va, ka, vb, kb), (h, h2, vm_offset), adjust, (k, t, dt, k2))| Scenario {
                f_g,
                a: SimHost::new(va, ka, f_g),
                b: SimHost::new(vb, kb, f_g),
                h,
                h2,
                vm_offset,
                adjust,
                k,
                t,
                dt,
                k2,
            },
        )
}

impl Scenario {
    fn readings(&self) -> Vec<VcpuTscReading> {
        self.adjust
            .iter()
            .map(|a| VcpuTscReading {
                offset: self.vm_offset.wrapping_add(*a),
                tsc_adjust: *a,
            })
            .collect()
    }
    /// Guest TSC of every vCPU at the freeze, from the host model.
    fn before(&self) -> Vec<u64> {
        self.readings()
            .iter()
            .map(|r| self.a.guest_tsc(self.h, r.offset))
            .collect()
    }
    fn freeze_sample(&self) -> HostSample {
        HostSample {
            kvmclock_ns: self.k,
            realtime_ns: self.t,
            host_tsc: self.h,
            bracket_ns: 0,
        }
    }
    fn thaw_sample(&self) -> HostSample {
        HostSample {
            kvmclock_ns: self.k2,
            realtime_ns: self.t + self.dt,
            host_tsc: self.h2,
            bracket_ns: 0,
        }
    }
    /// Captures on host a, stores as JSON and reads it back.
    fn snapshot(&self) -> TscSnapshot {
        let cap = capture(
            &self.freeze_sample(),
            &self.a.params(),
            self.f_g,
            &self.readings(),
            true,
            true,
        )
        .expect("capture");
        assert_eq!(cap.skew_cycles, 0);
        TscSnapshot::from_json(&cap.snapshot.to_json()).expect("round trip")
    }
    /// Guest TSC of every vCPU on host b right after applying `plan`.
    fn after(&self, plan: &ThawPlan) -> Vec<u64> {
        plan.vcpu_offsets
            .iter()
            .map(|off| self.b.guest_tsc(self.h2, *off))
            .collect()
    }
    fn expected_advance(&self) -> u64 {
        ((self.dt as u128) * (self.f_g as u128) / 1_000_000) as u64
    }
}

/// |a - b| modulo 2^64, as a signed distance.
fn dist(a: u64, b: u64) -> u64 {
    (a.wrapping_sub(b) as i64).unsigned_abs()
}

/// kvmclock and the TSC agree within 1 µs worth of cycles (+1 for rounding).
fn assert_kvmclock_agrees(plan: &ThawPlan, k: u64, f_g: u32, tsc_advance: u64) {
    let clock_advance = plan.set_clock.clock_ns.wrapping_sub(k);
    let as_cycles = ((clock_advance as u128) * (f_g as u128) / 1_000_000) as u64;
    let tolerance = u64::from(f_g) / 1000 + 1;
    assert!(
        dist(as_cycles, tsc_advance) <= tolerance,
        "kvmclock advanced {clock_advance} ns = {as_cycles} cycles, TSC {tsc_advance} cycles"
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn frozen_keeps_every_vcpu_continuous(s in scenario()) {
        let plan = plan_thaw(&s.snapshot(), &s.thaw_sample(), &s.b.params(), ClockPolicy::Frozen).unwrap();
        prop_assert_eq!(plan.policy, ClockPolicy::Frozen);
        for (i, (b, a)) in s.before().iter().zip(s.after(&plan)).enumerate() {
            prop_assert!(dist(a, *b) <= 1, "vCPU {}: before {} after {}", i, b, a);
            assert_kvmclock_agrees(&plan, s.k, s.f_g, a.wrapping_sub(*b));
        }
        prop_assert_eq!(plan.set_clock, SetClock { clock_ns: s.k, realtime_ns: s.t + s.dt });
    }

    #[test]
    fn wallclock_advances_by_elapsed(s in scenario()) {
        let plan = plan_thaw(&s.snapshot(), &s.thaw_sample(), &s.b.params(), ClockPolicy::Wallclock).unwrap();
        prop_assert_eq!(plan.elapsed_ns, s.dt);
        let want = s.expected_advance();
        for (b, a) in s.before().iter().zip(s.after(&plan)) {
            let adv = a.wrapping_sub(*b);
            prop_assert!(dist(adv, want) <= 1, "advanced {} want {}", adv, want);
            assert_kvmclock_agrees(&plan, s.k, s.f_g, adv);
        }
        prop_assert_eq!(plan.set_clock.clock_ns, s.k.wrapping_add(s.dt));
        prop_assert_eq!(plan.set_clock.realtime_ns, s.t + s.dt);
    }

    #[test]
    fn report_places_the_freeze_and_the_thaw(s in scenario(), frozen in any::<bool>()) {
        let policy = if frozen { ClockPolicy::Frozen } else { ClockPolicy::Wallclock };
        let snap = s.snapshot();
        let plan = plan_thaw(&snap, &s.thaw_sample(), &s.b.params(), policy).unwrap();
        let r = ClockReport::from_plan(
            policy, &plan, s.b.vendor, s.f_g, plan.vm_offset, Some(plan.vm_offset), true,
        );
        // The freeze's guest TSC is the snapshot's; the thaw's is where the new offset puts
        // the guest at the thaw's host sample; between them, the elapsed time shown.
        prop_assert_eq!(r.freeze_guest_tsc, Some(snap.vm_tsc()));
        prop_assert_eq!(r.thaw_guest_tsc, Some(plan.guest_tsc));
        prop_assert_eq!(
            plan.guest_tsc.wrapping_sub(snap.vm_tsc()),
            if frozen { 0 } else { plan.elapsed_cycles }
        );
    }

    #[test]
    fn one_base_offset_and_tsc_adjust_survives(s in scenario(), frozen in any::<bool>()) {
        let policy = if frozen { ClockPolicy::Frozen } else { ClockPolicy::Wallclock };
        let plan = plan_thaw(&s.snapshot(), &s.thaw_sample(), &s.b.params(), policy).unwrap();
        prop_assert_eq!(&plan.tsc_adjust, &s.adjust);
        prop_assert_eq!(plan.vcpu_tsc(), s.after(&plan));
        prop_assert_eq!(plan.vcpu_offsets.len(), s.adjust.len());
        for (off, a) in plan.vcpu_offsets.iter().zip(&s.adjust) {
            prop_assert_eq!(off.wrapping_sub(*a), plan.vm_offset);
        }
        // Each vCPU's TSC differs from vCPU 0's by exactly its TSC_ADJUST difference.
        let after = s.after(&plan);
        for (i, g) in after.iter().enumerate() {
            prop_assert_eq!(g.wrapping_sub(after[0]), s.adjust[i].wrapping_sub(s.adjust[0]));
        }
    }

    #[test]
    fn skew_is_measured_and_normalised_to_vcpu0(
        s in scenario(),
        skew in prop::collection::vec(-10_000i64..10_000, 0..5),
    ) {
        // vCPU 0 has no skew; the others' offsets are off by `skew`.
        let mut readings = s.readings();
        for (r, d) in readings.iter_mut().skip(1).zip(&skew) {
            r.offset = r.offset.wrapping_add(*d as u64);
        }
        let used: Vec<i64> = std::iter::once(0).chain(skew.iter().copied()).take(readings.len()).collect();
        let spread = (used.iter().max().unwrap() - used.iter().min().unwrap()) as u64;
        let cap = capture(&s.freeze_sample(), &s.a.params(), s.f_g, &readings, true, true).unwrap();
        prop_assert_eq!(cap.skew_cycles, spread);
        prop_assert_eq!(cap.snapshot.source().skew_cycles, spread);
        let plan = plan_thaw(&cap.snapshot, &s.thaw_sample(), &s.b.params(), ClockPolicy::Frozen).unwrap();
        prop_assert_eq!(!plan.warnings.is_empty(), spread != 0);
        let base0 = s.a.guest_tsc(s.h, readings[0].offset).wrapping_sub(s.adjust[0]);
        for (g, a) in s.after(&plan).iter().zip(&s.adjust) {
            prop_assert_eq!(g.wrapping_sub(*a), base0);
        }
    }

    #[test]
    fn migration_chain_keeps_tsc_continuous(
        s in scenario(),
        vc in vendor(),
        kc in khz(),
        run_b in 0u64..1 << 40,
        h3 in any::<u64>(),
    ) {
        // Thaw on b (wallclock), run there, capture on b from what KVM would
        // report, thaw on c (frozen): the guest TSC continues across both hops.
        let plan_b = plan_thaw(&s.snapshot(), &s.thaw_sample(), &s.b.params(), ClockPolicy::Wallclock).unwrap();
        let hb = s.h2.wrapping_add(run_b);
        let readings_b: Vec<VcpuTscReading> = plan_b.vcpu_offsets.iter().zip(&s.adjust)
            .map(|(o, a)| VcpuTscReading { offset: *o, tsc_adjust: *a }).collect();
        let at_capture_b: Vec<u64> = readings_b.iter().map(|r| s.b.guest_tsc(hb, r.offset)).collect();
        let sample_b = HostSample { kvmclock_ns: 1, realtime_ns: s.t + s.dt, host_tsc: hb, bracket_ns: 7 };
        let snap_b = capture(&sample_b, &s.b.params(), s.f_g, &readings_b, true, true).unwrap().snapshot;
        let c = SimHost::new(vc, kc, s.f_g);
        let now_c = HostSample { kvmclock_ns: 0, realtime_ns: 0, host_tsc: h3, bracket_ns: 0 };
        let plan_c = plan_thaw(&snap_b, &now_c, &c.params(), ClockPolicy::Frozen).unwrap();
        for (i, off) in plan_c.vcpu_offsets.iter().enumerate() {
            let g = c.guest_tsc(h3, *off);
            prop_assert!(dist(g, at_capture_b[i]) <= 1, "vCPU {}: {} vs {}", i, g, at_capture_b[i]);
        }
        prop_assert_eq!(plan_c.set_clock.clock_ns, 1);
    }

    #[test]
    fn tsc_wraps_around_2_pow_64(s in scenario(), below in 0u64..1_000_000) {
        // Put the VM TSC just below 2^64 so any advance wraps.
        let mut s = s;
        let model_scale = s.a.guest_tsc(s.h, 0);
        s.vm_offset = (u64::MAX - below).wrapping_sub(model_scale);
        s.dt = s.dt.max(10_000_000); // >= 10 ms: at >= 100 MHz that is >= 1e6 cycles
        let plan = plan_thaw(&s.snapshot(), &s.thaw_sample(), &s.b.params(), ClockPolicy::Wallclock).unwrap();
        let before = s.before();
        let after = s.after(&plan);
        prop_assert_eq!(before[0].wrapping_sub(s.adjust[0]), u64::MAX - below);
        prop_assert!(after[0].wrapping_sub(s.adjust[0]) < u64::MAX - below, "must have wrapped");
        prop_assert!(dist(after[0].wrapping_sub(before[0]), s.expected_advance()) <= 1);
    }

    #[test]
    fn realtime_going_back_is_zero_elapsed(s in scenario(), back in 1u64..1 << 40) {
        let snap = s.snapshot();
        let mut now = s.thaw_sample();
        now.realtime_ns = s.t.saturating_sub(back);
        prop_assume!(now.realtime_ns < s.t);
        let plan = plan_thaw(&snap, &now, &s.b.params(), ClockPolicy::Wallclock).unwrap();
        prop_assert_eq!(plan.elapsed_ns, 0);
        prop_assert!(!plan.warnings.is_empty());
        for (b, a) in s.before().iter().zip(s.after(&plan)) {
            prop_assert!(dist(a, *b) <= 1);
        }
    }

    #[test]
    fn same_host_tsc_keeps_the_offset(s in scenario(), run in 0u64..1 << 50) {
        // Same host, boot and frequency: elapsed from the host TSC, O' = O.
        let snap = s.snapshot();
        let now = HostSample { host_tsc: s.h.wrapping_add(run), ..s.thaw_sample() };
        prop_assume!(now.host_tsc >= s.h);
        let plan = plan_thaw_elapsed(&snap, &now, &s.a.params(), Elapsed::SameHostTsc).unwrap();
        prop_assert_eq!(plan.vm_offset, s.vm_offset);
        prop_assert_eq!(plan.policy, ClockPolicy::Wallclock);
        let adv = s.a.guest_tsc(now.host_tsc, 0).wrapping_sub(s.a.guest_tsc(s.h, 0));
        prop_assert_eq!(plan.elapsed_cycles, adv);
        assert_kvmclock_agrees(&plan, s.k, s.f_g, adv);
    }

    #[test]
    fn actual_tsc_plan_refuses_backwards_and_agrees_forwards(
        f_g in khz(), v in vendor(), h in any::<u64>(),
        adjust in prop::collection::vec(any::<u64>(), 1..5),
        junk in any::<u64>(), step in 1u64..1 << 62, k in 0u64..1 << 62, forward in any::<bool>(),
    ) {
        // A host that ignores offsets and has no scaling: every vCPU reads H.
        let host = SimHost::new(v, f_g, f_g);
        let readings: Vec<VcpuTscReading> = adjust.iter()
            .map(|a| VcpuTscReading { offset: junk, tsc_adjust: *a }).collect();
        let sample = HostSample { kvmclock_ns: k, realtime_ns: 0, host_tsc: h, bracket_ns: 3 };
        let snap = capture(&sample, &host.params(), f_g, &readings, true, false).unwrap().snapshot;
        prop_assert!(!snap.source().offsets_honoured);
        // vCPU 0 reads H, so G = H - A_0.
        prop_assert_eq!(snap.vm_tsc(), h.wrapping_sub(adjust[0]));
        let h2 = if forward { h.wrapping_add(step) } else { h.wrapping_sub(step) };
        let now = HostSample { kvmclock_ns: 0, realtime_ns: 9, host_tsc: h2, bracket_ns: 0 };
        let actual = h2.wrapping_sub(adjust[0]);
        match plan_for_actual_tsc(&snap, &now, actual) {
            Ok(plan) => {
                prop_assert!(forward);
                prop_assert_eq!(plan.guest_tsc, actual);
                prop_assert_eq!(plan.set_clock.realtime_ns, 9);
                assert_kvmclock_agrees(&plan, k, f_g, step);
            }
            Err(TscError::Backwards { planned, actual: got }) => {
                prop_assert!(!forward);
                prop_assert_eq!((planned, got), (snap.vm_tsc(), actual));
            }
            Err(TscError::ElapsedOutOfRange { cycles, .. }) => {
                // Only when the elapsed time does not fit 64-bit ns (centuries).
                prop_assert!(forward);
                prop_assert_eq!(cycles, step);
                prop_assert!((step as u128) * 1_000_000 / (f_g as u128) >= u64::MAX as u128);
            }
            Err(e) => prop_assert!(false, "unexpected error {}", e),
        }
    }
}

#[test]
fn thaw_refuses_a_host_that_cannot_run_the_frequency() {
    let s = SimHost::new(Vendor::Amd, 2_445_404, 2_445_404);
    let readings = [VcpuTscReading {
        offset: 0,
        tsc_adjust: 0,
    }];
    let sample = HostSample {
        kvmclock_ns: 0,
        realtime_ns: 0,
        host_tsc: 0,
        bracket_ns: 0,
    };
    let snap = capture(&sample, &s.params(), 2_445_404, &readings, true, true)
        .unwrap()
        .snapshot;
    // An SVM host at 9 MHz cannot scale by > 256x.
    let slow = HostTsc {
        vendor: Vendor::Amd,
        host_khz: 9_000,
        ratio: Vendor::Amd.default_ratio(),
    };
    let err = plan_thaw(&snap, &sample, &slow, ClockPolicy::Wallclock).unwrap_err();
    assert!(matches!(err, TscError::FrequencyOutOfRange { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("2445404 kHz") && msg.contains("9000 kHz") && msg.contains("250 ppm"),
        "{msg}"
    );
    // A host whose ratio is not the one KVM computes (no scaling, 2x faster guest).
    let fast = HostTsc {
        vendor: Vendor::Intel,
        host_khz: 1_222_702,
        ratio: Vendor::Intel.default_ratio(),
    };
    let err = plan_thaw(&snap, &sample, &fast, ClockPolicy::Frozen).unwrap_err();
    assert!(matches!(err, TscError::RatioMismatch { .. }), "{err}");
    // Within 250 ppm runs unscaled.
    let near = HostTsc {
        vendor: Vendor::Amd,
        host_khz: 2_445_380,
        ratio: Vendor::Amd.default_ratio(),
    };
    assert!(plan_thaw(&snap, &sample, &near, ClockPolicy::Frozen).is_ok());
}

#[test]
fn capture_rejects_bad_input() {
    let host = HostTsc {
        vendor: Vendor::Amd,
        host_khz: 1_000_000,
        ratio: 1 << 32,
    };
    let sample = HostSample {
        kvmclock_ns: 0,
        realtime_ns: 0,
        host_tsc: 0,
        bracket_ns: 0,
    };
    let one = [VcpuTscReading {
        offset: 0,
        tsc_adjust: 0,
    }];
    assert_eq!(
        capture(&sample, &host, 1_000_000, &[], true, true).unwrap_err(),
        TscError::NoVcpus
    );
    assert!(matches!(
        capture(&sample, &host, 0, &one, true, true),
        Err(TscError::ZeroFrequency { which: "guest_khz" })
    ));
    let bad = HostTsc {
        ratio: 1 << 40,
        ..host
    };
    assert!(matches!(
        capture(&sample, &bad, 1_000_000, &one, true, true),
        Err(TscError::InvalidRatio { .. })
    ));
}

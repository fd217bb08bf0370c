//! Cross-host migration, simulated in pure code against an independent world model.
//!
//! One true time axis `t` (ns). Each simulated host has its own vendor, TSC frequency, TSC value
//! at `t = 0` (hosts booted at different moments), kvmclock base, and a realtime clock that is
//! off true time by a known amount (`skew_ns`: NTP disagreement between hosts). Samples read
//! realtime with an error inside the sample's bracket. A guest hops across a chain of such hosts
//! (VMX to SVM and back, different frequencies), running for a while on each; at each hop it is
//! captured on one host and thawed on the next under a policy. The hardware model, not the
//! planner, says what TSC the guest reads afterwards.
//!
//! What must hold at every hop: under `frozen` the guest TSC continues within a cycle; under
//! `wallclock` it advances by the true gap plus exactly the two hosts' clock disagreement, within
//! the plan's stated `error_bound_ns`; kvmclock and the TSC agree within 1 µs; every vCPU gets the
//! same VM offset with its own TSC_ADJUST on top.

use hypervisor::tsc::*;
use proptest::prelude::*;

/// A simulated host.
#[derive(Debug, Clone, Copy)]
struct Host {
    vendor: Vendor,
    khz: u32,
    ratio: u64,
    /// Host TSC at true time 0.
    tsc_base: u64,
    /// kvmclock at true time 0.
    kvmclock_base: u64,
    /// This host's realtime minus true time, ns.
    skew_ns: i64,
}

impl Host {
    fn host_tsc(&self, t: u64) -> u64 {
        let cycles = (u128::from(t) * u128::from(self.khz) / 1_000_000) as u64;
        self.tsc_base.wrapping_add(cycles)
    }
    fn params(&self) -> HostTsc {
        HostTsc {
            vendor: self.vendor,
            host_khz: self.khz,
            ratio: self.ratio,
        }
    }
    /// What the hardware gives a vCPU with KVM offset `off` at true time `t`; the fraction
    /// width is written here per vendor, independently of the crate.
    fn guest_tsc(&self, t: u64, off: u64) -> u64 {
        let frac = match self.vendor {
            Vendor::Intel => 48,
            Vendor::Amd => 32,
        };
        let h = u128::from(self.host_tsc(t));
        (((h * u128::from(self.ratio)) >> frac) as u64).wrapping_add(off)
    }
    /// One sample at true time `t`; realtime is read `err_ns` off, inside `bracket_ns`.
    fn sample(&self, t: u64, bracket_ns: u64, err_ns: i64) -> HostSample {
        let realtime =
            i128::from(T0) + i128::from(t) + i128::from(self.skew_ns) + i128::from(err_ns);
        HostSample {
            kvmclock_ns: self.kvmclock_base.wrapping_add(t),
            realtime_ns: realtime as u64,
            host_tsc: self.host_tsc(t),
            bracket_ns,
        }
    }
}

/// True time 0 in realtime ns (late 2026).
const T0: u64 = 1_795_000_000_000_000_000;

/// One hop: run on the current host, then capture, wait, thaw on the next.
#[derive(Debug, Clone)]
struct Hop {
    next: Host,
    run_ns: u64,
    gap_ns: u64,
    frozen: bool,
    bracket_capture: u64,
    bracket_thaw: u64,
    /// Where inside its bracket each realtime read fell, as a fraction in [-1/2, 1/2].
    err_capture: f64,
    err_thaw: f64,
}

fn host(f_g: u32) -> impl Strategy<Value = Host> {
    (
        prop_oneof![Just(Vendor::Intel), Just(Vendor::Amd)],
        500_000u32..5_000_000,
        any::<u64>(),
        0u64..1 << 60,
        -100_000_000i64..100_000_000,
    )
        .prop_map(
            move |(vendor, khz, tsc_base, kvmclock_base, skew_ns)| Host {
                vendor,
                khz,
                ratio: tsc_ratio(vendor, khz, f_g).expect("in range").ratio,
                tsc_base,
                kvmclock_base,
                skew_ns,
            },
        )
}

fn hop(f_g: u32) -> impl Strategy<Value = Hop> {
    (
        host(f_g),
        0u64..100_000_000_000,
        1_000_000_000u64..100_000_000_000,
        any::<bool>(),
        prop_oneof![Just(0u64), 0u64..20_000],
        prop_oneof![Just(0u64), 0u64..20_000],
        -0.5f64..=0.5,
        -0.5f64..=0.5,
    )
        .prop_map(
            |(next, run_ns, gap_ns, frozen, bracket_capture, bracket_thaw, ec, et)| Hop {
                next,
                run_ns,
                gap_ns,
                frozen,
                bracket_capture,
                bracket_thaw,
                err_capture: ec,
                err_thaw: et,
            },
        )
}

fn world() -> impl Strategy<Value = (u32, Host, u64, Vec<u64>, Vec<Hop>)> {
    (1_000_000u32..4_000_000).prop_flat_map(|f_g| {
        (
            Just(f_g),
            host(f_g),
            any::<u64>(),
            prop::collection::vec(any::<u64>(), 1..5),
            prop::collection::vec(hop(f_g), 1..6),
        )
    })
}

fn dist(a: u64, b: u64) -> u64 {
    (a.wrapping_sub(b) as i64).unsigned_abs()
}

fn ns_of(cycles: u64, f_g: u32) -> i128 {
    i128::from(cycles) * 1_000_000 / i128::from(f_g)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn guest_time_across_a_chain_of_hosts(
        (f_g, first, g0, adjust, hops) in world()
    ) {
        // The VM starts on `first` at t = 0 with VM TSC g0: offsets O + A_i on every vCPU.
        let mut cur = first;
        let mut t = 0u64;
        let o = g0.wrapping_sub(cur.guest_tsc(0, 0));
        let mut offsets: Vec<u64> = adjust.iter().map(|a| o.wrapping_add(*a)).collect();
        for (n, h) in hops.iter().enumerate() {
            t += h.run_ns;
            let err_c = (h.err_capture * h.bracket_capture as f64) as i64;
            let freeze = cur.sample(t, h.bracket_capture, err_c);
            let readings: Vec<VcpuTscReading> = offsets
                .iter()
                .zip(&adjust)
                .map(|(off, a)| VcpuTscReading { offset: *off, tsc_adjust: *a })
                .collect();
            let before: Vec<u64> = offsets.iter().map(|off| cur.guest_tsc(t, *off)).collect();
            let cap = capture(&freeze, &cur.params(), f_g, &readings, true, true).unwrap();
            // Through the serialised form, as a snapshot or migration carries it.
            let snap = TscSnapshot::from_json(&cap.snapshot.to_json()).unwrap();

            t += h.gap_ns;
            let next = h.next;
            let err_t = (h.err_thaw * h.bracket_thaw as f64) as i64;
            let now = next.sample(t, h.bracket_thaw, err_t);
            let policy = if h.frozen { ClockPolicy::Frozen } else { ClockPolicy::Wallclock };
            let plan = plan_thaw(&snap, &now, &next.params(), policy).unwrap();
            let after: Vec<u64> = plan.vcpu_offsets.iter().map(|off| next.guest_tsc(t, *off)).collect();

            // One VM offset, TSC_ADJUST on top.
            for (i, a) in adjust.iter().enumerate() {
                prop_assert_eq!(plan.vcpu_offsets[i].wrapping_sub(*a), plan.vm_offset);
            }
            // Every vCPU advanced by the same amount (its TSC_ADJUST kept).
            let advance = after[0].wrapping_sub(before[0]);
            for i in 1..after.len() {
                prop_assert!(dist(after[i].wrapping_sub(before[i]), advance) <= 1,
                    "hop {}: vCPU {} advanced differently", n, i);
            }
            let advance_ns = ns_of(advance, f_g);
            let bound = i128::from(plan.error_bound_ns);
            if h.frozen {
                prop_assert!(dist(after[0], before[0]) <= 1, "hop {}: frozen moved {} cycles", n, advance);
                prop_assert!(advance_ns.abs() <= bound, "hop {}: frozen {} ns > bound {}", n, advance_ns, bound);
            } else {
                // Error against true time = the hosts' clock disagreement, within the bound.
                let disagreement = i128::from(next.skew_ns) - i128::from(cur.skew_ns);
                let err = advance_ns - i128::from(h.gap_ns) - disagreement;
                prop_assert!(err.abs() <= bound,
                    "hop {}: advance {} ns, gap {} ns, clocks {} ns apart: error {} > bound {}",
                    n, advance_ns, h.gap_ns, disagreement, err, bound);
                // Where the hosts' clocks agree the whole error is within the bound.
                if disagreement == 0 {
                    prop_assert!((advance_ns - i128::from(h.gap_ns)).abs() <= bound);
                }
            }
            // kvmclock agrees with the TSC within 1 µs.
            let clock_advance = plan.set_clock.clock_ns.wrapping_sub(freeze.kvmclock_ns);
            prop_assert!((i128::from(clock_advance) - advance_ns).abs() <= 1_000,
                "hop {}: kvmclock advanced {} ns, TSC {} ns", n, clock_advance, advance_ns);

            offsets = plan.vcpu_offsets.clone();
            cur = next;
        }
    }
}

/// The bound itself: only the sample brackets count under `wallclock`, never under `frozen`.
#[test]
fn error_bound_counts_brackets_and_rounding() {
    // 2 cycles at 1 GHz = 2 ns; at 3 MHz ceil(0.67 µs) = 667 ns.
    assert_eq!(error_bound_ns(Elapsed::Zero, 5_000, 7_000, 1_000_000), 2);
    assert_eq!(
        error_bound_ns(Elapsed::Realtime, 5_000, 7_000, 1_000_000),
        12_002
    );
    assert_eq!(error_bound_ns(Elapsed::Realtime, 0, 0, 3_000), 667);
    assert_eq!(error_bound_ns(Elapsed::SameHostTsc, 9, 9, 2_000_000), 1);
}

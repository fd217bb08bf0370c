#!/usr/bin/env bash
# The whole Hourglass test suite: formatting, lints, unit/property/integration tests against the
# real /dev/kvm (tests print why they skip where it is absent), then the nested kvm_amd suite
# (the host that honours TSC offsets), then a short fuzz smoke run when the fuzz targets exist.
#
#   scripts/test.sh            everything
#   SKIP_NESTED=1 scripts/test.sh   everything but the nested kvm_amd part
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n== %s ==\n' "$*"; }

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy (workspace, all targets, -D warnings)"
cargo clippy --workspace --all-targets -- -D warnings

step "build binaries (the integration tests drive the real hourglass and ch-remote)"
cargo build --workspace --bins

step "cargo test (workspace)"
if [ ! -e /dev/kvm ]; then
    echo "note: /dev/kvm is absent: tests that need it will print why they skip"
fi
cargo test --workspace --no-fail-fast -- --test-threads="${TEST_THREADS:-2}"

if [ -x scripts/nested-kvm.sh ] && [ "${SKIP_NESTED:-0}" != 1 ]; then
    step "nested kvm_amd (TSC offsets honoured)"
    # Issue 18: QEMU's multi-threaded TCG (one host thread per emulated CPU) sometimes leaves an
    # SVM world switch half done, so a guest's VMCB holds the host's own state or a guest takes
    # a fault on memory that is mapped (docs/design.md section 9). With one TCG thread that never
    # happened (0 of 11 soaks against 6 of 12), but a Linux guest's boot stalls there. So the
    # suites of the test guest run on one TCG thread: the VMM with its test guest (nested_vmm_*)
    # and everything on two hosts, live migration A -> B included; the hypervisor-level tests
    # and the Linux guests keep QEMU's default. The Linux clock tests (nested_linux_clock_*, about
    # 6 min) run on request, `scripts/nested-kvm.sh nested_linux_clock_`: a restored Linux guest
    # was hit once in about 60 operations by the default threading's fault. The soaks
    # (nested_vmm_soak_*) are issue 18's experiments, on request. One retry, only where the
    # emulated host itself hung or died mid-test (a VMM inside it cannot do that; the emulator
    # can), printed and counted in the summary line (scripts/nested-kvm.sh, emulator_fault).
    NESTED_SKIP_FILTER="nested_xhost_ nested_vmm_ nested_linux_clock_" scripts/nested-kvm.sh
    step "nested kvm_amd, the VMM with its test guest (one TCG thread)"
    NESTED_TCG_THREAD=single NESTED_SKIP_FILTER="nested_vmm_soak_" scripts/nested-kvm.sh nested_vmm_
    step "nested kvm_amd, two hosts (different TSC bases; one TCG thread)"
    NESTED_TCG_THREAD=single NESTED_SKIP_FILTER="" scripts/nested-kvm.sh --two-hosts
fi

if [ -x scripts/fuzz.sh ] && [ "${SKIP_FUZZ:-0}" != 1 ]; then
    step "fuzz smoke"
    scripts/fuzz.sh all "${FUZZ_SECONDS:-20}"
fi
echo
echo "all tests passed"

#!/usr/bin/env bash
# The nested kvm_amd part of the test suite, as scripts/test.sh runs it, in four steps:
#
#   scripts/nested-ci.sh              run the steps once; exit 0 only when all four passed
#   scripts/nested-ci.sh --repeat N   run them N times in a row and print a table: one row per
#                                     run and step with its summary line (issue 18's measure)
#
# Why the steps are split as they are (issue 18, docs/design.md section 9):
#   1. the hypervisor-level tests and the Linux guests on one emulated CPU (NESTED_SMP=1), the
#      Linux clock tests (nested_linux_clock_*) included: they read the guest's clocks through
#      its TSC, so one CPU's slow console no longer widens what they measure;
#   2. the VMM with its busy test guest (nested_vmm_*, 4-vCPU guests whose cross-vCPU claims
#      want two host CPUs) on two emulated CPUs and one TCG thread;
#   3. both two-host suites, live migration A -> B included, on one TCG thread;
#   4. the Linux clock tests across two hosts (nested_xhost_live_linux_*: snapshot on A ->
#      restore on B, live migration A -> B), each host on one emulated CPU, as step 1's Linux
#      guests and for the same reason.
# Two emulator faults decide that; the evidence and the figures are in docs/design.md
# section 9 (and docs/qemu-report.md), not repeated here. (a) QEMU's VMRUN emulation can lose
# the host's interrupt request; scripts/nested-kvm.sh boots the host with a periodic tick
# (highres=off nohz=off), which asks again every 4 ms, and step 1 stopped hanging. (b) Two
# emulated CPUs under QEMU's default threading (one host thread per emulated CPU) sometimes
# leave an SVM world switch half done; the tick does not cure that, and one TCG thread
# (-accel tcg,thread=single) or one emulated CPU never showed it.
# The soaks (nested_vmm_soak_*) are issue 18's experiments, on request. A retry only where the
# emulated host itself hung or died mid-test (a VMM inside it cannot do that; the emulator can),
# printed and counted in the step's summary line (scripts/nested-kvm.sh, emulator_fault): one
# per step. Step 1's host is declared hung after 60 s without a heartbeat (beats come every
# 5.1-5.6 s in healthy rounds, Linux boots included).
set -uo pipefail
cd "$(dirname "$0")/.."

STEPS=(
    "hypervisor-level and Linux guests (one emulated CPU)|NESTED_SMP=1 NESTED_EMULATOR_RETRIES=1 NESTED_HANG_S=60 NESTED_SKIP_FILTER='nested_xhost_ nested_vmm_' scripts/nested-kvm.sh"
    "the VMM with its test guest (one TCG thread)|NESTED_TCG_THREAD=single NESTED_SKIP_FILTER=nested_vmm_soak_ scripts/nested-kvm.sh nested_vmm_"
    "two hosts, different TSC bases (one TCG thread)|NESTED_TCG_THREAD=single NESTED_SKIP_FILTER=nested_xhost_live_linux_ scripts/nested-kvm.sh --two-hosts"
    "a Linux guest across two hosts (one emulated CPU each)|NESTED_SMP=1 NESTED_SKIP_FILTER= scripts/nested-kvm.sh --two-hosts nested_xhost_live_linux_"
)

# run_steps LOGDIR: runs every step (a failed step does not stop the next), each step's output
# to the terminal and to LOGDIR/step-K.log; exit status 0 only when all passed.
run_steps() {
    local k=0 status=0 name cmd
    for s in "${STEPS[@]}"; do
        k=$((k + 1))
        name=${s%%|*}
        cmd=${s#*|}
        printf '\n== nested kvm_amd, %s ==\n' "$name"
        bash -c "$cmd" 2>&1 | tee "$1/step-$k.log"
        [ "${PIPESTATUS[0]}" = 0 ] || status=1
    done
    return "$status"
}

case "${1:-}" in
    "")
        d=$(mktemp -d)
        run_steps "$d"
        status=$?
        rm -rf "$d"
        exit "$status"
        ;;
    --repeat)
        n=${2:-}
        [[ "$n" =~ ^[1-9][0-9]*$ ]] || {
            echo "usage: scripts/nested-ci.sh [--repeat N]   (N a positive count, not '$n')" >&2
            exit 2
        }
        out=target/nested-repeat
        rm -rf "$out"
        mkdir -p "$out"
        failed_runs=0
        for i in $(seq 1 "$n"); do
            mkdir -p "$out/run-$i"
            t0=$(date +%s)
            run_steps "$out/run-$i" >"$out/run-$i/all.log" 2>&1 || failed_runs=$((failed_runs + 1))
            echo "run $i: $(($(date +%s) - t0)) s" >>"$out/times"
            echo "nested-ci: run $i of $n done in $(($(date +%s) - t0)) s; $failed_runs failed so far" >&2
        done
        echo
        echo "| run | step | summary |"
        echo "|---|---|---|"
        for i in $(seq 1 "$n"); do
            for k in $(seq 1 "${#STEPS[@]}"); do
                summary=$(grep '^nested: ' "$out/run-$i/step-$k.log" | tail -n 1)
                echo "| $i | $k | ${summary:-(no summary line)} |"
            done
        done
        echo
        echo "nested-ci: $failed_runs of $n runs failed; logs in $out/"
        [ "$failed_runs" = 0 ]
        ;;
    *)
        echo "usage: scripts/nested-ci.sh [--repeat N]" >&2
        exit 2
        ;;
esac

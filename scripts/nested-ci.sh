#!/usr/bin/env bash
# The nested kvm_amd part of the test suite, as scripts/test.sh runs it, in three steps:
#
#   scripts/nested-ci.sh              run the steps once; exit 0 only when all three passed
#   scripts/nested-ci.sh --repeat N   run them N times in a row and print a table: one row per
#                                     run and step with its summary line (issue 18's measure)
#
# Why the steps are split as they are (issue 18, docs/design.md section 9): with two emulated
# CPUs, QEMU's multi-threaded TCG (one host thread per emulated CPU, its default) sometimes
# leaves an SVM world switch half done, so a guest's VMCB holds the host's own state or a guest
# takes a fault on memory that is mapped; on one TCG thread (-accel tcg,thread=single) that was
# not seen in 11 soaks of the test guest, but a Linux guest deadlocks early in its boot there
# (a spinlock no running CPU holds). With one emulated CPU neither was seen. So:
#   1. the hypervisor-level tests and the Linux guests on one emulated CPU (NESTED_SMP=1);
#      the Linux clock tests (nested_linux_clock_*, 4 x 83 s) are not among them: on one
#      emulated CPU the host hung in 2 of 3 of them, on two (QEMU's default) they passed 4 of 4
#      but that threading is what corrupts guests; on request: scripts/nested-kvm.sh
#      nested_linux_clock_;
#   2. the VMM with its busy test guest (nested_vmm_*, 4-vCPU guests whose cross-vCPU claims
#      want two host CPUs) on two emulated CPUs and one TCG thread;
#   3. both two-host suites, live migration A -> B included, on one TCG thread.
# The soaks (nested_vmm_soak_*) are issue 18's experiments, on request. A retry only where the
# emulated host itself hung or died mid-test (a VMM inside it cannot do that; the emulator can),
# printed and counted in the step's summary line (scripts/nested-kvm.sh, emulator_fault): one in
# steps 2 and 3, six in step 1 (a round gets one or two Linux tests done before its host hangs,
# and there are five; a CI run that day needed more than three), whose hosts are declared hung after
# 60 s without a heartbeat (beats come every 5.1-5.6 s in healthy rounds, Linux boots
# included). On 2026-12-06, on a quiet machine, step 1's host hung in 7 of its 8 rounds, then in
# 4 rounds of 4 in a CI run and 2 of 2 in another (last session: none in 9 runs). Of the twelve
# hangs read through QEMU's monitor (scripts/nested-kvm.sh, dump_cpu), ten show the emulated
# CPU inside the two-vCPU Linux guest, spinning in a cross-vCPU wait (stop_machine's
# multi_cpu_stop 5x, smp_call_function_many_cond's csd lock 3x, __timer_delete_sync 1x,
# cpu_init 1x), two more a loop at one boot-time guest address (a bzImage guest's addresses are
# KASLR'd, a PVH guest's are the host's own with nokaslr, the same kernel), every register
# unchanged over 3 s, and never leaving guest mode, so the host never runs the guest's other
# vCPU thread and never beats again. On a real CPU the host's timer interrupt (KVM intercepts
# INTR) ends the guest's time slice; a process in the host, our VMM included, cannot stop that.
# Our userfaultfd fill is not the trigger: with it off (HOURGLASS_NO_USERFAULTFD=1) the host
# hung as often, once in the round's first Linux boot.
# Five later hangs, read with the host's own local APIC and QEMU's threads: QEMU's vCPU
# thread runs flat out, the host's timer interrupt (vector 236) waits in the APIC's IRR,
# unmasked, and the guest spins on `pause`, which KVM does not intercept here (TCG offers no
# PAUSE filter). A real CPU would exit to the host on that interrupt; QEMU 7.2 and 10.0.2
# (3 of 4 rounds hung) do not. docs/design.md section 9 has the detail.
set -uo pipefail
cd "$(dirname "$0")/.."

STEPS=(
    "hypervisor-level and Linux guests (one emulated CPU)|NESTED_SMP=1 NESTED_EMULATOR_RETRIES=6 NESTED_HANG_S=60 NESTED_SKIP_FILTER='nested_xhost_ nested_vmm_ nested_linux_clock_' scripts/nested-kvm.sh"
    "the VMM with its test guest (one TCG thread)|NESTED_TCG_THREAD=single NESTED_SKIP_FILTER=nested_vmm_soak_ scripts/nested-kvm.sh nested_vmm_"
    "two hosts, different TSC bases (one TCG thread)|NESTED_TCG_THREAD=single NESTED_SKIP_FILTER= scripts/nested-kvm.sh --two-hosts"
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

#!/usr/bin/env bash
# Pause/resume latency benchmark of Hourglass on the real /dev/kvm.
#
#   scripts/bench-pause.sh                    # 1, 4 and 16 vCPUs, 200 cycles, release build
#   HOURGLASS_BENCH_VCPUS=1,2 HOURGLASS_BENCH_CYCLES=50 scripts/bench-pause.sh
#   HOURGLASS_BENCH_GUEST=idle scripts/bench-pause.sh   # only the idle guest (busy, idle, idle:N)
#   HOURGLASS_BENCH_CLIENT_SLICE=1 scripts/bench-pause.sh # client thread with a short time slice
#   PROFILE=dev scripts/bench-pause.sh        # debug build (faster to build, slower to run)
#
# Guests: `busy` (the test guest's sampling loop on every vCPU), `idle` (each vCPU halts 10 ms
# between samples: an idle OS on a 100 Hz tick) and `idle:1000` (a 1 kHz tick).
# Prints a table of p50/p99 in microseconds: request sent -> response received for vm.pause
# and vm.resume; the part of those spent outside Vm::pause/Vm::resume (client, API server,
# scheduling); and, measured inside the VMM, pause request -> every vCPU parked, the freeze,
# the thaw, and resume -> every vCPU thread out of the park.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -e /dev/kvm ]; then
    echo "skipped: /dev/kvm is absent"
    exit 0
fi
profile="${PROFILE:-release}"
if [ "$profile" = "release" ]; then
    exec cargo bench -p vmm --bench pause_resume
else
    exec cargo bench -p vmm --bench pause_resume --profile "$profile"
fi

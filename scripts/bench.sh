#!/usr/bin/env bash
# Pause/resume latency benchmark of Hourglass on the real /dev/kvm.
#
#   scripts/bench.sh                    # 1, 4 and 16 vCPUs, 200 cycles, release build
#   HOURGLASS_BENCH_VCPUS=1,2 HOURGLASS_BENCH_CYCLES=50 scripts/bench.sh
#   PROFILE=dev scripts/bench.sh        # debug build (faster to build, slower to run)
#
# Prints a table of p50/p99 in microseconds: request sent -> response received for vm.pause
# and vm.resume, and, measured inside the VMM, pause request -> every vCPU parked, the freeze,
# the thaw, and thaw done -> every vCPU released.
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

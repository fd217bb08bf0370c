#!/usr/bin/env bash
# Snapshot benchmark of Hourglass (no /dev/kvm needed).
#
#   scripts/bench-snapshot.sh                       # release build, defaults below
#   HOURGLASS_BENCH_WRITE_MIB=512,2048 scripts/bench-snapshot.sh
#   HOURGLASS_BENCH_RESTORE_MIB=256,1024,4096 HOURGLASS_BENCH_REPS=5 scripts/bench-snapshot.sh
#   HOURGLASS_BENCH_DIR=/mnt/disk scripts/bench-snapshot.sh   # the disk to measure
#   PROFILE=dev scripts/bench-snapshot.sh           # debug build (faster to build, slower)
#
# Prints two tables: snapshot write throughput against a dd-like sequential write of the same
# size on the same disk (both fsync'd; ratio 1.0 = disk speed), and restore times for 256 MiB,
# 1 GiB and 4 GiB guests (metadata, MAP_PRIVATE map, map + checksum check, Copy mode).
set -euo pipefail
cd "$(dirname "$0")/.."
profile="${PROFILE:-release}"
if [ "$profile" = "release" ]; then
    exec cargo bench -p vmm --bench snapshot
else
    exec cargo bench -p vmm --bench snapshot --profile "$profile"
fi

#!/usr/bin/env bash
# API server load benchmark of Hourglass on the real /dev/kvm (release build).
#
#   scripts/bench-api.sh                                   # 1, 8, 32, 64 clients, 10000 requests each
#   HOURGLASS_BENCH_API_CLIENTS=32 HOURGLASS_BENCH_API_REQUESTS=50000 scripts/bench-api.sh
#   HOURGLASS_BENCH_API_SECCOMP=false scripts/bench-api.sh # hourglass --seccomp false (default: its default)
#   PROFILE=dev scripts/bench-api.sh                       # debug build (faster to build, slower to run)
#
# The real `hourglass` boots the test guest (2 vCPUs, 64 MiB) for each client count; the
# clients send vm.info and vmm.ping alternately, one request per connection, over the API
# socket. Prints a table: clients, requests, req/s, p50 and p99 latency (ms), failures; warns
# if the guest counted a time violation meanwhile.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -e /dev/kvm ]; then
    echo "skipped: /dev/kvm is absent"
    exit 0
fi
profile="${PROFILE:-release}"
if [ "$profile" = "release" ]; then
    exec cargo bench -p vmm --bench api_load
else
    exec cargo bench -p vmm --bench api_load --profile "$profile"
fi

#!/usr/bin/env bash
# Every Hourglass benchmark, each printing a table of figures and ratios (release builds).
#
#   scripts/bench.sh                 all of them
#   scripts/bench.sh pause|tsc|snapshot|migration|api
#
#   pause      pause/resume latency, 1/4/16 vCPUs, busy and idle guest   (scripts/bench-pause.sh)
#   tsc        TscState freeze and thaw cost per vCPU, 1/8/64 vCPUs      (cargo bench -p hourglass-hypervisor)
#   snapshot   snapshot write vs plain sequential write; restore 256M-4G  (scripts/bench-snapshot.sh)
#   migration  total time and downtime, 256 MiB / 1 GiB, idle and dirty  (scripts/bench-migration.sh)
#   api        API requests/s and p50/p99 latency, 1/8/32/64 clients     (scripts/bench-api.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
what=${1:-all}
run() { printf '\n== bench: %s ==\n' "$1"; }
case "$what" in
    pause|all) run pause; scripts/bench-pause.sh ;;&
    tsc|all)
        run tsc
        if [ -e /dev/kvm ]; then cargo bench -p hourglass-hypervisor --bench tsc_cost; else echo "skipped: /dev/kvm is absent"; fi
        ;;&
    snapshot|all) run snapshot; scripts/bench-snapshot.sh ;;&
    migration|all) run migration; scripts/bench-migration.sh ;;&
    api|all) run api; scripts/bench-api.sh ;;&
    pause|tsc|snapshot|migration|api|all) ;;
    *) echo "usage: scripts/bench.sh [pause|tsc|snapshot|migration|api]" >&2; exit 2 ;;
esac

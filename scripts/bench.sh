#!/usr/bin/env bash
# Every Hourglass benchmark, each printing a table of figures and ratios (release builds).
#
#   scripts/bench.sh                 all of them
#   scripts/bench.sh pause|tsc|snapshot|migration|api|linux
#
#   pause      pause/resume latency, 1/4/16 vCPUs, busy and idle guest   (scripts/bench-pause.sh)
#   tsc        TscState freeze and thaw cost per vCPU, 1/8/64 vCPUs      (cargo bench -p hourglass-hypervisor)
#   snapshot   snapshot write vs plain sequential write; restore 256M-4G  (scripts/bench-snapshot.sh);
#              an idle guest's snapshot through the API, 256M-4G          (scripts/bench-snapshot-api.sh)
#   migration  total time and downtime, 256 MiB / 1 GiB, idle and dirty  (scripts/bench-migration.sh)
#   api        API requests/s and p50/p99 latency, 1/8/32/64 clients     (scripts/bench-api.sh)
#   linux      a 1 GiB Linux guest migrated right after boot, in the nested kvm_amd host (this
#              host's KVM cannot run Linux; every figure is QEMU's emulator's; minutes; not in
#              "all"): tests/tests/nested_linux.rs, nested_linux_1gib_guest_migrates_right_after_boot
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
    snapshot|all) run snapshot; scripts/bench-snapshot.sh; scripts/bench-snapshot-api.sh ;;&
    migration|all) run migration; scripts/bench-migration.sh ;;&
    api|all) run api; scripts/bench-api.sh ;;&
    linux)
        run linux
        log=$(mktemp)
        NESTED_SMP=1 scripts/nested-kvm.sh nested_linux_1gib_guest_migrates_right_after_boot \
            >"$log" 2>&1 || { tail -40 "$log"; rm -f "$log"; exit 1; }
        printf '%-9s %10s %12s %9s %11s %13s %7s\n' guest total_ms downtime_ms sent_MiB \
            data_pages unread_pages passes
        sed -n 's/.*LINUX-MIGRATION ram_mib=\([0-9]*\) total_ms=\([0-9.]*\) downtime_ms=\([0-9.]*\) sent_mib=\([0-9.]*\) data_pages=\([0-9]*\) unread_pages=\([0-9]*\) passes=\([0-9]*\).*/\1MiB \2 \3 \4 \5 \6 \7/p' "$log" |
            while read -r g t d s p u n; do
                printf '%-9s %10s %12s %9s %11s %13s %7s\n' "$g" "$t" "$d" "$s" "$p" "$u" "$n"
            done
        rm -f "$log"
        ;;
    pause|tsc|snapshot|migration|api|all) ;;
    *) echo "usage: scripts/bench.sh [pause|tsc|snapshot|migration|api|linux]" >&2; exit 2 ;;
esac

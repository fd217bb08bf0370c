#!/usr/bin/env bash
# Idle-guest snapshot through the API (needs /dev/kvm): a real `hourglass` process running the
# built-in test guest, paused, snapshotted REPS times with `ch-remote snapshot` into the same
# directory (each snapshot replaces the previous one atomically, as an operator's periodic
# snapshot does).
#
#   scripts/bench-snapshot-api.sh                   # release build; 256 MiB, 1 GiB and 4 GiB
#   SIZES_MIB="256" REPS=9 scripts/bench-snapshot-api.sh
#   BIN_DIR=DIR scripts/bench-snapshot-api.sh       # hourglass and ch-remote from DIR
#   SNAP_DIR=/mnt/disk scripts/bench-snapshot-api.sh  # the disk to write to (default: target/)
#
# Per guest size: the median and the range over REPS of the VMM's own time for the request
# (server_ms: capture of the paused state plus writing and fsyncing the snapshot, from the
# VMM's log), of the API call as ch-remote sees it (api_ms, its own start included), the
# size of memory.bin and of the whole snapshot on disk, and a plain write + fsync of the same
# number of bytes of data as memory.bin holds (plain_ms, dd) with the ratio server / plain.
# The guest (idle: it only samples its clocks, halting 1 ms between samples) has run for
# a second before the pause.
set -euo pipefail
cd "$(dirname "$0")/.."
profile="${PROFILE:-release}"
sizes="${SIZES_MIB:-256 1024 4096}"
reps="${REPS:-5}"
bench=bench-snapshot-api
TMP_BASE="${SNAP_DIR:-${CARGO_TARGET_DIR:-target}/tmp}"
. scripts/bench-vmm-common.sh

stats() { # values... -> "median (min-max)"
    local span
    span=$(python3 -c 'import sys; v=[float(x) for x in sys.argv[1:]]; print(f"{min(v):.1f}-{max(v):.1f}")' "$@")
    echo "$(median "$@") ($span)"
}

printf '| guest | server_ms median (range) | api_ms median (range) | memory.bin on disk | snapshot on disk | plain_ms | ratio |\n'
printf '|---|---|---|---|---|---|---|\n'
n=0
for size in $sizes; do
    n=$((n + 1))
    sock="$tmp/api$n.sock"; log="$tmp/vmm$n.log"; snap="$tmp/snap$n"
    "$hg" -v --cpus boot=2 --memory "size=${size}M" --guest-idle-us 1000 --serial off \
        --api-socket "path=$sock" 2>"$log" &
    pid=$!
    pids+=($!)
    wait_for "$sock" "the API socket"
    sleep 1 # let the guest run a while before the pause (a load, not a synchronisation)
    "$chr" --api-socket "$sock" pause >/dev/null
    api=()
    for _ in $(seq 1 "$reps"); do
        t0=$(date +%s%N)
        "$chr" --api-socket "$sock" snapshot "file://$snap" >/dev/null
        t1=$(date +%s%N)
        api+=("$(python3 -c "print(($t1 - $t0) / 1e6)")")
    done
    mapfile -t server < <(sed -n 's/.*snapshot written to .* in \([0-9.]*\) ms (.*/\1/p' "$log")
    if [ "${#server[@]}" != "$reps" ]; then
        echo "expected $reps 'snapshot written' lines in the VMM's log, found ${#server[@]}:" >&2
        cat "$log" >&2
        exit 1
    fi
    mem_kib=$(du -k "$snap/memory.bin" | cut -f1)
    all_kib=$(du -sk "$snap" | cut -f1)
    "$chr" --api-socket "$sock" shutdown-vmm >/dev/null 2>&1 || true
    wait "$pid" 2>/dev/null || true
    # The plain baseline: the bytes of data memory.bin holds, written and fsynced by dd.
    plain=()
    for _ in 1 2 3; do
        t0=$(date +%s%N)
        dd if=/dev/urandom of="$tmp/plain" bs=4k count=$((mem_kib / 4)) conv=fsync status=none
        t1=$(date +%s%N)
        plain+=("$(python3 -c "print(($t1 - $t0) / 1e6)")")
        rm -f "$tmp/plain"
    done
    plain_med=$(median "${plain[@]}")
    server_med=$(median "${server[@]}")
    ratio=$(python3 -c "print(f'{$server_med / max($plain_med, 1e-9):.1f}')")
    printf '| %s MiB | %s | %s | %s KiB | %s KiB | %s | %s |\n' "$size" "$(stats "${server[@]}")" \
        "$(stats "${api[@]}")" "$mem_kib" "$all_kib" "$plain_med" "$ratio"
done

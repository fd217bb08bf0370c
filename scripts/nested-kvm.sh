#!/usr/bin/env bash
# Runs the `nested_` tests on a real kvm_amd that honours TSC offsets: Debian's stock kernel booted
# under QEMU's emulator with SVM (`-accel tcg -cpu EPYC,+svm`), kvm-amd loaded inside.
#
#   scripts/nested-kvm.sh [FILTER]               one host; FILTER defaults to `nested_`
#                                                (tests named `nested_xhost_` are left out)
#   scripts/nested-kvm.sh --linux-guest          one host whose /init runs hourglass with a Linux
#                                                guest on the console, interactively (what
#                                                scripts/linux-guest.sh runs where /dev/kvm is not
#                                                a real kvm_intel/kvm_amd); QEMU on this terminal
#   scripts/nested-kvm.sh --two-hosts [FILTER]   hosts A then B (booted later: another TSC base),
#                                                FILTER defaults to `nested_xhost_`; tests named
#                                                `nested_xhost_live_*` run on both hosts at once
#                                                (A sends to B over IPv6 link-local), then A
#                                                runs the rest, writes the share, B runs the rest
#
# Installs what is missing (qemu-system-x86, busybox-static, cpio, kmod) with apt-get, downloads
# Debian's kernel package once, builds the workspace's test executables and binaries, boots the
# host(s) with an initramfs holding them, runs each matching test inside with HOURGLASS_NESTED=1
# and ends with one line `nested: N passed, M failed`. Exit status: 0 only when every test passed
# and at least one ran. Everything is cached under target/nested/ (see scripts/nested/README.md).
#
# Environment: NESTED_TIMEOUT_S (whole run of one host, default 1500), NESTED_TEST_TIMEOUT_S (one
# test, default 300), NESTED_MEM_MB (1024), NESTED_SMP (2), NESTED_SMP_B (NESTED_SMP),
# NESTED_B_DELAY_S (2: B boots this long after A is ready), NESTED_SHARE_MB (256),
# NESTED_REQUIRE=1 (fail instead of skipping where QEMU cannot be installed), NESTED_PACKAGES
# (space-separated cargo packages to build instead of the whole workspace), NESTED_SKIP_FILTER
# (space-separated libtest --skip filters; default `nested_xhost_` on one host, none on two),
# NESTED_HANG_S (120: a host whose heartbeat stopped this long is killed as hung), NESTED_TCG_THREAD (multi, QEMU's default: one host thread per emulated CPU, whose SVM
# emulation sometimes leaves a world switch half done; single: every emulated CPU on one host
# thread, where that never happened but a Linux guest's boot stalls; issue 18, docs/design.md
# section 9; scripts/nested-ci.sh says which steps run how), NESTED_SMP=1 (one emulated CPU:
# neither fault seen; the CI's hypervisor-level and Linux step), NESTED_HOST_SETUP (a shell snippet the
# host runs in the background before its tests, for experiments on the host, e.g. a
# memory-compaction loop), NESTED_KVM_AMD_PARAMS (kvm_amd's module parameters in the host,
# e.g. npt=0), NESTED_HOST_APPEND (more kernel parameters for the emulated host, e.g. nohz=off),
# NESTED_EMULATOR_RETRIES (1; see emulator_fault below), NESTED_TEST_ENV (NAME=VALUE pairs
# exported to the tests inside), NESTED_QEMU (the emulator binary, to compare QEMU builds),
# NESTED_GDB_SCRIPT (a gdb script run against QEMU when a host hangs, for a QEMU with debug
# info), NESTED_PERIODIC_TICK=0 (the host's timer one-shot, as Linux chooses; see HOST_APPEND),
# NESTED_BZIMAGE=1
# (boot the compressed vmlinuz instead of the extracted PVH vmlinux: about 8 s slower a boot).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
N="$ROOT/target/nested"
mkdir -p "$N"

TWO_HOSTS=0
LINUX_GUEST=0
case "${1:-}" in
    --two-hosts) TWO_HOSTS=1 && shift ;;
    --linux-guest) LINUX_GUEST=1 && shift ;;
esac
if [ $# -gt 1 ] || [[ "${1:-}" == -* ]] || { [ "$LINUX_GUEST" = 1 ] && [ $# -gt 0 ]; }; then
    echo "usage: scripts/nested-kvm.sh [--two-hosts] [FILTER] | --linux-guest" >&2
    exit 2
fi
# --linux-guest: LINUX_GUEST_DIR (a directory carried to /opt/hourglass-guest: the guest's kernel
# and initramfs) and LINUX_GUEST_ARGS (hourglass's arguments, one a line, paths inside that
# directory), both written by scripts/linux-guest.sh.
if [ "$LINUX_GUEST" = 1 ]; then
    [ -d "${LINUX_GUEST_DIR:-}" ] && [ -f "${LINUX_GUEST_ARGS:-}" ] || {
        echo "nested-kvm: --linux-guest needs LINUX_GUEST_DIR and LINUX_GUEST_ARGS (run scripts/linux-guest.sh)" >&2
        exit 2
    }
fi
if [ "$TWO_HOSTS" = 1 ]; then
    FILTER=${1:-nested_xhost_}
    SKIP_FILTER=
else
    FILTER=${1:-nested_}
    SKIP_FILTER=nested_xhost_
fi
SKIP_FILTER=${NESTED_SKIP_FILTER-$SKIP_FILTER}
TIMEOUT_S=${NESTED_TIMEOUT_S:-1500}
MEM_MB=${NESTED_MEM_MB:-1024}
SMP_A=${NESTED_SMP:-2}
SMP_B=${NESTED_SMP_B:-$SMP_A}
# One run at a time: runs share the cache and the run files, and two emulated hosts per run are
# already all that 2 cores can carry.
exec 9>"$N/lock"
if ! flock -n 9; then
    echo "nested-kvm: waiting for another scripts/nested-kvm.sh run to finish" >&2
    flock 9
fi

T_START=$(date +%s.%N)

log() { echo "nested-kvm: $*" >&2; }
since() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }
summary_fail() {
    log "$*"
    echo "nested: 0 passed, 1 failed"
    exit 1
}
skip_or_fail() {
    if [ "${NESTED_REQUIRE:-0}" = 1 ]; then summary_fail "$*"; fi
    echo "nested: skipped: $*"
    exit 0
}

# --- 1. host packages and the kernel ------------------------------------------------------------
# shellcheck source=scripts/nested/kernel.sh
. "$ROOT/scripts/nested/kernel.sh"

# --- 2. build the test executables and binaries -------------------------------------------------
T_BUILD=$(date +%s.%N)
SCOPE=(--workspace)
if [ -n "${NESTED_PACKAGES:-}" ]; then
    SCOPE=()
    for p in $NESTED_PACKAGES; do SCOPE+=(-p "$p"); done
fi
log "building (cargo build --bins ${SCOPE[*]}; cargo test --no-run ${SCOPE[*]})"
cargo build "${SCOPE[@]}" --bins --message-format=json-render-diagnostics >"$N/cargo-bins.json" ||
    summary_fail "cargo build --bins failed"
if [ "$LINUX_GUEST" = 1 ]; then
    : >"$N/cargo-tests.json" # no tests: hourglass is all the host runs
else
    cargo test "${SCOPE[@]}" --no-run --message-format=json-render-diagnostics >"$N/cargo-tests.json" ||
        summary_fail "cargo test --no-run failed"
fi
# One line per executable: <kind>\t<path>\t<package dir>; kind is test or bin.
python3 - "$N/cargo-bins.json" "$N/cargo-tests.json" >"$N/executables.tsv" <<'EOF'
import json, os, sys
seen = set()
for name in sys.argv[1:]:
    for line in open(name):
        try:
            m = json.loads(line)
        except ValueError:
            continue
        exe = m.get("executable")
        if m.get("reason") != "compiler-artifact" or not exe or exe in seen:
            continue
        seen.add(exe)
        if m["profile"]["test"]:
            kind = "test"
        elif "bin" in m["target"]["kind"]:
            kind = "bin"
        else:
            continue
        print(f"{kind}\t{exe}\t{os.path.dirname(m['manifest_path'])}")
EOF
# The tests to run: each test executable's libtest list, filtered as the guest will filter it.
: >"$N/tests.tsv"
while IFS=$'\t' read -r kind exe dir; do
    [ "$kind" = test ] || continue
    skip_args=()
    for f in $SKIP_FILTER; do skip_args+=(--skip "$f"); done
    if ! out=$(cd "$dir" && timeout 60 "$exe" --list "$FILTER" "${skip_args[@]}" </dev/null 2>/dev/null); then
        log "warning: $exe --list failed (not a libtest harness?); not run"
        continue
    fi
    # libtest filters by substring; keep the tests whose own name (the last path segment) starts
    # with FILTER, or any match when FILTER names a path (contains ::).
    sed -n 's/^\(.*\): test$/\1/p' <<<"$out" | while IFS= read -r name; do
        [[ "$FILTER" == *::* || "${name##*::}" == "$FILTER"* ]] || continue
        printf '%s\t%s\t%s\n' "$exe" "$dir" "$name"
    done >>"$N/tests.tsv"
done <"$N/executables.tsv"
PLANNED=$(wc -l <"$N/tests.tsv")
log "build and listing took $(since "$T_BUILD") s; $PLANNED test(s) match '$FILTER'"
if [ "$PLANNED" = 0 ] && [ "$LINUX_GUEST" = 0 ]; then
    log "no test matches '$FILTER'"
    echo "nested: 0 passed, 0 failed"
    exit 1
fi

# --- 3. the initramfs ---------------------------------------------------------------------------
S="$N/initramfs"
rm -rf "$S"
mkdir -p "$S"/{bin,sbin,etc/hourglass-nested,modules,proc,sys,dev,tmp,mnt/share,root}
cp "$BUSYBOX" "$S/bin/busybox"
for a in $("$BUSYBOX" --list); do
    [ "$a" = busybox ] || ln -sf busybox "$S/bin/$a"
done
for kv in ${NESTED_TEST_ENV:-}; do
    [[ "$kv" =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || summary_fail "NESTED_TEST_ENV: '$kv' is not NAME=VALUE"
done
cp "$ROOT/scripts/nested/init" "$S/init"
chmod 755 "$S/init"
cp "$KD"/mods/*.ko "$S/modules/"
cp "$KD/modules.order" "$S/etc/hourglass-nested/modules"
cp "$N/tests.tsv" "$S/etc/hourglass-nested/tests"
{
    echo "TEST_TIMEOUT_S=${NESTED_TEST_TIMEOUT_S:-300}"
    echo "SHARE_WAIT_S=$TIMEOUT_S"
    echo "PEER_WAIT_S=$TIMEOUT_S"
    echo "KVM_AMD_PARAMS='${NESTED_KVM_AMD_PARAMS:-}'"
    # NESTED_TEST_ENV: space-separated NAME=VALUE pairs exported to the tests (and the VMMs
    # they start), e.g. HOURGLASS_NO_USERFAULTFD=1.
    for kv in ${NESTED_TEST_ENV:-}; do printf 'export %q\n' "$kv"; done
} >"$S/etc/hourglass-nested/env"
printf '%s\n' "${NESTED_HOST_SETUP:-}" >"$S/etc/hourglass-nested/setup.sh"
# The executables keep their absolute paths (so CARGO_BIN_EXE_* and friends stay valid), without
# debug info; the dynamic loader and the libraries ldd names go beside them at their own paths.
copy_exe() {
    local exe=$1 lib
    mkdir -p "$S$(dirname "$exe")"
    strip --strip-debug -o "$S$exe" "$exe" 2>/dev/null || cp "$exe" "$S$exe"
    for lib in $(ldd "$exe" 2>/dev/null | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }'); do
        if [ ! -e "$S$lib" ]; then
            mkdir -p "$S$(dirname "$lib")"
            cp -L "$lib" "$S$lib"
        fi
    done
}
cut -f1 "$N/tests.tsv" | sort -u | while IFS= read -r exe; do copy_exe "$exe"; done
awk -F'\t' '$1 == "bin" { print $2 }' "$N/executables.tsv" | while IFS= read -r exe; do copy_exe "$exe"; done
cut -f2 "$N/tests.tsv" | sort -u | while IFS= read -r dir; do mkdir -p "$S$dir"; done
# Data files the tests read at run time: scripts/nested/carry.list, one path (relative to the
# repository root) a line, copied to the same absolute path.
sed -e 's/#.*//' -e 's/[[:space:]]*$//' "$ROOT/scripts/nested/carry.list" | while IFS= read -r p; do
    [ -n "$p" ] || continue
    [ -e "$ROOT/$p" ] || summary_fail "scripts/nested/carry.list: $p does not exist"
    mkdir -p "$S$(dirname "$ROOT/$p")"
    cp -a "$ROOT/$p" "$S$ROOT/$p"
done
# The Linux-guest tests (nested_linux*.rs, nested_xhost_live_linux.rs) boot Debian's kernel
# inside: both forms.
if grep -qE 'nested_(xhost_live_)?linux' "$N/tests.tsv"; then
    mkdir -p "$S/opt/hourglass-linux"
    cp "$KD/vmlinuz" "$S/opt/hourglass-linux/vmlinuz"
    [ ! -f "$KD/vmlinux" ] || cp "$KD/vmlinux" "$S/opt/hourglass-linux/vmlinux"
fi
if [ "$LINUX_GUEST" = 1 ]; then
    hg=$(awk -F'\t' '$1 == "bin" && $2 ~ /\/hourglass$/ { print $2; exit }' "$N/executables.tsv")
    [ -n "$hg" ] || summary_fail "cargo built no hourglass binary"
    mkdir -p "$S/opt/hourglass-guest"
    cp -a "$LINUX_GUEST_DIR"/. "$S/opt/hourglass-guest/"
    { echo "$hg"; cat "$LINUX_GUEST_ARGS"; } >"$S/etc/hourglass-nested/guest"
fi
(cd "$S" && find . -print0 | cpio --null -o -H newc --quiet) | gzip -1 >"$N/initrd.gz"
log "initramfs: $(du -sm "$S" | cut -f1) MiB unpacked, $(du -m "$N/initrd.gz" | cut -f1) MiB gzipped"

# --- 4. boot ------------------------------------------------------------------------------------
PIDS=()
# shellcheck disable=SC2317 # called by the trap
cleanup() {
    local p
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# The emulated host: an EPYC with SVM on TCG, booting Debian's kernel with our initramfs.
# QEMU's TCG threading (NESTED_TCG_THREAD above): with one host thread per emulated CPU its
# nested SVM sometimes restores the host's state and stays in guest mode (issue 18).
TCG_THREAD=${NESTED_TCG_THREAD:-multi}
case "$TCG_THREAD" in single | multi) ;; *) summary_fail "NESTED_TCG_THREAD must be single or multi, not '$TCG_THREAD'" ;; esac
# NESTED_QEMU: the emulator binary (default: Debian's qemu-system-x86_64 on PATH), to compare
# another QEMU build against the same tests (docs/design.md section 9).
QEMU_BIN=${NESTED_QEMU:-qemu-system-x86_64}
QEMU=("$QEMU_BIN" -accel "tcg,thread=$TCG_THREAD" -cpu EPYC,+svm -m "$MEM_MB"
    -kernel "$KERNEL" -display none -nodefaults -no-user-config -no-reboot
    -name hourglass-nested,debug-threads=on)
INITRD="$N/initrd.gz"
log "$("$QEMU_BIN" --version | head -n 1), TCG thread=$TCG_THREAD"
# nokaslr: the host kernel sits at the same addresses in every run, so that an instruction
# pointer read from a hung host (dump_cpu) names the same function each time.
# highres=off nohz=off: the host's local APIC timer ticks periodically (issue 18, docs/design.md
# section 9). QEMU's VMRUN emulation can overwrite the request that tells the emulated CPU to
# look at its APIC (a lost interrupt); with a one-shot timer that is re-armed only by its own
# interrupt the host then never takes an interrupt again, while a periodic timer asks again on
# the next tick by itself. NESTED_PERIODIC_TICK=0 leaves it out (to reproduce the hang).
TICK="highres=off nohz=off"
[ "${NESTED_PERIODIC_TICK:-1}" = 1 ] || TICK=
HOST_APPEND="console=ttyS0 quiet panic=-1 clocksource=tsc tsc=reliable nokaslr $TICK ${NESTED_HOST_APPEND:-}"
# start_host NAME SMP APPEND EXTRA_QEMU_ARGS...: boots one host in the background, console to
# $N/console-NAME.log (streamed to stdout with a prefix); sets HOST_PID.
start_host() {
    local name=$1 smp=$2 append=$3
    shift 3
    local logf="$N/console-$name.log"
    : >"$logf"
    : >"$N/alive-$name.log"
    # QEMU's monitor on a pair of FIFOs (QEMU opens both read-write, so nothing blocks): how a
    # hung host's CPU is read (dump_cpu).
    rm -f "$N/mon-$name.in" "$N/mon-$name.out"
    mkfifo "$N/mon-$name.in" "$N/mon-$name.out"
    "${QEMU[@]}" -initrd "$INITRD" -smp "$smp" -append "$HOST_APPEND $append" \
        -chardev "pipe,id=mon,path=$N/mon-$name" -mon chardev=mon,mode=readline \
        -serial "file:$logf" -serial "file:$N/alive-$name.log" "$@" </dev/null >"$N/qemu-$name.log" 2>&1 &
    HOST_PID=$!
    PIDS+=("$HOST_PID")
    tail -n +1 -F --pid="$HOST_PID" "$logf" 2>/dev/null | sed -u "s/^/[$name] /" &
    PIDS+=("$!")
}
# wait_for NAME PID PATTERN DEADLINE: 0 once PATTERN is in NAME's console, 1 when the host exited
# or the deadline (epoch seconds) passed.
wait_for() {
    while ! grep -q "$3" "$N/console-$1.log"; do
        kill -0 "$2" 2>/dev/null || return 1
        [ "$(date +%s)" -lt "$4" ] || return 1
        sleep 0.2
    done
}
# The host's /init writes its uptime to its second serial port (alive-NAME.log) every 5 s from
# a background loop. When that stops for HANG_S while QEMU still runs, the emulated machine is
# hung (issue 18: the emulator's nested SVM can corrupt the host's kernel), and nothing inside
# it, not even the per-test timeout, will report again: kill it then rather than at the deadline.
HANG_S=${NESTED_HANG_S:-120}
# emulator_fault NAME: true when host NAME stopped in the middle of its tests without a word of
# its own: its heartbeat stopped (hung), or QEMU exited before /init's END line and without an
# error /init reported (the emulated kernel died: panic=-1 with -no-reboot ends QEMU). A VMM, a
# process inside that host, can do neither to it; the emulator's nested SVM can (issue 18:
# host state run in guest mode, "corrupted stack end detected inside scheduler"). One-host runs
# re-run the tests without a result once (NESTED_EMULATOR_RETRIES), and say so in the summary.
RETRIES=${NESTED_EMULATOR_RETRIES:-1}
EMULATOR_FAULTS=()
emulator_fault() {
    local c="$N/console-$1.log" during what
    grep -q HOURGLASS-NESTED-TESTS-START "$c" || return 1
    grep -q '^HOURGLASS-NESTED-END' "$c" && return 1
    if grep -q 'HOURGLASS-NESTED-ERROR emulated machine hung' "$c"; then
        what="hung (no heartbeat for $HANG_S s after uptime $(tr -d '\r' <"$N/alive-$1.log" | tail -n 1 | cut -d' ' -f1) s)"
    elif grep -q HOURGLASS-NESTED-ERROR "$c"; then
        return 1
    else
        what="died (QEMU exited before /init's END)"
    fi
    during=$(sed -n 's/^HOURGLASS-NESTED-TEST-START //p' "$c" | tail -n 1)
    EMULATOR_FAULTS+=("host $1 $what during ${during:-?}")
}
# dump_cpu NAME: a hung host's emulated CPUs as QEMU's monitor shows them, three times a second
# apart, into $N/regs-NAME.txt, and its last heartbeats (uptime, memory left, load) and each
# sample's instruction pointers and halt state into the log: whether the emulated machine
# spins (where), sleeps, or starved for memory.
# threads_cpu PID: QEMU's threads, each as name:state:CPU ticks used (utime + stime).
threads_cpu() {
    local t
    for t in /proc/"$1"/task/*; do
        awk '{ sub(/^[^)]*\) /, ""); n = $0 } END { split(n, f, " "); printf "%s:%s:%d ", c, f[1], f[12] + f[13] }' \
            c="$(tr -d ' ' <"$t/comm" 2>/dev/null)" "$t/stat" 2>/dev/null || true
    done
}
dump_cpu() {
    local m="$N/mon-$1" out="$N/regs-$1.txt" k t0
    log "host $1: its last heartbeats: $(tr -d '\r' <"$N/alive-$1.log" | tail -n 6 | tr '\n' '|')"
    # Whether QEMU's vCPU threads still execute (ticks grow) or wait (they do not): a spinning
    # guest and a stuck emulator look alike from the registers alone.
    [ -z "${2:-}" ] || t0=$(threads_cpu "$2")
    [ -p "$m.in" ] || return 0
    : >"$out"
    for k in 1 2 3; do
        echo "== sample $k" >>"$out"
        # The registers; the stack; the memory the first callee-saved register points to (a
        # spinning kernel loop keeps its state there: which stop_machine, which lock).
        # And the host's own local APIC (timer mode and count, IRR/ISR/TPR): whether the
        # interrupt that would take the CPU out of a guest is armed, pending or blocked.
        printf 'info registers -a\nx/32gx $esp\nx/8gx $ebx\nx/4i $pc\ninfo lapic\n' >"$m.in"
        timeout 1 cat "$m.out" >>"$out" 2>/dev/null || true
    done
    log "host $1: its CPUs (QEMU's monitor, 3 samples 1 s apart; all in $out):" \
        "$(tr -d '\r' <"$out" | grep -oE '^(CPU#[0-9]+|RIP=[0-9a-f]+)|RFL=[0-9a-f]+|HLT=[01]|CR3=[0-9a-f]+' | tr '\n' ' ')"
    log "host $1: its local APIC at the last sample: $(tr -d '\r' <"$out" | sed -n '/dumping local APIC/,$p' |
        grep -E '^(LVTT|Timer|ISR|IRR|APR|ESR|ICR)' | tr -s ' ' | tr '\n' '|')"
    [ -z "${2:-}" ] || log "host $1: QEMU's threads (name:state:CPU ticks), before and ~3 s after: $t0| $(threads_cpu "$2")"
    # Where each QEMU thread is: its kernel wait channel and a backtrace (Debian's QEMU is
    # stripped, so frames inside QEMU are bare addresses; libc's name the wait, if any).
    if [ -n "${2:-}" ]; then
        log "host $1: QEMU's threads' wait channels: $(for t in /proc/"$2"/task/*; do
            printf '%s:%s ' "$(tr -d ' ' <"$t/comm" 2>/dev/null)" "$(cat "$t/wchan" 2>/dev/null)"
        done)"
        if command -v gdb >/dev/null; then
            timeout 60 gdb -p "$2" -batch -ex 'info threads' -ex 'thread apply all bt 12' \
                >"$N/gdb-$1.txt" 2>&1 || true
            log "host $1: QEMU's backtraces in $N/gdb-$1.txt; the vCPU threads': $(
                awk '/^Thread .*CPU/ { p = 1; print; next } /^Thread / { p = 0 } p && /^#[0-4] / { print }' \
                    "$N/gdb-$1.txt" | tr -s ' ' | cut -c1-160 | tr '\n' '|')"
            # A QEMU built with debug info can say more: NESTED_GDB_SCRIPT runs a gdb script
            # against it (scripts/nested/qemu-hang.gdb reads the emulated CPU's interrupt state).
            if [ -n "${NESTED_GDB_SCRIPT:-}" ]; then
                timeout 120 gdb -p "$2" -batch -x "$NESTED_GDB_SCRIPT" >"$N/gdb-script-$1.txt" 2>&1 || true
                log "host $1: $NESTED_GDB_SCRIPT's output in $N/gdb-script-$1.txt"
            fi
        fi
    fi
}
# alive_age NAME: sets AGE to the seconds since NAME's heartbeat last grew (0 before the first
# beat). Not a $(...) function: it keeps its state in the shell's own arrays.
alive_age() {
    local f="$N/alive-$1.log" size now
    size=$(stat -c %s "$f" 2>/dev/null || echo 0)
    now=$(date +%s)
    if [ "$size" != "${ALIVE_SIZE[$1]:-}" ]; then
        ALIVE_SIZE[$1]=$size
        ALIVE_AT[$1]=$now
    fi
    AGE=0
    [ "$size" = 0 ] || AGE=$((now - ALIVE_AT[$1]))
}
declare -A ALIVE_SIZE ALIVE_AT
# finish NAME PID DEADLINE [OTHER_PID OTHER_NAME]: waits for the host to power off; kills it at
# the deadline, when its heartbeat stops, or (two hosts) once host A is gone without having
# written the share.
finish() {
    while kill -0 "$2" 2>/dev/null; do
        alive_age "$1"
        if [ "$AGE" -ge "$HANG_S" ]; then
            log "host $1: no heartbeat for $HANG_S s, the emulated machine is hung: killed"
            dump_cpu "$1" "$2"
            kill "$2" 2>/dev/null || true
            echo "HOURGLASS-NESTED-ERROR emulated machine hung (no heartbeat for $HANG_S s)" >>"$N/console-$1.log"
            break
        fi
        if [ -n "${4:-}" ] && ! kill -0 "$4" 2>/dev/null && ! grep -q HOURGLASS-NESTED-SHARE-WRITTEN "$N/console-$5.log"; then
            log "host $5 stopped without writing the share: host $1 killed"
            kill "$2" 2>/dev/null || true
            echo "HOURGLASS-NESTED-ERROR host $5 stopped without writing the share" >>"$N/console-$1.log"
            break
        fi
        if [ "$(date +%s)" -ge "$3" ]; then
            log "host $1 still running at its deadline: killed"
            kill "$2" 2>/dev/null || true
            echo "HOURGLASS-NESTED-ERROR timeout" >>"$N/console-$1.log"
            break
        fi
        sleep 0.2
    done
    wait "$2" 2>/dev/null || true
}

T_BOOT=$(date +%s.%N)
INITRD_TESTS="$N/tests.tsv"
rm -f "$N"/results-earlier-*.log "$N"/console-*.round*.log "$N"/alive-*.round*.log
if [ "$LINUX_GUEST" = 1 ]; then
    # In the foreground on this terminal: QEMU's serial is the host's console, where its /init
    # runs hourglass on the Linux guest (scripts/nested/init). Ctrl-A X ends QEMU.
    log "booting the emulated host; the guest's console follows (Ctrl-A X ends QEMU)"
    trap - EXIT
    # loglevel=1: the host's own kernel messages would land in the middle of the guest's.
    # QEMU's own messages (TCG's unsupported-feature warnings) go to a file, not the console.
    exec "${QEMU[@]}" -initrd "$INITRD" -smp "$SMP_A" -append "$HOST_APPEND loglevel=1" -serial mon:stdio \
        2>"$N/qemu-linux-guest.log"
elif [ "$TWO_HOSTS" = 0 ]; then
    HOSTS=(S)
    round=1
    while :; do
        start_host S "$SMP_A" "hourglass.round=$round"
        finish S "$HOST_PID" $(($(date +%s) + TIMEOUT_S))
        emulator_fault S || break
        [ "${#EMULATOR_FAULTS[@]}" -le "$RETRIES" ] || break
        # The tests that gave no result (the one running when the host stopped, and those after
        # it) run again on a fresh host: the same initramfs with a second archive on top that
        # replaces its list of tests. The results already given stand.
        mv "$N/console-S.log" "$N/console-S.round$round.log"
        mv "$N/alive-S.log" "$N/alive-S.round$round.log"
        grep '^HOURGLASS-NESTED-RESULT ' "$N/console-S.round$round.log" >>"$N/results-earlier-S.log" || true
        awk -F'\t' 'FILENAME == ARGV[1] { if ($1 == "HOURGLASS-NESTED-RESULT") done[$4 " " $5] = 1; next }
            { n = split($1, p, "/"); if (!((p[n] " " $3) in done)) print }' \
            <(tr ' ' '\t' <"$N/results-earlier-S.log") "$INITRD_TESTS" >"$N/tests-retry.next"
        # A file of its own first: from the second retry on, the list read is tests-retry.tsv.
        mv "$N/tests-retry.next" "$N/tests-retry.tsv"
        INITRD_TESTS="$N/tests-retry.tsv"
        round=$((round + 1))
        log "emulator fault ${#EMULATOR_FAULTS[@]} of at most $RETRIES retried: ${EMULATOR_FAULTS[-1]}; round $round runs the $(wc -l <"$INITRD_TESTS") test(s) without a result on a fresh host"
        O="$N/overlay"
        rm -rf "$O"
        mkdir -p "$O/etc/hourglass-nested"
        cp "$INITRD_TESTS" "$O/etc/hourglass-nested/tests"
        (cd "$O" && find . -print0 | cpio --null -o -H newc --quiet) | gzip -1 >"$N/overlay.gz"
        cat "$N/initrd.gz" "$N/overlay.gz" >"$N/initrd-retry.gz"
        INITRD="$N/initrd-retry.gz"
    done
else
    HOSTS=(A B)
    cp /dev/null "$N/share.img"
    truncate -s "${NESTED_SHARE_MB:-256}M" "$N/share.img"
    DRIVE=(-drive "file=$N/share.img,format=raw,if=virtio,cache=writethrough,file.locking=off")
    port=$((20000 + RANDOM % 20000))
    start_host A "$SMP_A" "hourglass.role=A hourglass.net=1" "${DRIVE[@]}" \
        -netdev "socket,id=n0,listen=127.0.0.1:$port" -device e1000,netdev=n0,mac=52:54:00:12:34:0a
    PID_A=$HOST_PID
    deadline_a=$(($(date +%s) + TIMEOUT_S))
    if wait_for A "$PID_A" HOURGLASS-NESTED-READY "$deadline_a"; then
        sleep "${NESTED_B_DELAY_S:-2}"
        gap_ms=$(awk -v a="$T_BOOT" -v b="$(date +%s.%N)" 'BEGIN { printf "%d", (b - a) * 1000 }')
        start_host B "$SMP_B" "hourglass.role=B hourglass.net=1 hourglass.gap_ms=$gap_ms" "${DRIVE[@]}" \
            -netdev "socket,id=n0,connect=127.0.0.1:$port" -device e1000,netdev=n0,mac=52:54:00:12:34:0b
        PID_B=$HOST_PID
        finish B "$PID_B" $(($(date +%s) + TIMEOUT_S)) "$PID_A" A
        finish A "$PID_A" $(($(date +%s) + 60))
    else
        : >"$N/console-B.log"
        finish A "$PID_A" "$deadline_a"
    fi
fi
BOOT_WALL=$(since "$T_BOOT")
sleep 0.3 # let the console streams drain

# --- 5. results ---------------------------------------------------------------------------------
passed=0
failed=0
status=0
: >"$N/results.tsv" # result, role, executable, test, seconds
for h in "${HOSTS[@]}"; do
    c="$N/console-$h.log"
    planned_h=$PLANNED
    if ! grep -q HOURGLASS-NESTED-BOOTED "$c"; then
        log "host $h did not come up; QEMU said:"
        grep -v "TCG doesn.t support requested feature" "$N/qemu-$h.log" | tail -n 20 >&2 || true
        log "console tail:"
        tail -n 40 "$c" >&2 || true
        failed=$((failed + planned_h))
        status=1
        continue
    fi
    if grep -q HOURGLASS-NESTED-ERROR "$c"; then
        log "host $h: $(grep HOURGLASS-NESTED-ERROR "$c" | head -n 3 | tr '\n' ' ')"
        tail -n 40 "$c" >&2
        failed=$((failed + 1))
        status=1
    fi
    # Results of earlier rounds (a retry after an emulator fault) count with this round's.
    r="$N/results-all-$h.log"
    cat "$N/results-earlier-$h.log" 2>/dev/null >"$r" || true
    grep '^HOURGLASS-NESTED-RESULT ' "$c" >>"$r" || true
    ok=$(grep -c '^HOURGLASS-NESTED-RESULT ok ' "$r" || true)
    bad=$(grep -c '^HOURGLASS-NESTED-RESULT FAILED ' "$r" || true)
    ign=$(grep -c '^HOURGLASS-NESTED-RESULT ignored ' "$r" || true)
    missing=$((planned_h - ok - bad - ign))
    [ "$missing" -le 0 ] || log "host $h: $missing test(s) gave no result"
    [ "$missing" -ge 0 ] || missing=0
    passed=$((passed + ok))
    failed=$((failed + bad + missing))
    sed -n "s/^HOURGLASS-NESTED-RESULT /nested-kvm: result [$h]: /p" "$r" >&2
    sed -n "s/^HOURGLASS-NESTED-RESULT //p" "$r" | tr ' ' '\t' >>"$N/results.tsv"
    booted=$(sed -n 's/^HOURGLASS-NESTED-BOOTED uptime=\([0-9.]*\).*/\1/p' "$c" | head -n 1)
    ready=$(sed -n 's/^HOURGLASS-NESTED-KVM-READY uptime=\([0-9.]*\).*/\1/p' "$c" | head -n 1)
    tstart=$(sed -n 's/^HOURGLASS-NESTED-TESTS-START uptime=\([0-9.]*\).*/\1/p' "$c" | head -n 1)
    tdone=$(sed -n 's/^HOURGLASS-NESTED-TESTS-DONE uptime=\([0-9.]*\).*/\1/p' "$c" | head -n 1)
    log "host $h (guest uptime): /init at ${booted:-?} s, /dev/kvm at ${ready:-?} s, tests ${tstart:-?}..${tdone:-?} s"
done
log "boot+tests wall clock $BOOT_WALL s; whole script $(since "$T_START") s"
[ "$passed" -gt 0 ] || status=1
[ "$failed" = 0 ] || status=1
if [ "${#EMULATOR_FAULTS[@]}" -gt 0 ]; then
    for f in "${EMULATOR_FAULTS[@]}"; do log "emulator fault: $f"; done
    echo "nested: $passed passed, $failed failed; ${#EMULATOR_FAULTS[@]} emulator fault(s), $((round - 1)) retried: ${EMULATOR_FAULTS[*]}"
else
    echo "nested: $passed passed, $failed failed"
fi
exit "$status"

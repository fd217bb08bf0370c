#!/usr/bin/env bash
# Boots a small Linux guest under hourglass with an interactive console: Debian's own kernel
# (the package linux-image-amd64 depends on, fetched with apt, never installed) and an initramfs
# of busybox-static with scripts/linux-guest/init, which gives the console a shell.
#
#   scripts/linux-guest.sh [--direct | --nested] [-- HOURGLASS-ARGS...]
#
# --direct   run hourglass here (needs /dev/kvm from kvm_intel or kvm_amd); the default there
# --nested   run it inside the emulated kvm_amd host of scripts/nested-kvm.sh (QEMU's emulator on
#            this terminal; Ctrl-A X ends QEMU); the default elsewhere, e.g. on kvm_pvm, which
#            cannot run a stock kernel
#
# In the guest: `poweroff -f` ends the VM (hourglass exits 0), `reboot -f` restarts it in the
# same process. HOURGLASS-ARGS are added to hourglass's own (e.g. `-- --api-socket
# path=/tmp/hg.sock` to drive it with ch-remote). Environment: GUEST_CPUS (2), GUEST_MEMORY
# (512M), GUEST_CMDLINE (added to "console=ttyS0"), GUEST_BZIMAGE=1 (boot vmlinuz through the
# Linux boot protocol instead of the PVH vmlinux extracted from it).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
N="$ROOT/target/nested"
mkdir -p "$N"

log() { echo "linux-guest: $*" >&2; }
summary_fail() {
    log "$*"
    exit 1
}
skip_or_fail() { summary_fail "$*"; }

MODE=
while [ $# -gt 0 ]; do
    case "$1" in
        --direct) MODE=direct ;;
        --nested) MODE=nested ;;
        --) shift && break ;;
        -h | --help)
            sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"
            exit 0
            ;;
        *)
            echo "usage: scripts/linux-guest.sh [--direct | --nested] [-- HOURGLASS-ARGS...]" >&2
            exit 2
            ;;
    esac
    shift
done
KVM_MODULE=none
for m in kvm_intel kvm_amd kvm_pvm; do
    if [ -d "/sys/module/$m" ]; then KVM_MODULE=$m && break; fi
done
if [ -z "$MODE" ]; then
    case "$KVM_MODULE" in
        kvm_intel | kvm_amd) MODE=direct ;;
        *) MODE=nested ;;
    esac
fi
if [ "$MODE" = direct ]; then
    [ -w /dev/kvm ] || summary_fail "--direct needs /dev/kvm (readable and writable by you)"
    case "$KVM_MODULE" in
        kvm_intel | kvm_amd) ;;
        *) log "warning: /dev/kvm is $KVM_MODULE, which cannot run a stock kernel (try --nested)" ;;
    esac
fi
log "mode: $MODE (this host's KVM: $KVM_MODULE)"

# The kernel and the host packages (busybox-static, cpio; QEMU only for --nested), with the lock
# scripts/nested-kvm.sh holds over the same cache.
[ "$MODE" = nested ] || NEED_QEMU=0
exec 9>"$N/lock"
flock 9
# shellcheck source=scripts/nested/kernel.sh
. "$ROOT/scripts/nested/kernel.sh"
exec 9>&-
GUEST_KERNEL="$KD/vmlinux"
[ "${GUEST_BZIMAGE:-0}" = 0 ] && [ -f "$GUEST_KERNEL" ] || GUEST_KERNEL="$KD/vmlinuz"

# The guest's initramfs: busybox and /init. No /dev/console entry is needed: the kernel's own
# built-in initramfs has one.
G="$N/linux-guest"
rm -rf "$G" "$N/linux-guest-root"
mkdir -p "$G" "$N/linux-guest-root/bin"
cp "$BUSYBOX" "$N/linux-guest-root/bin/busybox"
cp "$ROOT/scripts/linux-guest/init" "$N/linux-guest-root/init"
chmod 755 "$N/linux-guest-root/init"
(cd "$N/linux-guest-root" && find . -print0 | cpio --null -o -H newc --quiet) | gzip -1 >"$G/initramfs.cpio.gz"
cp "$GUEST_KERNEL" "$G/${GUEST_KERNEL##*/}"
log "guest: $KPKG ${GUEST_KERNEL##*/}, initramfs $(du -k "$G/initramfs.cpio.gz" | cut -f1) KiB"

# hourglass's arguments for kernel and initramfs at DIR.
guest_args() {
    printf '%s\n' --cpus "boot=${GUEST_CPUS:-2}" --memory "size=${GUEST_MEMORY:-512M}" \
        --kernel "$1/${GUEST_KERNEL##*/}" --initramfs "$1/initramfs.cpio.gz" \
        --cmdline "console=ttyS0 ${GUEST_CMDLINE:-}"
}

if [ "$MODE" = direct ]; then
    log "building hourglass (cargo build --release -p vmm --bins)"
    cargo build --release -p vmm --bins
    mapfile -t ARGS < <(guest_args "$G")
    bin="${CARGO_TARGET_DIR:-$ROOT/target}/release/hourglass"
    log "$bin ${ARGS[*]} --serial tty $*"
    exec "$bin" "${ARGS[@]}" --serial tty "$@"
fi
guest_args /opt/hourglass-guest >"$N/linux-guest.args"
[ $# -eq 0 ] || printf '%s\n' "$@" >>"$N/linux-guest.args"
LINUX_GUEST_DIR="$G" LINUX_GUEST_ARGS="$N/linux-guest.args" NESTED_PACKAGES=vmm \
    exec "$ROOT/scripts/nested-kvm.sh" --linux-guest

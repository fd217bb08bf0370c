# Sourced by scripts/nested-kvm.sh and scripts/linux-guest.sh (bash): the host packages they
# need and Debian's kernel. Expects N (the cache directory), log, summary_fail and skip_or_fail
# from the caller; sets KPKG (the package), KD (its cache directory: vmlinuz, vmlinux where the
# PVH ELF could be extracted, mods/*.ko and modules.order for the emulated host) and KERNEL (the
# form the emulated host boots: vmlinux unless NESTED_BZIMAGE=1).
# shellcheck shell=bash

need=()
# NEED_QEMU=0: the caller runs no emulated host (scripts/linux-guest.sh --direct).
[ "${NEED_QEMU:-1}" = 0 ] || command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
dpkg-query -W -f='${Status}' busybox-static 2>/dev/null | grep -q 'ok installed' || need+=(busybox-static)
command -v cpio >/dev/null || need+=(cpio)
command -v modinfo >/dev/null || need+=(kmod)
command -v python3 >/dev/null || need+=(python3-minimal)
if [ ${#need[@]} -gt 0 ]; then
    log "installing ${need[*]}"
    [ "$(id -u)" = 0 ] || skip_or_fail "QEMU cannot be installed here (not root; missing: ${need[*]})"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq --no-install-recommends "${need[@]}" >"$N/apt.log" 2>&1 ||
        { apt-get update -qq >>"$N/apt.log" 2>&1 &&
            apt-get install -y -qq --no-install-recommends "${need[@]}" >>"$N/apt.log" 2>&1; } ||
        skip_or_fail "QEMU cannot be installed here (apt-get failed: see $N/apt.log)"
fi
BUSYBOX=/bin/busybox
if ldd "$BUSYBOX" >/dev/null 2>&1; then summary_fail "$BUSYBOX is not the static one (install busybox-static)"; fi

# The kernel: the package the linux-image-amd64 metapackage depends on, extracted once.
KPKG=
[ -f "$N/kernel/current" ] && KPKG=$(cat "$N/kernel/current")
if [ -z "$KPKG" ] || [ ! -f "$N/kernel/$KPKG/vmlinuz" ] || [ ! -f "$N/kernel/$KPKG/modules.order" ]; then
    KPKG=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-/ { print $2; exit }')
    if [ -z "$KPKG" ]; then
        apt-get update -qq >>"$N/apt.log" 2>&1 || true
        KPKG=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-/ { print $2; exit }')
    fi
    [ -n "$KPKG" ] || skip_or_fail "cannot resolve Debian's linux-image-amd64"
    log "downloading $KPKG"
    rm -rf "$N/kernel/$KPKG" "$N/debs"
    mkdir -p "$N/debs" "$N/kernel/$KPKG/mods"
    if ! (cd "$N/debs" && apt-get download "$KPKG" >>"$N/apt.log" 2>&1); then
        # Stale package lists name a version the mirror no longer has: refresh and resolve again.
        apt-get update -qq >>"$N/apt.log" 2>&1 || true
        KPKG=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-/ { print $2; exit }')
        mkdir -p "$N/kernel/$KPKG/mods"
        (cd "$N/debs" && apt-get download "$KPKG" >>"$N/apt.log" 2>&1) ||
            skip_or_fail "cannot download $KPKG (see $N/apt.log)"
    fi
    dpkg-deb -x "$N"/debs/"$KPKG"_*.deb "$N/debs/x"
    KD="$N/kernel/$KPKG"
    cp "$N"/debs/x/boot/vmlinuz-* "$KD/vmlinuz.tmp"
    # Modules wanted inside, resolved with their dependencies (modinfo -F depends) into load order.
    declare -A MODFILE=() SEEN=()
    while IFS= read -r f; do
        b=${f##*/}
        b=${b%%.ko*}
        MODFILE[${b//-/_}]=$f
    done < <(find "$N/debs/x/lib/modules" -name '*.ko*')
    ORDER=()
    visit() {
        local m=${1//-/_} d
        [ -z "${SEEN[$m]:-}" ] || return 0
        SEEN[$m]=1
        [ -n "${MODFILE[$m]:-}" ] || summary_fail "module $m is not in $KPKG"
        for d in $(modinfo -F depends "${MODFILE[$m]}" | tr ',' ' '); do visit "$d"; done
        ORDER+=("$m")
    }
    for m in irqbypass kvm ccp kvm_amd e1000 virtio_pci virtio_blk; do visit "$m"; done
    for m in "${ORDER[@]}"; do
        f=${MODFILE[$m]}
        case "$f" in
            *.ko.xz) xz -dc "$f" >"$KD/mods/$m.ko" ;;
            *.ko.zst) zstd -qdc "$f" >"$KD/mods/$m.ko" ;;
            *.ko.gz) gzip -dc "$f" >"$KD/mods/$m.ko" ;;
            *) cp "$f" "$KD/mods/$m.ko" ;;
        esac
        echo "$m.ko"
    done >"$KD/modules.order"
    mv "$KD/vmlinuz.tmp" "$KD/vmlinuz"
    rm -rf "$N/debs"
    echo "$KPKG" >"$N/kernel/current"
fi
KD="$N/kernel/$KPKG"
# The uncompressed ELF boots through its PVH entry, skipping the kernel's self-decompression.
if [ ! -f "$KD/vmlinux" ] && [ ! -f "$KD/vmlinux.none" ]; then
    python3 "$ROOT/scripts/nested/extract-vmlinux.py" "$KD/vmlinuz" "$KD/vmlinux" ||
        { log "no PVH vmlinux in $KPKG: booting the bzImage"; touch "$KD/vmlinux.none"; }
fi
KERNEL="$KD/vmlinuz"
[ "${NESTED_BZIMAGE:-0}" = 1 ] || [ ! -f "$KD/vmlinux" ] || KERNEL="$KD/vmlinux"

#!/bin/bash
# Build the throw-away test guest used by qemu/run-guest.py:
#   OUTDIR/vmlinuz        Debian's stock amd64 kernel (bzImage)
#   OUTDIR/vmlinux        the same kernel uncompressed (ELF, PVH entry) when extractable
#   OUTDIR/initramfs.img  busybox + the modules for virtio-pci, virtiofs, virtio-blk, erofs
#   OUTDIR/guest.info     what was built (kernel version, module load order)
#
# Usage: qemu/build-guest.sh [--force] [OUTDIR]
#   OUTDIR defaults to ${VHOSTFS_GUEST_DIR:-$HOME/.cache/vhostfs/guest}.
#   Nothing is rebuilt when all outputs exist and are newer than this script (use --force).
#   VHOSTFS_KERNEL_DEB=/path/to/linux-image-*.deb skips the apt download.
#
# Needs: apt-get/apt-cache (Debian), dpkg, busybox-static (/bin/busybox), cpio, gzip.
set -euo pipefail

force=0
if [[ ${1:-} == --force ]]; then
    force=1
    shift
fi
OUTDIR=${1:-${VHOSTFS_GUEST_DIR:-$HOME/.cache/vhostfs/guest}}
SCRIPT=$(readlink -f "${BASH_SOURCE[0]}")
BUSYBOX=${VHOSTFS_BUSYBOX:-/bin/busybox}

# Modules wanted in the guest, in load order. Dependencies (from each module's
# "depends=" and "softdep=pre:" modinfo fields) are inserted in front automatically.
WANTED_MODULES=(
    virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci
    fuse virtiofs
    virtio_blk erofs
    overlay
)

log() { printf 'build-guest: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

outputs=("$OUTDIR/vmlinuz" "$OUTDIR/initramfs.img" "$OUTDIR/guest.info")
if ((!force)); then
    fresh=1
    for f in "${outputs[@]}"; do
        if [[ ! -s $f || ! $f -nt $SCRIPT ]]; then fresh=0; fi
    done
    if ((fresh)); then
        log "up to date: $OUTDIR"
        exit 0
    fi
fi

[[ -x $BUSYBOX ]] || die "$BUSYBOX missing (apt-get install busybox-static)"
file_out=$(LC_ALL=C od -An -c -N 4 "$BUSYBOX" | tr -d ' ')
[[ $file_out == 177ELF ]] || die "$BUSYBOX is not an ELF binary"
if command -v readelf >/dev/null && readelf -l "$BUSYBOX" | grep -q INTERP; then
    die "$BUSYBOX is dynamically linked; need busybox-static"
fi
for tool in cpio gzip dpkg; do
    command -v "$tool" >/dev/null || die "$tool not found"
done

WORK=$(mktemp -d "${TMPDIR:-/tmp}/vhostfs-guest.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

# --- 1. the kernel package ---------------------------------------------------
apt_download() {
    # APT::Sandbox::User=root avoids the "_apt cannot access" warning in a private temp dir.
    (cd "$WORK" && apt-get -q -o APT::Sandbox::User=root download "$@") >&2
}

if [[ -n ${VHOSTFS_KERNEL_DEB:-} ]]; then
    deb=$VHOSTFS_KERNEL_DEB
else
    command -v apt-cache >/dev/null || die "apt-cache not found (set VHOSTFS_KERNEL_DEB)"
    resolve_pkg() {
        # linux-image-amd64 is a metapackage; its Depends names the real versioned image.
        apt-cache depends linux-image-amd64 2>/dev/null |
            sed -n 's/^ *Depends: \(linux-image-[0-9][^ ]*-amd64\)$/\1/p' | head -n 1
    }
    pkg=$(resolve_pkg)
    if [[ -z $pkg ]]; then
        log "linux-image-amd64 unknown to apt; running apt-get update"
        apt-get -q update >&2
        pkg=$(resolve_pkg)
    fi
    [[ -n $pkg ]] || die "cannot resolve linux-image-amd64 to a versioned kernel package"
    log "kernel package: $pkg"
    if ! apt_download "$pkg"; then
        log "download failed; running apt-get update and retrying"
        apt-get -q update >&2
        apt_download "$pkg" || die "apt-get download $pkg failed"
    fi
    deb=$(find "$WORK" -maxdepth 1 -name "${pkg}_*.deb" | head -n 1)
    [[ -n $deb ]] || die "downloaded .deb for $pkg not found"
fi

log "unpacking $(basename "$deb")"
dpkg-deb -x "$deb" "$WORK/pkg"
vmlinuz=$(find "$WORK/pkg/boot" -maxdepth 1 -name 'vmlinuz-*' | head -n 1)
[[ -n $vmlinuz ]] || die "no boot/vmlinuz-* in $deb"
kver=${vmlinuz##*/vmlinuz-}
moddir=$WORK/pkg/lib/modules/$kver
[[ -d $moddir ]] || die "no lib/modules/$kver in $deb"

# --- 1b. uncompressed vmlinux for PVH boot ----------------------------------------
# QEMU boots an ELF vmlinux directly through its PVH entry point, which skips the bzImage
# decompressor (about 4 s of the ~9 s boot under TCG).  Needs CONFIG_PVH=y.
extract_vmlinux() {
    local magic tool off
    for magic in '\xfd7zXZ\x00:xz -dc --single-stream' '\x28\xb5\x2f\xfd:zstd -qdc' \
        '\x1f\x8b\x08:gzip -dc'; do
        tool=${magic#*:}
        command -v "${tool%% *}" >/dev/null || continue
        for off in $(LC_ALL=C grep -obUaP "${magic%%:*}" "$vmlinuz" | head -n 4 | cut -d: -f1); do
            tail -c "+$((off + 1))" "$vmlinuz" | $tool >"$WORK/vmlinux" 2>/dev/null || true
            if [[ $(head -c 4 "$WORK/vmlinux" | od -An -c | tr -d ' ') == 177ELF ]]; then
                return 0
            fi
        done
    done
    rm -f "$WORK/vmlinux"
    return 1
}
have_vmlinux=0
if grep -qx 'CONFIG_PVH=y' "$WORK/pkg/boot/config-$kver" 2>/dev/null; then
    if extract_vmlinux; then
        have_vmlinux=1
    else
        log "warning: could not extract vmlinux; guests will boot the slower bzImage"
    fi
fi

# --- 2. module dependency resolution -----------------------------------------
declare -A modpath=()     # normalized name -> path of the .ko[.xz|.zst|.gz]
while IFS= read -r -d '' f; do
    name=${f##*/}
    name=${name%%.ko*}
    modpath[${name//-/_}]=$f
done < <(find "$moddir" -name '*.ko*' -print0)

declare -A builtin=()
if [[ -f $moddir/modules.builtin ]]; then
    while IFS= read -r line; do
        name=${line##*/}
        name=${name%%.ko*}
        builtin[${name//-/_}]=1
    done <"$moddir/modules.builtin"
fi

# Write the uncompressed module to $WORK/mods/NAME.ko (busybox insmod and the
# 6.1 kernel cannot be relied on to take compressed modules).
decompress() {
    case $1 in
        *.ko) cat "$1" ;;
        *.ko.xz) xz -dc "$1" ;;
        *.ko.zst) zstd -qdc "$1" ;;
        *.ko.gz) gzip -dc "$1" ;;
        *) die "unknown module compression: $1" ;;
    esac
}
extract_module() {
    mkdir -p "$WORK/mods"
    decompress "${modpath[$1]}" >"$WORK/mods/$1.ko"
}

modinfo_field() { # modinfo_field NAME FIELD -> values, one per line
    tr '\0' '\n' <"$WORK/mods/$1.ko" | sed -n "s/^$2=//p"
}

# Softdep names can be aliases (libcrc32c: "pre: crc32c"); look those up among
# the crypto modules, which is where such aliases live.
resolve_alias() {
    local alias=${1//-/_} f name
    if [[ -n ${modpath[$alias]:-} || -n ${builtin[$alias]:-} ]]; then
        echo "$alias"
        return
    fi
    while IFS= read -r -d '' f; do
        # (grep -c, not -q: an early exit would SIGPIPE the producer and trip pipefail)
        if [[ $(decompress "$f" | tr '\0' '\n' | grep -cx "alias=$1") != 0 ]]; then
            name=${f##*/}
            name=${name%%.ko*}
            echo "${name//-/_}"
            return
        fi
    done < <(
        # generic C implementations first: they load on any CPU
        find "$moddir/kernel/crypto" -name '*.ko*' -print0 | sort -z
        find "$moddir/kernel/arch" -path '*crypto*' -name '*.ko*' -print0 | sort -z
    )
}

declare -A state=()       # name -> visiting|done
load_order=()
visit() {
    local name=${1//-/_} dep deps
    case ${state[$name]:-} in
        "done") return ;;
        visiting) die "module dependency cycle at $name" ;;
    esac
    if [[ -z ${modpath[$name]:-} ]]; then
        if [[ -n ${builtin[$name]:-} ]]; then
            state[$name]="done"
            return
        fi
        die "module $name not found in $kver"
    fi
    state[$name]=visiting
    extract_module "$name"
    deps=$(modinfo_field "$name" depends | tr ',' ' ')
    for dep in $(modinfo_field "$name" softdep | sed -n 's/.*pre:\([^:]*\)\(post:.*\)\{0,1\}$/\1/p'); do
        dep=$(resolve_alias "$dep")
        [[ -n $dep ]] && deps="$dep $deps"
    done
    for dep in $deps; do
        visit "$dep"
    done
    state[$name]="done"
    load_order+=("$name")
}
for m in "${WANTED_MODULES[@]}"; do
    visit "$m"
done
log "modules: ${load_order[*]}"

# --- 3. the initramfs ----------------------------------------------------------
root=$WORK/root
mkdir -p "$root"/{bin,dev,proc,sys,mnt,tmp,run,root,etc,vhostfs,lib/modules}
ln -s bin "$root/sbin"
mkdir -p "$root/usr"
ln -s ../bin "$root/usr/bin"
ln -s ../bin "$root/usr/sbin"
cp "$BUSYBOX" "$root/bin/busybox"
for applet in $("$BUSYBOX" --list); do
    [[ $applet == busybox ]] || ln -sf busybox "$root/bin/$applet"
done
for m in "${load_order[@]}"; do
    cp "$WORK/mods/$m.ko" "$root/lib/modules/"
done
printf '%s\n' "${load_order[@]}" >"$root/etc/modules.load"
printf 'vhostfs-guest\n' >"$root/etc/hostname"
printf 'root:x:0:0:root:/root:/bin/sh\n' >"$root/etc/passwd"
printf 'root:x:0:\n' >"$root/etc/group"

# /init protocol (see qemu/README.md):
#   kernel cmdline  vhostfs.tag=TAG    mount -t virtiofs TAG at vhostfs.mnt (default /mnt)
#                   vhostfs.mnt=DIR
#                   vhostfs.out=DEV    script stdout device (default ttyS1)
#                   vhostfs.err=DEV    script stderr device (default ttyS2)
#   /vhostfs/run.sh (appended per run as a second cpio archive) is run by /bin/sh with
#   stdin=/dev/null.  Afterwards "\n@@VHOSTFS-EXIT=<status>@@\n" is written to the
#   stdout device and "VHOSTFS-EXIT=<status>" to the console, then the VM powers off.
#   Status 250-253 are init failures (no script / mount failed).
cat >"$root/init" <<'EOF'
#!/bin/sh
mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t tmpfs -o mode=1777 tmpfs /tmp
mount -t tmpfs -o mode=755 tmpfs /run
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
export PATH=/bin HOME=/root TERM=dumb
hostname -F /etc/hostname

while read -r m; do
    insmod "/lib/modules/$m.ko" || echo "vhostfs-init: insmod $m failed"
done </etc/modules.load

tag= mnt=/mnt out=ttyS1 err=ttyS2
for arg in $(cat /proc/cmdline); do
    case $arg in
        vhostfs.tag=*) tag=${arg#vhostfs.tag=} ;;
        vhostfs.mnt=*) mnt=${arg#vhostfs.mnt=} ;;
        vhostfs.out=*) out=${arg#vhostfs.out=} ;;
        vhostfs.err=*) err=${arg#vhostfs.err=} ;;
    esac
done

# Raw mode: no \n -> \r\n translation, so the host gets the script's bytes unchanged.
exec 3>"/dev/$out" 4>"/dev/$err"
stty raw -echo <&3
stty raw -echo <&4

status=0
if [ -n "$tag" ]; then
    mkdir -p "$mnt"
    if ! mount -t virtiofs "$tag" "$mnt" >&4 2>&1; then
        echo "vhostfs-init: mount -t virtiofs $tag $mnt failed" >&4
        status=252
    fi
fi
if [ "$status" = 0 ]; then
    if [ -f /vhostfs/run.sh ]; then
        (cd / && exec /bin/sh /vhostfs/run.sh </dev/null >&3 2>&4)
        status=$?
    else
        echo "vhostfs-init: no /vhostfs/run.sh in the initramfs" >&4
        status=250
    fi
fi
printf '\n@@VHOSTFS-EXIT=%d@@\n' "$status" >&3
exec 3>&- 4>&-
echo "VHOSTFS-EXIT=$status"
cd /
[ -n "$tag" ] && umount "$mnt" 2>/dev/null
sync
poweroff -f
EOF
chmod 755 "$root/init"

log "packing initramfs"
(cd "$root" && find . -mindepth 1 | LC_ALL=C sort |
    cpio --quiet -o -H newc -R 0:0 --reproducible) | gzip -9n >"$WORK/initramfs.img"

mkdir -p "$OUTDIR"
if ((have_vmlinux)); then
    install -m 644 "$WORK/vmlinux" "$OUTDIR/vmlinux.tmp"
    mv -f "$OUTDIR/vmlinux.tmp" "$OUTDIR/vmlinux"
else
    rm -f "$OUTDIR/vmlinux"
fi
install -m 644 "$vmlinuz" "$OUTDIR/vmlinuz.tmp"
install -m 644 "$WORK/initramfs.img" "$OUTDIR/initramfs.img.tmp"
{
    echo "kernel_package=$(basename "$deb")"
    echo "kernel_version=$kver"
    echo "modules=${load_order[*]}"
    echo "vmlinux=$have_vmlinux"
    echo "busybox=$("$BUSYBOX" 2>&1 | sed -n 1p)"
} >"$OUTDIR/guest.info.tmp"
mv -f "$OUTDIR/vmlinuz.tmp" "$OUTDIR/vmlinuz"
mv -f "$OUTDIR/initramfs.img.tmp" "$OUTDIR/initramfs.img"
mv -f "$OUTDIR/guest.info.tmp" "$OUTDIR/guest.info"
log "done: $OUTDIR ($kver)"

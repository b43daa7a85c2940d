#!/usr/bin/env bash
# Prepare a Debian 12 host for vhostfs: system packages, a Python environment with vhostfs
# installed (editable, with test extras) in .venv, and the test guest (kernel + initramfs).
# Safe to run again: every step skips what is already done.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
sudo=""
[ "$(id -u)" = 0 ] || sudo="sudo"

packages=(
    qemu-system-x86 qemu-system-common   # QEMU 7.2 and the reference C virtiofsd
    busybox-static cpio                  # the guest's initramfs
    erofs-utils                          # mkfs/fsck/dump.erofs, the independent format check
    lz4                                  # the reference LZ4 encoder for the decoder tests
    debootstrap                          # the Debian rootfs the image tests serve
    gnuplot-nox                          # the benchmark chart (qemu/bench.py)
    docker-registry apache2-utils        # a real OCI registry (distribution 2.8) and htpasswd
    skopeo                               # pushes the demo's OCI image, the cold-start baseline
    nginx-light                          # stands in for dfdaemon in the proxy tests
    gcc python3-dev python3-venv         # the cffi extension and the virtual environment
)
missing=()
for pkg in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing ${missing[*]}"
    $sudo apt-get update -qq
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${missing[@]}" >/dev/null
fi

python=${PYTHON:-python3}
if [ ! -x "$repo/.venv/bin/python" ]; then
    echo "setup: creating $repo/.venv with $($python --version)"
    "$python" -m venv "$repo/.venv"
fi
echo "setup: installing vhostfs into .venv (builds the C extension)"
pip_log="$repo/.venv/pip-install.log"
if ! { "$repo/.venv/bin/python" -m pip install --upgrade pip &&
       "$repo/.venv/bin/python" -m pip install -e "$repo[test]"; } >"$pip_log" 2>&1; then
    cat "$pip_log" >&2
    echo "setup: pip install failed (log above, also in $pip_log)" >&2
    exit 1
fi

echo "setup: building the test guest"
"$repo/qemu/build-guest.sh"
echo "setup: done"

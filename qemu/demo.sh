#!/usr/bin/env bash
# The main job, end to end: prepare a sample tree holding a program, serve it with vhostfs,
# boot a guest in QEMU that mounts it over virtio-fs, and run the program from the mount.
# Run qemu/setup.sh first (the README's first command does both).
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
python="$repo/.venv/bin/python"
work=$(mktemp -d /tmp/vhostfs-demo.XXXXXX)
trap 'kill "${daemon:-}" 2>/dev/null || true; rm -rf "$work"' EXIT

sample="$work/sample"
mkdir -p "$sample/bin"
cp /bin/busybox "$sample/bin/busybox"
cat > "$sample/hello.sh" <<'SCRIPT'
echo "hello from a program served by vhostfs"
/mnt/bin/busybox uname -sr
/mnt/bin/busybox sha256sum /mnt/bin/busybox
SCRIPT
echo "demo: host sha256 $(sha256sum "$sample/bin/busybox")"

"$python" -m vhostfs serve --socket "$work/vhostfs.sock" --shared-dir "$sample" \
    --log-level warning &
daemon=$!
for _ in $(seq 100); do [ -S "$work/vhostfs.sock" ] && break; sleep 0.1; done

echo "demo: booting the guest"
"$python" "$repo/qemu/run-guest.py" --socket "$work/vhostfs.sock" \
    --command '/mnt/bin/busybox sh /mnt/hello.sh'

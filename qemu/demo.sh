#!/usr/bin/env bash
# The main job, end to end: build a RAFS image (zstd chunks, blake3 digests) of a sample tree
# holding a program, serve it lazily with vhostfs, boot a guest in QEMU that mounts it over
# virtio-fs, and run the program from the mount. Run qemu/setup.sh first (the README's first
# command does both).
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
vhostfs=("$repo/.venv/bin/python" -m vhostfs)
work=$(mktemp -d /tmp/vhostfs-demo.XXXXXX)
trap 'kill "${daemon:-}" 2>/dev/null || true; rm -rf "$work"' EXIT

sample="$work/sample"
mkdir -p "$sample/bin"
cp /bin/busybox "$sample/bin/busybox"
cat > "$sample/hello.sh" <<'SCRIPT'
echo "hello from a program in a RAFS image served by vhostfs"
/mnt/bin/busybox uname -sr
/mnt/bin/busybox sha256sum /mnt/bin/busybox
SCRIPT
echo "demo: host sha256 $(sha256sum "$sample/bin/busybox")"

echo "demo: building the image"
"${vhostfs[@]}" build "$sample" -o "$work/image"
"${vhostfs[@]}" inspect "$work/image/bootstrap"

"${vhostfs[@]}" serve --socket "$work/vhostfs.sock" --bootstrap "$work/image/bootstrap" \
    --blob-dir "$work/image" --cache-dir "$work/cache" --log-level warning &
daemon=$!
for _ in $(seq 100); do [ -S "$work/vhostfs.sock" ] && break; sleep 0.1; done

echo "demo: booting the guest"
"$repo/.venv/bin/python" "$repo/qemu/run-guest.py" --socket "$work/vhostfs.sock" \
    --command '/mnt/bin/busybox sh /mnt/hello.sh'

#!/usr/bin/env bash
# The main job, end to end: make an OCI image of a sample tree holding a program, push it to a
# local registry this script starts, convert it with `vhostfs convert` into a nydus image in the
# same registry, serve that image lazily with `vhostfs serve --image`, boot a guest in QEMU that
# mounts it over virtio-fs, run the program from the mount, and print how many bytes were
# fetched from the registry. Run qemu/setup.sh first (the README's first command does both).
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
python="$repo/.venv/bin/python"
vhostfs=("$python" -m vhostfs)
work=$(mktemp -d /tmp/vhostfs-demo.XXXXXX)
trap 'kill "${daemon:-}" "${registry:-}" 2>/dev/null || true; wait 2>/dev/null; rm -rf "$work"' EXIT

sample="$work/sample"
mkdir -p "$sample/bin" "$sample/data"
cp /bin/busybox "$sample/bin/busybox"
cat > "$sample/hello.sh" <<'SCRIPT'
echo "hello from a program in a nydus image, pulled lazily from a registry by vhostfs"
/mnt/bin/busybox uname -sr
/mnt/bin/busybox sha256sum /mnt/bin/busybox
SCRIPT
# Never read by the guest, so never fetched: that is the point of a lazy pull.
head -c $((64 << 20)) /dev/urandom > "$sample/data/unused.bin"
echo "demo: host sha256 $(sha256sum "$sample/bin/busybox")"

echo "demo: making an OCI image of the sample tree"
layout="$work/oci"
mkdir -p "$layout/blobs/sha256"
put_blob() {  # file -> prints "sha256:<hex> <size>", the file moved into the layout
    local hex size
    hex=$(sha256sum "$1" | cut -d' ' -f1)
    size=$(stat -c %s "$1")
    mv "$1" "$layout/blobs/sha256/$hex"
    echo "sha256:$hex $size"
}
tar -C "$sample" -cf "$work/layer.tar" .
diff_id="sha256:$(sha256sum "$work/layer.tar" | cut -d' ' -f1)"
gzip -n "$work/layer.tar"
read -r layer_digest layer_size < <(put_blob "$work/layer.tar.gz")
printf '{"architecture":"amd64","os":"linux","config":{},"rootfs":{"type":"layers","diff_ids":["%s"]}}' \
    "$diff_id" > "$work/config.json"
read -r config_digest config_size < <(put_blob "$work/config.json")
printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"%s","size":%s},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"%s","size":%s}]}' \
    "$config_digest" "$config_size" "$layer_digest" "$layer_size" > "$work/manifest.json"
read -r manifest_digest manifest_size < <(put_blob "$work/manifest.json")
printf '{"schemaVersion":2,"manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"%s","size":%s,"annotations":{"org.opencontainers.image.ref.name":"demo"}}]}' \
    "$manifest_digest" "$manifest_size" > "$layout/index.json"
echo '{"imageLayoutVersion":"1.0.0"}' > "$layout/oci-layout"

port=$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
cat > "$work/registry.yml" <<YAML
version: 0.1
log: {level: warn, accesslog: {disabled: true}}
storage: {filesystem: {rootdirectory: $work/registry}}
http: {addr: 127.0.0.1:$port}
YAML
docker-registry serve "$work/registry.yml" > "$work/registry.log" 2>&1 &
registry=$!
for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done
host="127.0.0.1:$port"
echo "demo: pushing the OCI image to the local registry at $host"
skopeo copy --quiet --dest-tls-verify=false "oci:$layout:demo" "docker://$host/demo:oci"

echo "demo: converting it to a nydus image"
"${vhostfs[@]}" convert --source "$host/demo:oci" --target "$host/demo:nydus" \
    --source-insecure --target-insecure

"${vhostfs[@]}" serve --socket "$work/vhostfs.sock" --image "$host/demo:nydus" --insecure \
    --cache-dir "$work/cache" --log-level info 2> "$work/daemon.log" &
daemon=$!
for _ in $(seq 100); do [ -S "$work/vhostfs.sock" ] && break; sleep 0.1; done

echo "demo: booting the guest"
"$python" "$repo/qemu/run-guest.py" --socket "$work/vhostfs.sock" \
    --command '/mnt/bin/busybox sh /mnt/hello.sh'

# The daemon logs its counters when the guest goes away, then exits.
wait "$daemon" || true
daemon=""
"$python" - "$work/daemon.log" "$layer_size" <<'PY'
import json, sys
log, layer_size = open(sys.argv[1]).read(), int(sys.argv[2])
line = [l for l in log.splitlines() if " metrics {" in l][-1]
metrics = json.loads(line.split(" metrics ", 1)[1])
print(
    f"demo: fetched {metrics['backend_bytes']} bytes from the registry in "
    f"{metrics['backend_requests']} range requests; the source layer is {layer_size} bytes"
)
PY

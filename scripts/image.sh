#!/usr/bin/env bash
# Build the runtime image tunnel:latest offline (no registry, nothing pulled).
#
#   scripts/image.sh          (root, or a user allowed to use Docker; `make image`)
#
# The image is assembled from this machine's files:
#   - target/release/tunnel          -> /usr/local/bin/tunnel (the entrypoint)
#   - the shared libraries it needs (ldd) and the dynamic loader, at their paths
#   - busybox-static (Debian package) -> /bin/busybox + applet links, for a
#     shell, `ip`, `wget`, ... (compose/docker-compose.yml runs `sh -c`)
#   - /etc/passwd, /etc/group, /tmp, /var/lib/tunnel, /var/run/wireguard
# and imported with `docker import` (ENTRYPOINT ["/usr/local/bin/tunnel"]).
# The image carries labels with the binary's sha256 and the recipe version, so
# scripts/compose-demo.sh can tell whether it is stale.
#
# For a registry-based build (rust + debian-slim), see the Dockerfile instead.
#
# Environment:
#   TUNNEL_IMAGE  image to build (default tunnel:latest)
#   TUNNEL_BIN    binary to package (default target/release/tunnel)
#   NO_BUILD      1 = do not run `cargo build --release` first
#
# Progress goes to stderr; on success the image id is printed on stdout.
set -euo pipefail
export LC_ALL=C
export DEBIAN_FRONTEND=noninteractive

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$HERE")
IMAGE=${TUNNEL_IMAGE:-tunnel:latest}
TUNNEL_BIN=${TUNNEL_BIN:-$ROOT/target/release/tunnel}
# Bump when the rootfs recipe below changes: compose-demo.sh rebuilds images
# with another value.
IMAGE_RECIPE=1

step() { printf '==> %s\n' "$*" >&2; }
info() { printf '    %s\n' "$*" >&2; }
fail() {
	printf 'image: error: %s\n' "$*" >&2
	exit 1
}

WORK=""
cleanup() {
	if [ -n "$WORK" ]; then
		rm -rf "$WORK"
	fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

pkg_installed() {
	[ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null || true)" = "install ok installed" ]
}

# Copy a file to the same absolute path under the rootfs, following symlinks
# for the content but keeping the name asked for (libc.so.6, ld-linux...).
copy_abs() {
	local src=$1 dst
	dst=$ROOTFS$src
	mkdir -p "$(dirname "$dst")"
	cp -L "$src" "$dst"
}

main() {
	local t0=$SECONDS bb applet n=0 lib libs loader sha version id old_id

	command -v docker >/dev/null 2>&1 || fail "no docker CLI (run: sudo bash scripts/docker-env.sh)"
	timeout 10 docker info >/dev/null 2>&1 || fail "no Docker engine answers (run: sudo bash scripts/docker-env.sh)"

	if [ "${NO_BUILD:-0}" != 1 ]; then
		step "building (cargo build --release)"
		(cd "$ROOT" && cargo build --release) >&2 || fail "cargo build --release failed"
	fi
	[ -x "$TUNNEL_BIN" ] || fail "$TUNNEL_BIN not found (run: cargo build --release)"
	version=$("$TUNNEL_BIN" --version 2>/dev/null) || fail "$TUNNEL_BIN --version failed"

	if ! pkg_installed busybox-static; then
		step "installing busybox-static"
		if ! apt-get install -y -q --no-install-recommends busybox-static >&2; then
			apt-get update -q >&2 || fail "apt-get update failed"
			apt-get install -y -q --no-install-recommends busybox-static >&2 ||
				fail "apt-get install busybox-static failed"
		fi
	fi
	bb=$(dpkg -L busybox-static | grep -E '/bin/busybox$' | head -n 1)
	[ -x "$bb" ] || fail "busybox binary not found in package busybox-static"

	step "assembling the rootfs for $IMAGE ($version)"
	WORK=$(mktemp -d /tmp/tunnel-image.XXXXXX)
	ROOTFS=$WORK/rootfs
	mkdir -p "$ROOTFS"/{bin,etc,root,tmp,proc,sys,dev,run,usr/local/bin,var/lib/tunnel}
	ln -s ../run "$ROOTFS/var/run"
	mkdir -p "$ROOTFS/run/wireguard"
	chmod 1777 "$ROOTFS/tmp"
	chmod 0700 "$ROOTFS/root" "$ROOTFS/var/lib/tunnel"

	install -m 0755 "$TUNNEL_BIN" "$ROOTFS/usr/local/bin/tunnel"

	# Shared libraries (absolute paths in ldd's output) and the loader.
	libs=$(ldd "$TUNNEL_BIN" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }' | sort -u)
	[ -n "$libs" ] || fail "ldd found no libraries for $TUNNEL_BIN (a static binary needs none; check ldd output)"
	for lib in $libs; do
		copy_abs "$lib"
		info "library $lib"
	done
	loader=$(readelf -l "$TUNNEL_BIN" 2>/dev/null | sed -n 's/.*Requesting program interpreter: \(.*\)]/\1/p') || true
	if [ -n "$loader" ] && [ ! -e "$ROOTFS$loader" ]; then
		copy_abs "$loader"
		info "loader $loader"
	fi

	cp "$bb" "$ROOTFS/bin/busybox"
	for applet in $("$bb" --list); do
		case $applet in
		busybox | */* | '') continue ;;
		esac
		ln -s busybox "$ROOTFS/bin/$applet"
		n=$((n + 1))
	done
	for d in sbin usr/bin usr/sbin; do
		ln -s /bin "$ROOTFS/$d"
	done
	printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' >"$ROOTFS/etc/passwd"
	printf 'root:x:0:\nnogroup:x:65534:\n' >"$ROOTFS/etc/group"
	info "busybox $("$bb" | head -n 1 | awk '{print $2}') + $n applet links"

	sha=$(sha256sum "$TUNNEL_BIN" | awk '{print $1}')
	old_id=$(docker image inspect -f '{{.Id}}' "$IMAGE" 2>/dev/null) || old_id=""
	step "importing $IMAGE"
	tar --numeric-owner --owner=0 --group=0 -C "$ROOTFS" -c . |
		docker import \
			--change 'ENTRYPOINT ["/usr/local/bin/tunnel"]' \
			--change 'CMD ["--help"]' \
			--change 'ENV PATH=/usr/local/bin:/bin' \
			--change 'WORKDIR /' \
			--change "LABEL org.opencontainers.image.title=tunnel" \
			--change "LABEL org.opencontainers.image.version=${version#tunnel }" \
			--change "LABEL tunnel.image.recipe=$IMAGE_RECIPE" \
			--change "LABEL tunnel.image.binary-sha256=$sha" \
			- "$IMAGE" >/dev/null || fail "docker import of $IMAGE failed"

	step "verifying $IMAGE"
	local out
	out=$(docker run --rm --network none "$IMAGE" --version 2>&1) ||
		fail "docker run --rm --network none $IMAGE --version failed: $out"
	[ "$out" = "$version" ] || fail "$IMAGE --version printed '$out', want '$version'"
	info "tunnel --version in the image: $out"
	# shellcheck disable=SC2016  # $a is for the container's shell
	docker run --rm --network none --entrypoint /bin/sh "$IMAGE" -c \
		'for a in sh ip wget sleep timeout cat; do command -v $a >/dev/null || { echo "missing applet: $a"; exit 1; }; done' >&2 ||
		fail "$IMAGE lacks a shell or applets"
	info "shell and applets (sh ip wget sleep timeout cat) ok"

	id=$(docker image inspect -f '{{.Id}}' "$IMAGE")
	# The image this one replaces would stay behind untagged: remove it unless
	# a container or another tag still uses it.
	if [ -n "$old_id" ] && [ "$old_id" != "$id" ]; then
		if docker rmi "$old_id" >/dev/null 2>&1; then
			info "removed the previous image ${old_id#sha256:}"
		else
			info "previous image ${old_id#sha256:} still in use; left as is"
		fi
	fi
	info "size $(docker image inspect -f '{{.Size}}' "$IMAGE" | awk '{ printf "%.1f MB", $1 / 1e6 }'), built in $((SECONDS - t0))s"
	printf '%s %s\n' "$IMAGE" "$id"
}

main "$@"

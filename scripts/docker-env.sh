#!/usr/bin/env bash
# Make sure a local Docker engine answers and the test image exists.
#
#   bash scripts/docker-env.sh        (root; idempotent; used by .ci/run and
#                                      by `sudo make test` / `make docker-env`)
#
# 1. If `docker info` answers, use that engine.
# 2. Otherwise install Debian's docker.io when dockerd is missing, and start
#    dockerd detached from this shell (log: /var/log/tunnel-dockerd.log). dockerd
#    20.10 starts its own containerd when no system containerd is running, and
#    needs no systemd; it does need cgroups mounted, which is done here if not.
#    The engine is left running on purpose.
# 3. Build $TUNNEL_TEST_IMAGE (default tunnel-test-busybox:latest) locally from
#    busybox-static when it is missing (no registry is needed), then check it:
#    a shell with the applets, and an httpd reached by wget from a second
#    container over the default bridge. Verification containers are removed.
# 4. Print the engine version and the image id on stdout.
#
# Progress goes to stderr; on failure the last line is "docker-env: error: ...".
set -euo pipefail
export LC_ALL=C
export DEBIAN_FRONTEND=noninteractive

IMAGE=${TUNNEL_TEST_IMAGE:-tunnel-test-busybox:latest}
# Bump when the image recipe below changes: an image with another value is rebuilt.
IMAGE_RECIPE=1
DOCKERD_LOG=/var/log/tunnel-dockerd.log
WAIT_SECS=${DOCKER_WAIT_SECS:-60}
LOCK=/run/lock/tunnel-docker-env.lock
VERIFY_LABEL=tunnel.docker-env.verify
INDEX_BODY="tunnel-test-busybox ok"

step() { printf '==> %s\n' "$*" >&2; }
info() { printf '    %s\n' "$*" >&2; }
fail() {
	printf 'docker-env: error: %s\n' "$*" >&2
	exit 1
}

engine_up() { timeout 10 docker info >/dev/null 2>&1; }

apt_install() {
	info "apt-get install $*"
	# NEEDRESTART_SUSPEND: no needrestart prompt/report from the apt hook.
	if ! NEEDRESTART_SUSPEND=1 apt-get install -y -q --no-install-recommends "$@" >&2; then
		info "install failed; running apt-get update and retrying"
		apt-get update -q >&2 || fail "apt-get update failed"
		NEEDRESTART_SUSPEND=1 apt-get install -y -q --no-install-recommends "$@" >&2 ||
			fail "apt-get install $* failed"
	fi
}

pkg_installed() {
	[ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null || true)" = "install ok installed" ]
}

# Mount cgroups the way Debian's /etc/init.d/docker (cgroupfs-mount) does, for
# machines where nothing (no systemd) has mounted them.
ensure_cgroups() {
	if awk '$3 == "cgroup" || $3 == "cgroup2" { found = 1 } END { exit !found }' /proc/mounts; then
		return 0
	fi
	info "no cgroup filesystem mounted: mounting cgroup v1 hierarchies under /sys/fs/cgroup"
	if [ ! -e /proc/cgroups ] || [ ! -d /sys/fs/cgroup ]; then
		fail "no cgroup support (/proc/cgroups or /sys/fs/cgroup missing)"
	fi
	if ! mountpoint -q /sys/fs/cgroup; then
		mount -t tmpfs -o uid=0,gid=0,mode=0755 cgroup /sys/fs/cgroup || fail "cannot mount tmpfs on /sys/fs/cgroup"
	fi
	local sys
	while read -r sys; do
		mkdir -p "/sys/fs/cgroup/$sys"
		mountpoint -q "/sys/fs/cgroup/$sys" || mount -n -t cgroup -o "$sys" cgroup "/sys/fs/cgroup/$sys" ||
			rmdir "/sys/fs/cgroup/$sys" || true
	done < <(awk '!/^#/ { if ($4 == 1) print $1 }' /proc/cgroups)
	awk '$3 == "cgroup" { found = 1 } END { exit !found }' /proc/mounts || fail "could not mount any cgroup hierarchy"
}

# The dockerd log since the last start by this script.
log_since_start() {
	awk '/ docker-env\.sh starting dockerd$/ { n = 0; next } { a[++n] = $0 } END { for (i = 1; i <= n; i++) print a[i] }' \
		"$DOCKERD_LOG" 2>/dev/null || true
}

show_log_tail() {
	log_since_start | tail -n 15 | sed 's/^/    | /' >&2
}

start_engine() {
	local t0=$SECONDS pid="" reason
	if pgrep -x dockerd >/dev/null 2>&1; then
		info "a dockerd is already running (pid $(pgrep -x dockerd | paste -sd ' ')); waiting for it"
	else
		if ! command -v dockerd >/dev/null 2>&1; then
			step "installing docker.io (dockerd missing)"
			apt_install docker.io
			command -v dockerd >/dev/null 2>&1 || fail "dockerd still missing after installing docker.io"
			if engine_up; then
				info "engine answers after install"
				return 0
			fi
		fi
		command -v containerd >/dev/null 2>&1 || apt_install containerd
		command -v runc >/dev/null 2>&1 || apt_install runc
		ensure_cgroups
		if [ -d /run/systemd/system ]; then
			info "note: systemd is running; 'systemctl start docker' would also do"
		fi
		step "starting dockerd (log: $DOCKERD_LOG)"
		t0=$SECONDS
		mkdir -p "$(dirname "$DOCKERD_LOG")"
		printf '\n=== %s docker-env.sh starting dockerd\n' "$(date -Is)" >>"$DOCKERD_LOG"
		# setsid + nohup: own session, survives the calling shell and its job
		# control; dockerd starts and supervises its own containerd.
		# fd 9 (the lock) is closed so that dockerd and its children do not
		# keep holding it.
		(
			exec 9>&-
			ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
			exec setsid nohup dockerd >>"$DOCKERD_LOG" 2>&1 </dev/null
		) &
		pid=$!
		info "dockerd pid $pid"
	fi
	local deadline=$((SECONDS + WAIT_SECS))
	until engine_up; do
		if [ -n "$pid" ] && ! kill -0 "$pid" 2>/dev/null && ! pgrep -x dockerd >/dev/null 2>&1; then
			show_log_tail
			reason=$(log_since_start | grep -E 'level=(fatal|error)|failed' | tail -n 1) || true
			fail "dockerd exited during startup: ${reason:-see $DOCKERD_LOG}"
		fi
		if [ "$SECONDS" -ge "$deadline" ]; then
			show_log_tail
			fail "docker engine did not answer within ${WAIT_SECS}s (see $DOCKERD_LOG)"
		fi
		sleep 1
	done
	info "engine answers after $((SECONDS - t0))s"
}

build_image() {
	local t0=$SECONDS bb rootfs applet d n=0
	if ! pkg_installed busybox-static; then
		step "installing busybox-static"
		apt_install busybox-static
	fi
	bb=$(dpkg -L busybox-static | grep -E '/bin/busybox$' | head -n 1)
	[ -x "$bb" ] || fail "busybox binary not found in package busybox-static"
	step "building $IMAGE from $bb ($("$bb" | head -n 1))"
	WORK=$(mktemp -d /tmp/tunnel-docker-env.XXXXXX)
	rootfs=$WORK/rootfs
	mkdir -p "$rootfs"/{bin,etc,root,tmp,var/www,proc,sys,dev}
	chmod 1777 "$rootfs/tmp"
	chmod 0700 "$rootfs/root"
	cp "$bb" "$rootfs/bin/busybox"
	for applet in $("$bb" --list); do
		case $applet in
		busybox | */* | '') continue ;;
		esac
		ln -s busybox "$rootfs/bin/$applet"
		n=$((n + 1))
	done
	mkdir -p "$rootfs/usr"
	for d in sbin usr/bin usr/sbin; do
		ln -s /bin "$rootfs/$d"
	done
	printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' >"$rootfs/etc/passwd"
	printf 'root:x:0:\nnogroup:x:65534:\n' >"$rootfs/etc/group"
	printf '%s\n' "$INDEX_BODY" >"$rootfs/var/www/index.html"
	info "rootfs: busybox + $n applet links"
	tar --numeric-owner --owner=0 --group=0 -C "$rootfs" -c . |
		docker import \
			--change 'CMD ["/bin/sh"]' \
			--change 'ENV PATH=/bin' \
			--change "LABEL tunnel.test-image.recipe=$IMAGE_RECIPE" \
			- "$IMAGE" >/dev/null || fail "docker import of $IMAGE failed"
	rm -rf "$WORK"
	WORK=""
	info "built in $((SECONDS - t0))s"
}

WORK=""
VERIFY_CONTAINERS=()
cleanup_verify() {
	if [ "${#VERIFY_CONTAINERS[@]}" -gt 0 ]; then
		docker rm -f "${VERIFY_CONTAINERS[@]}" >/dev/null 2>&1 || true
		VERIFY_CONTAINERS=()
	fi
}
cleanup() {
	cleanup_verify
	if [ -n "$WORK" ]; then
		rm -rf "$WORK"
	fi
}

verify_image() {
	local t0=$SECONDS srv cli ip out="" i stale
	step "verifying $IMAGE"
	# Leftovers of an interrupted earlier run.
	stale=$(docker ps -aq --filter "label=$VERIFY_LABEL") || true
	if [ -n "$stale" ]; then
		# shellcheck disable=SC2086  # one id per word
		docker rm -f $stale >/dev/null 2>&1 || true
	fi
	# shellcheck disable=SC2016  # $a is for the container's shell
	docker run --rm --network none --label "$VERIFY_LABEL=1" "$IMAGE" /bin/busybox sh -c \
		'for a in sh httpd wget ip sleep timeout; do command -v $a >/dev/null || { echo "missing applet: $a"; exit 1; }; done' >&2 ||
		fail "image $IMAGE does not run or lacks applets"
	info "shell and applets (sh httpd wget ip sleep timeout) ok"

	srv=tunnel-env-httpd-$$
	cli=tunnel-env-wget-$$
	VERIFY_CONTAINERS+=("$srv" "$cli")
	docker run -d --name "$srv" --label "$VERIFY_LABEL=1" "$IMAGE" httpd -f -p 80 -h /var/www >/dev/null ||
		fail "cannot start an httpd container from $IMAGE"
	ip=$(docker inspect -f '{{.NetworkSettings.IPAddress}}' "$srv")
	[ -n "$ip" ] || fail "httpd container got no address on the default bridge"
	# Not `wget -T`: Debian's busybox-static 1.35 wget lacks the timeout
	# feature and segfaults on -T; use the timeout applet instead.
	for i in 1 2 3 4 5; do
		docker rm -f "$cli" >/dev/null 2>&1 || true
		if out=$(docker run --name "$cli" --label "$VERIFY_LABEL=1" "$IMAGE" timeout 5 wget -qO- "http://$ip/" 2>&1) &&
			[ "$out" = "$INDEX_BODY" ]; then
			break
		fi
		[ "$i" -lt 5 ] || fail "wget http://$ip/ from a second container failed: ${out:-no output}"
		sleep 1
	done
	cleanup_verify
	info "httpd at $ip reached from a second container over the default bridge ($((SECONDS - t0))s)"
}

main() {
	[ "$(id -u)" -eq 0 ] || fail "must run as root"
	local t0=$SECONDS
	trap cleanup EXIT
	trap 'exit 130' INT
	trap 'exit 143' TERM
	mkdir -p "$(dirname "$LOCK")"
	exec 9>"$LOCK"
	flock -w 300 9 || fail "another docker-env.sh holds $LOCK"

	step "checking the docker engine"
	if ! command -v docker >/dev/null 2>&1 && ! command -v dockerd >/dev/null 2>&1; then
		step "installing docker.io (no docker CLI or engine)"
		apt_install docker.io
	fi
	command -v docker >/dev/null 2>&1 || fail "no docker CLI on PATH"
	if engine_up; then
		info "engine already answers"
	else
		start_engine
	fi

	local recipe
	recipe=$(docker image inspect -f "{{ index .Config.Labels \"tunnel.test-image.recipe\" }}" "$IMAGE" 2>/dev/null || true)
	if [ -z "$recipe" ]; then
		build_image
	elif [ "$recipe" != "$IMAGE_RECIPE" ]; then
		info "$IMAGE has recipe $recipe, want $IMAGE_RECIPE: rebuilding"
		build_image
	else
		info "image $IMAGE present"
	fi
	verify_image

	local version id
	version=$(docker version -f '{{.Server.Version}}')
	id=$(docker image inspect -f '{{.Id}}' "$IMAGE")
	step "docker environment ready in $((SECONDS - t0))s"
	printf 'docker engine %s\n' "$version"
	printf 'image %s %s\n' "$IMAGE" "$id"
}

main "$@"

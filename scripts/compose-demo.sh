#!/usr/bin/env bash
# Compose demo: two sites on one Docker host, joined by `tunnel`, with a web
# container on site A and a client container on site B that have no network
# but the tunnel. Brings compose/docker-compose.yml up, waits for the client
# to fetch the page across the tunnel, prints it, brings everything down and
# checks that nothing is left.
#
# Usage (as root): make compose-demo      or   scripts/compose-demo.sh
#
# Steps: install Debian's docker-compose when no Compose is there; start the
# engine and build tunnel-test-busybox (scripts/docker-env.sh); build
# tunnel:latest (scripts/image.sh, i.e. `make image`) when it is missing or
# older than target/release/tunnel, or the binary is older than the sources;
# `up -d`; wait for "RESULT:" in the client's log and for both sites'
# healthchecks (`tunnel status --check`) to pass; `down -v`; check.
#
# Environment:
#   COMPOSE        Compose command (default: docker-compose, else `docker compose`)
#   WAIT_SECS      how long to wait for the client's result (default 60)
#   NO_BUILD       1 = never run cargo build (image.sh packages the binary as is)
#   KEEP_UP        1 = leave the demo running (no `down`; for poking around)
#   TUNNEL_IMAGE   tunnel image to run, used as it is (default: tunnel:latest,
#                  built or rebuilt here when stale)
#   WEB_IMAGE, CLIENT_IMAGE, TUNNEL_LOG: passed to compose (compose/README.md)
#   COMPOSE_EXTRA  override files to add with -f, space-separated (then, as
#                  with WEB_IMAGE, any non-empty page counts as a success)
#
# Exit 0 only if the client printed the page it fetched over the tunnel.
set -euo pipefail
export LC_ALL=C
export DEBIAN_FRONTEND=noninteractive

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$HERE")
FILE=$ROOT/compose/docker-compose.yml
PROJECT=tunnel-demo
WAIT_SECS=${WAIT_SECS:-60}
TUNNEL_BIN=$ROOT/target/release/tunnel
# An image named by the caller is used as it is; the default one is (re)built.
if [ -n "${TUNNEL_IMAGE:-}" ]; then
	OWN_IMAGE=0
else
	OWN_IMAGE=1
	TUNNEL_IMAGE=tunnel:latest
fi
export TUNNEL_IMAGE
WEB=tunnel-demo-web
CLIENT=tunnel-demo-client
EXPECTED_PAGE="hello from site A over the tunnel"
PROJECT_LABEL=com.docker.compose.project=$PROJECT

# shellcheck source=scripts/packages.sh
. "$(dirname "${BASH_SOURCE[0]}")/packages.sh"

step() { printf '==> %s\n' "$*" >&2; }
info() { printf '    %s\n' "$*" >&2; }
fail() {
	printf 'compose-demo: error: %s\n' "$*" >&2
	exit 1
}

# Override files (e.g. another web server, see compose/README.md), each
# added with -f after compose/docker-compose.yml.
FILES=(-f "$FILE")
read -r -a EXTRA <<<"${COMPOSE_EXTRA:-}"
for f in "${EXTRA[@]}"; do
	FILES+=(-f "$f")
done

COMPOSE_CMD=()
dc() { "${COMPOSE_CMD[@]}" -p "$PROJECT" "${FILES[@]}" "$@"; }

find_compose() {
	if [ -n "${COMPOSE:-}" ]; then
		read -r -a COMPOSE_CMD <<<"$COMPOSE"
	elif command -v docker-compose >/dev/null 2>&1; then
		COMPOSE_CMD=(docker-compose)
	elif docker compose version >/dev/null 2>&1; then
		COMPOSE_CMD=(docker compose)
	else
		step "installing docker-compose (Debian package; no Compose found)"
		ensure_packages docker-compose:docker-compose >&2 || fail "cannot install docker-compose"
		command -v docker-compose >/dev/null 2>&1 || fail "docker-compose still missing after install"
		COMPOSE_CMD=(docker-compose)
	fi
	info "compose: ${COMPOSE_CMD[*]} ($("${COMPOSE_CMD[@]}" version --short 2>/dev/null || echo '?'))"
}

# Newest mtime (seconds) among the files the binary is built from.
sources_mtime() {
	find "$ROOT/src" "$ROOT/Cargo.toml" "$ROOT/Cargo.lock" -type f -printf '%T@\n' 2>/dev/null |
		sort -n | tail -n 1 | cut -d. -f1
}

# Builds tunnel:latest (make image) when it is missing or stale.
ensure_image() {
	local why="" want_recipe have_recipe have_sha sha
	if [ "$OWN_IMAGE" = 0 ]; then
		docker image inspect "$TUNNEL_IMAGE" >/dev/null 2>&1 || fail "TUNNEL_IMAGE=$TUNNEL_IMAGE: no such image"
		info "using TUNNEL_IMAGE=$TUNNEL_IMAGE as it is"
		return 0
	fi
	want_recipe=$(sed -n 's/^IMAGE_RECIPE=//p' "$HERE/image.sh")
	if [ ! -x "$TUNNEL_BIN" ]; then
		why="$TUNNEL_BIN is missing"
	elif [ "${NO_BUILD:-0}" != 1 ] && [ "$(sources_mtime)" -gt "$(stat -c %Y "$TUNNEL_BIN")" ]; then
		why="$TUNNEL_BIN is older than the sources"
	elif ! docker image inspect "$TUNNEL_IMAGE" >/dev/null 2>&1; then
		why="$TUNNEL_IMAGE is missing"
	else
		have_recipe=$(docker image inspect -f '{{ index .Config.Labels "tunnel.image.recipe" }}' "$TUNNEL_IMAGE")
		have_sha=$(docker image inspect -f '{{ index .Config.Labels "tunnel.image.binary-sha256" }}' "$TUNNEL_IMAGE")
		sha=$(sha256sum "$TUNNEL_BIN" | awk '{print $1}')
		if [ "$have_recipe" != "$want_recipe" ]; then
			why="$TUNNEL_IMAGE has recipe '$have_recipe', want $want_recipe"
		elif [ "$have_sha" != "$sha" ]; then
			why="$TUNNEL_IMAGE holds another tunnel binary than $TUNNEL_BIN"
		fi
	fi
	if [ -z "$why" ]; then
		info "image $TUNNEL_IMAGE is up to date with $TUNNEL_BIN"
		return 0
	fi
	step "building $TUNNEL_IMAGE: $why (make image)"
	make -C "$ROOT" --no-print-directory image >&2 || fail "make image failed"
}

# Prints what is left of the project (containers, networks, volumes, by
# label and by the names both Compose versions use); fails when nothing is.
project_leftovers() {
	local c=() n=() v=() x
	mapfile -t c < <(docker ps -a --filter "label=$PROJECT_LABEL" --format '{{.Names}}')
	mapfile -t n < <(docker network ls --filter "label=$PROJECT_LABEL" --format '{{.Name}}')
	mapfile -t v < <(docker volume ls --filter "label=$PROJECT_LABEL" --format '{{.Name}}')
	for x in "$WEB" "$CLIENT"; do
		docker container inspect "$x" >/dev/null 2>&1 && c+=("$x")
	done
	for x in "${PROJECT}_internet" "${PROJECT}-internet"; do
		docker network inspect "$x" >/dev/null 2>&1 && n+=("$x")
	done
	for x in "${PROJECT}_token" "${PROJECT}-token"; do
		docker volume inspect "$x" >/dev/null 2>&1 && v+=("$x")
	done
	[ "$((${#c[@]} + ${#n[@]} + ${#v[@]}))" -gt 0 ] || return 1
	printf 'containers: %s; networks: %s; volumes: %s\n' \
		"$(printf '%s\n' "${c[@]}" | sort -u | paste -sd ' ')" \
		"$(printf '%s\n' "${n[@]}" | sort -u | paste -sd ' ')" \
		"$(printf '%s\n' "${v[@]}" | sort -u | paste -sd ' ')"
}

UP=0
RESULT_OK=0
cleanup() {
	local rc=$?
	trap - EXIT INT TERM
	if [ "$UP" = 1 ]; then
		if [ "$RESULT_OK" != 1 ]; then
			step "logs (last 30 lines per service)"
			dc logs --no-color --tail 30 >&2 2>&1 || true
		fi
		if [ "${KEEP_UP:-0}" = 1 ] && [ "$rc" = 0 ]; then
			info "KEEP_UP=1: left running; stop with: ${COMPOSE_CMD[*]} -p $PROJECT ${FILES[*]} down -v"
			exit "$rc"
		fi
		step "cleaning up: down -v"
		dc down -v --remove-orphans --timeout 20 >&2 2>&1 || true
	fi
	exit "$rc"
}

wait_for_result() {
	local deadline=$((SECONDS + WAIT_SECS)) line svc state
	while :; do
		line=$(docker logs "$CLIENT" 2>&1 | grep -E '^(RESULT|FAILED):' | head -n 1) || true
		if [ -n "$line" ]; then
			printf '%s\n' "$line"
			return 0
		fi
		for svc in site-a site-b; do
			state=$(docker inspect -f '{{.State.Status}} {{.State.ExitCode}}' "$(dc ps -q "$svc")" 2>/dev/null) || state="missing"
			case $state in
			running*) ;;
			*) fail "$svc is not running ($state) before the client got the page" ;;
			esac
		done
		[ "$SECONDS" -lt "$deadline" ] || fail "no RESULT from the client within ${WAIT_SECS}s"
		sleep 0.5
	done
}

# Waits (at most 30 s) for the compose healthcheck of service $1 to pass.
wait_healthy() {
	local deadline=$((SECONDS + 30)) health
	while :; do
		health=$(docker inspect -f '{{.State.Health.Status}}' "$(dc ps -q "$1")" 2>/dev/null) || health="missing"
		if [ "$health" = healthy ]; then
			info "$1: healthy; tunnel status --check says:"
			dc exec -T "$1" tunnel status --check --state-dir /var/lib/tunnel 2>&1 | sed 's/^/      /' >&2 || true
			return 0
		fi
		[ "$SECONDS" -lt "$deadline" ] || fail "$1 is $health, not healthy, 30 s after the page came"
		sleep 0.5
	done
}

main() {
	[ "$(id -u)" -eq 0 ] || fail "must run as root (Docker, and the image build)"
	local t0=$SECONDS t line page left
	trap cleanup EXIT
	trap 'exit 130' INT
	trap 'exit 143' TERM

	step "Docker engine and the test image (scripts/docker-env.sh)"
	bash "$HERE/docker-env.sh" >&2 || fail "scripts/docker-env.sh failed"
	find_compose
	ensure_image
	dc config -q || fail "${FILES[*]} does not validate"

	if left=$(project_leftovers); then
		info "leftovers of an earlier run ($left): removing"
		UP=1
		dc down -v --remove-orphans --timeout 20 >&2 2>&1 || true
		UP=0
		for x in $WEB $CLIENT; do
			if docker container inspect "$x" >/dev/null 2>&1; then
				fail "a container named $x exists and is not part of project $PROJECT; remove it first"
			fi
		done
	fi

	step "starting the sites: ${COMPOSE_CMD[*]} -p $PROJECT ${FILES[*]#"$ROOT/"} up -d"
	t=$SECONDS
	UP=1
	dc up -d >&2 2>&1 || fail "up failed"
	info "up in $((SECONDS - t))s"

	step "waiting (at most ${WAIT_SECS}s) for the client to fetch http://$WEB.site-a.tunnel/ over the tunnel"
	t=$SECONDS
	line=$(wait_for_result)
	page=${line#*: }
	case $line in
	FAILED:*) fail "client could not fetch the page: $page" ;;
	esac
	[ -n "$page" ] || fail "client fetched an empty page"
	if [ -z "${WEB_IMAGE:-}${COMPOSE_EXTRA:-}" ] && [ "$page" != "$EXPECTED_PAGE" ]; then
		fail "client got '$page', want '$EXPECTED_PAGE'"
	fi
	RESULT_OK=1
	info "client result after $((SECONDS - t))s (since up), $((SECONDS - t0))s in all"

	step "health: both sites' healthcheck (tunnel status --check) passes"
	wait_healthy site-a
	wait_healthy site-b

	step "what happened"
	dc logs --no-color site-b 2>&1 | grep -E 'joined ' | sed 's/^/    /' >&2 || true
	info "client's interfaces and routes (it has no network but the tunnel):"
	docker exec "$CLIENT" sh -c 'ip -o addr show 2>/dev/null | awk "{print \$2, \$4}"; ip route 2>/dev/null' 2>/dev/null |
		sed 's/^/      /' >&2 || true
	info "tunnel status on site-a:"
	dc exec -T site-a tunnel status --state-dir /var/lib/tunnel 2>&1 | sed 's/^/      /' >&2 || true
	printf '%s\n' "$line"

	if [ "${KEEP_UP:-0}" = 1 ]; then
		return 0
	fi
	step "stopping: down -v"
	t=$SECONDS
	dc down -v --remove-orphans --timeout 20 >&2 2>&1 || fail "down failed"
	UP=0
	info "down in $((SECONDS - t))s"

	step "checking nothing is left"
	if left=$(project_leftovers); then
		fail "left behind: $left"
	fi
	info "no containers, networks or volumes of project $PROJECT"
	if ip -o link show 2>/dev/null | grep -Eq ': wg-site(a|b)(c[0-9]+)?[:@]'; then
		fail "tunnel interfaces left on the host: $(ip -o link show | grep -Eo 'wg-site[a-z0-9]*' | sort -u | paste -sd ' ')"
	fi
	if ls /var/run/wireguard/wg-site* >/dev/null 2>&1; then
		fail "UAPI sockets left on the host: $(ls /var/run/wireguard/wg-site*)"
	fi
	info "no tunnel interfaces or UAPI sockets on the host"
	step "compose demo ok in $((SECONDS - t0))s: $page"
}

main "$@"

#!/usr/bin/env bash
# Demo: two "sites" (network namespaces A and B) joined by a veth "internet".
# A web container is attached by `tunnel serve` in A, a client container by
# `tunnel join` in B; the client fetches the web page across the tunnel.
# Then a clean shutdown: the containers keep running without the tunnel
# interface, and nothing is left behind. DEMO_CONTAINERS=0 runs the same
# demo without Docker (httpd and wget in the namespaces themselves).
#
# Usage (as root): make demo      or   scripts/demo.sh
#
# Environment:
#   TUNNEL_BIN      binary to use (default: target/release/tunnel)
#   NO_BUILD        1 = skip `cargo build --release`
#   TUNNEL_VERBOSE  1 = pass -v to tunnel serve/join
#   KEEP_LOGS       1 = keep the work dir with all logs
#   DEMO_CONTAINERS 0 = no Docker: serve the page from site A itself
set -euo pipefail
export LC_ALL=C

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$HERE")
# shellcheck source=scripts/netns.sh
. "$HERE/netns.sh"

TUNNEL_BIN=${TUNNEL_BIN:-$ROOT/target/release/tunnel}
TUNNEL_PORT=51820
TUNNEL_SUBNET=10.77.0.0/24
SERVER_IP=10.77.0.1
HTTP_PORT=8080
PAGE="hello from site A over the tunnel"

require_root
require_cmds ip ss busybox timeout jq
CONTAINERS=${DEMO_CONTAINERS:-1}
IMAGE=tunnel-test-busybox:latest
if [ "$CONTAINERS" = 1 ]; then
	log_step "making sure a Docker engine and the local demo image are there (scripts/docker-env.sh)"
	bash "$HERE/docker-env.sh" >/dev/null
fi

if [ "${NO_BUILD:-0}" != 1 ]; then
	log_step "building (cargo build --release)"
	(cd "$ROOT" && cargo build --release)
else
	log_step "building: skipped (NO_BUILD=1)"
fi
[ -x "$TUNNEL_BIN" ] || die "$TUNNEL_BIN not found"
serve_help=$("$TUNNEL_BIN" serve --help 2>&1 || true)
[[ $serve_help == *--iface* ]] ||
	die "'$TUNNEL_BIN serve --help' does not describe --iface; is it the real tunnel binary?"

ns_init
W=$NS_WORK
VERBOSE=()
[ "${TUNNEL_VERBOSE:-0}" = 1 ] && VERBOSE=(-v)
SERVE_IF="tsa$NS_ID"
JOIN_IF="tjb$NS_ID"
ns_add_iface "$SERVE_IF" "$JOIN_IF"

log_step "creating two namespace sites: A=$NS_A ($NS_ADDR_A) and B=$NS_B ($NS_ADDR_B), joined by a veth pair"
ns_create_sites
ns_ping "$NS_B" "$NS_ADDR_A" 1 2 >/dev/null || die "veth link does not pass traffic"
log_info "site B can reach site A at $NS_ADDR_A"

WEB_C="tdemo${NS_ID}web"
CLIENT_C="tdemo${NS_ID}client"
CONTAINER_ARGS_A=()
CONTAINER_ARGS_B=()
if [ "$CONTAINERS" = 1 ]; then
	log_step "starting the apps: container $WEB_C (httpd) for site A, $CLIENT_C for site B"
	ns_docker_run "$WEB_C" "$IMAGE" sh -c "mkdir -p /www && echo '$PAGE' > /www/index.html && exec httpd -f -p 80 -h /www" >/dev/null
	ns_docker_run "$CLIENT_C" "$IMAGE" sleep 3600 >/dev/null
	ns_add_iface "${SERVE_IF}c0" "${JOIN_IF}c0"
	CONTAINER_ARGS_A=(--container "$WEB_C")
	CONTAINER_ARGS_B=(--container "$CLIENT_C")
fi

log_step "starting the hub in site A: tunnel serve --iface $SERVE_IF ${CONTAINER_ARGS_A[*]}"
STATE_A=$(mktemp -d "$W/state-a.XXXXXX")
STATE_B=$(mktemp -d "$W/state-b.XXXXXX")
ns_bg "$NS_A" "$W/serve" "$TUNNEL_BIN" serve "${VERBOSE[@]}" --iface "$SERVE_IF" \
	--port "$TUNNEL_PORT" --subnet "$TUNNEL_SUBNET" --state-dir "$STATE_A" \
	--tokens 1 --token-ttl 1h --backend auto --mtu 1420 \
	--endpoint "$NS_ADDR_A:$TUNNEL_PORT" "${CONTAINER_ARGS_A[@]}"
serve_pid=$NS_LAST_PID
rc=0
wait_for_lines "$W/serve.out" 1 30 "$serve_pid" || rc=$?
case $rc in
0) ;;
2) die "tunnel serve exited before printing a token: $(tail -n1 "$W/serve.err")" ;;
*) die "tunnel serve printed no token within 30s" ;;
esac
TOKEN=$(head -n1 "$W/serve.out")
[ -n "$TOKEN" ] || die "tunnel serve printed an empty token line"
log_info "join token: ${TOKEN:0:24}... (${#TOKEN} chars)"
ip -n "$NS_A" -brief addr show "$SERVE_IF" | sed 's/^/    site A: /'

log_step "joining from site B: tunnel join <token> $NS_ADDR_A --iface $JOIN_IF ${CONTAINER_ARGS_B[*]}"
ns_bg "$NS_B" "$W/join" "$TUNNEL_BIN" join "${VERBOSE[@]}" "$TOKEN" "$NS_ADDR_A" \
	--iface "$JOIN_IF" --state-dir "$STATE_B" --backend auto --mtu 1420 "${CONTAINER_ARGS_B[@]}"
join_pid=$NS_LAST_PID
rc=0
JOIN_LINE=$(wait_for_line "$W/join.out" '^joined ' 30 "$join_pid") || rc=$?
case $rc in
0) ;;
2)
	ns_reap "$join_pid" 1
	die "tunnel join exited with status $NS_STOP_RC: $(tail -n1 "$W/join.err")"
	;;
*) die "tunnel join printed no 'joined' line within 30s" ;;
esac
log_info "$JOIN_LINE"
ip -n "$NS_B" -brief addr show "$JOIN_IF" | sed 's/^/    site B: /'

log_step "pinging site A's tunnel address $SERVER_IP from site B"
if ! ns_ping "$NS_B" "$SERVER_IP" 3 2 | sed 's/^/    /'; then
	die "ping over the tunnel failed"
fi

if [ "$CONTAINERS" = 1 ]; then
	log_step "tunnel status in site A"
	ip netns exec "$NS_A" "$TUNNEL_BIN" status --state-dir "$STATE_A" | sed 's/^/    /'
	WEB_IP=$(ip netns exec "$NS_A" "$TUNNEL_BIN" status --json --state-dir "$STATE_A" |
		jq -r --arg c "$WEB_C" '.[] | select(.container == $c) | .address | split("/")[0]')
	[ -n "$WEB_IP" ] || die "no tunnel address for $WEB_C in tunnel status"
	log_step "inside $CLIENT_C: the tunnel interface and its route"
	docker exec "$CLIENT_C" ip -o -4 addr show "${JOIN_IF}c0" | sed 's/^/    /'
	log_step "fetching http://$WEB_IP/ from container $CLIENT_C (site B) to container $WEB_C (site A)"
	BODY=$(docker exec "$CLIENT_C" timeout 15 wget -qO- "http://$WEB_IP/") ||
		die "fetching the page over the tunnel failed"
else
	log_step "serving a web page in site A on $SERVER_IP:$HTTP_PORT (busybox httpd)"
	mkdir -p "$W/www"
	printf '%s\n' "$PAGE" >"$W/www/index.html"
	ns_bg "$NS_A" "$W/httpd" busybox httpd -f -p "$SERVER_IP:$HTTP_PORT" -h "$W/www"
	httpd_pid=$NS_LAST_PID
	wait_for_tcp "$NS_A" "$HTTP_PORT" 10 "$httpd_pid" || die "busybox httpd did not start"
	log_step "fetching http://$SERVER_IP:$HTTP_PORT/ from site B (busybox wget)"
	BODY=$(ip netns exec "$NS_B" timeout 15 busybox wget -qO- "http://$SERVER_IP:$HTTP_PORT/") ||
		die "fetching the page over the tunnel failed"
	ns_stop "$httpd_pid" 5
fi
printf '    page: %s\n' "$BODY"
[ "$BODY" = "$PAGE" ] || die "unexpected page content"

log_step "stopping tunnel join (SIGTERM)"
ns_stop "$join_pid" 10
[ "$NS_STOP_RC" = 0 ] || die "tunnel join exited with status $NS_STOP_RC after SIGTERM"
log_step "stopping tunnel serve (SIGTERM)"
ns_stop "$serve_pid" 10
[ "$NS_STOP_RC" = 0 ] || die "tunnel serve exited with status $NS_STOP_RC after SIGTERM"

log_step "checking that nothing is left behind"
leftover=0
for pair in "$NS_A:$SERVE_IF" "$NS_B:$JOIN_IF"; do
	ns=${pair%%:*}
	ifc=${pair#*:}
	if ip -n "$ns" link show "$ifc" >/dev/null 2>&1; then
		log_err "interface $ifc still exists in $ns"
		leftover=1
	fi
	if [ -e "$NS_WG_RUN_DIR/$ifc.sock" ]; then
		log_err "UAPI socket $NS_WG_RUN_DIR/$ifc.sock still exists"
		leftover=1
	fi
done
if [ "$CONTAINERS" = 1 ]; then
	for pair in "$WEB_C:${SERVE_IF}c0" "$CLIENT_C:${JOIN_IF}c0"; do
		c=${pair%%:*}
		ifc=${pair#*:}
		[ "$(docker inspect -f '{{.State.Running}}' "$c")" = true ] || { log_err "$c is not running any more"; leftover=1; }
		if docker exec "$c" ip link show "$ifc" >/dev/null 2>&1; then
			log_err "interface $ifc still exists in container $c"
			leftover=1
		fi
	done
	log_info "$WEB_C and $CLIENT_C still run, without tunnel interfaces"
fi
[ "$leftover" = 0 ] || die "tunnel left interfaces or sockets behind"
log_info "no $SERVE_IF/$JOIN_IF interface and no UAPI socket left"

log_step "removing the demo containers and the namespace sites"
ns_remove_containers || die "could not remove the containers"
ns_delete_sites || die "could not remove the namespaces"
log_info "namespaces $NS_A and $NS_B removed"
log_step "demo finished successfully"
exit 0

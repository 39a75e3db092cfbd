#!/usr/bin/env bash
# Benchmark: raw veth vs. stock wireguard-go vs. `tunnel` (userspace backend),
# plus the time from `tunnel join` to the first packet across the tunnel, and
# (section "containers") how fast `tunnel --container` follows Docker: a
# stopped container started again until its endpoint is attached, and a
# `docker restart` until a fetch over the tunnel works again.
#
# Usage (as root): make bench      or   scripts/bench.sh
#
# Environment:
#   TUNNEL_BIN     binary to test (default: target/release/tunnel)
#   BENCH_SECONDS  iperf3 duration per measurement (default 5)
#   BENCH_ONLY     comma list of raw,wggo,tunnel,containers (default: all four)
#   BENCH_STRICT   1 = exit non-zero when a target is missed (default 0)
#   IPERF_EXTRA    extra iperf3 client arguments (e.g. "-P 2")
#   TUNNEL_VERBOSE 1 = pass -v to tunnel serve/join
#   KEEP_LOGS      1 = keep the work dir with all logs
#   TUNNEL_TEST_IMAGE  image for the containers section (default
#                  tunnel-test-busybox:latest; scripts/docker-env.sh builds it
#                  and is run first when the engine or the image is missing)
#
# Everything lives in two namespaces and, for the containers section, two
# containers created for this run (names carry $$); no traffic leaves them.
# Cleans up on exit, including on errors.
set -euo pipefail
export LC_ALL=C

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$HERE")
# shellcheck source=scripts/netns.sh
. "$HERE/netns.sh"

TUNNEL_BIN=${TUNNEL_BIN:-$ROOT/target/release/tunnel}
BENCH_SECONDS=${BENCH_SECONDS:-5}
BENCH_ONLY=${BENCH_ONLY:-raw,wggo,tunnel,containers}
BENCH_STRICT=${BENCH_STRICT:-0}
IPERF_EXTRA=${IPERF_EXTRA:-}
IPERF_PORT=5201
TUNNEL_PORT=51820
TUNNEL_SUBNET=10.77.0.0/24
TUNNEL_SERVER_IP=10.77.0.1
WGGO_IP_A=10.78.0.1
WGGO_IP_B=10.78.0.2
TARGET_RATIO=1.3
TARGET_JOIN_MS=1000
CONT_IMAGE=${TUNNEL_TEST_IMAGE:-tunnel-test-busybox:latest}
CONT_PAGE=bench-page
CONT_WAIT_SECS=30 # per attach / fetch wait in the containers section
CONT_RESTARTS=3

want() { [[ ",$BENCH_ONLY," == *",$1,"* ]]; }

require_root
require_cmds ip ss iperf3 jq timeout awk
if want wggo; then require_cmds wg wireguard-go; fi
if want tunnel || want containers; then
	[ -x "$TUNNEL_BIN" ] || die "$TUNNEL_BIN not found; run 'make build' first"
	serve_help=$("$TUNNEL_BIN" serve --help 2>&1 || true)
	[[ $serve_help == *--iface* ]] ||
		die "'$TUNNEL_BIN serve --help' does not describe --iface; is it the real tunnel binary?"
fi
if want containers; then
	require_cmds docker nsenter
	[[ $serve_help == *--container* ]] ||
		die "'$TUNNEL_BIN serve --help' has no --container (binary too old? run 'make build'), or leave containers out of BENCH_ONLY"
	if ! timeout 10 docker info >/dev/null 2>&1 ||
		! timeout 10 docker image inspect "$CONT_IMAGE" >/dev/null 2>&1; then
		log_step "no Docker engine or no $CONT_IMAGE: running scripts/docker-env.sh"
		bash "$HERE/docker-env.sh" >/dev/null || die "scripts/docker-env.sh failed"
	fi
fi

ns_init
W=$NS_WORK
VERBOSE=()
[ "${TUNNEL_VERBOSE:-0}" = 1 ] && VERBOSE=(-v)

RAW_MBPS="" WGGO_MBPS="" TUNNEL_MBPS=""
JOIN_REPORTED_MS="" JOIN_MEASURED_MS=""
t_start=0 t_joined=0
SERVE_HWM="n/a" JOIN_HWM="n/a" WGGO_HWM="n/a"
SHUTDOWN_PROBLEMS=()
CONT_PROBLEMS=()
CONT_ATTACH_AFTER="" CONT_ATTACH_TOTAL="" CONT_TOOL_MS="" CONT_EXEC_MS=""
CONT_RESTART_AFTER=() CONT_RESTART_TOTAL=()

# iperf NAME ADDR - iperf3 server in site A, client in site B towards ADDR.
# Sets IPERF_MBPS (Mbit/s, one decimal).
iperf() {
	local name=$1 addr=$2 spid json="$W/iperf-$1.json"
	ns_bg "$NS_A" "$W/iperf-$name-server" iperf3 -s -1 -p "$IPERF_PORT"
	spid=$NS_LAST_PID
	wait_for_tcp "$NS_A" "$IPERF_PORT" 10 "$spid" || die "$name: iperf3 server did not start"
	log_info "iperf3 -c $addr -t $BENCH_SECONDS (TCP, from site B)"
	# shellcheck disable=SC2086  # IPERF_EXTRA is a word list on purpose
	if ! ip netns exec "$NS_B" timeout $((BENCH_SECONDS + 30)) \
		iperf3 -c "$addr" -p "$IPERF_PORT" -t "$BENCH_SECONDS" -J --connect-timeout 5000 $IPERF_EXTRA \
		>"$json" 2>"$W/iperf-$name-client.err"; then
		ns_add_log "$W/iperf-$name-client.err"
		die "$name: iperf3 client failed: $(jq -r '.error // empty' "$json" 2>/dev/null || true)"
	fi
	ns_reap "$spid" 10
	IPERF_MBPS=$(jq -r '.end.sum_received.bits_per_second / 1e6 * 10 | round / 10' "$json") ||
		die "$name: cannot parse iperf3 output $json"
	case $IPERF_MBPS in
	'' | null | 0) die "$name: no throughput in iperf3 output" ;;
	esac
	log_info "$name: $IPERF_MBPS Mbit/s"
}

# median N... - median of integers (mean of the middle two for an even count).
median() {
	printf '%s\n' "$@" | sort -n | awk '{ v[NR] = $1 }
		END { if (NR == 0) exit 1; if (NR % 2) print v[(NR + 1) / 2]; else printf "%d\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}

# cont_fetch URL - fetch URL from the cli container; true when the page is $CONT_PAGE.
cont_fetch() {
	local body
	body=$(timeout 10 docker exec "$CLI_C" timeout 5 wget -qO- "$1" 2>/dev/null) || return 1
	[ "$body" = "$CONT_PAGE" ]
}

# cont_wait_fetch URL SECS - fetch until it works; success time (ms) in CONT_T.
cont_wait_fetch() {
	local url=$1 secs=$2 deadline
	now_ms CONT_T
	deadline=$((CONT_T + secs * 1000))
	until cont_fetch "$url"; do
		now_ms CONT_T
		[ "$CONT_T" -lt "$deadline" ] || return 1
		sleep 0.01
	done
	now_ms CONT_T
}

# cont_wait_addr CONTAINER IFACE SECS - until IFACE has an inet address inside
# CONTAINER's network namespace; time (ms) in CONT_T.
cont_wait_addr() {
	local c=$1 ifc=$2 secs=$3 deadline pid=0
	now_ms CONT_T
	deadline=$((CONT_T + secs * 1000))
	while :; do
		if [ "$pid" -le 0 ] || [ ! -d "/proc/$pid" ]; then
			pid=$(ns_container_pid "$c" 2>/dev/null) || pid=0
		fi
		if [ "$pid" -gt 0 ] &&
			nsenter -t "$pid" -n ip -o addr show dev "$ifc" 2>/dev/null | grep -q ' inet '; then
			now_ms CONT_T
			return 0
		fi
		now_ms CONT_T
		[ "$CONT_T" -lt "$deadline" ] || return 1
		sleep 0.01
	done
}

# cont_count FILE FIXED-STRING - number of lines of FILE containing the string.
cont_count() { grep -cF -- "$2" "$1" 2>/dev/null || true; }

log_step "creating two namespace sites ($NS_A: $NS_ADDR_A, $NS_B: $NS_ADDR_B)"
ns_create_sites
ns_ping "$NS_B" "$NS_ADDR_A" 1 2 >/dev/null || die "veth link does not pass traffic"

# --- a. raw veth --------------------------------------------------------------
if want raw; then
	log_step "measuring raw veth throughput (B -> A $NS_ADDR_A)"
	iperf raw "$NS_ADDR_A"
	RAW_MBPS=$IPERF_MBPS
fi

# --- b. stock wireguard-go pair -------------------------------------------------
if want wggo; then
	log_step "starting a wireguard-go pair ($(wireguard-go --version 2>/dev/null | head -n1))"
	WGGO_A="wga$NS_ID"
	WGGO_B="wgb$NS_ID"
	ns_add_iface "$WGGO_A" "$WGGO_B"
	(
		umask 077
		wg genkey >"$W/wggo-a.key"
		wg genkey >"$W/wggo-b.key"
	)
	pub_a=$(wg pubkey <"$W/wggo-a.key")
	pub_b=$(wg pubkey <"$W/wggo-b.key")
	ns_bg "$NS_A" "$W/wggo-a" env LOG_LEVEL=error wireguard-go -f "$WGGO_A"
	wggo_pid_a=$NS_LAST_PID
	ns_bg "$NS_B" "$W/wggo-b" env LOG_LEVEL=error wireguard-go -f "$WGGO_B"
	wggo_pid_b=$NS_LAST_PID
	for i in $(seq 1 200); do
		[ -S "$NS_WG_RUN_DIR/$WGGO_A.sock" ] && [ -S "$NS_WG_RUN_DIR/$WGGO_B.sock" ] && break
		ns_alive "$wggo_pid_a" || die "wireguard-go in site A exited"
		ns_alive "$wggo_pid_b" || die "wireguard-go in site B exited"
		[ "$i" -lt 200 ] || die "wireguard-go UAPI sockets did not appear"
		sleep 0.05
	done
	ip netns exec "$NS_A" wg set "$WGGO_A" listen-port 51830 private-key "$W/wggo-a.key" \
		peer "$pub_b" allowed-ips "$WGGO_IP_B/32" endpoint "$NS_ADDR_B:51831"
	ip netns exec "$NS_B" wg set "$WGGO_B" listen-port 51831 private-key "$W/wggo-b.key" \
		peer "$pub_a" allowed-ips "$WGGO_IP_A/32" endpoint "$NS_ADDR_A:51830"
	ip -n "$NS_A" addr add "$WGGO_IP_A/24" dev "$WGGO_A"
	ip -n "$NS_B" addr add "$WGGO_IP_B/24" dev "$WGGO_B"
	ip -n "$NS_A" link set "$WGGO_A" mtu 1420 up
	ip -n "$NS_B" link set "$WGGO_B" mtu 1420 up
	ok=0
	for i in 1 2 3 4 5; do
		if ns_ping "$NS_B" "$WGGO_IP_A" 1 2 >/dev/null; then
			ok=1
			break
		fi
	done
	[ "$ok" = 1 ] || die "wireguard-go tunnel does not pass traffic"
	log_step "measuring wireguard-go throughput (B -> A $WGGO_IP_A)"
	iperf wireguard-go "$WGGO_IP_A"
	WGGO_MBPS=$IPERF_MBPS
	WGGO_HWM=$(ns_hwm "$wggo_pid_a")
	log_step "stopping wireguard-go"
	ns_stop "$wggo_pid_a" 10
	ns_stop "$wggo_pid_b" 10
fi

# --- c./d. tunnel serve + join ---------------------------------------------------
if want tunnel; then
	SERVE_IF="tsa$NS_ID"
	JOIN_IF="tjb$NS_ID"
	ns_add_iface "$SERVE_IF" "$JOIN_IF"
	STATE_A=$(mktemp -d "$W/state-a.XXXXXX")
	STATE_B=$(mktemp -d "$W/state-b.XXXXXX")

	log_step "starting tunnel serve in site A (iface $SERVE_IF, userspace backend)"
	ns_bg "$NS_A" "$W/serve" "$TUNNEL_BIN" serve "${VERBOSE[@]}" --iface "$SERVE_IF" \
		--port "$TUNNEL_PORT" --subnet "$TUNNEL_SUBNET" --state-dir "$STATE_A" \
		--tokens 1 --token-ttl 1h --backend userspace --mtu 1420 \
		--endpoint "$NS_ADDR_A:$TUNNEL_PORT"
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

	log_step "starting tunnel join in site B (iface $JOIN_IF)"
	now_ms t_start
	ns_bg "$NS_B" "$W/join" "$TUNNEL_BIN" join "${VERBOSE[@]}" "$TOKEN" "$NS_ADDR_A" \
		--iface "$JOIN_IF" --state-dir "$STATE_B" --backend userspace --mtu 1420
	join_pid=$NS_LAST_PID
	rc=0
	wait_for_line "$W/join.out" '^joined ' 30 "$join_pid" >/dev/null || rc=$?
	now_ms t_joined
	case $rc in
	0) ;;
	2)
		ns_reap "$join_pid" 1
		die "tunnel join exited with status $NS_STOP_RC: $(tail -n1 "$W/join.err")"
		;;
	*) die "tunnel join printed no 'joined' line within 30s" ;;
	esac
	JOIN_LINE=$(grep -m1 '^joined ' "$W/join.out")
	log_info "$JOIN_LINE"
	JOIN_MEASURED_MS=$((t_joined - t_start))
	JOIN_REPORTED_MS=$(sed -n 's/.*first packet after \([0-9][0-9]*\) *ms.*/\1/p' <<<"$JOIN_LINE")
	[ -n "$JOIN_REPORTED_MS" ] || log_err "could not find 'first packet after N ms' in the join line"

	ns_ping "$NS_B" "$TUNNEL_SERVER_IP" 1 2 >/dev/null || die "no ping reply from $TUNNEL_SERVER_IP over the tunnel"
	log_step "measuring tunnel throughput (B -> A $TUNNEL_SERVER_IP)"
	iperf tunnel "$TUNNEL_SERVER_IP"
	TUNNEL_MBPS=$IPERF_MBPS
	SERVE_HWM=$(ns_hwm "$serve_pid")
	JOIN_HWM=$(ns_hwm "$join_pid")

	log_step "stopping tunnel join and serve (SIGTERM)"
	ns_stop "$join_pid" 10
	[ "$NS_STOP_RC" = 0 ] || SHUTDOWN_PROBLEMS+=("tunnel join exited with status $NS_STOP_RC after SIGTERM")
	ns_stop "$serve_pid" 10
	[ "$NS_STOP_RC" = 0 ] || SHUTDOWN_PROBLEMS+=("tunnel serve exited with status $NS_STOP_RC after SIGTERM")
	for pair in "$NS_A:$SERVE_IF" "$NS_B:$JOIN_IF"; do
		ns=${pair%%:*}
		ifc=${pair#*:}
		if ip -n "$ns" link show "$ifc" >/dev/null 2>&1; then
			SHUTDOWN_PROBLEMS+=("interface $ifc still exists in $ns after shutdown")
		fi
		if [ -e "$NS_WG_RUN_DIR/$ifc.sock" ]; then
			SHUTDOWN_PROBLEMS+=("UAPI socket $NS_WG_RUN_DIR/$ifc.sock still exists after shutdown")
		fi
	done
fi

# --- e. containers: tunnel --container following Docker --------------------------
if want containers; then
	WEB_C="tb${NS_ID}web"
	CLI_C="tb${NS_ID}cli"
	CSERVE_IF="tca$NS_ID"
	CJOIN_IF="tcb$NS_ID"
	# container endpoints: the --iface value cut to 13 characters + "c0"
	WEB_IF="${CSERVE_IF:0:13}c0"
	CLI_IF="${CJOIN_IF:0:13}c0"
	ns_add_iface "$CSERVE_IF" "$CJOIN_IF" "$WEB_IF" "$CLI_IF"
	CSTATE_A=$(mktemp -d "$W/cstate-a.XXXXXX")
	CSTATE_B=$(mktemp -d "$W/cstate-b.XXXXXX")

	log_step "starting containers $WEB_C (httpd) and $CLI_C from $CONT_IMAGE"
	ns_docker_run "$WEB_C" "$CONT_IMAGE" sh -c \
		"mkdir -p /www && echo $CONT_PAGE > /www/index.html && exec httpd -f -p 80 -h /www" ||
		die "docker run $WEB_C failed"
	ns_docker_run "$CLI_C" "$CONT_IMAGE" sleep 3600 || die "docker run $CLI_C failed"

	log_step "starting tunnel serve --container $WEB_C in site A (iface $CSERVE_IF)"
	ns_bg "$NS_A" "$W/cserve" "$TUNNEL_BIN" serve "${VERBOSE[@]}" --iface "$CSERVE_IF" \
		--port "$TUNNEL_PORT" --subnet "$TUNNEL_SUBNET" --state-dir "$CSTATE_A" \
		--tokens 1 --token-ttl 1h --backend userspace --mtu 1420 \
		--endpoint "$NS_ADDR_A:$TUNNEL_PORT" --container "$WEB_C"
	cserve_pid=$NS_LAST_PID
	rc=0
	wait_for_lines "$W/cserve.out" 1 30 "$cserve_pid" || rc=$?
	case $rc in
	0) ;;
	2) die "tunnel serve --container exited before printing a token: $(tail -n1 "$W/cserve.err")" ;;
	*) die "tunnel serve --container printed no token within 30s" ;;
	esac
	CTOKEN=$(head -n1 "$W/cserve.out")
	[ -n "$CTOKEN" ] || die "tunnel serve --container printed an empty token line"

	log_step "starting tunnel join --container $CLI_C in site B (iface $CJOIN_IF)"
	ns_bg "$NS_B" "$W/cjoin" "$TUNNEL_BIN" join "${VERBOSE[@]}" "$CTOKEN" "$NS_ADDR_A" \
		--iface "$CJOIN_IF" --state-dir "$CSTATE_B" --backend userspace --mtu 1420 \
		--container "$CLI_C"
	cjoin_pid=$NS_LAST_PID
	rc=0
	wait_for_line "$W/cjoin.out" '^joined ' 30 "$cjoin_pid" >/dev/null || rc=$?
	case $rc in
	0) ;;
	2)
		ns_reap "$cjoin_pid" 1
		die "tunnel join --container exited with status $NS_STOP_RC: $(tail -n1 "$W/cjoin.err")"
		;;
	*) die "tunnel join --container printed no 'joined' line within 30s" ;;
	esac
	CJOIN_LINE=$(grep -m1 '^joined ' "$W/cjoin.out")
	log_info "$CJOIN_LINE"
	[[ $CJOIN_LINE == *"container $CLI_C as "* ]] ||
		die "the join line does not mention 'container $CLI_C as ...'"

	ip netns exec "$NS_A" "$TUNNEL_BIN" status --json --state-dir "$CSTATE_A" \
		>"$W/cstatus-a.json" 2>"$W/cstatus-a.err" || {
		ns_add_log "$W/cstatus-a.err"
		die "tunnel status --json in site A failed"
	}
	WEB_ADDR=$(jq -r --arg c "$WEB_C" \
		'[.[] | select(.container == $c) | .address][0] // empty' "$W/cstatus-a.json") ||
		die "cannot parse tunnel status --json ($W/cstatus-a.json)"
	WEB_ADDR=${WEB_ADDR%%/*}
	[ -n "$WEB_ADDR" ] || die "tunnel status --json lists no endpoint for container $WEB_C"
	WEB_URL="http://$WEB_ADDR/"
	log_info "$WEB_C is $WEB_ADDR (interface $WEB_IF inside it)"
	cont_wait_fetch "$WEB_URL" "$CONT_WAIT_SECS" ||
		die "$CLI_C cannot fetch $WEB_URL over the tunnel"
	# What one fetch costs by itself (docker exec + wget), for reading the figures below.
	execs=()
	for i in 1 2 3; do
		now_ms t0
		cont_fetch "$WEB_URL" || die "a steady-state fetch of $WEB_URL from $CLI_C failed"
		now_ms t1
		execs+=($((t1 - t0)))
	done
	CONT_EXEC_MS=$(median "${execs[@]}")
	log_info "$CLI_C fetches $WEB_URL: $CONT_PAGE (one fetch via docker exec: ${execs[*]} ms)"

	# --- container start -> attached ---
	log_step "docker stop $WEB_C, then docker start: time until $WEB_IF has its address"
	n_det=$(cont_count "$W/cserve.err" "detached $WEB_IF from container $WEB_C")
	n_att=$(cont_count "$W/cserve.err" "attached $WEB_IF to container $WEB_C")
	timeout 60 docker stop -t 1 "$WEB_C" >/dev/null || die "docker stop $WEB_C failed"
	now_ms t0
	deadline=$((t0 + 10000))
	while [ "$(cont_count "$W/cserve.err" "detached $WEB_IF from container $WEB_C")" -le "$n_det" ]; do
		now_ms t1
		if [ "$t1" -ge "$deadline" ]; then
			log_info "no 'detached $WEB_IF' line in the serve log within 10 s; going on"
			break
		fi
		sleep 0.02
	done
	now_ms t0
	timeout 60 docker start "$WEB_C" >/dev/null || die "docker start $WEB_C failed"
	now_ms t1
	if cont_wait_addr "$WEB_C" "$WEB_IF" "$CONT_WAIT_SECS"; then
		CONT_ATTACH_AFTER=$((CONT_T - t1))
		CONT_ATTACH_TOTAL=$((CONT_T - t0))
		log_info "attached ${CONT_ATTACH_AFTER} ms after docker start returned (docker start took $((t1 - t0)) ms; ${CONT_ATTACH_TOTAL} ms in all)"
		if cont_wait_fetch "$WEB_URL" "$CONT_WAIT_SECS"; then
			log_info "$CLI_C fetches $WEB_URL again, $((CONT_T - t1)) ms after docker start returned"
		else
			CONT_PROBLEMS+=("after docker start, $CLI_C could not fetch $WEB_URL within ${CONT_WAIT_SECS}s")
		fi
	else
		CONT_PROBLEMS+=("after docker start, $WEB_IF had no address in $WEB_C within ${CONT_WAIT_SECS}s")
	fi
	# the tool's own figure, from its "attached ... (N ms to traffic)" log line
	if [ "$(cont_count "$W/cserve.err" "attached $WEB_IF to container $WEB_C")" -gt "$n_att" ]; then
		CONT_TOOL_MS=$(grep -F "attached $WEB_IF to container $WEB_C" "$W/cserve.err" | tail -n1 |
			sed -n 's/.*(\([0-9][0-9]*\) ms to traffic).*/\1/p')
		[ -z "$CONT_TOOL_MS" ] || log_info "tunnel serve logged: $CONT_TOOL_MS ms from attaching to traffic"
	fi

	# --- docker restart -> traffic ---
	for r in $(seq 1 "$CONT_RESTARTS"); do
		log_step "docker restart $WEB_C ($r/$CONT_RESTARTS): time until $CLI_C fetches $WEB_URL"
		now_ms t0
		timeout 60 docker restart -t 1 "$WEB_C" >/dev/null || die "docker restart $WEB_C failed"
		now_ms t1
		if cont_wait_fetch "$WEB_URL" "$CONT_WAIT_SECS"; then
			CONT_RESTART_AFTER+=($((CONT_T - t1)))
			CONT_RESTART_TOTAL+=($((CONT_T - t0)))
			log_info "traffic $((CONT_T - t1)) ms after docker restart returned (docker restart took $((t1 - t0)) ms; $((CONT_T - t0)) ms in all)"
		else
			CONT_RESTART_AFTER+=(-)
			CONT_PROBLEMS+=("restart $r: $CLI_C could not fetch $WEB_URL within ${CONT_WAIT_SECS}s")
		fi
	done

	log_step "stopping tunnel join and serve with containers (SIGTERM)"
	ns_stop "$cjoin_pid" 10
	[ "$NS_STOP_RC" = 0 ] || SHUTDOWN_PROBLEMS+=("tunnel join --container exited with status $NS_STOP_RC after SIGTERM")
	ns_stop "$cserve_pid" 10
	[ "$NS_STOP_RC" = 0 ] || SHUTDOWN_PROBLEMS+=("tunnel serve --container exited with status $NS_STOP_RC after SIGTERM")
	for pair in "$NS_A:$CSERVE_IF" "$NS_B:$CJOIN_IF"; do
		ns=${pair%%:*}
		ifc=${pair#*:}
		if ip -n "$ns" link show "$ifc" >/dev/null 2>&1; then
			SHUTDOWN_PROBLEMS+=("interface $ifc still exists in $ns after shutdown")
		fi
	done
	for pair in "$WEB_C:$WEB_IF" "$CLI_C:$CLI_IF"; do
		c=${pair%%:*}
		ifc=${pair#*:}
		if [ "$(timeout 30 docker inspect -f '{{.State.Running}}' "$c" 2>/dev/null)" != true ]; then
			SHUTDOWN_PROBLEMS+=("container $c is not running after tunnel exited")
			continue
		fi
		pid=$(ns_container_pid "$c") || pid=0
		if [ "$pid" -gt 0 ] && nsenter -t "$pid" -n ip link show "$ifc" >/dev/null 2>&1; then
			SHUTDOWN_PROBLEMS+=("interface $ifc still exists in container $c after shutdown")
		fi
	done
	for ifc in "$CSERVE_IF" "$CJOIN_IF" "$WEB_IF" "$CLI_IF"; do
		if [ -e "$NS_WG_RUN_DIR/$ifc.sock" ]; then
			SHUTDOWN_PROBLEMS+=("UAPI socket $NS_WG_RUN_DIR/$ifc.sock still exists after shutdown")
		fi
	done
	log_step "removing containers $WEB_C and $CLI_C"
	ns_remove_containers || SHUTDOWN_PROBLEMS+=("could not remove containers $WEB_C / $CLI_C")
fi

# --- summary --------------------------------------------------------------------
fmt_mbps() { if [ -n "$1" ]; then printf '%8.0f Mbit/s' "$1"; else printf '%8s' "-"; fi; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else printf "-" }'; }

missed=()
echo
echo "==================== tunnel benchmark summary ===================="
echo "kernel $(uname -r), $(nproc) CPUs, iperf3 TCP ${BENCH_SECONDS}s, 1 stream${IPERF_EXTRA:+ ($IPERF_EXTRA)}, MTU 1420"
want raw && echo "raw veth:      $(fmt_mbps "$RAW_MBPS")"
want wggo && echo "wireguard-go:  $(fmt_mbps "$WGGO_MBPS")"
want tunnel && echo "tunnel:        $(fmt_mbps "$TUNNEL_MBPS")"
if want tunnel && want wggo; then
	r=$(ratio "$TUNNEL_MBPS" "$WGGO_MBPS")
	verdict=ok
	awk -v r="$r" -v t="$TARGET_RATIO" 'BEGIN { exit !(r >= t) }' || {
		verdict=MISSED
		missed+=("tunnel/wireguard-go ratio $r < $TARGET_RATIO")
	}
	echo "ratio tunnel/wireguard-go: $r  (target >= $TARGET_RATIO: $verdict)"
fi
if want tunnel && want raw; then
	echo "ratio tunnel/raw veth:     $(ratio "$TUNNEL_MBPS" "$RAW_MBPS")"
fi
if want tunnel; then
	verdict=ok
	check_ms=${JOIN_REPORTED_MS:-$JOIN_MEASURED_MS}
	if [ "$check_ms" -ge "$TARGET_JOIN_MS" ] || [ "$JOIN_MEASURED_MS" -ge "$TARGET_JOIN_MS" ]; then
		verdict=MISSED
		missed+=("join -> first packet took ${JOIN_REPORTED_MS:-?} ms reported / $JOIN_MEASURED_MS ms measured")
	fi
	echo "join -> first packet: ${JOIN_REPORTED_MS:-?} ms (reported by join), $JOIN_MEASURED_MS ms (measured from start)  (target < $TARGET_JOIN_MS ms: $verdict)"
	echo "peak RSS (VmHWM): tunnel serve $SERVE_HWM, tunnel join $JOIN_HWM${WGGO_MBPS:+, wireguard-go $WGGO_HWM}"
fi
if want containers; then
	if [ -n "$CONT_ATTACH_AFTER" ]; then
		echo "container start -> attached:     $CONT_ATTACH_AFTER ms after \`docker start\` returned ($CONT_ATTACH_TOTAL ms from its start)"
	else
		echo "container start -> attached:     - (not attached within ${CONT_WAIT_SECS}s)"
	fi
	ok_after=() ok_total=()
	for v in "${CONT_RESTART_AFTER[@]}"; do [ "$v" = - ] || ok_after+=("$v"); done
	for v in "${CONT_RESTART_TOTAL[@]}"; do ok_total+=("$v"); done
	list=$(printf '%s / ' "${CONT_RESTART_AFTER[@]}")
	list=${list% / }
	if [ "${#ok_after[@]}" -gt 0 ]; then
		med_total=$(median "${ok_total[@]}")
		echo "docker restart -> traffic:       $list ms after \`docker restart\` returned (median $(median "${ok_after[@]}") ms; $(awk -v t="$med_total" 'BEGIN { printf "%.1f", t / 1000 }') s including the restart)"
	else
		echo "docker restart -> traffic:       - (no fetch within ${CONT_WAIT_SECS}s after any restart)"
	fi
	echo "  (fetches run as \`docker exec $CLI_C wget\`, ${CONT_EXEC_MS:-?} ms each when steady, included above${CONT_TOOL_MS:+; serve logged $CONT_TOOL_MS ms attach -> traffic})"
	for p in "${CONT_PROBLEMS[@]}"; do echo "containers PROBLEM: $p"; done
fi
if want tunnel || want containers; then
	if [ "${#SHUTDOWN_PROBLEMS[@]}" -eq 0 ]; then
		echo "shutdown: clean (exit 0, no interface or UAPI socket left)"
	else
		for p in "${SHUTDOWN_PROBLEMS[@]}"; do echo "shutdown PROBLEM: $p"; done
	fi
fi
echo "=================================================================="

if [ "${#SHUTDOWN_PROBLEMS[@]}" -gt 0 ]; then
	die "tunnel did not shut down cleanly"
fi
if [ "${#CONT_PROBLEMS[@]}" -gt 0 ]; then
	die "containers section: ${#CONT_PROBLEMS[@]} measurement(s) failed"
fi
if [ "${#missed[@]}" -gt 0 ]; then
	for m in "${missed[@]}"; do log_err "target missed: $m"; done
	[ "$BENCH_STRICT" = 1 ] && exit 1
fi
exit 0

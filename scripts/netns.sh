# shellcheck shell=bash
# shellcheck disable=SC2034  # variables here are used by the scripts that source this file
# Shared helpers for scripts/bench.sh, scripts/demo.sh, scripts/compose-demo.sh and .ci/run.
#
# Source this file; it only defines functions and variables, it runs nothing.
#
#   ns_init              make a per-run work dir and install the cleanup trap
#   ns_create_sites      two namespaces "site A" / "site B" joined by a veth pair:
#                          A: $NS_VETH_A 10.231.0.1/24   B: $NS_VETH_B 10.231.0.2/24
#   ns_bg NS LOG CMD...  start CMD in namespace NS in the background, stdout to
#                          LOG.out, stderr to LOG.err; pid in $NS_LAST_PID
#   ns_stop PID [SECS]   SIGTERM, wait up to SECS, then SIGKILL; exit code in
#                          $NS_STOP_RC
#   wait_for_lines FILE N SECS [PID]      wait until FILE has N complete lines
#   wait_for_line FILE REGEX SECS [PID]   wait for a complete line matching REGEX
#   wait_for_tcp NS PORT SECS [PID]       wait for a TCP listener in NS
#   ensure_packages CMD:PKG...            apt-get install what is missing
#   ns_docker_run NAME ARGS...   docker run -d --name NAME ARGS...; NAME is
#                          removed (docker rm -f) by the cleanup trap
#   ns_remove_containers         remove those containers now
#   ns_container_pid NAME        pid of the container's init (0 when stopped)
#
# Everything created here carries the shell's pid ($$) so that parallel runs do
# not collide; interface names stay <= 15 characters. Addresses used are only
# inside the namespaces created here (10.231.0.0/24 for the veth "internet").

NS_ID=$$
NS_A="tnl-a-${NS_ID}"
NS_B="tnl-b-${NS_ID}"
NS_VETH_A="tva${NS_ID}"
NS_VETH_B="tvb${NS_ID}"
NS_ADDR_A=10.231.0.1
NS_ADDR_B=10.231.0.2
NS_WG_RUN_DIR=/var/run/wireguard

NS_WORK=""
NS_PIDS=()        # background pids still to be reaped
NS_NAMESPACES=()  # namespaces to delete
NS_IFACES=()      # wg interface names (UAPI sockets live in $NS_WG_RUN_DIR)
NS_LOGS=()        # files to show when the script fails
NS_CONTAINERS=()  # Docker containers to remove (names carry $$)
NS_LAST_PID=""
NS_STOP_RC=0
NS_STOP_KILLED=0
NS_CLEANED=0

log_step() { printf '==> %s\n' "$*"; }
log_info() { printf '    %s\n' "$*"; }
log_err() { printf 'error: %s\n' "$*" >&2; }
die() {
	log_err "$*"
	exit 1
}

require_root() {
	if [ "$(id -u)" -ne 0 ]; then
		die "must run as root (network namespaces, tun devices)"
	fi
}

require_cmds() {
	local c missing=()
	for c in "$@"; do
		command -v "$c" >/dev/null 2>&1 || missing+=("$c")
	done
	if [ "${#missing[@]}" -gt 0 ]; then
		die "missing commands: ${missing[*]} (run 'make deps')"
	fi
}

# Milliseconds since the epoch, without forking, into the variable named $1.
now_ms() {
	local t=${EPOCHREALTIME/[.,]/}
	printf -v "$1" '%d' "$((t / 1000))"
}

# ensure_packages CMD:PKG ... - install (apt-get) the packages whose command is
# missing. Runs apt-get update at most once and only when something is missing.
ensure_packages() {
	local pair cmd pkg missing=()
	for pair in "$@"; do
		cmd=${pair%%:*}
		pkg=${pair#*:}
		if ! command -v "$cmd" >/dev/null 2>&1; then
			missing+=("$pkg")
		fi
	done
	if [ "${#missing[@]}" -eq 0 ]; then
		echo "all required packages present"
		return 0
	fi
	if [ "$(id -u)" -ne 0 ]; then
		log_err "missing packages: ${missing[*]}; run as root: apt-get install ${missing[*]}"
		return 1
	fi
	echo "installing missing packages: ${missing[*]}"
	DEBIAN_FRONTEND=noninteractive apt-get update -q
	DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
}

# Packages needed by bench/demo, as command:package.
NS_RUNTIME_PACKAGES=(
	ip:iproute2
	wg:wireguard-tools
	wireguard-go:wireguard-go
	iperf3:iperf3
	jq:jq
	busybox:busybox-static
	nft:nftables
	ps:procps
	ping:iputils-ping
	setpriv:util-linux
	prlimit:util-linux
	curl:curl
	dockerd:docker.io
)

# ns_init - per-run work dir + cleanup traps. Call once, early.
ns_init() {
	NS_WORK=$(mktemp -d "/tmp/tunnel-${NS_ID}.XXXXXX")
	trap ns_cleanup EXIT
	trap 'exit 130' INT
	trap 'exit 143' TERM
	trap 'exit 129' HUP
}

ns_add_log() { NS_LOGS+=("$@"); }
ns_add_iface() { NS_IFACES+=("$@"); }

ns_create_sites() {
	local ns
	for ns in "$NS_A" "$NS_B"; do
		if ip netns list | grep -qw "$ns"; then
			die "namespace $ns already exists"
		fi
	done
	ip netns add "$NS_A"
	NS_NAMESPACES+=("$NS_A")
	ip netns add "$NS_B"
	NS_NAMESPACES+=("$NS_B")
	ip -n "$NS_A" link set lo up
	ip -n "$NS_B" link set lo up
	ip link add "$NS_VETH_A" netns "$NS_A" type veth peer name "$NS_VETH_B" netns "$NS_B"
	ip -n "$NS_A" addr add "$NS_ADDR_A/24" dev "$NS_VETH_A"
	ip -n "$NS_B" addr add "$NS_ADDR_B/24" dev "$NS_VETH_B"
	ip -n "$NS_A" link set "$NS_VETH_A" up
	ip -n "$NS_B" link set "$NS_VETH_B" up
	# Wait for the veth link to come up (carrier) before using it.
	local i
	for i in $(seq 1 100); do
		if ip -n "$NS_B" -o link show "$NS_VETH_B" | grep -q 'LOWER_UP' &&
			ip -n "$NS_A" -o link show "$NS_VETH_A" | grep -q 'LOWER_UP'; then
			return 0
		fi
		sleep 0.05
	done
	die "veth $NS_VETH_A <-> $NS_VETH_B did not come up"
}

# ns_docker_run NAME ARGS... - `docker run -d --name NAME ARGS...`. NAME is
# registered first, so the cleanup trap removes it even when the run fails
# half-way. Output of docker run goes to the work dir.
ns_docker_run() {
	local name=$1
	shift
	NS_CONTAINERS+=("$name")
	if ! timeout 60 docker run -d --name "$name" "$@" >"$NS_WORK/docker-run-$name.out" 2>&1; then
		cat "$NS_WORK/docker-run-$name.out" >&2
		return 1
	fi
}

# ns_container_pid NAME - pid (in the root pid namespace) of the container's
# init, 0 when it is not running.
ns_container_pid() {
	timeout 30 docker inspect -f '{{.State.Pid}}' "$1"
}

# ns_remove_containers - docker rm -f every container from ns_docker_run;
# fails when one of them is still listed afterwards.
ns_remove_containers() {
	local c bad=0
	for c in "${NS_CONTAINERS[@]}"; do
		timeout 60 docker rm -f "$c" >/dev/null 2>&1 || true
		if timeout 30 docker container inspect "$c" >/dev/null 2>&1; then
			log_err "container $c still exists"
			bad=1
		fi
	done
	NS_CONTAINERS=()
	return "$bad"
}

# ns_delete_sites - delete our namespaces now (processes must be stopped
# first); fails if one of them is still listed afterwards.
ns_delete_sites() {
	local ns bad=0
	for ns in "${NS_NAMESPACES[@]}"; do
		ip netns del "$ns" 2>/dev/null || true
		if ip netns list | grep -qw -- "$ns"; then
			log_err "namespace $ns still exists"
			bad=1
		fi
	done
	NS_NAMESPACES=()
	return "$bad"
}

# ns_ping NS ADDR [COUNT] [TIMEOUT] - ping from inside NS (iputils or busybox).
ns_ping() {
	local ns=$1 addr=$2 count=${3:-1} wait_s=${4:-2}
	if command -v ping >/dev/null 2>&1; then
		ip netns exec "$ns" ping -n -c "$count" -W "$wait_s" "$addr"
	else
		ip netns exec "$ns" busybox ping -c "$count" -W "$wait_s" "$addr"
	fi
}

# ns_bg NS LOGBASE CMD... - run CMD inside NS in the background.
# `ip netns exec` execs CMD directly, so $! is CMD's own pid.
ns_bg() {
	local ns=$1 logbase=$2
	shift 2
	ip netns exec "$ns" "$@" >"${logbase}.out" 2>"${logbase}.err" &
	NS_LAST_PID=$!
	NS_PIDS+=("$NS_LAST_PID")
	NS_LOGS+=("${logbase}.out" "${logbase}.err")
}

# ns_alive PID - true while PID exists and is not a zombie (our background
# children stay zombies until reaped with wait).
ns_alive() {
	local st
	{ read -r st <"/proc/$1/stat"; } 2>/dev/null || return 1
	st=${st##*) }
	[ "${st%% *}" != Z ]
}

# ns_stop PID [SECS] - SIGTERM, wait up to SECS (default 10), then SIGKILL.
# Reaps the process and sets NS_STOP_RC to its exit status. NS_STOP_KILLED=1
# when it had to be SIGKILLed.
ns_stop() {
	local pid=$1 secs=${2:-10} i steps
	NS_STOP_RC=0
	NS_STOP_KILLED=0
	if ns_alive "$pid"; then
		kill -TERM "$pid" 2>/dev/null || true
		steps=$((secs * 20))
		for ((i = 0; i < steps; i++)); do
			ns_alive "$pid" || break
			sleep 0.05
		done
		if ns_alive "$pid"; then
			log_err "pid $pid did not exit within ${secs}s after SIGTERM; sending SIGKILL"
			kill -KILL "$pid" 2>/dev/null || true
			NS_STOP_KILLED=1
		fi
	fi
	wait "$pid" 2>/dev/null || NS_STOP_RC=$?
	local p keep=()
	for p in "${NS_PIDS[@]}"; do
		[ "$p" = "$pid" ] || keep+=("$p")
	done
	NS_PIDS=("${keep[@]}")
}

# ns_reap PID - wait for a process that exits by itself; rc in NS_STOP_RC.
ns_reap() {
	ns_stop "$1" "${2:-10}"
}

# ns_hwm PID - peak RSS (VmHWM) of PID, e.g. "12345 kB", or "n/a".
ns_hwm() {
	local v
	v=$(awk '/^VmHWM:/ {print $2 " " $3}' "/proc/$1/status" 2>/dev/null || true)
	echo "${v:-n/a}"
}

# Number of newline-terminated lines in FILE.
_ns_lines() { if [ -f "$1" ]; then wc -l <"$1"; else echo 0; fi; }

# wait_for_lines FILE N SECS [PID] - until FILE has >= N complete lines.
# Returns 1 on timeout, 2 if PID exited first.
wait_for_lines() {
	local file=$1 n=$2 secs=$3 pid=${4:-} deadline now
	now_ms now
	deadline=$((now + secs * 1000))
	while :; do
		if [ "$(_ns_lines "$file")" -ge "$n" ]; then
			return 0
		fi
		if [ -n "$pid" ] && ! ns_alive "$pid"; then
			[ "$(_ns_lines "$file")" -ge "$n" ] && return 0
			return 2
		fi
		now_ms now
		[ "$now" -lt "$deadline" ] || return 1
		sleep 0.01
	done
}

# wait_for_line FILE REGEX SECS [PID] - print the first complete line of FILE
# matching the extended REGEX. Returns 1 on timeout, 2 if PID exited first.
wait_for_line() {
	local file=$1 re=$2 secs=$3 pid=${4:-} deadline now n line
	now_ms now
	deadline=$((now + secs * 1000))
	while :; do
		n=$(_ns_lines "$file")
		if [ "$n" -gt 0 ]; then
			line=$(head -n "$n" "$file" | grep -m1 -E -- "$re" || true)
			if [ -n "$line" ]; then
				printf '%s\n' "$line"
				return 0
			fi
		fi
		if [ -n "$pid" ] && ! ns_alive "$pid"; then
			line=$(grep -m1 -E -- "$re" "$file" 2>/dev/null || true)
			if [ -n "$line" ]; then
				printf '%s\n' "$line"
				return 0
			fi
			return 2
		fi
		now_ms now
		[ "$now" -lt "$deadline" ] || return 1
		sleep 0.01
	done
}

# wait_for_tcp NS PORT SECS [PID] - until something listens on TCP PORT in NS.
wait_for_tcp() {
	local ns=$1 port=$2 secs=$3 pid=${4:-} deadline now
	now_ms now
	deadline=$((now + secs * 1000))
	while :; do
		if ip netns exec "$ns" ss -Hltn "sport = :$port" 2>/dev/null | grep -q .; then
			return 0
		fi
		if [ -n "$pid" ] && ! ns_alive "$pid"; then
			return 2
		fi
		now_ms now
		[ "$now" -lt "$deadline" ] || return 1
		sleep 0.02
	done
}

# ns_show_logs - tail every registered log file to stderr.
ns_show_logs() {
	local f
	for f in "${NS_LOGS[@]}"; do
		if [ -s "$f" ]; then
			printf -- '---- %s (last 30 lines) ----\n' "$f" >&2
			tail -n 30 "$f" >&2
		fi
	done
}

# ns_cleanup - EXIT trap: stop processes, show the logs (on failure), remove
# containers, delete namespaces (and with them the veth pair and any tun/wg
# interface inside), drop stale UAPI sockets of our own interface names,
# remove the work dir. Keeps the exit status.
ns_cleanup() {
	local rc=$?
	set +e
	trap - EXIT INT TERM HUP
	if [ "$NS_CLEANED" = 1 ]; then
		return "$rc"
	fi
	NS_CLEANED=1
	local pid ns iface i
	for pid in "${NS_PIDS[@]}"; do
		ns_alive "$pid" && kill -TERM "$pid" 2>/dev/null
	done
	for ((i = 0; i < 100; i++)); do
		local any=0
		for pid in "${NS_PIDS[@]}"; do
			ns_alive "$pid" && any=1
		done
		[ "$any" = 0 ] && break
		sleep 0.05
	done
	for pid in "${NS_PIDS[@]}"; do
		if ns_alive "$pid"; then
			log_err "pid $pid ($(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | cut -c1-60)) did not exit within 5s after SIGTERM; sending SIGKILL"
			kill -KILL "$pid" 2>/dev/null
		fi
		wait "$pid" 2>/dev/null
	done
	NS_PIDS=()
	# logs after the processes stopped, so that they include their last words
	if [ "$rc" -ne 0 ]; then
		log_err "failed (exit $rc); logs follow"
		ns_show_logs
	fi
	# after our processes (a tunnel detaches from its containers on exit)
	if [ "${#NS_CONTAINERS[@]}" -gt 0 ]; then
		ns_remove_containers
	fi
	for ns in "${NS_NAMESPACES[@]}"; do
		# anything still running inside our namespace was started by us
		for pid in $(ip netns pids "$ns" 2>/dev/null); do
			kill -KILL "$pid" 2>/dev/null
		done
		ip netns del "$ns" 2>/dev/null
	done
	NS_NAMESPACES=()
	for iface in "${NS_IFACES[@]}"; do
		if [ -e "$NS_WG_RUN_DIR/$iface.sock" ]; then
			log_err "removing stale UAPI socket $NS_WG_RUN_DIR/$iface.sock"
			rm -f "$NS_WG_RUN_DIR/$iface.sock"
		fi
		# an interface that somehow ended up in the root namespace
		if ip link show "$iface" >/dev/null 2>&1; then
			log_err "removing leftover interface $iface"
			ip link del "$iface" 2>/dev/null
		fi
	done
	if [ -n "$NS_WORK" ] && [ -d "$NS_WORK" ]; then
		if [ "${KEEP_LOGS:-0}" = 1 ]; then
			echo "logs kept in $NS_WORK" >&2
		else
			rm -rf "$NS_WORK"
		fi
	fi
	exit "$rc"
}

# shellcheck shell=bash
# shellcheck disable=SC2034  # RUNTIME_PACKAGES is used by the files that source this one
# Debian packages that the tests, `make bench`, `make demo` and CI use, and
# how to install the missing ones. Sourced by .ci/run, the Makefile and
# scripts/compose-demo.sh. Provisioning only: the namespace lab itself is
# Rust (lab/), shared by the tests, the benchmark and the demo.

# command:package
RUNTIME_PACKAGES=(
	ip:iproute2
	ss:iproute2
	wg:wireguard-tools
	wireguard-go:wireguard-go
	iperf3:iperf3
	busybox:busybox-static
	nft:nftables
	iptables:iptables
	ps:procps
	ping:iputils-ping
	setpriv:util-linux
	prlimit:util-linux
	nsenter:util-linux
	curl:curl
	tinyproxy:tinyproxy
	stunnel4:stunnel4
	squid:squid
	nginx:nginx
	sha256sum:coreutils
	dockerd:docker.io
)

# ensure_packages CMD:PKG ... - apt-get install the packages whose command
# is missing; apt-get update runs only when something is missing.
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
		printf 'error: missing packages: %s; run as root: apt-get install %s\n' "${missing[*]}" "${missing[*]}" >&2
		return 1
	fi
	echo "installing missing packages: ${missing[*]}"
	DEBIAN_FRONTEND=noninteractive apt-get update -q
	DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
}

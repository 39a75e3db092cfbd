#!/usr/bin/env bash
# The benchmark's competitors that Debian's main suite does not carry, each
# in a folder of its own under $BENCH_PEERS (default /var/cache/tunnel-bench),
# never on the PATH and never by changing the machine's apt sources:
#   - wireguard-go 0.0.20231211 from bookworm-backports (the one with the
#     2023 TUN and UDP offloads), fetched with `apt-get download` through a
#     private sources list and unpacked with dpkg-deb;
#   - gotatun-cli 0.10.2 from crates.io (the library we embed, without our
#     layers), with `cargo install --root`.
# Idempotent: what is there already is kept. Prints nothing else on stdout
# than the two binaries' paths, one per line.
set -euo pipefail
export LC_ALL=C

dir=${BENCH_PEERS:-/var/cache/tunnel-bench}
wggo_version=0.0.20231211
gotatun_version=0.10.2
wggo=$dir/wireguard-go-$wggo_version
gotatun=$dir/gotatun-cli-$gotatun_version

if [ ! -x "$wggo/usr/bin/wireguard-go" ]; then
	apt=$dir/apt
	rm -rf "$apt" "$wggo"
	mkdir -p "$apt/lists/partial" "$apt/cache/archives/partial" "$apt/download" "$wggo"
	echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm-backports main" >"$apt/sources.list"
	opts=(
		-o "Dir::Etc::SourceList=$apt/sources.list"
		-o "Dir::Etc::SourceParts=/dev/null"
		-o "Dir::State::Lists=$apt/lists"
		-o "Dir::Cache=$apt/cache"
		-o "APT::Sandbox::User=root"
		-q
	)
	echo "fetching wireguard-go $wggo_version from bookworm-backports into $wggo" >&2
	apt-get "${opts[@]}" update >&2
	(cd "$apt/download" && apt-get "${opts[@]}" download "wireguard-go=$wggo_version-*" >&2)
	dpkg-deb -x "$apt/download"/wireguard-go_"$wggo_version"-*.deb "$wggo"
	rm -rf "$apt"
fi

if [ ! -x "$gotatun/bin/gotatun" ]; then
	echo "building gotatun-cli $gotatun_version from crates.io into $gotatun" >&2
	cargo install --quiet --locked --version "$gotatun_version" --root "$gotatun" gotatun-cli >&2
fi

echo "$wggo/usr/bin/wireguard-go"
echo "$gotatun/bin/gotatun"

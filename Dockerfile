# Runtime image of tunnel, built from source with a registry at hand:
#
#   docker build -t tunnel:latest .
#   docker run --rm tunnel:latest --version
#
# Without a registry (no base images can be pulled), `make image` assembles an
# equivalent image from target/release/tunnel and busybox-static instead
# (scripts/image.sh). Either works with compose/docker-compose.yml, which runs
# `/bin/sh -c` in it.
#
# Running it: tunnel needs NET_ADMIN, /dev/net/tun (userspace WireGuard) and,
# for --container, SYS_ADMIN, the Docker socket and the host's pid namespace:
#
#   docker run -d --network host --pid host --cap-add NET_ADMIN --cap-add SYS_ADMIN \
#     --device /dev/net/tun -v /var/run/docker.sock:/var/run/docker.sock \
#     -v tunnel-state:/var/lib/tunnel tunnel:latest serve --container web

FROM rust:1-bookworm AS build
WORKDIR /src
# Dependencies first, so that a source change does not re-fetch them.
COPY Cargo.toml Cargo.lock ./
RUN cargo fetch --locked
COPY src ./src
RUN cargo build --release --locked --bin tunnel \
    && install -m 0755 target/release/tunnel /tunnel \
    && /tunnel --version

FROM debian:bookworm-slim
# ca-certificates: for a Docker engine reached over TLS (DOCKER_HOST=tcp://...:2376).
# iproute2: `ip` for looking around inside the container; tunnel itself never runs it.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates iproute2 \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p -m 0700 /var/lib/tunnel \
    && mkdir -p /run/wireguard
COPY --from=build /tunnel /usr/local/bin/tunnel
ENTRYPOINT ["/usr/local/bin/tunnel"]
CMD ["--help"]

# tunnel - developer entry points. bench/demo/deps need root.
SHELL := /bin/bash
CARGO ?= cargo

.NOTPARALLEL:
.PHONY: all build test docker-env lint fmt bench scale soak demo demo-sites deps ci clean help image compose-demo

all: build

help:
	@echo "make build   - cargo build --release"
	@echo "make test    - cargo test; as root also the end-to-end tests (--include-ignored),"
	@echo "               after scripts/docker-env.sh, and make demo, make compose-demo after"
	@echo "make docker-env - start a local Docker engine, build the test image (root)"
	@echo "make lint    - cargo fmt --check + cargo clippy --all-targets -- -D warnings"
	@echo "make bench   - raw veth vs both wireguard-gos, gotatun-cli and tunnel (scripts/bench-peers.sh installs the newer two), join latency, container attach/restart times, 250 and 500 sites at once (root)"
	@echo "make scale   - N sites join one hub at once (SCALE_SITES=250,500): admitted, RSS, idle CPU, status, revoke (root)"
	@echo "make soak    - reliability soak: iperf3, container/hub restarts, joins; fails on a lost peer or RSS/fd growth (SOAK_MINUTES=30) (root)"
	@echo "make demo    - two namespace sites with a container each, page fetched across the tunnel (root)"
	@echo "make demo-sites - a hub, three sites and an office LAN behind a masquerading gateway (root)"
	@echo "make image   - build the runtime image tunnel:latest offline (docker import)"
	@echo "make compose-demo - compose/: two container sites, web <- client over the tunnel (root)"
	@echo "make deps    - apt-get install the runtime tools that are missing (root)"
	@echo "make ci      - run .ci/run"
	@echo "make clean   - cargo clean"

build:
	$(CARGO) build --release

# As root (sudo make test, CI) the Docker engine and test image are set up
# first, and the two demos run after the tests: they are what a newcomer runs
# first, so they are tested too. A non-root run only runs cargo test.
test:
	@if [ "$$(id -u)" -eq 0 ]; then \
		bash scripts/docker-env.sh && $(CARGO) test -- --include-ignored; \
	else \
		$(CARGO) test && echo "not root: the tests that need root or Docker were ignored, and make demo and make compose-demo were not run"; \
	fi
	@if [ "$$(id -u)" -eq 0 ]; then $(MAKE) --no-print-directory demo demo-sites compose-demo; fi

docker-env:
	bash scripts/docker-env.sh

lint:
	$(CARGO) fmt --check
	$(CARGO) clippy --all-targets -- -D warnings

fmt:
	$(CARGO) fmt

# The benchmark and the demo are Rust programs of the lab crate (lab/), the
# same namespace lab the tests use. Its container figures need the Docker
# engine and the test image, as the soak does.
bench: deps build docker-env
	./target/release/bench

scale: deps build
	./target/release/scale

# 30 minutes by default (SOAK_MINUTES), the short form under CI=true; the
# same soak runs short in make test (tests/soak.rs).
soak: deps build docker-env
	./target/release/soak

demo: deps build
	./target/release/demo

demo-sites: deps build
	./target/release/demo_sites

# The runtime image, from target/release/tunnel + busybox-static (no registry).
image:
	bash scripts/image.sh

compose-demo:
	bash scripts/compose-demo.sh

deps:
	@. scripts/packages.sh && ensure_packages "$${RUNTIME_PACKAGES[@]}"

ci:
	bash .ci/run

clean:
	$(CARGO) clean

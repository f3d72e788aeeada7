# syntax=docker/dockerfile:1
#
# relaygate container image.
#
#   docker build -t relaygate .
#   docker run -p 8080:8080 -v "$PWD/config/relaygate.example.toml:/etc/relaygate/relaygate.toml:ro" \
#     -e HOLYSHEEP_API_KEY -e RELAYGATE_ADMIN_KEY -e APP_A_KEY relaygate
#   docker run -p 8080:8080 relaygate demo --listen 0.0.0.0:8080
#
# Two stages: the Rust toolchain builds a release binary; the runtime image
# is Debian slim with CA certificates, curl for the HEALTHCHECK, and the
# binary, run as an unprivileged user.

ARG RUST_VERSION=1
ARG DEBIAN_RELEASE=bookworm

FROM rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS builder
WORKDIR /src
# The whole context (see .dockerignore), so that a build.rs, benches or
# examples named in Cargo.toml are there when cargo looks for them.
COPY . .
# Cache mounts keep the registry and the target directory between builds
# (BuildKit); the binary is copied out because the cache is not part of the
# layer.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked \
    && install -D -m 0755 target/release/relaygate /out/relaygate

FROM debian:${DEBIAN_RELEASE}-slim AS runtime
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 relaygate \
    && useradd --system --uid 10001 --gid relaygate --home-dir /nonexistent --no-create-home \
       --shell /usr/sbin/nologin relaygate \
    && mkdir -p /etc/relaygate

COPY --from=builder /out/relaygate /usr/local/bin/relaygate

USER 10001:10001
EXPOSE 8080
# relaygate drains in-flight requests on SIGTERM for up to shutdown_grace
# (30s by default); give `docker stop` at least that: --time 40.
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD curl -fsS -o /dev/null http://127.0.0.1:8080/health/live || exit 1

ENTRYPOINT ["/usr/local/bin/relaygate"]
# --listen: in a container the gateway must listen beyond loopback, whatever
# server.listen says.
CMD ["serve", "--config", "/etc/relaygate/relaygate.toml", "--listen", "0.0.0.0:8080"]

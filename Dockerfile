# syntax=docker/dockerfile:1

# upline: one image carrying all four binaries (upline, upline-api, upline-worker,
# upline-notifier); docker-compose.yml picks the service with `command:`.
#
#   docker build -t upline .
#   docker run --rm upline upline --help

ARG RUST_VERSION=1
ARG DEBIAN_RELEASE=bookworm

# ---- builder -------------------------------------------------------------------------------
FROM rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS builder
WORKDIR /src

# Queries are checked at compile time against the committed .sqlx/ cache: never reach for a
# database while building (.cargo/config.toml says the same).
ENV SQLX_OFFLINE=true \
    CARGO_TERM_COLOR=never

# The whole workspace (.dockerignore keeps target/ and .git/ out). migrations/ is embedded by
# sqlx::migrate! and config/default.toml by include_str!, so both must be present here.
COPY . .

# Registry, git checkouts and target/ live in cache mounts, so dependencies are compiled once
# and reused across builds; only the workspace crates are rebuilt when the source changes.
# sqlx::migrate! (in upline-common) does not tell cargo about migrations/, hence the touch: a
# new migration must reach the binaries even when no Rust file changed. The binaries are copied
# out of the target/ cache mount, which is not part of the image.
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    touch common/src/lib.rs \
 && cargo build --release --locked --bins \
 && mkdir -p /out \
 && cp target/release/upline \
       target/release/upline-api \
       target/release/upline-worker \
       target/release/upline-notifier \
       target/release/upline-webhooks \
       /out/

# ---- runtime -------------------------------------------------------------------------------
FROM debian:${DEBIAN_RELEASE}-slim AS runtime

# ca-certificates for TLS to managed brokers and databases; curl for container healthchecks.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/*

RUN groupadd --system --gid 10001 upline \
 && useradd --system --uid 10001 --gid upline --home-dir /app --no-create-home \
            --shell /usr/sbin/nologin upline

COPY --from=builder /out/ /usr/local/bin/

# The binaries read config/default.toml relative to the working directory (the same defaults
# are compiled in); override any key with UPLINE__SECTION__KEY, DATABASE_URL and AMQP_URL.
WORKDIR /app
COPY config/ /app/config/
# The broker users' provisioning script, run by compose's one-shot rabbitmq-users service
# (POSIX sh + curl, both in this image).
COPY deploy/ /app/deploy/

USER upline:upline

# api, notifier, worker and webhooks service (health and metrics)
EXPOSE 8080 8081 8082 8083

# The services stop gracefully on SIGTERM (docker stop's default signal).
STOPSIGNAL SIGTERM

# Everything in one process by default; compose runs upline-api, upline-worker,
# upline-notifier and upline-webhooks separately.
CMD ["upline", "run"]

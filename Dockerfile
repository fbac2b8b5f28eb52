# The engine image for docker-compose.yml. Builds the plugins and the engine, then
# ships the binary with the plugins, templates and migrations it loads at run time.
FROM rust:1.95-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends cmake pkg-config libssl-dev zlib1g-dev \
    && rm -rf /var/lib/apt/lists/* \
    && rustup target add wasm32-wasip2
WORKDIR /src
ENV CARGO_TARGET_DIR=/src/target
COPY . .
# One plugin per build: the SDK's `routing` and `templating` features must not be unified.
RUN for crate in default-router acme-router locale-templater; do \
        cargo build --release --locked --target wasm32-wasip2 --manifest-path plugins/Cargo.toml -p $crate || exit 1; \
    done \
    && mkdir -p /out/plugins \
    && cp target/wasm32-wasip2/release/default_router.wasm /out/plugins/default.wasm \
    && cp target/wasm32-wasip2/release/acme_router.wasm /out/plugins/acme.wasm \
    && cp target/wasm32-wasip2/release/locale_templater.wasm /out/plugins/locale-templater.wasm
RUN cargo build --release --locked --bin notify-engine && cp target/release/notify-engine /out/

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates libssl3 zlib1g \
    && rm -rf /var/lib/apt/lists/* && useradd --system --uid 10001 notify
COPY --from=build /out/notify-engine /usr/local/bin/notify-engine
COPY --from=build /out/plugins /app/plugins
COPY templates /app/templates
WORKDIR /app
USER notify
# The public API listens on every interface (publish it behind a TLS proxy). The admin
# listener (health, readiness, metrics, the admin API) stays on the container's loopback:
# `docker run -p` cannot reach it by accident. Probes run inside the container (see the
# HEALTHCHECK); to scrape metrics from outside, set NOTIFY_HTTP__ADMIN_LISTEN=0.0.0.0:9090
# deliberately and publish it on a private address only.
ENV NOTIFY_HTTP__LISTEN=0.0.0.0:8080 \
    NOTIFY_HTTP__ADMIN_LISTEN=127.0.0.1:9090 \
    NOTIFY_PLUGINS__DIR=/app/plugins \
    NOTIFY_EMAIL__TEMPLATES_DIR=/app/templates
EXPOSE 8080
# Readiness (`/readyz`: PostgreSQL answers, the routes can serve) over the admin listener,
# asked by the engine's own probe (no curl in the image): it reads http.admin_listen from
# the same config and environment as the engine, needs no secret, gives up after 3 s.
HEALTHCHECK --interval=10s --timeout=5s --start-period=15s --retries=3 \
    CMD ["/usr/local/bin/notify-engine", "healthcheck"]
ENTRYPOINT ["/usr/local/bin/notify-engine"]
CMD ["run"]

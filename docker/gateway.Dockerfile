# The gateway: FastAPI + the embedded ONNX Runtime backend or a Triton client. No torch.
#
#   docker build -f docker/gateway.Dockerfile -t glipv2-gateway .
#
# BASE_IMAGE: any Debian-like image with python3 >= 3.11 and its venv module
# (python:3.11-slim-bookworm by default; the tests build on a debootstrapped Debian).
# Behind a TLS-intercepting proxy, pass its CA bundle as a build secret:
#   docker build --secret id=pip_cert,src=/etc/ssl/certs/ca-certificates.crt ...
# It is mounted for the pip step only and is in no layer of the image.
ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3 -m venv /opt/glipv2
COPY pyproject.toml README.md /src/
COPY glipv2 /src/glipv2
COPY service /src/service
COPY export /src/export
# `serve` (FastAPI, tritonclient) + `cpu` (onnxruntime): one ONNX Runtime build, never both
# pip's download cache is a build cache mount: reruns are fast, and it is in no layer
RUN --mount=type=secret,id=pip_cert --mount=type=cache,target=/root/.cache/pip \
    if [ -s /run/secrets/pip_cert ]; then export PIP_CERT=/run/secrets/pip_cert; fi; \
    /opt/glipv2/bin/pip install --quiet "/src[serve,cpu]" \
    && /opt/glipv2/bin/python -c "import service.app, sys; assert 'torch' not in sys.modules"

FROM ${BASE_IMAGE}
COPY --from=build /opt/glipv2 /opt/glipv2
RUN (getent group glipv2 || groupadd --system glipv2) && useradd --system --gid glipv2 --no-create-home glipv2
USER glipv2
WORKDIR /opt/glipv2
# Container defaults (service/settings.py): listen on every interface; compose sets the
# backend, the Triton address and the repository.
ENV PATH=/opt/glipv2/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    GLIPV2_HOST=0.0.0.0 \
    GLIPV2_PORT=8000 \
    GLIPV2_REPOSITORY=/models/cpu
EXPOSE 8000
HEALTHCHECK --interval=5s --timeout=4s --start-period=30s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health/ready' % os.environ.get('GLIPV2_PORT', '8000'), timeout=3)"]
CMD ["python3", "-m", "service"]

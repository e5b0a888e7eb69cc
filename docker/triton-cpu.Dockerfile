# Triton for the cpu flavour: the real tritonserver (2.51, from the nvidia-pytriton wheel)
# whose python backend runs the repository's ONNX files with ONNX Runtime. NGC's
# tritonserver image has no onnxruntime module for the python backend, and the backend's
# stub needs numpy<2: export/local_triton.py installs both into a venv of their own.
#
#   docker build -f docker/triton-cpu.Dockerfile -t glipv2-triton-cpu .
#
# BASE_IMAGE needs python3.11 with its shared libpython and venv module (python:3.11-slim-bookworm
# has them; on Debian: libpython3.11, python3-venv). pip runs from a throwaway venv (Debian's
# python3 has none); the models' own venv (numpy<2 + onnxruntime) is made from the base python3.
# Proxy CA: the same build secret as docker/gateway.Dockerfile.
ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE}
ARG ONNXRUNTIME_VERSION=
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    GLIPV2_STUB_ONNXRUNTIME=${ONNXRUNTIME_VERSION} \
    PYTHONUNBUFFERED=1
COPY export/__init__.py export/local_triton.py /opt/glipv2/export/
WORKDIR /opt/glipv2
# pip's download cache is a build cache mount: reruns are fast, and it is in no layer
RUN --mount=type=secret,id=pip_cert --mount=type=cache,target=/root/.cache/pip \
    if [ -s /run/secrets/pip_cert ]; then export PIP_CERT=/run/secrets/pip_cert; fi; \
    python3 -m venv /tmp/pip-venv \
    && /tmp/pip-venv/bin/python3 -m export.local_triton install --cache-dir /opt/tritonserver \
    && rm -rf /opt/tritonserver/wheels /tmp/pip-venv
# the server stops with the container's SIGTERM; 8000 HTTP, 8001 gRPC, 8002 metrics
EXPOSE 8000 8001 8002
HEALTHCHECK --interval=5s --timeout=4s --start-period=60s --retries=3 \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/v2/health/ready', timeout=3)"]
CMD ["python3", "-m", "export.local_triton", "serve", "--cache-dir", "/opt/tritonserver", "--repository", "/models/cpu", \
     "--host", "0.0.0.0", "--timeout", "300", "--log-stdout"]

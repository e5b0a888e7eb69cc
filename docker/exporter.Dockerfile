# The exporter: checkpoint -> ONNX graphs + a rendered Triton repository, into the `models`
# volume (compose.yaml). PyTorch's CPU build is enough: the export traces on the CPU.
#
#   docker build -f docker/exporter.Dockerfile -t glipv2-exporter .
#
# TORCH_INDEX: where pip finds torch's CPU wheel (PyPI's own torch wheel is the CUDA build,
# gigabytes larger). Proxy CA: the same build secret as docker/gateway.Dockerfile.
ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS build
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3 -m venv /opt/glipv2
COPY pyproject.toml README.md /src/
COPY glipv2 /src/glipv2
COPY export /src/export
COPY training /src/training
COPY service /src/service
COPY bench /src/bench
# pip's download cache is a build cache mount: reruns are fast, and it is in no layer
RUN --mount=type=secret,id=pip_cert --mount=type=cache,target=/root/.cache/pip \
    if [ -s /run/secrets/pip_cert ]; then export PIP_CERT=/run/secrets/pip_cert; fi; \
    /opt/glipv2/bin/pip install --quiet --extra-index-url "${TORCH_INDEX}" "/src[train,export,cpu]"

FROM ${BASE_IMAGE}
COPY --from=build /opt/glipv2 /opt/glipv2
ENV PATH=/opt/glipv2/bin:$PATH PYTHONUNBUFFERED=1
WORKDIR /opt/glipv2
# compose.yaml gives the checkpoint, flavour and output folder
ENTRYPOINT ["python3", "-m", "export.build"]
CMD ["--help"]

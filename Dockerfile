# The indexer image: `indexer` is the entrypoint (watch, serve, index, search, ...).
#
#   docker build -t indexer .          # torch 2.14.1 from PyPI: bundles CUDA, runs on the GPU (NVIDIA container
#                                      # toolkit) and on the CPU; what docker-compose.yml builds (6.5 GB)
#   docker build -t indexer:cpu --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu .
#                                      # CPU-only torch: a much smaller image
#
# Build arguments, all optional:
#   EXTRA_CA_CERTS   PEM text of extra CA certificates, trusted by pip, Python and the Hugging Face download
#                    (networks whose proxy intercepts TLS): --build-arg EXTRA_CA_CERTS="$(cat corp-ca.pem)"
#   TORCH_INDEX_URL  the index torch/torchvision come from (PyPI stays the index of everything else)
#   PIP_INDEX_URL, PIP_EXTRA_INDEX_URL
#                    a PyPI mirror (they are recorded in the image history: no passwords in them)
#
# Layers, from the most stable: CA certificates, torch, the user, the other dependencies (from pyproject.toml
# only), the code. A code change rebuilds only the last layer; a README change only the last two.
# No "# syntax=" line: it would make every build pull the Dockerfile frontend from a registry.
# The extra CA certificates are written in a stage of their own: a build argument in scope shows in the history
# of every later layer, and the PEM text would clutter all of them.
FROM python:3.11-slim AS ca
ARG EXTRA_CA_CERTS=""
RUN mkdir /extra && if [ -n "$EXTRA_CA_CERTS" ]; then printf '%s\n' "$EXTRA_CA_CERTS" > /extra/extra-ca-certs.crt; fi

FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_CERT=/etc/ssl/certs/ca-certificates.crt \
    SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt \
    REQUESTS_CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt \
    HF_HOME=/models/huggingface \
    XDG_CACHE_HOME=/cache \
    XDG_DATA_HOME=/data
COPY --from=ca /extra/ /usr/local/share/ca-certificates/
RUN update-ca-certificates >/dev/null \
 && echo "extra CA certificates: $(cat /usr/local/share/ca-certificates/*.crt 2>/dev/null | grep -c 'BEGIN CERTIFICATE')"

ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG TORCH_INDEX_URL=""
# torch/torchvision first (pinned as in pyproject.toml): the big layer is reused when only the project changes.
RUN pip install ${TORCH_INDEX_URL:+--index-url $TORCH_INDEX_URL --extra-index-url ${PIP_INDEX_URL:-https://pypi.org/simple}} \
        torch==2.14.1 torchvision==0.29.1

RUN useradd --system --uid 10001 --home-dir /app --shell /usr/sbin/nologin indexer \
 && mkdir -p /app /models /cache /data \
 && chown indexer /models /cache /data

WORKDIR /app
# The other dependencies, from pyproject.toml alone (no code yet: setuptools finds no package and installs the
# dependencies of an empty project), so that editing the code does not reinstall them.
COPY pyproject.toml ./
RUN touch README.md && pip install '.[heif]' && rm README.md
COPY README.md ./
COPY indexer ./indexer
RUN pip install --no-deps --force-reinstall . && rm -rf build ./*.egg-info && indexer --help >/dev/null

# Named volumes mounted on these start with the image's ownership, so the unprivileged user can write them.
VOLUME ["/models", "/cache", "/data"]
USER indexer
EXPOSE 8000
ENTRYPOINT ["indexer"]
CMD ["--help"]

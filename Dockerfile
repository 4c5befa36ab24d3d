# The flow-run image for the docker and kubernetes work pools in prefect.yaml: this repository, torch and the
# locked dependencies, no dev/bench extras (a worker only runs flows).
#   docker build -t qlora-pipeline:cpu .                            # CPU build of torch (~200 MB)
#   docker build --build-arg TORCH=cu130 -t qlora-pipeline:cu130 .  # CUDA 13 build (several GB; GPU nodes)
# BASE: any image with CPython 3.11 and pip (the tested Python); PIP_INDEX_URL / TORCH_INDEX_URL: mirrors.
ARG BASE=python:3.11-slim
FROM ${BASE}

ARG TORCH=cpu
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG EXTRAS=
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 \
    QLORA_REPO_DIR=/opt/qlora PYTHONPATH=/opt/qlora
WORKDIR /opt/qlora

# torch first and on its own, as `make install` does: the CPU build from PyTorch's CPU index, or the package
# index's default (CUDA 13) build; the lock then constrains everything else and leaves torch's build alone.
RUN python -m pip install -q pip==26.3 && \
    if [ "$TORCH" = cpu ]; then python -m pip install -q --index-url "$TORCH_INDEX_URL" torch==2.13.0; \
    elif [ "$TORCH" = cu130 ]; then python -m pip install -q torch==2.13.0; \
    else echo "TORCH=$TORCH: cpu or cu130" >&2; exit 1; fi

# Dependencies before the source, so a code change reuses this layer.
COPY pyproject.toml requirements.lock README.md ./
RUN mkdir -p flows tasks registry qlora demo && touch flows/__init__.py tasks/__init__.py registry/__init__.py qlora/__init__.py demo/__init__.py && \
    python -m pip install -q -c requirements.lock ".${EXTRAS:+[$EXTRAS]}" && \
    python -m pip uninstall -q -y qlora-pipeline && rm -rf flows tasks registry qlora demo build

COPY . .
RUN python -m pip install -q --no-deps -e . && qlora --version

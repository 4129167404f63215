# The GPU environment for clusters: CUDA 13.0 (what torch 2.14.1's wheels are built for),
# Python 3.11 and the project with its gpu and metrics extras, every package at the version
# in requirements/constraints.txt (tests/test_environment.py keeps the three in step).
# Not NVIDIA's PyTorch image: its own torch build fails the compat layer's version check.
# Build from the repository root: docker build -t megatron-transfusion .
FROM nvidia/cuda:13.0.1-devel-ubuntu24.04

ARG DEBIAN_FRONTEND=noninteractive
# Python 3.11 from the deadsnakes PPA (Ubuntu 24.04 ships 3.12); apt packages follow the image.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends software-properties-common gpg-agent \
    && add-apt-repository -y ppa:deadsnakes/ppa \
    && apt-get install -y --no-install-recommends git python3.11 python3.11-dev python3.11-venv \
    && rm -rf /var/lib/apt/lists/*

ENV VIRTUAL_ENV=/opt/venv MTF_ENV=/opt/venv PATH=/opt/venv/bin:$PATH
WORKDIR /opt/megatron_transfusion
COPY . .
RUN python3.11 -m venv /opt/venv \
    && pip install --no-cache-dir -c requirements/constraints.txt --upgrade pip setuptools wheel \
    && pip install --no-cache-dir -c requirements/constraints.txt -e '.[metrics]'
# flash-attn and transformer-engine compile against the torch installed above, hence no build
# isolation; MAX_JOBS bounds the parallel compiler jobs (each takes several GB of memory).
ENV MAX_JOBS=8
RUN pip install --no-cache-dir --no-build-isolation -c requirements/constraints.txt -e '.[gpu,metrics]' \
    && pip check

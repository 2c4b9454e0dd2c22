# GPU image for ctm-dist on Ray clusters: the RayJob/RayCluster image of clusters/kubernetes,
# or a container on Slurm nodes.
#   docker build -t REGISTRY/ctm-dist:TAG .
#   docker build --build-arg BASE_IMAGE=pytorch/pytorch:<torch>-cuda<x.y>-cudnn9-runtime -t ... .
# The base image brings CUDA PyTorch; the install script CI uses adds everything else and keeps
# that torch (TORCH_SPEC=skip).
ARG BASE_IMAGE=pytorch/pytorch:2.8.0-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# wget: KubeRay's default health probes call it.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends wget \
 && rm -rf /var/lib/apt/lists/*

RUN groupadd --gid 1000 ctm \
 && useradd --uid 1000 --gid 1000 --create-home --shell /bin/bash ctm

WORKDIR /opt/ctm-dist
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    RAY_USAGE_STATS_ENABLED=0

# Dependencies first: this layer is rebuilt only when the package or the install script change.
COPY pyproject.toml README.md ./
COPY .ci/install .ci/install
COPY ctm_dist/ ctm_dist/
RUN TORCH_SPEC=skip bash .ci/install \
 && python -c "import torch, deepspeed, ray, ctm_dist; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

COPY . .
# The code stays root-owned; the user may create files (e.g. local runs/) beside it.
RUN chown 1000:1000 /opt/ctm-dist

# Numeric, so Kubernetes can check runAsNonRoot.
USER 1000:1000
ENV HOME=/home/ctm

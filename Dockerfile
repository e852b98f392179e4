# graft on Ray: one image for the head and the workers of a Ray cluster (and for `ray job submit`).
#
# CPU (default):   docker build -t graft:0.1.0 .
# CUDA variant:    docker build -t graft:0.1.0-gpu \
#                    --build-arg RAY_IMAGE=rayproject/ray:2.60.0-py311-gpu \
#                    --build-arg TORCH_SPEC="torch==2.13.0" .
#   (the default PyPI torch wheel is the CUDA build; for a smaller CPU image pass
#    --build-arg PIP_EXTRA_ARGS="--index-url <your PyTorch CPU wheel index>")
# Ray in the image must match the cluster's Ray version exactly.
ARG RAY_IMAGE=rayproject/ray:2.60.0-py311-cpu
FROM ${RAY_IMAGE}

ARG TORCH_SPEC="torch==2.13.0"
ARG PIP_EXTRA_ARGS=""
ENV RAY_USAGE_STATS_ENABLED=0 \
    HF_HUB_DISABLE_TELEMETRY=1 \
    PIP_NO_CACHE_DIR=1

# torch first, pinned: an unpinned torch would be resolved by graft's requirements instead.
RUN pip install ${PIP_EXTRA_ARGS} "${TORCH_SPEC}"

WORKDIR /opt/graft
COPY --chown=ray:users pyproject.toml README.md LICENSE __init__.py __main__.py ./
COPY --chown=ray:users engine ./engine
COPY --chown=ray:users cluster ./cluster
RUN pip install "/opt/graft[gcs,azure]" && graft --version

# No credentials in the image: S3/GCS access comes from the pod's or instance's role, the Hub token
# from a secret mounted at run time (see cluster/deploy/).
WORKDIR /home/ray

# ca2vdm server image: CUDA runtime base, torch/triton from PyPI (CUDA builds), the package, a non-root user.
#   docker build -t ca2vdm .
#   docker run --gpus all -p 8000:8000 -v ca2vdm-data:/data -v /path/to/models:/models:ro ca2vdm
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04

# ---- build stage: a virtual environment with everything installed --------------------------------------
FROM ${CUDA_IMAGE} AS build
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-pip \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch first, as its own layer: the large, rarely changing part (PyPI's Linux wheels are CUDA builds)
ARG TORCH_SPEC="torch>=2.4"
RUN pip install "${TORCH_SPEC}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY server ./server
COPY kernels ./kernels
COPY client ./client
COPY ca2vdm ./ca2vdm
# cluster: Ray Serve, PostgreSQL and S3 clients for the scale-out deployment (deploy/ray, docs/scale-out.md);
# text: the T5 encoder of text-conditioned models (--text-encoder)
RUN pip install ".[vae,cluster,text]"

# ---- runtime stage --------------------------------------------------------------------------------------
FROM ${CUDA_IMAGE}
ENV DEBIAN_FRONTEND=noninteractive
# Triton compiles a small C launcher for its kernels at first use, so the runtime keeps a C compiler and the
# Python headers; nothing else from the build stage (no pip caches, no sources).
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 gcc libc6-dev python3-dev \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /opt/venv /opt/venv
RUN useradd --create-home --uid 10001 ca2vdm \
    && mkdir -p /data /models /sessions \
    && chown 10001:10001 /data /models /sessions
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    CA2VDM_HOST=0.0.0.0 \
    CA2VDM_PORT=8000 \
    CA2VDM_DATA_DIR=/data \
    TRITON_CACHE_DIR=/data/.triton
USER 10001:10001
WORKDIR /home/ca2vdm
VOLUME ["/data", "/models"]
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python3", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4).status != 200)"]
CMD ["ca2vdm", "serve", "--host", "0.0.0.0"]

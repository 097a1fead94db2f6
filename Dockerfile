# One image for every role (intake, GPU worker, beat, training); the command picks the role.
# PyPI's torch wheels carry CUDA, so the same image runs on GPU nodes (with the NVIDIA runtime) and on CPU.
# Debian release pinned: the apt package names below are the ones CI installs and tests against.
FROM python:3.11-slim-bookworm AS base
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# dataset-fashion-mnist: the data of the default training preset, for the `train` worker (30 MB).
# Versions unpinned: Debian drops superseded point-release versions from its mirrors, so pins break rebuilds.
# hadolint ignore=DL3008
RUN apt-get update && apt-get install -y --no-install-recommends libjpeg62-turbo tini dataset-fashion-mnist \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /app
# Dependencies first, at the lock's exact versions, so code edits don't re-download torch.
COPY requirements.lock ./
RUN pip install -r requirements.lock
COPY pyproject.toml README.md ./
# the layers, bottom to top
COPY schemas schemas
COPY migrations migrations
COPY core core
COPY model model
COPY training training
COPY worker worker
COPY similar similar
COPY enrich enrich
RUN pip install --no-deps . \
    && groupadd --gid 10001 enrich && useradd --create-home --uid 10001 --gid 10001 enrich \
    && install -d -o 10001 -g 10001 /home/enrich/data
# numeric, so Kubernetes' runAsNonRoot can check it
USER 10001:10001
ENV ENRICH_DATA_DIR=/home/enrich/data
# No model in the image: workers load the registry's active model from ENRICH_MODEL_URI (S3) and follow
# promotions; nothing is downloaded from a model hub at run time.
EXPOSE 9100
ENTRYPOINT ["tini", "--", "enrich"]
CMD ["--help"]

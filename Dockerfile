# One image for every role (intake, GPU worker, beat, training); the command picks the role.
# PyPI's torch wheels carry CUDA, so the same image runs on GPU nodes (with the NVIDIA runtime) and on CPU.
FROM python:3.11-slim AS base
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update && apt-get install -y --no-install-recommends libjpeg62-turbo tini \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /app
# Dependencies first so code edits don't re-download torch.
COPY pyproject.toml README.md ./
ARG PACKAGES="schemas migrations core model training worker similar enrich"
RUN pip install "torch>=2.4" "torchvision>=0.19" \
    && for p in $PACKAGES; do mkdir -p "$p" && touch "$p/__init__.py"; done \
    && pip install . && pip uninstall -y catalogue-enrich
# the layers, bottom to top
COPY schemas schemas
COPY migrations migrations
COPY core core
COPY model model
COPY training training
COPY worker worker
COPY similar similar
COPY enrich enrich
RUN pip install --no-deps . && useradd --create-home --uid 10001 enrich
USER enrich
ENV ENRICH_DATA_DIR=/home/enrich/data
# Models are mounted or baked at ENRICH_MODEL_DIR; nothing is downloaded at run time.
EXPOSE 9100
ENTRYPOINT ["tini", "--", "enrich"]
CMD ["--help"]

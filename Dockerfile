# The samestyle worker image: CPU-only PyTorch + faiss-cpu. `docker compose up --build`.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# torch first and from the CPU index: from PyPI it would pull gigabytes of CUDA wheels. Its own
# layer, so code changes do not re-download it. Keep the pin equal to pyproject.toml's.
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu

WORKDIR /src
COPY . .
# The pinned torch above already satisfies the project's torch requirement. EXTRAS adds extras
# (docker-compose builds "cpu,milvus": the Milvus index backend's client and Milvus Lite).
ARG EXTRAS=cpu
RUN pip install ".[${EXTRAS}]"

# Run unprivileged; /state (a worker's), /models (the trainer's candidates, shared with the
# workers) and /trainer (its state) are created here so named volumes mounted on them inherit the owner.
RUN useradd --create-home --uid 10001 samestyle \
    && mkdir -p /state /models /trainer \
    && chown samestyle /state /models /trainer
USER samestyle
WORKDIR /home/samestyle

ENV SAMESTYLE_STATE_DIR=/state
EXPOSE 6066
ENTRYPOINT ["samestyle"]
CMD ["worker"]

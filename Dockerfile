# GPU image for clusters: NVIDIA's PyTorch build (CUDA, NCCL, cuDNN) plus this package.
# It keeps the base image's torch; nothing is downloaded at run time (HF_HUB_OFFLINE).
FROM nvcr.io/nvidia/pytorch:25.10-py3

ENV HF_HUB_OFFLINE=1 \
    PYTHONUNBUFFERED=1 \
    TOKENIZERS_PARALLELISM=false

WORKDIR /opt/nemo_controlnet
COPY pyproject.toml README.md ./
COPY nemo_controlnet ./nemo_controlnet
RUN pip install --no-cache-dir . && python -c "import nemo_controlnet, diffusers, lightning, hydra, webdataset"

WORKDIR /workspace
CMD ["controlnet-train", "--help"]

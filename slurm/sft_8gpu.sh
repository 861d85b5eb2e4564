#!/bin/bash
# Stage 2 packed parallel SFT on one 8-GPU node:   sbatch slurm/sft_8gpu.sh [CONFIG] [key=value ...]
#SBATCH --job-name=npr-sft
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=24:00:00
#SBATCH --output=logs/%x-%j.out
set -euo pipefail
CONFIG=${1:-examples/qwen3_4b/sft_8gpu.yaml}
shift || true
export OMP_NUM_THREADS=8 CUDA_DEVICE_MAX_CONNECTIONS=1
# a re-submitted job resumes from out_dir/checkpoints/latest
srun torchrun --nproc_per_node 8 --nnodes 1 -m megatron_npr.cli sft "$CONFIG" "$@"

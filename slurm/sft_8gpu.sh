#!/bin/bash
# Stage 2 packed parallel SFT on one 8-GPU node:   sbatch slurm/sft_8gpu.sh [CONFIG] [key=value ...]
# (more nodes: sbatch --nodes=4 slurm/sft_8gpu.sh; dp grows with the ranks)
#SBATCH --job-name=npr-sft
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@600
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
source slurm/launch.sh sft examples/qwen3_4b/sft_8gpu.yaml "$@"

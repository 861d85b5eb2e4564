#!/bin/bash
# Stage 1 DAPO (format-follow RL) on Qwen3-4B-Instruct, 8 nodes x 8 H100, engines per node:
#   sbatch slurm/dapo_64gpu.sh [CONFIG] [key=value ...]      (--dry-run: print the plan only)
#SBATCH --job-name=npr-dapo
#SBATCH --nodes=8
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --time=48:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@900
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
source slurm/launch.sh rl examples/qwen3_4b/dapo_64gpu.yaml "$@"

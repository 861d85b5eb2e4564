#!/bin/bash
# Stage 3 PAPO on Qwen3-4B, 8 nodes x 8 H100, one SGLang engine per node sharing its GPUs:
#   sbatch slurm/papo_64gpu.sh [CONFIG] [key=value ...]      (--dry-run: print the plan only)
# Preemption-safe: 15 min before the time limit (or on SIGTERM) every rank finishes its step,
# a checkpoint is written and the job requeues itself; the next attempt resumes from it.
#SBATCH --job-name=npr-papo
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
source slurm/launch.sh rl examples/qwen3_4b/papo_64gpu.yaml "$@"

#!/bin/bash
# Evaluation on one GPU:   sbatch slurm/eval.sh CONFIG [key=value ...]
#   e.g. sbatch slurm/eval.sh my_eval.yaml engine.hf_dir=/checkpoints/npr_papo_4b/hf engine.device=cuda
#SBATCH --job-name=npr-eval
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=1
#SBATCH --cpus-per-task=16
#SBATCH --time=4:00:00
#SBATCH --output=slurm-%x-%j.out
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
source slurm/launch.sh eval "" "$@"   # no default: name the config

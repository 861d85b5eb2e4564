#!/bin/bash
# Checkpoint conversion on one node (CPU ranks):   sbatch slurm/convert.sh mcore-to-hf --ckpt DIR --out DIR
#   (any tools/convert_hf.py command: hf-to-mcore, mcore-to-hf, verify)
#SBATCH --job-name=npr-convert
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=32
#SBATCH --time=2:00:00
#SBATCH --output=slurm-%x-%j.out
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
export NPR_GPUS_PER_NODE=${NPR_GPUS_PER_NODE:-1}   # a CPU job: no GPU count from SLURM
exec "${NPR_PYTHON:-python3}" -m megatron_npr.cli launch convert -- "$@"

# The shared part of every slurm/*.sh (sourced, not submitted):
#   source slurm/launch.sh STAGE DEFAULT_CONFIG [CONFIG] [key=value ...] [--dry-run]
# runs `npr launch` (megatron_npr/launch) on the batch host: it checks the config and the paths,
# prints and saves the plan under runs/<job name>-<job id>/, starts one rank per GPU with srun
# (and the rollout engines per node), forwards the preemption signal and requeues the job.
# Cluster settings are NPR_* environment variables (README, "Cluster settings").
stage=$1 config=$2
shift 2
if [[ $# -gt 0 && $1 != -* && $1 != *=* ]]; then config=$1; shift; fi
if [[ -z $config ]]; then echo "usage: sbatch $0 CONFIG [key=value ...] [--dry-run]" >&2; exit 2; fi
exec "${NPR_PYTHON:-python3}" -m megatron_npr.cli launch "$stage" "$config" "$@"

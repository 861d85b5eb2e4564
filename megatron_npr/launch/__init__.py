"""Launching on a cluster: SLURM -> torch.distributed (`npr launch`), cluster settings from the
environment, preemption and requeue, the resolved plan (`--dry-run`), and the `npr plan` estimate.

    cluster.py    ClusterSettings: every site knob, read from NPR_* variables with defaults
    slurm.py      Allocation: hosts, ports, ranks from SLURM's variables; the srun command lines
    launcher.py   `npr launch STAGE CONFIG`: check, plan, srun the ranks (and engines), requeue
    rank.py       `npr launch-rank`: one srun task -> the env:// variables -> the stage's command
    estimate.py   `npr plan`: memory and time per GPU before a run
"""

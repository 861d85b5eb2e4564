"""SLURM host-list expansion for the fake `scontrol` and `srun`: `gpu-[001-003,7],big` -> names."""
import re


def expand(nodelist: str) -> list[str]:
    hosts = []
    for prefix, ranges, suffix in re.findall(r"([^,\[\]]*)(?:\[([^\]]+)\])?([^,\[\]]*)", nodelist):
        if not (prefix or ranges or suffix):
            continue
        if not ranges:
            hosts.append(prefix + suffix)
            continue
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            for i in range(int(lo), int(hi or lo) + 1):
                hosts.append(f"{prefix}{str(i).zfill(len(lo))}{suffix}")
    return hosts

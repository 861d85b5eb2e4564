"""A synthetic task with a natural parallel decomposition: multi-part sums.

"Let A = 3 + 4 and B = 5 + 2. What is A + B?" Each part is an independent sub-sum (one branch),
the takeaway adds them up. Tunable parts (branches) and digits; a tiny Qwen3 learns the
single-digit version on CPU in minutes, which leaves room for the RL stages.
"""
from __future__ import annotations

import random
import re
import string

from ..topology import branch_label
from .problems import Problem

NAMES = string.ascii_uppercase


def make_problem(rng: random.Random, index: int, parts: tuple[int, int], digits: int, terms: int = 2):
    """(Problem, canonical NPR solution text)."""
    count = rng.randint(*parts)
    top = 10 ** digits - 1
    sums = [[rng.randint(0, top) for _ in range(terms)] for _ in range(count)]
    values = [sum(s) for s in sums]
    names = NAMES[:count]
    defs = [f"{n} = {' + '.join(map(str, s))}" for n, s in zip(names, sums)]
    question = f"Let {', '.join(defs[:-1])} and {defs[-1]}. What is {' + '.join(names)}?" if count > 1 else \
        f"Let {defs[0]}. What is {names[0]}?"
    answer = sum(values)
    plans = "".join(f"<plan>{branch_label(j)} Compute {n}.</plan>" for j, n in enumerate(names, 1))
    steps = "".join(f"<step>{branch_label(j)} {d} = {v}.</step>" for j, (d, v) in enumerate(zip(defs, values), 1))
    total = " + ".join(map(str, values))
    solution = (f"<guideline>{plans}</guideline>{steps}<takeaway>{' + '.join(names)} = {total} = {answer}."
                f"</takeaway>\nThe answer is \\boxed{{{answer}}}.")
    return Problem(f"synth-{index}", question, str(answer), "synth"), solution


_DEF = re.compile(r"([A-Z]) = (\d+(?: \+ \d+)*)")


def plain_solution(question: str) -> str:
    """The same computation as the canonical solution, written as one sequential chain without
    any NPR tag: `A = 3 + 4 = 7. B = 5 + 2 = 7. A + B = 7 + 7 = 14.` and the boxed answer. The
    pipeline bootstraps mostly on these, so stage 1 (DAPO) has a format to teach."""
    defs = _DEF.findall(question)
    if not defs:
        raise ValueError(f"not a synthetic question: {question!r}")
    values = [sum(int(t) for t in terms.split(" + ")) for _, terms in defs]
    lines = [f"{name} = {terms} = {v}." for (name, terms), v in zip(defs, values)]
    if len(defs) > 1:
        lines.append(f"{' + '.join(n for n, _ in defs)} = {' + '.join(map(str, values))} = {sum(values)}.")
    return " ".join(lines) + f"\nThe answer is \\boxed{{{sum(values)}}}."


def make_synth_dataset(n: int, parts: tuple[int, int] = (2, 4), digits: int = 1, seed: int = 0):
    """n (problem, solution) pairs, reproducible from the seed."""
    if n < 1 or not 1 <= parts[0] <= parts[1] <= len(NAMES) or digits < 1:
        raise ValueError(f"synth: need n >= 1, 1 <= parts min <= max <= {len(NAMES)}, digits >= 1; "
                         f"got n={n}, parts={parts}, digits={digits}")
    rng = random.Random(seed)
    return [make_problem(rng, i, parts, digits) for i in range(n)]

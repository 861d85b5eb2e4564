"""Correctness rewards for math answers: the last `\\boxed{...}` against a gold answer.

math-verify times out with `signal.alarm`, which only works in a process's main thread, so
`MathGrader` grades in worker processes. A computation stuck in C (huge powers) ignores the alarm;
the grader then kills its workers after a wall-clock deadline and starts fresh ones.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import re
import threading
import time
from collections import deque
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool

_BOX_OPEN = re.compile(r"\\(?:boxed|fbox)\s*\{")
_TEXT_WRAPPER = re.compile(r"\\(?:text|textbf|mathrm|mathbf)\s*\{([^{}]*)\}")
_CHOICE_NOISE = re.compile(r"[\s$()\[\].:]")
_INTEGER = re.compile(r"[+-]?\d+")
_CHOICE_LETTERS = "ABCDE"


def extract_answer(prediction_text: str) -> str | None:
    """Content of the last complete top-level `\\boxed{...}` / `\\fbox{...}`, or None.

    Braces balance; escaped `\\{ \\}` are content, not structure. A box nested inside the found
    one is part of its content; an unclosed box is ignored."""
    found, resume_at = None, 0
    for match in _BOX_OPEN.finditer(prediction_text):
        if match.start() < resume_at:  # nested inside the box found last
            continue
        depth, i = 1, match.end()
        while i < len(prediction_text) and depth:
            char = prediction_text[i]
            if char == "\\":
                i += 2  # skip the escaped character
                continue
            depth += {"{": 1, "}": -1}.get(char, 0)
            i += 1
        if depth == 0:
            found, resume_at = prediction_text[match.end():i - 1], i
    return found


def _choice_letter(text: str) -> str:
    """`\\text{(C)}`, `(c)`, `C.` -> "C"; anything that is not one bare letter stays longer."""
    previous = None
    while previous != text:  # unwrap nested \text{\textbf{...}}
        previous, text = text, _TEXT_WRAPPER.sub(r"\1", text)
    return _CHOICE_NOISE.sub("", text).upper()


def _is_choice_gold(gold: str) -> bool:
    letter = _choice_letter(gold)
    # Written in upper case only: a gold "e" is far more likely Euler's number than a choice.
    return len(letter) == 1 and letter in _CHOICE_LETTERS and letter in gold


def _as_math(text: str) -> str:
    text = text.strip()
    return text if len(text) >= 2 and text.startswith("$") and text.endswith("$") else f"${text}$"


def grade_one(prediction_text: str, gold: str, *, max_chars: int = 512, timeout_s: int = 5) -> bool:
    """Whether the last boxed answer equals the gold. Never raises for bad model output.

    Must run in the main thread of its process (math-verify's timeouts use signal.alarm)."""
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("grade_one must run in a main thread (math-verify uses signal.alarm); "
                           "use MathGrader to grade from other threads")
    answer = extract_answer(prediction_text)
    gold = str(gold)
    if answer is None or not answer.strip() or not gold.strip():
        return False
    answer = answer[:max_chars].strip().strip("$")  # the length cap bounds parse time
    if _is_choice_gold(gold):
        return _choice_letter(answer) == _choice_letter(gold)
    try:
        from math_verify import parse, verify
        parsed_gold = parse(_as_math(gold), parsing_timeout=timeout_s)
        parsed_pred = parse(f"$\\boxed{{{answer}}}$", parsing_timeout=timeout_s)
        return bool(verify(parsed_gold, parsed_pred, timeout_seconds=timeout_s))  # gold first
    except Exception:  # malformed model output must cost a reward, not a crash
        return False


def grade_exact_int(prediction_text: str, gold) -> bool:
    """Exact integer match of the last boxed answer (the synthetic arithmetic task)."""
    answer = (extract_answer(prediction_text) or "").strip().strip("$").strip()
    gold = str(gold).strip().strip("$").strip()
    return bool(_INTEGER.fullmatch(answer) and _INTEGER.fullmatch(gold)) and int(answer) == int(gold)


def _start_worker() -> None:
    import math_verify  # noqa: F401  (pay the sympy import before the first deadline starts)
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # timeouts are expected, not news


class MathGrader:
    """A process pool grading (prediction, gold) pairs with `grade_one`; use as a context manager.

    Each item gets `timeout_s + WALL_MARGIN_S` seconds of wall time from when a worker takes it;
    past that it counts as False and the workers are replaced. An item whose worker dies is
    retried once on its own (it may have been a bystander); dying again counts as False.
    `grade_fn` is the per-item function (module-level, picklable); tests swap it."""

    WALL_MARGIN_S = 5
    STARTUP_TIMEOUT_S = 120

    def __init__(self, workers: int = 2, timeout_s: int = 5, max_chars: int = 512, *, grade_fn=grade_one):
        if workers < 1 or timeout_s < 1 or max_chars < 1:
            raise ValueError(f"MathGrader: workers, timeout_s and max_chars must be >= 1; "
                             f"got {workers}, {timeout_s}, {max_chars}")
        self.workers, self.timeout_s, self.max_chars = workers, int(timeout_s), max_chars
        self.grade_fn = grade_fn
        methods = multiprocessing.get_all_start_methods()
        # Never fork: the parent may hold threads (torch, NCCL) that a fork would copy half-way.
        self._context = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
        self._pool: ProcessPoolExecutor | None = None

    def __enter__(self) -> MathGrader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._discard_pool()

    def _ensure_pool(self) -> ProcessPoolExecutor:
        if self._pool is None:
            pool = ProcessPoolExecutor(self.workers, mp_context=self._context, initializer=_start_worker)
            self._pool = pool
            try:  # one task per worker starts them all now, so deadlines never include start-up
                warmups = [pool.submit(os.getpid) for _ in range(self.workers)]
                for future in warmups:
                    future.result(timeout=self.STARTUP_TIMEOUT_S)
            except Exception as error:  # a broken install, not a bad answer: say so
                self._discard_pool()
                raise RuntimeError(f"MathGrader: worker processes failed to start: {error!r}") from error
        return self._pool

    def _discard_pool(self) -> None:
        """Kill the workers (a stuck one ignores everything else) and drop the pool."""
        pool, self._pool = self._pool, None
        if pool is None:
            return
        # Private, but the only handle on the worker processes before Python 3.14's kill_workers().
        processes = list((getattr(pool, "_processes", None) or {}).values())
        for process in processes:
            process.kill()
        pool.shutdown(wait=True, cancel_futures=True)

    def _restart(self, queue: deque, in_flight: dict, retry: list) -> None:
        """Replace the workers; `retry` and the unfinished in-flight items go back to the front."""
        retry = retry + [(index, suspect) for index, suspect, _ in in_flight.values()]
        in_flight.clear()
        self._discard_pool()
        queue.extendleft(reversed(retry))

    def grade(self, predictions: list[str], golds: list[str]) -> list[bool]:
        if len(predictions) != len(golds):
            raise ValueError(f"MathGrader.grade: {len(predictions)} predictions but {len(golds)} golds")
        results = [False] * len(predictions)
        queue = deque((index, False) for index in range(len(predictions)))  # (index, suspect)
        in_flight: dict = {}  # future -> (index, suspect, deadline)
        while queue or in_flight:
            pool = self._ensure_pool()
            # At most one item per worker, so each starts when submitted and its deadline is fair;
            # a suspect runs alone so that a second crash is surely its own.
            while queue and len(in_flight) < self.workers:
                if queue[0][1] and in_flight or any(suspect for _, suspect, _ in in_flight.values()):
                    break
                index, suspect = queue.popleft()
                try:
                    future = pool.submit(self.grade_fn, predictions[index], str(golds[index]),
                                         max_chars=self.max_chars, timeout_s=self.timeout_s)
                except BrokenProcessPool:  # a worker died between tasks (the OOM killer, say)
                    self._restart(queue, in_flight, [(index, suspect)])
                    break
                in_flight[future] = (index, suspect, time.monotonic() + self.timeout_s + self.WALL_MARGIN_S)
            if not in_flight:
                continue
            next_deadline = min(deadline for _, _, deadline in in_flight.values())
            done, _ = wait(in_flight, timeout=max(0.0, next_deadline - time.monotonic()),
                           return_when=FIRST_COMPLETED)
            retry, restart = [], False
            for future in done:
                index, suspect, _ = in_flight.pop(future)
                try:
                    results[index] = bool(future.result())
                except BrokenProcessPool:
                    restart = True
                    if not suspect:  # perhaps a bystander: retry alone; a suspect dying again stays False
                        retry.append((index, True))
                except Exception:  # the grading function itself raised
                    results[index] = False
            now = time.monotonic()
            overdue = [future for future, (_, _, deadline) in in_flight.items() if deadline <= now]
            for future in overdue:
                del in_flight[future]  # stuck past its deadline: stays False
            if restart or overdue:
                self._restart(queue, in_flight, retry)
        return results

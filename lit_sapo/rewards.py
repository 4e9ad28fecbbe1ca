"""Rewards for math RL: answer extraction, math-verify accuracy graded in a bounded worker pool, a format reward.

Grading never stalls or kills training: every completion is graded in a worker process with a wall-clock bound,
and a timeout or a crash scores 0 and is counted (``RewardResult.timeouts`` / ``.errors``).

This module imports neither torch nor Lightning: spawned grading workers import it and must start fast.
"""

from __future__ import annotations

import concurrent.futures
import functools
import importlib
import logging
import math
import multiprocessing
import re
import threading
import time
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

from lit_sapo.bounded import BoundedCaller, CallTimedOut

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------- answer extraction

_BOX_OPEN = re.compile(r"\\(?:boxed|fbox)\s*\{")
# A number: thousands groups with commas ("1,234.5") or plain digits; a trailing sentence dot is not a decimal.
_NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?")


def find_boxes(text: str) -> list[tuple[int, int, str]]:
    """All complete top-level ``\\boxed{...}`` / ``\\fbox{...}`` as (start, end, content), braces balanced.

    An unclosed box (a truncated completion) is skipped; a box nested inside another counts as part of the outer.
    """
    boxes, pos = [], 0
    while (m := _BOX_OPEN.search(text, pos)) is not None:
        depth, i = 1, m.end()
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth:  # unbalanced: look for a later, complete box
            pos = m.end()
            continue
        boxes.append((m.start(), i, text[m.end() : i - 1]))
        pos = i
    return boxes


def extract_answer(text: str) -> str | None:
    """The model's final answer in ``text``.

    Rule: the content of the LAST complete ``\\boxed{...}`` (balanced braces, stripped); if there is none,
    the last number in the text with thousands commas removed ("1,234" -> "1234"); else None.
    """
    boxes = find_boxes(text)
    if boxes:
        return boxes[-1][2].strip()
    numbers = _NUMBER.findall(text)
    return numbers[-1].replace(",", "") if numbers else None


# ------------------------------------------------------------------------------------------------------ protocol


@runtime_checkable
class RewardFunction(Protocol):
    """What a reward function is: a ``name`` and a batch call returning one float per completion.

    ``completions``, ``answers`` (gold) and ``prompts`` are aligned lists (the caller repeats a prompt's gold and
    text for each of its G completions).
    """

    name: str

    def __call__(self, completions: list[str], answers: list[str], prompts: list[str]) -> list[float]: ...


@dataclass
class RewardScores:
    """One reward function's scores on a batch, with the completions that timed out or errored (scored 0)."""

    values: list[float]
    timeouts: int = 0
    errors: int = 0


# ------------------------------------------------------------------------------------------------- worker pool


class GradingPool:
    """A bounded pool of spawned worker processes that runs ``fn(*args)`` per item with a wall-clock bound.

    - ``spawn`` context: the parent holds torch/OpenMP threads, which ``fork`` would copy in a broken state.
    - The bound counts from the moment a worker picks the task up (pebble's rule), so worker start-up never
      times a task out; a task over ``timeout_s`` has its worker killed (pebble respawns it).
    - A task that raises ``TimeoutError`` counts as a timeout; any other exception or a dying worker as an error.
    - Created lazily, reused across calls, restarted when broken. ``workers=0`` runs in-process: no wall-clock
      guarantee at all (debugging only).
    """

    def __init__(self, workers: int = 2, timeout_s: float = 1.0, initializer: Callable[[], None] | None = None,
                 startup_grace_s: float = 60.0, respawn_grace_s: float = 10.0) -> None:
        if workers < 0 or timeout_s <= 0:
            raise ValueError(f"GradingPool needs workers >= 0 and timeout_s > 0, got {workers=}, {timeout_s=}")
        self.workers, self.timeout_s, self.initializer = workers, timeout_s, initializer
        # A safety net only, against a pool that cannot make progress (e.g. workers failing to start): a batch
        # gets startup_grace_s + (timeout_s + respawn_grace_s) per task per worker, then is abandoned.
        self.startup_grace_s, self.respawn_grace_s = startup_grace_s, respawn_grace_s
        self._pool: Any = None
        self._lock = threading.Lock()

    def _ensure_pool(self) -> Any:
        if self._pool is not None and not self._pool.active:
            self._stop()
        if self._pool is None:
            from pebble import ProcessPool  # imported here: in-process mode must work without it

            ctx = multiprocessing.get_context("spawn")
            self._pool = ProcessPool(max_workers=self.workers, initializer=self.initializer, context=ctx)
        return self._pool

    def _stop(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.stop()
            pool.join(timeout=10)

    def run(self, fn: Callable[..., Any], calls: Sequence[tuple]) -> list[tuple[Any, str]]:
        """Run ``fn(*args)`` for each args tuple; returns (value or None, status) with status ok|timeout|error."""
        if not calls:
            return []
        if self.workers == 0:
            return [_call_inline(fn, args) for args in calls]
        with self._lock:
            try:
                futures = self._schedule(fn, calls)
            except RuntimeError:  # pebble refuses a stopped/broken pool: start a fresh one once
                self._stop()
                futures = self._schedule(fn, calls)
            per_task = self.timeout_s + self.respawn_grace_s
            deadline = time.monotonic() + self.startup_grace_s + per_task * math.ceil(len(calls) / self.workers)
            out, restart = [], False
            for fut in futures:
                try:
                    out.append((fut.result(timeout=max(0.0, deadline - time.monotonic())), "ok"))
                except (TimeoutError, concurrent.futures.TimeoutError):
                    if not fut.done():  # our own deadline, not the task's: the pool is stuck
                        fut.cancel()
                        restart = True
                    out.append((None, "timeout"))
                except BrokenProcessPool:
                    restart = True
                    out.append((None, "error"))
                except Exception as exc:  # noqa: BLE001 - a crashing grader must not stop training
                    log.debug("grading task failed: %r", exc)
                    out.append((None, "error"))
            if restart:
                log.warning("grading pool broken or stuck; restarting it")
                self._stop()
            return out

    def _schedule(self, fn: Callable[..., Any], calls: Sequence[tuple]) -> list[Any]:
        pool = self._ensure_pool()
        return [pool.schedule(fn, args=args, timeout=self.timeout_s) for args in calls]

    def close(self) -> None:
        with self._lock:
            self._stop()

    def __enter__(self) -> GradingPool:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _call_inline(fn: Callable[..., Any], args: tuple) -> tuple[Any, str]:
    try:
        return fn(*args), "ok"
    except (TimeoutError, concurrent.futures.TimeoutError):
        return None, "timeout"
    except Exception as exc:  # noqa: BLE001
        log.debug("grading failed in-process: %r", exc)
        return None, "error"


# ------------------------------------------------------------------------------------------------- math accuracy


def _warm_math_verify() -> None:
    """Worker initializer: import and exercise math-verify/sympy before the first task's clock starts."""
    from math_verify import parse, verify

    verify(parse("$1$"), parse("\\boxed{1}"))


@functools.lru_cache(maxsize=4096)  # the G completions of a prompt share one gold
def _parse_gold(gold: str, timeout: int | None) -> list:
    from math_verify import parse

    # `$gold$` first: a raw LaTeX gold parses to nothing (\frac{\sqrt{2}}{2}) or to a fragment (3\sqrt{13} -> 3,
    # 57 of the 500 MATH500 golds); with `$...$` all 500 match their own boxed form. "1,234" parses either way.
    for candidate in (f"${gold}$", f"\\boxed{{{gold}}}", gold):
        parsed = parse(candidate, parsing_timeout=timeout, raise_on_error=True)
        if parsed:
            return parsed
    return [gold]  # unparseable gold: plain string comparison


def grade_math(completion: str, gold: str, timeout: int | None) -> float:
    """1.0 if ``completion``'s answer equals ``gold`` under math-verify, else 0.0. Runs in a grading worker.

    When the completion has a complete \\boxed{}, only the last box is graded (math-verify alone would merge
    several boxes into a set); otherwise math-verify extracts the answer from the whole text (LaTeX, then plain
    expressions). ``timeout`` is math-verify's own signal.alarm bound in whole seconds (None: off); its expiry
    is raised as TimeoutError so that the pool counts it.
    """
    from math_verify import parse, verify
    from math_verify.errors import TimeoutException

    try:
        gold_parsed = _parse_gold(str(gold).strip(), timeout)
        boxes = find_boxes(completion)
        text = f"\\boxed{{{boxes[-1][2]}}}" if boxes else completion
        pred = parse(text, parsing_timeout=timeout, raise_on_error=True)
        if not pred:
            return 0.0
        return float(verify(gold_parsed, pred, timeout_seconds=timeout, raise_on_error=True))
    except TimeoutException as exc:
        raise TimeoutError(str(exc)) from None


class MathAccuracy:
    """Accuracy reward: 1.0 when math-verify finds the completion's final answer equal to the gold, else 0.0.

    Each completion is graded in a worker process (``workers`` of them, spawned lazily, reused) with a wall-clock
    bound: math-verify's own alarm is set to ``ceil(timeout_s)`` seconds (it takes whole seconds) and the pool kills
    a worker that runs past ``timeout_s + 0.5`` s. The alarm usually fires first and leaves the worker alive; the
    kill covers C-level work that ignores signals (and costs a respawn). A timeout or a crash scores 0 and is counted. ``workers=0`` grades in-process: math-verify's alarm works only in
    the main thread and there is no hard bound, so a power tower can stall the caller (debugging only).
    """

    name = "accuracy"
    bounds_itself = True  # per-completion bound in its workers: RewardSet adds no batch bound on top

    def __init__(self, timeout_s: float = 1.0, workers: int = 2) -> None:
        self.timeout_s = timeout_s
        self.pool = GradingPool(workers=workers, timeout_s=timeout_s + 0.5, initializer=_warm_math_verify)

    def grade(self, completions: list[str], answers: list[str], prompts: list[str] | None = None) -> RewardScores:
        timeout: int | None = max(1, math.ceil(self.timeout_s))
        if self.pool.workers == 0 and threading.current_thread() is not threading.main_thread():
            timeout = None  # signal.alarm raises outside the main thread
        results = self.pool.run(grade_math, [(c, a, timeout) for c, a in zip(completions, answers)])
        return RewardScores(values=[float(v) if status == "ok" else 0.0 for v, status in results],
                            timeouts=sum(status == "timeout" for _, status in results),
                            errors=sum(status == "error" for _, status in results))

    def __call__(self, completions: list[str], answers: list[str], prompts: list[str] | None = None) -> list[float]:
        return self.grade(completions, answers, prompts).values

    def close(self) -> None:
        self.pool.close()

    def __enter__(self) -> MathAccuracy:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# ------------------------------------------------------------------------------------------------- format reward

# What may follow the final box and still count as "at the end": closing math/markdown and punctuation.
_TRAILER = re.compile(r"[\s$.!*)\]\\]*")
_ANSWER_LINE = re.compile(r"(?i)(final answer|answer\s*(is|:)|####)|\d")
_WORD = re.compile(r"\w+")


def format_score(text: str, min_reasoning_words: int = 3) -> float:
    """Format level of one completion (the paper's four levels):

    - 1.0: exactly one complete ``\\boxed{}``, at the end (only whitespace, ``$``, ``.``, ``!``, ``*``, ``)``,
      ``\\]`` after it) and at least ``min_reasoning_words`` words of reasoning before it;
    - 0.5: a complete ``\\boxed{}`` present but not that (several boxes, text after it, or no reasoning);
    - 0.25: no complete box, but the last non-empty line looks like an answer (contains a number,
      "answer is", "answer:", "final answer" or "####");
    - 0.0: anything else (empty, or no answer at all).
    """
    boxes = find_boxes(text)
    if len(boxes) == 1:
        start, end, _ = boxes[0]
        at_end = _TRAILER.fullmatch(text[end:]) is not None
        if at_end and len(_WORD.findall(text[:start])) >= min_reasoning_words:
            return 1.0
    if boxes:
        return 0.5
    lines = [line for line in text.splitlines() if line.strip()]
    if lines and _ANSWER_LINE.search(lines[-1]):
        return 0.25
    return 0.0


class FormatReward:
    """Format reward with levels 1 / 0.5 / 0.25 / 0; the rule is in :func:`format_score`."""

    name = "format"

    def __init__(self, min_reasoning_words: int = 3) -> None:
        self.min_reasoning_words = min_reasoning_words

    def __call__(self, completions: list[str], answers: list[str], prompts: list[str] | None = None) -> list[float]:
        return [format_score(c, self.min_reasoning_words) for c in completions]


# ------------------------------------------------------------------------------------------------------ loading

BUILTIN_REWARDS: dict[str, type] = {"accuracy": MathAccuracy, "format": FormatReward}


def _import_object(path: str) -> Any:
    module_name, _, attr = path.replace(":", ".").rpartition(".")
    if not module_name:
        raise ValueError(f"reward {path!r} is neither a built-in ({', '.join(BUILTIN_REWARDS)}) nor a dotted path")
    return getattr(importlib.import_module(module_name), attr)


def check_reward_names(names: list[str], field: str = "data.rewards") -> None:
    """Every reward name is a built-in or an importable object: checked when the data module is built (an import,
    no model), so a typo in a class path fails in one line instead of after the model has loaded."""
    for name in names:
        if name in BUILTIN_REWARDS:
            continue
        try:
            _import_object(name)
        except (ImportError, AttributeError, ValueError) as err:
            raise ValueError(f"{field}: cannot load reward {name!r} ({type(err).__name__}: {err}); use a built-in "
                             f"({', '.join(BUILTIN_REWARDS)}) or an importable 'package.module.Name'") from None


def load_reward(spec: Any) -> Any:
    """A reward function from a spec: an instance (returned as is), a built-in name ("accuracy", "format"),
    a dotted path ("pkg.mod.Class" or "pkg.mod:Class"; a class is instantiated with no arguments, a plain function
    is used as is), or a dict ``{"class_path": ..., "init_args": {...}}`` (class_path may be a built-in name)."""
    init_args: dict[str, Any] = {}
    if isinstance(spec, dict):
        unknown = set(spec) - {"class_path", "init_args"}
        if "class_path" not in spec or unknown:
            raise ValueError(f"a reward dict needs 'class_path' (and optional 'init_args'), got keys {sorted(spec)}")
        spec, init_args = spec["class_path"], dict(spec.get("init_args") or {})
    if not isinstance(spec, str):
        if callable(spec):
            return spec
        raise TypeError(f"cannot make a reward function from {spec!r}")
    target = BUILTIN_REWARDS.get(spec) or _import_object(spec)
    if isinstance(target, type):
        return target(**init_args)
    if init_args:
        raise ValueError(f"init_args given for {spec!r}, which is a function, not a class")
    return target


# ---------------------------------------------------------------------------------------------------- reward set


@dataclass
class RewardResult:
    """Scores of a batch: the weighted ``total`` per completion, each function's scores, and how many
    (completion, function) scores were zeroed by a timeout or an error."""

    total: list[float]
    per_function: dict[str, list[float]] = field(default_factory=dict)
    timeouts: int = 0
    errors: int = 0


class RewardCountError(ValueError):
    """A reward function returned a different number of scores than completions."""


class RewardSet:
    """Several named reward functions and their weights (default 1.0 each); the total is the weighted sum.

    ``rewards`` maps a name to a spec (see :func:`load_reward`) or a function. Shorthand: a number as the value
    means "the key is the spec, the value its weight" (``{"accuracy": 1.0, "format": 0.1}``). ``timeout_s`` and
    ``workers`` configure a built-in "accuracy" given by name. Math accuracy grades in worker processes (see
    :class:`MathAccuracy`); every other reward function, user ones included, runs in-process: one that raises or
    returns a non-finite score scores 0 on the whole batch, each of its completions counts as an error, a warning
    is logged once per function, and training goes on. One that returns the wrong number of scores is a bug in
    the function: :class:`RewardCountError` stops the run, naming the function, the counts and the batch. A function with a ``grade``
    method returning :class:`RewardScores` reports its own timeouts and errors.

    Every function except those that bound themselves (``bounds_itself = True``, as MathAccuracy) runs under a
    wall-clock bound of ``call_timeout_s`` per batch call (:class:`lit_sapo.bounded.BoundedCaller`): past it the
    batch scores 0 for that function, each completion counts as a timeout, and a warning is logged once.
    ``check`` is called while waiting and may raise to abandon the wait (the trainer's SIGTERM check).
    """

    def __init__(self, rewards: dict[str, Any], weights: dict[str, float] | None = None, timeout_s: float = 1.0,
                 workers: int = 2, call_timeout_s: float = 30.0, check: Callable[[], None] | None = None) -> None:
        if not rewards:
            raise ValueError("RewardSet needs at least one reward function")
        rewards, weights = dict(rewards), dict(weights or {})
        for name, spec in list(rewards.items()):
            if isinstance(spec, (int, float)) and not isinstance(spec, bool):
                rewards[name], weights[name] = name, weights.get(name, float(spec))
        unknown = set(weights) - set(rewards)
        if unknown:
            raise ValueError(f"weights name unknown rewards {sorted(unknown)}; rewards are {sorted(rewards)}")
        builtin_args = {"accuracy": {"timeout_s": timeout_s, "workers": workers}}
        self.functions = {
            name: load_reward({"class_path": spec, "init_args": builtin_args[spec]}
                        if isinstance(spec, str) and spec in builtin_args else spec)
            for name, spec in rewards.items()
        }
        self.weights = {name: float(weights.get(name, 1.0)) for name in rewards}
        # a class path as the key logs under the function's own short name (reward/<name>)
        for key in [k for k in self.functions if "." in k or ":" in k]:
            short = getattr(self.functions[key], "name", None) or key.replace(":", ".").rsplit(".", 1)[-1]
            if short not in self.functions:
                self.functions[short] = self.functions.pop(key)
                self.weights[short] = self.weights.pop(key)
        self._warned: set[str] = set()
        self.caller = BoundedCaller(call_timeout_s, check=check)

    def _call(self, name: str, fn: Any, completions: list[str], answers: list[str], prompts: list[str]) -> RewardScores:
        call = fn.grade if hasattr(fn, "grade") else fn
        if getattr(fn, "bounds_itself", False):
            out = call(completions, answers, prompts)
        else:
            out = self.caller.call(name, call, completions, answers, prompts)
        return out if isinstance(out, RewardScores) else RewardScores(values=[float(v) for v in out])

    def _score(self, name: str, fn: Any, completions: list[str], answers: list[str], prompts: list[str]) -> RewardScores:
        try:
            scores = self._call(name, fn, completions, answers, prompts)
            if len(scores.values) != len(completions):
                # a bug in the reward, not a bad completion: scoring 0 would silently train on nothing
                first = (prompts[0] if prompts else "")[-80:].replace("\n", " ")
                raise RewardCountError(f"reward {name!r} ({getattr(fn, '__qualname__', type(fn).__qualname__)}) "
                                       f"returned {len(scores.values)} scores for {len(completions)} completions "
                                       f"(batch of {len(set(prompts))} prompts, first ends {first!r}); it must "
                                       "return one score per completion")
            if not all(math.isfinite(v) for v in scores.values):
                raise ValueError("returned a non-finite score")
            return scores
        except RewardCountError:
            raise
        except CallTimedOut as exc:
            if name + "/timeout" not in self._warned:
                self._warned.add(name + "/timeout")
                log.warning("reward %r timed out (%s): scoring 0 and counting timeouts; warned once", name, exc)
            return RewardScores(values=[0.0] * len(completions), timeouts=len(completions))
        except Exception as exc:  # noqa: BLE001 - a broken reward must not stop training
            if name not in self._warned:
                self._warned.add(name)
                log.warning("reward %r failed (%r): scoring 0 and counting errors; warned once", name, exc)
            return RewardScores(values=[0.0] * len(completions), errors=len(completions))

    def __call__(self, completions: list[str], answers: list[str], prompts: list[str] | None = None) -> RewardResult:
        prompts = list(prompts) if prompts is not None else [""] * len(completions)
        if not len(completions) == len(answers) == len(prompts):
            raise ValueError(f"{len(completions)} completions, {len(answers)} answers, {len(prompts)} prompts")
        result = RewardResult(total=[0.0] * len(completions))
        for name, fn in self.functions.items():
            scores = self._score(name, fn, list(completions), list(answers), prompts)
            result.per_function[name] = scores.values
            result.timeouts += scores.timeouts
            result.errors += scores.errors
            w = self.weights[name]
            result.total = [t + w * v for t, v in zip(result.total, scores.values)]
        return result

    def close(self) -> None:
        for fn in self.functions.values():
            if callable(getattr(fn, "close", None)):
                fn.close()

    def __enter__(self) -> RewardSet:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

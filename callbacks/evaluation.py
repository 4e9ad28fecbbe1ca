"""BenchmarkEvaluation: math-benchmark accuracy with the run's own sampler, at the start, every N rollouts, at the end."""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from pathlib import Path

import torch
from lightning.pytorch import Callback
from lightning.pytorch.utilities import rank_zero_info

from lit_sapo.callbacks._dist import all_reduce, gather_objects, shard, world
from lit_sapo.rewards import MathAccuracy, extract_answer
from lit_sapo.tasks import PRESETS, PromptSource, load_prompts

# Training reads the gsm8k preset's train split; a benchmark is its test split. (A local path ignores splits.)
EVAL_SPLITS = {"gsm8k": "test"}



def majority_answer(answers: list[str | None]) -> str | None:
    """The most frequent extracted answer (exact string; None never votes); a tie goes to the one seen first."""
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return None
    best = max(counts.values())
    return next(a for a in answers if a is not None and counts[a] == best)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct (Chen et al. 2021): 1 - C(n-c, k) / C(n, k).

    The probability that k of the n samples, drawn without replacement, contain a correct one. Exact integer
    binomials, one correctly rounded division.
    """
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass_at_k: need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:  # every k-subset holds a correct sample
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def pass_ks(n: int) -> list[int]:
    """The k of the pass@k columns for n samples: 1, 2, 4, ... below n, and n itself."""
    ks = [1 << i for i in range(max(n, 1).bit_length()) if (1 << i) < n]
    return sorted(set(ks + [max(n, 1)]))


def _num_correct(row: dict) -> int:
    return int(round(sum(row["correct"])))


def summarize(rows: list[dict], *, n_samples: int | None = None, sync: bool = True, device=None) -> dict[str, float]:
    """pass@1, pass@k (k in :func:`pass_ks`), avg@n and maj@n of graded rows; n = `n_samples` (default: the
    longest row). Sums over this rank's rows are all-reduced as counts, not fractions: every rank must pass
    the same `n_samples` (a rank without rows still contributes zeros)."""
    local_n = max((len(r["correct"]) for r in rows), default=0)
    if n_samples is None:  # without it the ranks agree on n first
        n_samples = int(all_reduce(torch.tensor([local_n], dtype=torch.float64), "max", device=device)[0]) \
            if sync else local_n
    ks = [k for k in pass_ks(n_samples) if k > 1]
    sums = [sum(sum(r["correct"]) for r in rows), sum(len(r["correct"]) for r in rows),
            sum(sum(r["correct"]) / len(r["correct"]) for r in rows),
            sum(float(r["majority_correct"]) for r in rows), len(rows)]
    sums += [sum(pass_at_k(len(r["correct"]), _num_correct(r), min(k, len(r["correct"]))) for r in rows) for k in ks]
    counts = torch.tensor(sums, dtype=torch.float64)
    if sync:
        counts = all_reduce(counts, device=device)
    correct, samples, per_problem, majority, problems, *pass_sums = (float(c) for c in counts)
    if problems == 0:
        return {}
    out = {"pass@1": correct / samples}
    out.update({f"pass@{k}": total / problems for k, total in zip(ks, pass_sums)})
    out.update({f"avg@{n_samples}": per_problem / problems, f"maj@{n_samples}": majority / problems,
                "problems": problems})
    return out


def generate_and_grade(examples: list, indices: list[int], sampler, tokenizer, prompt_ids, grader, *,
                       n_samples: int, temperature: float | None, max_new_tokens: int | None, batch_size: int,
                       seed: int, rank: int = 0, top_p: float | None = None) -> list[dict]:
    """Sample `n_samples` completions for `examples[i]`, i in `indices` (-1 = padding: generated, not kept), and
    grade them: one row per problem, the rows of the per-problem JSONL. Shared by BenchmarkEvaluation and
    `lit-sapo eval`, so their files agree by construction.

    `prompt_ids(example) -> list[int]` renders a prompt; `grader.grade(texts, golds).values` scores texts.
    Each row: index, id, problem, gold, completions, extracted answers, per-sample correctness, majority answer
    (most frequent extracted string) and its correctness (graded as `\\boxed{majority}`).
    """
    k, texts = n_samples, []
    for b, start in enumerate(range(0, len(indices), batch_size)):
        chunk = [examples[max(i, 0)] for i in indices[start:start + batch_size]]
        gen = sampler.generate([prompt_ids(ex) for ex in chunk], k, seed=seed + 100_003 * b + rank,
                               temperature=temperature, max_new_tokens=max_new_tokens, top_p=top_p)
        texts += tokenizer.batch_decode(gen.completion_ids, skip_special_tokens=True)
    rows, to_grade, golds = [], [], []
    for j, i in enumerate(indices):
        if i < 0:
            continue
        ex, completions = examples[i], texts[j * k:(j + 1) * k]
        extracted = [extract_answer(c) for c in completions]
        majority = majority_answer(extracted)
        rows.append({"index": i, "id": ex.id, "problem": ex.problem, "gold": ex.answer,
                     "completions": completions, "extracted": extracted, "majority": majority})
        # grade the k completions and the majority answer (as a box) in one batch
        to_grade += completions + [f"\\boxed{{{majority}}}" if majority is not None else ""]
        golds += [ex.answer] * (k + 1)
    values = grader.grade(to_grade, golds).values if to_grade else []
    for n, row in enumerate(rows):
        graded = values[n * (k + 1):(n + 1) * (k + 1)]
        row["correct"] = [float(v) for v in graded[:k]]
        row["majority_correct"] = float(graded[k]) if row["majority"] is not None else 0.0
    return rows


def write_rows(path: str | Path, rows: list[dict], step: int | None = None) -> Path:
    """The per-problem JSONL: one row of :func:`generate_and_grade` a line, in index order, tagged with `step`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for row in sorted(rows, key=lambda r: r["index"]):
            f.write(json.dumps({"step": step, **row}) + "\n")
    return path


def benchmark_source(name: str, paths: dict[str, str] | None = None) -> PromptSource:
    """The evaluation source of a benchmark name: a preset's test split (shipped copy for gsm8k, math500,
    aime24), or the local file `paths[name]`."""
    paths = paths or {}
    if name not in PRESETS and name not in paths:
        raise ValueError(f"{name!r} is not a benchmark preset ({', '.join(PRESETS)}); give its file as a path")
    return PromptSource(name=name, path=paths.get(name), split=EVAL_SPLITS.get(name))


class BenchmarkEvaluation(Callback):
    """Accuracy on math benchmarks, generated by the run's own sampler with the current weights.

    Runs at the start of training (the baseline), after every `every_n_steps` rollout steps (0 = never) and at
    the end. Metrics go to every logger with step = the policy version v (rollouts trained so far): the same step
    as the training row of rollout v, which that policy sampled. Per benchmark `<name>`:

    - `eval/<name>/pass@1`: fraction of all problems x n_samples completions graded correct (the unbiased pass@1
      estimate from n_samples draws).
    - `eval/<name>/avg@k` (k = n_samples): mean over problems of each problem's accuracy over its k samples. Every
      problem has k samples, so it equals pass@1; both names are logged because papers quote both.
    - `eval/<name>/pass@j` for j = 2, 4, ... below k, and k: the unbiased estimate (Chen et al. 2021) of the
      chance that j samples hold a correct one, averaged over problems (:func:`pass_at_k`).
    - `eval/<name>/maj@k`: fraction of problems whose majority answer (most frequent `extract_answer` string
      among the k samples; no answer never votes; ties go to the first seen) is graded correct as `\\boxed{ans}`.
    - `eval/<name>/time_s`: wall seconds of that benchmark's evaluation (generation, grading, gathering).

    Grading: the datamodule's `accuracy` reward when it is a `MathAccuracy`, else a `MathAccuracy` of its own
    (the datamodule's grading timeout and workers). Each evaluation writes
    `<output_dir or trainer.log_dir>/eval/<name>_step<v>.jsonl`: per problem its id, problem, gold, completions,
    extracted answers, per-sample correctness, majority answer and its correctness.

    Several processes: problems are sharded by rank, the counts all-reduced (the logged numbers are what one
    process computes from the same completions) and rank 0 writes the file. Sampling seeds are fixed per batch
    and rank (not per step): successive evaluations share their sampling noise, so differences are the weights'.

    Args:
        every_n_steps: evaluate after every this many rollout steps (0 = only at the start and the end).
        benchmarks: preset names (gsm8k, math500, aime24, aime25) or names given in `paths`.
        n_samples: completions per problem (k).
        temperature: sampling temperature of the evaluation (0 = greedy).
        top_p: nucleus mass of the evaluation (None = the run's sampler's own; the R1 protocol uses 0.95).
        max_new_tokens: completion length cap of the evaluation.
        limit: keep the first `limit` problems of each benchmark (None = all).
        output_dir: folder of the eval/ JSONL files (None = trainer.log_dir).
        paths: benchmark name -> local file, e.g. {gsm8k: /data/gsm8k/test.jsonl}.
        sources: further benchmarks as full PromptSource entries (logged under their `name`).
        batch_size: problems per `generate` call (bounds HF memory; vLLM batches within a call).
        seed: base sampling seed.
    """

    def __init__(self, every_n_steps: int = 50, benchmarks: tuple[str, ...] | list[str] = ("gsm8k",),
                 n_samples: int = 1, temperature: float = 0.7, top_p: float | None = None,
                 max_new_tokens: int = 512, limit: int | None = None,
                 output_dir: str | None = None, paths: dict[str, str] | None = None,
                 sources: list[PromptSource] | None = None, batch_size: int = 64, seed: int = 1234) -> None:
        if every_n_steps < 0 or n_samples < 1 or max_new_tokens < 1 or batch_size < 1:
            raise ValueError("BenchmarkEvaluation: every_n_steps >= 0, n_samples, max_new_tokens, batch_size >= 1")
        if top_p is not None and not 0 < top_p <= 1:
            raise ValueError(f"BenchmarkEvaluation.top_p: must be in (0, 1] or None (the sampler's own), got {top_p}")
        if limit is not None and limit < 1:
            raise ValueError(f"BenchmarkEvaluation.limit: must be >= 1 or None, got {limit}")
        self.paths = dict(paths or {})
        self.sources: list[PromptSource] = []
        for name in benchmarks:
            try:
                self.sources.append(benchmark_source(name, self.paths))
            except ValueError as err:
                raise ValueError(f"BenchmarkEvaluation.benchmarks: {err} in `paths`, or a full entry in `sources`") \
                    from None
        self.sources += list(sources or [])
        names = [s.name for s in self.sources]
        if len(set(names)) != len(names):
            raise ValueError(f"BenchmarkEvaluation: benchmark names must be unique, got {names}")
        self.every_n_steps, self.n_samples, self.temperature, self.top_p = every_n_steps, n_samples, temperature, top_p
        self.max_new_tokens, self.limit, self.output_dir = max_new_tokens, limit, output_dir
        self.batch_size, self.seed = batch_size, seed
        self._examples: dict[str, list] = {}
        self._own_grader: MathAccuracy | None = None
        self._last_version: int | None = None
        self._out: Path | None = None
        self.last_metrics: dict[str, float] = {}

    # ---- hooks ----------------------------------------------------------------------------------------------
    def on_train_start(self, trainer, pl_module) -> None:
        self.evaluate(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        version = self._version(trainer, pl_module)
        if self.every_n_steps and version % self.every_n_steps == 0:
            self.evaluate(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if self._version(trainer, pl_module) != self._last_version:
            self.evaluate(trainer, pl_module)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if self._own_grader is not None:
            self._own_grader.close()
            self._own_grader = None

    @staticmethod
    def _version(trainer, pl_module) -> int:
        return int(getattr(pl_module, "weight_version", trainer.global_step))

    # ---- evaluation -----------------------------------------------------------------------------------------
    def evaluate(self, trainer, pl_module) -> dict[str, float]:
        """Evaluate every benchmark with the current weights; log and write files; return the metrics."""
        dm = trainer.datamodule
        if self._out is None:  # trainer.log_dir broadcasts: every rank must ask
            self._out = Path(self.output_dir or trainer.log_dir or trainer.default_root_dir) / "eval"
        dm.ensure_synced(pl_module)  # the sampler must generate with the weights being evaluated
        version = self._version(trainer, pl_module)
        metrics = {}
        for source in self.sources:
            t0 = time.perf_counter()
            rows = self._run(dm, source)
            scores = summarize(rows, n_samples=self.n_samples, device=pl_module.device)
            metrics.update({f"eval/{source.name}/{key}": value for key, value in scores.items() if key != "problems"})
            metrics[f"eval/{source.name}/time_s"] = time.perf_counter() - t0
            everyone = gather_objects(rows)  # all ranks call; rank 0 writes
            if trainer.is_global_zero:
                self._write(source.name, version, sorted((r for part in everyone for r in part),
                                                         key=lambda r: r["index"]))
        self._last_version = version
        self.last_metrics = metrics
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=version)
                logger.save()
            rank_zero_info("eval v%d: %s" % (version, ", ".join(f"{k}={v:.4g}" for k, v in metrics.items())))
        return metrics

    def _load(self, source: PromptSource) -> list:
        if source.name not in self._examples:
            self._examples[source.name] = load_prompts(source)[: self.limit]
        return self._examples[source.name]

    def _grader(self, dm):
        fn = (getattr(dm.reward_set, "functions", None) or {}).get("accuracy")
        if isinstance(fn, MathAccuracy):
            return fn
        if self._own_grader is None:
            self._own_grader = MathAccuracy(timeout_s=getattr(dm, "grading_timeout", 1.0),
                                            workers=getattr(dm, "grading_workers", 2))
        return self._own_grader

    def _run(self, dm, source: PromptSource) -> list[dict]:
        """Generate and grade this rank's shard of `source`; one row per problem (padding dropped)."""
        examples = self._load(source)
        rank, world_size = world()
        return generate_and_grade(
            examples, shard(len(examples), rank, world_size), dm.sampler, dm.tokenizer,
            lambda ex: dm.prompt_token_ids(ex)[-dm.max_prompt_length:],  # training's rendering
            self._grader(dm), n_samples=self.n_samples, temperature=self.temperature, top_p=self.top_p,
            max_new_tokens=self.max_new_tokens, batch_size=self.batch_size, seed=self.seed, rank=rank)

    def _write(self, name: str, version: int, rows: list[dict]) -> None:
        write_rows(self._out / f"{name}_step{version}.jsonl", rows, step=version)

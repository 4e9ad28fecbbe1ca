"""Prompt sources: presets, HF hub ids or local files with a field map; weighted mixtures; a synthetic arithmetic task.

Every stream is indexed: ``example(i)`` is a pure function of the seed and ``i``, so a resumed run (or another rank)
continues exactly where it should. No torch or Lightning import here.
"""

from __future__ import annotations

import dataclasses
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import numpy as np

log = logging.getLogger(__name__)

DEFAULT_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
SHORT_INSTRUCTION = "Put the final answer within \\boxed{}."
ANSWER_TRANSFORMS = ("none", "gsm8k", "boxed")
_LOCAL_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


@dataclass(frozen=True)
class Example:
    """One prompt with its gold answer; ``instruction``/``system_prompt`` come from its source."""

    id: str
    problem: str
    answer: str
    source: str
    instruction: str | None = DEFAULT_INSTRUCTION
    system_prompt: str | None = None


@dataclass
class PromptSource:
    """Where prompts come from. Fields left ``None`` take the preset's value when ``name`` is a preset."""

    name: str = "gsm8k"
    """A preset (gsm8k, math500, aime24, aime25, deepmath) or a free label for a custom source. gsm8k with
    ``split: test``, math500 and aime24 read the copies shipped in the package unless ``path`` or ``hub_id`` is set."""
    hub_id: str | None = None
    """HF hub dataset id, passed to ``datasets.load_dataset`` (a local dataset folder works too)."""
    config: str | None = None
    """Dataset config name (``name=`` of ``load_dataset``), e.g. "main" for openai/gsm8k."""
    split: str | None = None
    """Split to read; ignored for a single local file (the file is the split). Default "train"."""
    path: str | None = None
    """Local .jsonl/.json/.parquet/.csv file or a directory (data files or ``save_to_disk``); wins over hub_id."""
    problem_field: str | None = None
    """Column holding the problem text. Default "problem"."""
    answer_field: str | None = None
    """Column holding the gold answer. Default "answer"."""
    id_field: str | None = None
    """Column holding a row id; default: "id" if present, else "<name>-<split>-<row>"."""
    answer_transform: str | None = None
    """none | gsm8k (text after the last "####", stripped, commas removed) | boxed (last \\boxed{} of a solution)."""
    instruction: str | None = None
    """Appended to each problem when rendering; default :data:`DEFAULT_INSTRUCTION`; "" for none."""
    system_prompt: str | None = None
    """Optional system message when rendering."""
    shuffle: bool = False
    """Shuffle the rows (with ``seed``) before ``limit``."""
    seed: int = 0
    limit: int | None = None
    """Keep at most this many rows (after shuffling)."""
    cache_dir: str | None = None
    """``datasets`` cache folder; default: the datasets library's own."""

    def resolved(self) -> PromptSource:
        """A copy with preset values and generic defaults filled in. A shipped benchmark (gsm8k's test split,
        math500, aime24) with neither ``path`` nor ``hub_id`` set reads the file inside the package."""
        shipped = self.shipped_file()
        if shipped is not None:
            return dataclasses.replace(
                self, path=str(shipped), hub_id=None, config=None, split=self.split or PRESETS[self.name].split,
                problem_field=self.problem_field or "problem", answer_field=self.answer_field or "answer",
                answer_transform=self.answer_transform or "none",
                instruction=DEFAULT_INSTRUCTION if self.instruction is None else self.instruction)
        preset = PRESETS.get(self.name)
        values = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            # a local path replaces the preset's hub location (it would be ignored anyway)
            if value is None and preset is not None and not (self.path and f.name in ("hub_id", "config")):
                value = getattr(preset, f.name)
            values[f.name] = value
        generic = {"split": "train", "problem_field": "problem", "answer_field": "answer",
                   "answer_transform": "none", "instruction": DEFAULT_INSTRUCTION}
        for key, default in generic.items():
            if values[key] is None:
                values[key] = default
        return PromptSource(**values)

    def shipped_file(self) -> Path | None:
        """The package's own copy of this source, if it is a shipped benchmark and no other location is set."""
        if self.path is not None or self.hub_id is not None or self.name not in SHIPPED_SPLITS:
            return None
        wanted = SHIPPED_SPLITS[self.name]
        if wanted is not None and (self.split or PRESETS[self.name].split) != wanted:
            return None
        from lit_sapo import benchmarks

        return benchmarks.path(self.name)

    def validate(self, check_columns: bool = True) -> None:
        """Cheap checks to run before loading a model. Local data is opened (cached by ``datasets``) so a bad
        field map fails here; a hub dataset is only checked at load time (no network in a validation)."""
        src = self.resolved()
        if src.path is None and src.hub_id is None:
            presets = ", ".join(PRESETS)
            raise ValueError(f"prompt source {src.name!r} is not a preset ({presets}) and sets neither path nor hub_id")
        if src.answer_transform not in ANSWER_TRANSFORMS:
            raise ValueError(f"answer_transform={src.answer_transform!r}; choose one of {ANSWER_TRANSFORMS}")
        if src.limit is not None and src.limit <= 0:
            raise ValueError(f"limit must be positive or None, got {src.limit}")
        if src.path is not None:
            path = Path(src.path).expanduser()
            if not path.exists():
                raise ValueError(f"prompt source {src.name!r}: path {src.path} does not exist")
            if path.is_file() and path.suffix not in _LOCAL_BUILDERS:
                raise ValueError(f"prompt source {src.name!r}: {path.suffix} files unsupported; use {list(_LOCAL_BUILDERS)}")
            if path.is_file() and path.stat().st_size == 0:  # `datasets` fails obscurely on an empty file
                raise ValueError(f"prompt source {src.name!r} ({src.path}) is empty")
            if check_columns:
                table = _load_table(src)
                _resolve_fields(src, table.column_names)
                if len(table) == 0:
                    raise ValueError(f"prompt source {src.name!r} ({src.path}) is empty")


# The hub split names are the datasets' own (MATH-500 and aime25 ship only "test", aime_2024 only "train").
# gsm8k's test split, math500 and aime24 are read from the package (lit_sapo/benchmarks/data) unless `path` or
# `hub_id` is set; training splits, deepmath and aime25 come from the hub (or a local `path`).
PRESETS: dict[str, PromptSource] = {
    "gsm8k": PromptSource("gsm8k", hub_id="openai/gsm8k", config="main", split="train", problem_field="question",
                          answer_field="answer", answer_transform="gsm8k"),
    "math500": PromptSource("math500", hub_id="HuggingFaceH4/MATH-500", split="test"),
    "aime24": PromptSource("aime24", hub_id="HuggingFaceH4/aime_2024", split="train"),
    # math-ai/aime25: a test.jsonl with id/problem/answer, as read by public loaders; not checked on the hub here.
    "aime25": PromptSource("aime25", hub_id="math-ai/aime25", split="test"),
    "deepmath": PromptSource("deepmath", hub_id="zwhe99/DeepMath-103K", split="train", problem_field="question",
                             answer_field="final_answer"),
}
# preset -> the split whose rows ship with the package (None: the benchmark has one split, any name reads it)
SHIPPED_SPLITS = {"gsm8k": "test", "math500": None, "aime24": None}


def _load_table(src: PromptSource) -> Any:
    """The rows of a resolved source as a ``datasets.Dataset``."""
    import datasets

    if src.path is not None:
        path = Path(src.path).expanduser()
        if path.is_file():  # a local file loads in well under a second: no "Generating train split" bar
            bars_on = datasets.is_progress_bar_enabled()
            datasets.disable_progress_bars()
            try:
                return datasets.load_dataset(_LOCAL_BUILDERS[path.suffix], data_files=str(path), split="train",
                                             cache_dir=src.cache_dir)
            finally:
                if bars_on:
                    datasets.enable_progress_bars()
        if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
            table = datasets.load_from_disk(str(path))
            if isinstance(table, datasets.DatasetDict):
                if src.split not in table:
                    raise ValueError(f"prompt source {src.name!r}: split={src.split!r} not in {path}; splits: {list(table)}")
                table = table[src.split]
            return table
        return datasets.load_dataset(str(path), name=src.config, split=src.split, cache_dir=src.cache_dir)
    return datasets.load_dataset(src.hub_id, name=src.config, split=src.split, cache_dir=src.cache_dir)


def _resolve_fields(src: PromptSource, columns: Sequence[str]) -> tuple[str, str, str | None]:
    """(problem, answer, id) column names. A configured field that is missing falls back to the normalized
    ``problem``/``answer`` columns when present, so a preset pointed at a normalized JSONL just works."""
    chosen = []
    for setting, wanted, normalized in (("problem_field", src.problem_field, "problem"),
                                        ("answer_field", src.answer_field, "answer")):
        if wanted in columns:
            chosen.append(wanted)
        elif normalized in columns:
            chosen.append(normalized)
        else:
            raise ValueError(f"prompt source {src.name!r}: {setting}={wanted!r} is not a column; columns: {list(columns)}")
    id_field = src.id_field
    if id_field is not None and id_field not in columns:
        raise ValueError(f"prompt source {src.name!r}: id_field={id_field!r} is not a column; columns: {list(columns)}")
    if id_field is None and "id" in columns:
        id_field = "id"
    return chosen[0], chosen[1], id_field


def transform_answer(answer: Any, transform: str) -> str:
    """Post-process a gold answer: none (str, stripped), gsm8k (after the last "####", commas removed),
    boxed (content of the last complete \\boxed{}; the whole text if there is none)."""
    text = str(answer).strip()
    if transform == "gsm8k":
        return text.rpartition("####")[2].strip().replace(",", "")
    if transform == "boxed":
        from lit_sapo.rewards import find_boxes

        boxes = find_boxes(text)
        return boxes[-1][2].strip() if boxes else text
    if transform != "none":
        raise ValueError(f"answer_transform={transform!r}; choose one of {ANSWER_TRANSFORMS}")
    return text


def load_prompts(source: PromptSource | str) -> list[Example]:
    """Load a source (a PromptSource or a preset name) into Examples. Rows with an empty problem or answer are
    dropped with a warning; a source left empty is an error."""
    src = (PromptSource(name=source) if isinstance(source, str) else source).resolved()
    src.validate(check_columns=False)
    table = _load_table(src)
    problem_f, answer_f, id_f = _resolve_fields(src, table.column_names)
    table = table.select_columns(sorted({problem_f, answer_f} | ({id_f} if id_f else set())))  # skip big columns
    order = list(range(len(table)))
    if src.shuffle:
        random.Random(src.seed).shuffle(order)
    if src.limit is not None:
        order = order[: src.limit]
    # generated ids name the split, or the file (a single local file ignores `split`)
    label = Path(src.path).stem if src.path is not None and Path(src.path).is_file() else src.split
    examples, dropped = [], 0
    cols = (table.select(order) if order != list(range(len(table))) else table).to_dict()  # columns as lists
    for j, row_idx in enumerate(order):
        problem = str(cols[problem_f][j] or "").strip()
        raw_answer = cols[answer_f][j]
        answer = transform_answer("" if raw_answer is None else raw_answer, src.answer_transform)
        if not problem or not answer:
            dropped += 1
            continue
        ex_id = str(cols[id_f][j]) if id_f else f"{src.name}-{label}-{row_idx:05d}"
        examples.append(Example(ex_id, problem, answer, src.name, src.instruction, src.system_prompt))
    if dropped:
        log.warning("prompt source %r: dropped %d rows with an empty problem or answer", src.name, dropped)
    if not examples:
        where = src.path or f"{src.hub_id} (config={src.config}, split={src.split})"
        raise ValueError(f"prompt source {src.name!r} is empty: {where}")
    return examples


# ------------------------------------------------------------------------------------------------ arithmetic task


@dataclass
class ArithmeticTask:
    """Synthetic "What is a+b?" prompts, infinite and deterministic by index; easy enough for a 135M model.

    Operands are drawn uniformly from [min_value, max_value], operators from ``ops`` (+, -, *); the answer
    follows the usual precedence (* before + and -).
    """

    seed: int = 0
    min_value: int = 2
    max_value: int = 9
    num_terms: int = 2
    ops: tuple[str, ...] = ("+",)
    instruction: str | None = SHORT_INSTRUCTION
    system_prompt: str | None = None
    name: str = "arithmetic"

    def __post_init__(self) -> None:
        self.ops = tuple(self.ops)
        if self.num_terms < 2 or self.min_value > self.max_value or not self.ops or set(self.ops) - {"+", "-", "*"}:
            raise ValueError(f"bad ArithmeticTask settings: {self}")

    def example(self, index: int) -> Example:
        rng = random.Random(f"{self.seed}:{index}")  # str seeds hash with sha512: stable across processes
        nums = [rng.randint(self.min_value, self.max_value) for _ in range(self.num_terms)]
        ops = [rng.choice(self.ops) for _ in range(self.num_terms - 1)]
        expr = str(nums[0]) + "".join(f"{op}{n}" for op, n in zip(ops, nums[1:]))
        # precedence by hand (no eval): fold * into the current term, then sum the signed terms
        terms, signs = [nums[0]], [1]
        for op, n in zip(ops, nums[1:]):
            if op == "*":
                terms[-1] *= n
            else:
                terms.append(n)
                signs.append(1 if op == "+" else -1)
        answer = sum(s * t for s, t in zip(signs, terms))
        return Example(f"{self.name}-{self.seed}-{index}", f"What is {expr}?", str(answer), self.name,
                       self.instruction, self.system_prompt)


# ---------------------------------------------------------------------------------------------------- mixtures


class ExampleStream(Protocol):
    name: str

    def example(self, index: int) -> Example: ...


class _EpochStream:
    """A finite list of examples as an infinite stream: epoch e visits all rows in a permutation seeded by e."""

    def __init__(self, examples: list[Example], seed: tuple[int, ...], name: str) -> None:
        self.examples, self.seed, self.name, self._perm = examples, seed, name, (-1, None)

    def example(self, index: int) -> Example:
        epoch, pos = divmod(index, len(self.examples))
        if self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([*self.seed, epoch]).permutation(len(self.examples)))
        return self.examples[int(self._perm[1][pos])]


class PromptMixture:
    """A weighted, infinite, deterministic stream of examples from several sources: ``example(i)``.

    Sampling rule: index i draws its source with probability proportional to its weight, from a uniform number
    of block ``i // 4096`` of a ``numpy`` generator seeded by (seed, block). The k-th draw of a finite source
    reads its row ``perm_e[k mod n]`` with ``e = k // n`` and ``perm_e`` a permutation seeded by (seed, source,
    e): each source is visited in full, reshuffled every epoch. Synthetic streams (ArithmeticTask) read
    ``example(k)``. Random access is cheap: per-block source counts are cached.

    ``drop(example) -> bool`` (e.g. "prompt too long") removes rows of finite sources once, at construction;
    ``dropped`` counts them. Synthetic streams are not filtered.
    """

    BLOCK = 4096

    def __init__(self, sources: Sequence[PromptSource | ExampleStream | str], weights: Sequence[float] | None = None,
                 seed: int = 0, drop: Callable[[Example], bool] | None = None) -> None:
        weights = [1.0] * len(sources) if weights is None else [float(w) for w in weights]
        if not sources or len(weights) != len(sources) or min(weights) < 0 or sum(weights) <= 0:
            raise ValueError(f"PromptMixture needs one non-negative weight per source, got {weights} for {len(sources)}")
        self.seed = seed % 2**64  # numpy seed sequences take non-negative ints
        self.weights = [w / sum(weights) for w in weights]
        self._cum = np.cumsum(self.weights)
        self._cum[-1] = 1.0  # float round-off must not leave u in (cum[-1], 1)
        self.streams: list[Any] = []
        self.dropped = 0
        for k, src in enumerate(sources):
            if isinstance(src, (PromptSource, str)):
                examples = load_prompts(src)
                if drop is not None:
                    kept = [ex for ex in examples if not drop(ex)]
                    self.dropped += len(examples) - len(kept)
                    if not kept:
                        raise ValueError(f"prompt source {examples[0].source!r}: every example was dropped")
                    examples = kept
                self.streams.append(_EpochStream(examples, seed=(self.seed, k), name=examples[0].source))
            else:
                self.streams.append(src)
        self._block_counts: list[np.ndarray] = [np.zeros(len(sources), dtype=np.int64)]  # counts before block b
        self._block_cache: tuple[int, np.ndarray | None] = (-1, None)

    def _choices(self, block: int) -> np.ndarray:
        if self._block_cache[0] != block:
            u = np.random.default_rng([self.seed, block]).random(self.BLOCK)
            self._block_cache = (block, np.searchsorted(self._cum, u, side="right"))
        return self._block_cache[1]

    def source_of(self, index: int) -> int:
        """Which source index i draws from."""
        return int(self._choices(index // self.BLOCK)[index % self.BLOCK])

    def example(self, index: int) -> Example:
        if index < 0:
            raise IndexError(index)
        block, offset = divmod(index, self.BLOCK)
        while len(self._block_counts) <= block:
            b = len(self._block_counts) - 1
            counts = np.bincount(self._choices(b), minlength=len(self.streams))
            self._block_counts.append(self._block_counts[-1] + counts)
        choices = self._choices(block)
        s = int(choices[offset])
        k = int(self._block_counts[block][s] + np.count_nonzero(choices[:offset] == s))
        return self.streams[s].example(k)


# ---------------------------------------------------------------------------------------------------- rendering


def render_prompt(tokenizer: Any, problem: str, system_prompt: str | None = None,
                  instruction: str | None = DEFAULT_INSTRUCTION) -> str:
    """The text to generate from: the problem with the instruction on a new line, through the tokenizer's chat
    template (add_generation_prompt=True). Without a chat template: "[system\\n]problem\\ninstruction\\n"."""
    content = f"{problem}\n{instruction}" if instruction else problem
    if getattr(tokenizer, "chat_template", None):
        messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
            {"role": "user", "content": content}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return (f"{system_prompt}\n" if system_prompt else "") + content + "\n"


def render_example(tokenizer: Any, example: Example) -> str:
    """:func:`render_prompt` with the example's own instruction and system prompt."""
    return render_prompt(tokenizer, example.problem, example.system_prompt, example.instruction)

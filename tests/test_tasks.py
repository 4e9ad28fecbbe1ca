import json
from collections import Counter

import pytest

from lit_sapo.tasks import (
    DEFAULT_INSTRUCTION,
    PRESETS,
    SHORT_INSTRUCTION,
    ArithmeticTask,
    Example,
    PromptMixture,
    PromptSource,
    load_prompts,
    render_example,
    render_prompt,
    transform_answer,
)
from lit_sapo import benchmarks



def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


# ------------------------------------------------------------------------------------ shipped benchmarks


def test_shipped_benchmarks_load_offline_by_default():
    test = load_prompts(PromptSource("gsm8k", split="test"))
    assert len(test) == 1319 and test[0].id == "gsm8k-test-0000" and test[0].answer == "18"
    assert test[0].problem.startswith("Janet’s ducks lay 16 eggs per day") and test[0].source == "gsm8k"
    assert test[0].instruction == DEFAULT_INSTRUCTION
    assert all(e.answer.lstrip("-").isdigit() for e in test)  # "#### 1,234" was cut to "1234" in the file
    math500 = load_prompts("math500")
    assert len(math500) == 500 and math500[0].id == "test/precalculus/807.json"
    assert math500[0].answer == r"\left( 3, \frac{\pi}{2} \right)"
    aime = load_prompts("aime24")
    assert len(aime) == 30 and aime[0].id == "aime2024-I-1" and aime[0].answer == "204"
    assert [e.id for e in aime[14:16]] == ["aime2024-I-15", "aime2024-II-1"]
    for name in benchmarks.names():
        rows = [json.loads(line) for line in benchmarks.path(name).read_text().splitlines()]
        assert len(rows) == benchmarks.SIZES[name] and all(set(r) == {"id", "problem", "answer", "source"} for r in rows)
        assert len({r["id"] for r in rows}) == len(rows)
    assert "MIT" in (benchmarks.DATA_DIR / "NOTICE.md").read_text()
    with pytest.raises(ValueError, match="no shipped benchmark 'aime25'"):
        benchmarks.path("aime25")


def test_hub_stays_the_source_of_training_splits_and_other_benchmarks(tmp_path):
    assert PromptSource("gsm8k").resolved().path is None  # the training split: openai/gsm8k on the hub
    assert PromptSource("gsm8k").resolved().hub_id == "openai/gsm8k"
    for name in ("aime25", "deepmath"):
        assert PromptSource(name).resolved().path is None and PromptSource(name).shipped_file() is None
    # an explicit hub id or path wins over the shipped copy
    hub = PromptSource("math500", hub_id="HuggingFaceH4/MATH-500").resolved()
    assert (hub.path, hub.hub_id, hub.split) == (None, "HuggingFaceH4/MATH-500", "test")
    mine = _write_jsonl(tmp_path / "aime.jsonl", [{"problem": "p", "answer": "7"}])
    assert [e.answer for e in load_prompts(PromptSource("aime24", path=mine))] == ["7"]
    shipped = PromptSource("gsm8k", split="test").resolved()
    assert (shipped.path, shipped.hub_id, shipped.answer_transform) == (
        str(benchmarks.path("gsm8k")), None, "none")
    assert shipped.resolved() == shipped  # resolving twice changes nothing


def test_gsm8k_original_format_uses_preset_field_map_and_transform(tmp_path):
    rows = [{"question": "Q0?", "answer": "work <<1+1=2>>\n#### 18"}, {"question": "Q1?", "answer": "so\n#### 1,234"}]
    examples = load_prompts(PromptSource("gsm8k", path=_write_jsonl(tmp_path / "test.jsonl", rows)))
    assert [(e.problem, e.answer) for e in examples] == [("Q0?", "18"), ("Q1?", "1234")]
    assert examples[0].id == "gsm8k-test-00000"  # a single file: ids name the file, not the preset split


def test_shuffle_and_limit_are_deterministic():
    first5 = [e.id for e in load_prompts(PromptSource("aime24", limit=5))]
    assert first5 == [f"aime2024-I-{i}" for i in range(1, 6)]
    a = [e.id for e in load_prompts(PromptSource("aime24", shuffle=True, seed=3, limit=10))]
    b = [e.id for e in load_prompts(PromptSource("aime24", shuffle=True, seed=3, limit=10))]
    c = [e.id for e in load_prompts(PromptSource("aime24", shuffle=True, seed=4, limit=10))]
    assert a == b and a != c and len(set(a)) == 10 and a[:5] != first5


# ------------------------------------------------------------------------------------- custom local files


def test_parquet_and_csv_with_field_map(tmp_path):
    pd = pytest.importorskip("pandas")
    rows = {"q": ["What is 2+2?", "What is 3*3?"], "sol": [r"2+2 is \boxed{4}.", r"It is \boxed{9}"], "uid": [10, 11]}
    pd.DataFrame(rows).to_parquet(tmp_path / "train.parquet")
    pd.DataFrame(rows).to_csv(tmp_path / "train.csv", index=False)
    for name in ("train.parquet", "train.csv"):
        src = PromptSource("mine", path=str(tmp_path / name), problem_field="q", answer_field="sol", id_field="uid",
                           answer_transform="boxed", instruction="")
        src.validate()
        examples = load_prompts(src)
        assert examples == [Example("10", "What is 2+2?", "4", "mine", "", None),
                            Example("11", "What is 3*3?", "9", "mine", "", None)]


def test_field_map_errors_name_setting_and_columns(tmp_path):
    path = _write_jsonl(tmp_path / "x.jsonl", [{"question": "q1", "solution": "1"}])
    bad = PromptSource("mine", path=path, problem_field="question", answer_field="final")
    with pytest.raises(ValueError) as err:
        bad.validate()
    msg = str(err.value)
    assert "answer_field='final'" in msg and "['question', 'solution']" in msg and "\n" not in msg
    with pytest.raises(ValueError, match="answer_field='final'"):
        load_prompts(bad)
    with pytest.raises(ValueError, match="id_field='uid'"):
        PromptSource("mine", path=path, problem_field="question", answer_field="solution", id_field="uid").validate()
    # the default field names, absent, fail the same way
    with pytest.raises(ValueError, match="problem_field='problem'"):
        PromptSource("mine", path=path).validate()


def test_source_config_errors(tmp_path):
    with pytest.raises(ValueError, match="neither path nor hub_id"):
        PromptSource("my-data").validate()
    with pytest.raises(ValueError, match="does not exist"):
        PromptSource("gsm8k", path=str(tmp_path / "missing.jsonl")).validate()
    with pytest.raises(ValueError, match="answer_transform='latex'"):
        PromptSource("gsm8k", answer_transform="latex").validate()
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(ValueError, match=r"\.txt files unsupported"):
        PromptSource("mine", path=str(tmp_path / "x.txt")).validate()


def test_empty_source_errors(tmp_path):
    path = _write_jsonl(tmp_path / "rows.jsonl", [{"problem": "p", "answer": ""}, {"problem": "", "answer": "1"}])
    with pytest.raises(ValueError, match="prompt source 'blank' is empty"):
        load_prompts(PromptSource("blank", path=path))
    kept = _write_jsonl(tmp_path / "some.jsonl", [{"problem": "p", "answer": ""}, {"problem": "q", "answer": " 7 "}])
    assert [(e.problem, e.answer) for e in load_prompts(PromptSource("some", path=kept))] == [("q", "7")]


def test_hub_code_path_on_a_local_dataset_folder(tmp_path):
    # load_dataset(hub_id, name=config, split=split) on a folder laid out as a hub dataset repo with two configs
    repo = tmp_path / "repo"
    for config in ("main", "socratic"):
        (repo / config).mkdir(parents=True)
        for split in ("train", "test"):
            rows = [{"question": f"{config} {split} q{i}", "answer": f"work\n#### 1,00{i}"} for i in range(3)]
            _write_jsonl(repo / config / f"{split}.jsonl", rows)
    (repo / "README.md").write_text(
        "---\nconfigs:\n"
        + "".join(f"- config_name: {c}\n  data_files:\n  - split: train\n    path: {c}/train.jsonl\n"
                  f"  - split: test\n    path: {c}/test.jsonl\n" for c in ("main", "socratic"))
        + "---\n")
    src = PromptSource("gsm8k", hub_id=str(repo), config="socratic", split="test", cache_dir=str(tmp_path / "cache"))
    examples = load_prompts(src)
    assert [e.problem for e in examples] == ["socratic test q0", "socratic test q1", "socratic test q2"]
    assert [e.answer for e in examples] == ["1000", "1001", "1002"]
    assert examples[0].id == "gsm8k-test-00000"


def test_saved_to_disk_folder(tmp_path):
    datasets = pytest.importorskip("datasets")
    dd = datasets.DatasetDict({"test": datasets.Dataset.from_dict({"problem": ["a", "b"], "answer": ["1", "2"]})})
    dd.save_to_disk(str(tmp_path / "saved"))
    examples = load_prompts(PromptSource("saved", path=str(tmp_path / "saved"), split="test"))
    assert [(e.problem, e.answer, e.id) for e in examples] == [("a", "1", "saved-test-00000"), ("b", "2", "saved-test-00001")]
    with pytest.raises(ValueError, match=r"split='train' not in .*; splits: \['test'\]"):
        load_prompts(PromptSource("saved", path=str(tmp_path / "saved")))


def test_presets_and_transforms():
    gsm = PromptSource("gsm8k").resolved()
    assert (gsm.hub_id, gsm.config, gsm.split, gsm.problem_field, gsm.answer_field, gsm.answer_transform) == (
        "openai/gsm8k", "main", "train", "question", "answer", "gsm8k")
    deep = PromptSource("deepmath").resolved()
    assert (deep.hub_id, deep.problem_field, deep.answer_field) == ("zwhe99/DeepMath-103K", "question", "final_answer")
    assert PromptSource("gsm8k", split="test").resolved().split == "test"  # user values win over the preset
    assert set(PRESETS) == {"gsm8k", "math500", "aime24", "aime25", "deepmath"}
    assert transform_answer("a\n#### 1,234 ", "gsm8k") == "1234"
    assert transform_answer("72", "gsm8k") == "72"
    assert transform_answer(r"so \boxed{\frac{1}{2}} and", "boxed") == r"\frac{1}{2}"
    assert transform_answer(17, "none") == "17"


# ------------------------------------------------------------------------------------------------ mixtures


def test_mixture_deterministic_weighted_and_epoch_shuffled():
    aime, math500 = PromptSource("aime24"), PromptSource("math500")
    mix = PromptMixture([aime, math500], [0.3, 0.7], seed=7)
    again = PromptMixture([aime, math500], [3, 7], seed=7)  # weights are normalized
    other = PromptMixture([aime, math500], [0.3, 0.7], seed=8)
    seq = [mix.example(i) for i in range(10_000)]
    assert seq == [again.example(i) for i in range(10_000)]
    assert [e.id for e in seq[:50]] != [other.example(i).id for i in range(50)]
    share = Counter(e.source for e in seq)["aime24"] / len(seq)
    assert abs(share - 0.3) < 0.02
    # random access (a resumed run, another rank) gives the same example as the sequential stream
    fresh = PromptMixture([aime, math500], [0.3, 0.7], seed=7)
    assert fresh.example(9_999) == seq[9_999] and fresh.example(123) == seq[123]
    # within a source, each epoch visits every row once, in a new order
    aime_ids = [e.id for e in seq if e.source == "aime24"]
    assert len(set(aime_ids[:30])) == 30 and len(set(aime_ids[30:60])) == 30 and aime_ids[:30] != aime_ids[30:60]


def test_mixture_with_arithmetic_and_drop():
    gsm = PromptSource("gsm8k", split="test")
    mix = PromptMixture([gsm, ArithmeticTask(seed=1)], [0.5, 0.5], seed=0, drop=lambda e: len(e.problem) > 200)
    assert 0 < mix.dropped < 1319
    seq = [mix.example(i) for i in range(2000)]
    assert all(len(e.problem) <= 200 for e in seq)
    arith = [e for e in seq if e.source == "arithmetic"]
    assert arith[:3] == [ArithmeticTask(seed=1).example(k) for k in range(3)]  # the k-th draw reads example(k)
    with pytest.raises(ValueError, match="every example was dropped"):
        PromptMixture([gsm], drop=lambda e: True)
    with pytest.raises(ValueError, match="one non-negative weight per source"):
        PromptMixture([gsm], [0.5, 0.5])


def test_mixture_zero_weight_source_never_drawn():
    mix = PromptMixture([ArithmeticTask(seed=0), ArithmeticTask(seed=1, name="never")], [1.0, 0.0])
    assert {mix.example(i).source for i in range(5000)} == {"arithmetic"}


# ---------------------------------------------------------------------------------------------- arithmetic


def test_arithmetic_task():
    task = ArithmeticTask(seed=0)
    examples = [task.example(i) for i in range(500)]
    assert examples == [ArithmeticTask(seed=0).example(i) for i in range(500)]
    assert examples != [ArithmeticTask(seed=1).example(i) for i in range(500)]
    for ex in examples:
        a, b = ex.problem.removeprefix("What is ").removesuffix("?").split("+")
        assert 2 <= int(a) <= 9 and 2 <= int(b) <= 9 and int(ex.answer) == int(a) + int(b)
    assert {ex.problem for ex in examples} == {f"What is {a}+{b}?" for a in range(2, 10) for b in range(2, 10)}
    assert examples[0].instruction == SHORT_INSTRUCTION and examples[0].source == "arithmetic"
    mixed = ArithmeticTask(seed=0, num_terms=3, ops=["+", "-", "*"])
    for i in range(300):
        ex = mixed.example(i)
        expr = ex.problem.removeprefix("What is ").removesuffix("?")
        assert int(ex.answer) == eval(expr)  # test-only oracle; precedence must match Python's
    with pytest.raises(ValueError):
        ArithmeticTask(ops=("/",))


# ---------------------------------------------------------------------------------------------- rendering


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<eos>", "What", "is"]
    tk = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", eos_token="<eos>")


def test_render_prompt_chat_template_and_fallback(tokenizer):
    assert render_prompt(tokenizer, "What is 7+5?") == f"What is 7+5?\n{DEFAULT_INSTRUCTION}\n"  # no template
    assert render_prompt(tokenizer, "Q", system_prompt="S", instruction=None) == "S\nQ\n"
    tokenizer.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
                               "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    try:
        assert render_prompt(tokenizer, "What is 7+5?", instruction=SHORT_INSTRUCTION) == (
            "<|user|>What is 7+5?\nPut the final answer within \\boxed{}.<|end|><|assistant|>")
        assert render_prompt(tokenizer, "Q", system_prompt="Be brief.", instruction="") == (
            "<|system|>Be brief.<|end|><|user|>Q<|end|><|assistant|>")
        ex = ArithmeticTask(seed=0, system_prompt="S").example(0)
        assert render_example(tokenizer, ex) == (
            f"<|system|>S<|end|><|user|>{ex.problem}\n{SHORT_INSTRUCTION}<|end|><|assistant|>")
    finally:
        tokenizer.chat_template = None

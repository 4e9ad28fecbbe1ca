"""The `lit-sapo` CLI: every YAML recipe parses, bad settings fail in one line before any model is loaded."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lit_sapo import cli
from lit_sapo import benchmarks, models

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))
OVERLAYS = [p for p in CONFIGS if p.parent.name == "gates"]
BASES = [p for p in CONFIGS if p not in OVERLAYS]
TINY = ROOT / "tests" / "data" / "tiny.yaml"


def print_config(*args: str, capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        cli.main(["fit", *args, "--print_config"])
    assert exc.value.code in (0, None)
    return capsys.readouterr().out


@pytest.mark.parametrize("config", BASES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_base_config_parses(config, capsys):
    out = print_config("--config", str(config), capsys=capsys)
    assert "model:" in out and "data:" in out


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.stem)
def test_gate_overlays_combine_with_a_base(overlay, capsys):
    out = print_config("--config", str(ROOT / "configs" / "quickstart.yaml"), "--config", str(overlay), capsys=capsys)
    gate = "clip" if overlay.stem == "grpo" else overlay.stem
    assert f"gate: {gate}" in out


def test_interpolation_feeds_the_model_name_to_the_data(capsys):
    out = print_config("--config", str(TINY), "--model.model.name", "smollm2-135m-instruct", capsys=capsys)
    assert "tokenizer: smollm2-135m-instruct" in out


def _fail(args: list[str], capsys, monkeypatch) -> str:
    loaded = []
    monkeypatch.setattr(models, "load_policy", lambda *a, **k: loaded.append(a))  # must never be reached
    with pytest.raises(SystemExit) as exc:
        cli.main(["fit", "--config", str(TINY), *args])
    assert exc.value.code == 2
    assert not loaded
    err = capsys.readouterr().err.strip().splitlines()
    return err[-1]


@pytest.mark.parametrize("args, expected", [
    (["--model.tau_pos", "0"], "model.tau_pos"),
    (["--model.tau_neg", "-1"], "model.tau_neg"),
    (["--data.num_generations", "1"], "data.num_generations"),
    (["--model.gate", "bogus"], "model.gate"),
    (["--model.model.name", "/nope/model"], "model.model.name"),
    (["--model.aggregation", "mean"], "model.aggregation"),
    (["--model.rollout_correction", "tis"], "model.rollout_correction"),
    (["--model.model.attn_implementation", "flash"], "model.model.attn_implementation"),
    (["--model.pack_row_tokens", "0"], "model.pack_row_tokens"),
])
def test_bad_setting_fails_in_one_line_before_loading(args, expected, capsys, monkeypatch):
    line = _fail(args, capsys, monkeypatch)
    assert line.startswith("lit-sapo: error: ") and expected in line


def test_dataset_without_the_mapped_field(tmp_path, capsys, monkeypatch):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"question": "1+1?", "solution": "2"}) + "\n")
    line = _fail(["--data.sources", json.dumps([{"name": "mine", "path": str(data), "problem_field": "question",
                                                 "answer_field": "final"}])], capsys, monkeypatch)
    assert "data.sources[0]" in line and "answer_field" in line and "final" in line


def test_empty_dataset(tmp_path, capsys, monkeypatch):
    data = tmp_path / "empty.jsonl"
    data.write_text("")
    line = _fail(["--data.sources", json.dumps([{"name": "mine", "path": str(data)}])], capsys, monkeypatch)
    assert "data.sources[0]" in line and "empty" in line


def test_local_preset_source_is_accepted(capsys):
    out = print_config("--config", str(TINY), "--data.sources",
                       json.dumps([{"name": "gsm8k", "path": str(benchmarks.path("gsm8k"))}]), capsys=capsys)
    assert "gsm8k" in out


def test_console_script_runs():
    result = subprocess.run([sys.executable, "-m", "lit_sapo.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "fit" in result.stdout


def test_validate_scores_held_out_prompts(tmp_path):
    source = json.dumps([{"name": "gsm8k", "split": "test", "limit": 3}])  # the shipped copy, offline
    result = cli.main(["validate", "--config", str(TINY), "--trainer.default_root_dir", str(tmp_path),
                       "--trainer.logger.init_args.save_dir", str(tmp_path), "--data.val_sources", source,
                       "--data.val_batch_size", "2"])
    metrics = result.trainer.callback_metrics
    assert set(metrics) >= {"val/reward", "val/accuracy", "val/completion_len"}
    assert float(metrics["val/accuracy"]) == 0.0  # a random 2-layer model solves no GSM8K problem
    assert 1.0 <= float(metrics["val/completion_len"]) <= 8.0  # tiny.yaml caps completions at 8 tokens


def test_bad_input_of_every_kind_is_one_line_naming_the_setting_or_file(tmp_path, capsys, monkeypatch):
    import zipfile

    typo = tmp_path / "typo.yaml"
    typo.write_text("model:\n  gatee: erf\n")
    broken = tmp_path / "broken.yaml"
    broken.write_text("model:\n  gate: [erf\n")
    not_a_ckpt = tmp_path / "garbage.ckpt"
    not_a_ckpt.write_text("garbage\n")
    truncated = tmp_path / "truncated.ckpt"
    with zipfile.ZipFile(truncated, "w") as archive:
        archive.writestr("archive/data.pkl", b"not a pickle")
    cases = [
        (["--model.optimizer.lr", "-1e-3"], "model.optimizer.lr: must be a finite number > 0, got -0.001"),
        (["--model.optimizer.lr=-1e-3"], "model.optimizer.lr: must be a finite number > 0"),
        (["--ckpt_path", str(tmp_path / "missing.ckpt")], "missing.ckpt does not exist"),
        (["--ckpt_path", str(not_a_ckpt)], "garbage.ckpt is not a torch checkpoint"),
        (["--ckpt_path", str(truncated)], "truncated.ckpt cannot be loaded"),
        (["--data.rewards", '{"no_such_pkg.Reward": 1.0}'], "data.rewards: cannot load reward 'no_such_pkg.Reward'"),
        (["--data.sampler.init_args.max_new_tokens", "0"], "data.sampler.max_new_tokens: must be >= 1, got 0"),
        (["--config", str(typo)], "model.gatee: no such setting; did you mean model.gate?"),
        (["--model.gatee", "erf"], "model.gatee: no such setting; did you mean model.gate?"),
        (["--config", str(broken)], "broken.yaml: not valid YAML at line 3"),
        (["--config", str(tmp_path / "nope.yaml")], "--config: "),
    ]
    for args, expected in cases:
        line = _fail(args, capsys, monkeypatch)
        assert line.startswith("lit-sapo: error: ") and expected in line, (args, line)


def test_negative_values_join_their_option_and_typos_get_the_closest_setting():
    from lit_sapo.cli_checks import join_negative_values, one_line_parse_error

    assert join_negative_values(["--model.optimizer.lr", "-1e-3", "--x", "-2", "-c", "a.yaml"]) == \
        ["--model.optimizer.lr=-1e-3", "--x=-2", "-c", "a.yaml"]
    assert join_negative_values(["--a=1", "-5"]) == ["--a=1", "-5"]  # '--a=1' already has its value
    keys = ["trainer.max_steps", "trainer.max_time", "model.gate", "model.tau_pos"]
    assert one_line_parse_error("unrecognized arguments: --model.tau_pso 3", keys) == \
        "model.tau_pso: no such setting; did you mean model.tau_pos?"
    assert "see `lit-sapo fit --help`" in one_line_parse_error("Group 'model' does not accept option 'zzz'", keys)

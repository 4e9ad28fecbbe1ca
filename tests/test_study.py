"""lit-sapo sweep and lit-sapo plot on the tiny model: the runs finish, the summary matches each run's
metrics.csv, a second call re-runs nothing, and the plot command writes one PNG per metric."""

import csv
import math
from pathlib import Path

import pytest

from lit_sapo.plots import read_run
from lit_sapo.study import plot_cli, sweep

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "tests" / "data" / "tiny.yaml")


@pytest.mark.slow
def test_sweep_summary_resume_and_plot(tmp_path):
    args = ["--config", TINY, "--gates", "sigmoid,clip", "--taus", "1:1.05", "--seeds", "0",
            "--out", str(tmp_path), "--trainer.max_steps", "4"]
    assert sweep.main(args) == 0
    rows = list(csv.DictReader(open(tmp_path / "summary.csv")))
    assert [r["gate"] for r in rows] == ["sigmoid", "clip"]
    for row in rows:
        series = read_run(tmp_path / row["run"])
        rewards = [v for _, v in sorted(series["reward/mean"].items())]
        assert int(row["rollouts"]) == 2 == len(rewards)
        assert math.isclose(float(row["reward_final"]), rewards[-1])
        assert math.isclose(float(row["reward_mean"]), sum(rewards) / 2)
        # rollouts whose tokens all have A = 0 carry no gradient and log nan ratio statistics: the summary skips them
        var = [v for _, v in sorted(series["train/ratio_var"].items()) if math.isfinite(v)]
        expected = sum(var) / len(var) if var else math.nan
        assert (math.isnan(expected) and math.isnan(float(row["ratio_var"]))) or \
            math.isclose(float(row["ratio_var"]), expected, rel_tol=1e-9, abs_tol=1e-15)
        assert (tmp_path / row["run"] / "checkpoints" / "last.ckpt").exists()
    assert (tmp_path / "summary.md").read_text().count("\n") == 2 + len(rows)
    # a second call re-runs nothing: the finished runs' metrics files are untouched
    files = sorted(tmp_path.rglob("metrics.csv"))
    mtimes = [f.stat().st_mtime_ns for f in files]
    assert sweep.main(args) == 0
    assert sorted(tmp_path.rglob("metrics.csv")) == files and [f.stat().st_mtime_ns for f in files] == mtimes

    out = tmp_path / "png"
    assert plot_cli.main([str(tmp_path), "--out", str(out)]) == 0
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == 8 and all(p.stat().st_size > 1000 for p in pngs)  # 7 metrics and overview.png
    assert (out / "overview.png").stat().st_size > (out / "reward.png").stat().st_size


def test_clip_runs_take_eps_pairs_not_taus():
    specs = sweep.run_specs(["erf", "clip"], [(10.0, 12.0), (1.0, 1.05)], [(0.2, 0.28)], [0, 1])
    assert [s["name"] for s in specs if s["gate"] == "clip"] == ["clip-eps0.2_0.28-seed0", "clip-eps0.2_0.28-seed1"]
    assert len([s for s in specs if s["gate"] == "erf"]) == 4


def _probe(out, *extra):
    from lit_sapo.study import probe

    args = ["--config", TINY, "--gates", "sigmoid,softsign,clip", "--taus", "1:1.05", "--steps", "3",
            "--out", str(out), "--data.rewards", '{"tests.recorders.LengthReward": 1.0}',
            "--data.num_generations", "4", "--model.optimizer.lr", "0.05", *extra]
    assert probe.main(args) == 0
    return list(csv.DictReader(open(out / "probe.csv")))


def test_probe_records_each_gates_trust_region_on_one_rollout(tmp_path):
    rows = _probe(tmp_path / "a")
    assert [(r["gate"], int(r["step"])) for r in rows] == [(g, s) for g in ("sigmoid", "softsign", "clip")
                                                           for s in range(4)]
    by_gate = {g: [r for r in rows if r["gate"] == g] for g in ("sigmoid", "softsign", "clip")}
    for gate, series in by_gate.items():
        first = series[0]  # before any step: pi_0 itself, on-policy, every gate is plain policy gradient
        assert float(first["kl"]) == pytest.approx(0.0, abs=1e-6)
        assert float(first["ratio_mean"]) == pytest.approx(1.0, abs=1e-6) and float(first["eur"]) == pytest.approx(1.0)
        kls = [float(r["kl"]) for r in series]
        assert kls[-1] > 1e-4, gate  # the same rollout, stepped on three times, moves the policy away
    # the gates see the same rollout and start weights, so they agree on the first step and part ways after it
    first_step = [float(by_gate[g][1]["kl"]) for g in by_gate]  # f'(1) = 1 for all: the same first update
    assert max(first_step) == pytest.approx(min(first_step), rel=1e-4)
    assert by_gate["sigmoid"][-1]["kl"] != by_gate["clip"][-1]["kl"]
    assert (tmp_path / "a" / "probe.png").stat().st_size > 10_000
    # deterministic: a second probe writes the same numbers
    assert _probe(tmp_path / "b") == rows


def test_probe_refuses_a_bad_gate_before_loading_a_model(tmp_path):
    from lit_sapo.study import probe

    with pytest.raises(SystemExit, match="gate"):
        probe.main(["--config", TINY, "--gates", "sigmoidd", "--out", str(tmp_path)])

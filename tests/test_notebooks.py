"""Every notebook in notebooks/ runs top to bottom without an error (its own asserts check the values), and
shows what it is for: gate_family the admissibility table, Figure 1 and the saturation bands; compare_runs the
summary table and the comparison figure of the committed sweep fixture."""

import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
FIXTURE = ROOT / "tests" / "data" / "sweep_fixture"


def _execute(path: Path, tmp_path: Path, monkeypatch) -> tuple[str, list[str]]:
    monkeypatch.setenv("LIT_SAPO_SWEEP", str(FIXTURE))
    nb = nbformat.read(path, as_version=4)
    # run in a scratch folder: nothing a notebook writes lands in the repository
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.get("outputs", [])]
    text = "".join(out.get("text", "") + out.get("data", {}).get("text/plain", "") for out in outputs)
    images = [out["data"]["image/png"] for out in outputs if "image/png" in out.get("data", {})]
    return text, images


def test_every_notebook_is_tested():
    assert {p.name for p in NOTEBOOKS} == {"gate_family.ipynb", "compare_runs.ipynb"}


def test_gate_family_notebook(tmp_path, monkeypatch):
    text, images = _execute(ROOT / "notebooks" / "gate_family.ipynb", tmp_path, monkeypatch)
    assert "admissible=True" in text and "admissible=False" in text
    assert "band [1-c/tau, 1+c/tau]" in text and "[    0.8000,     1.2000]" in text  # sigmoid at tau 10: 1 ± 2/10
    assert len(images) == 1 and len(images[0]) > 50_000  # Figure 1 (base64 PNG)


def test_compare_runs_notebook_reads_the_sweep_fixture(tmp_path, monkeypatch):
    text, images = _execute(ROOT / "notebooks" / "compare_runs.ipynb", tmp_path, monkeypatch)
    assert f"{FIXTURE}: 6 runs" in text
    assert "summary.csv matches metrics.csv for 6 runs" in text
    assert "overview.png" in text and len(images) == 2  # the overview and the EUR panels

"""The docs stand alone: every relative link in README.md and docs/*.md resolves to a file of the repository (and
to a heading of it, for links with #anchor), no doc names a machine path, and the custom-metric example in
docs/callbacks.md is the code the callback tests run."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^(```|~~~)")


def prose_lines(path: Path) -> list[str]:
    """The lines of a markdown file outside fenced code blocks."""
    lines, in_fence = [], False
    for line in path.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line.lstrip()):
            in_fence = not in_fence
            continue
        if not in_fence:
            lines.append(line)
    return lines


def heading_slug(title: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    title = title.strip().lower().replace("`", "")
    title = re.sub(r"[^\w\- ]", "", title)
    return title.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    return {heading_slug(line.lstrip("#")) for line in prose_lines(path) if re.match(r"^#{1,6} ", line)}


def relative_links(path: Path) -> list[str]:
    links = []
    for line in prose_lines(path):
        line = re.sub(r"`[^`]*`", "", line)  # inline code is not a link
        links += [t for t in LINK.findall(line) if not re.match(r"^[a-z][a-z0-9+.-]*:", t)]
    return links


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves_to_a_file_and_heading(doc):
    broken = []
    for link in relative_links(doc):
        target, _, anchor = link.partition("#")
        file = (doc.parent / target).resolve() if target else doc
        if not file.is_relative_to(ROOT) or not file.exists():
            broken.append(f"{link}: no such file in the repository")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{link}: no heading #{anchor} in {file.relative_to(ROOT)}")
    assert not broken, f"{doc.relative_to(ROOT)}: " + "; ".join(broken)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_doc_names_a_machine_path(doc):
    text = doc.read_text(encoding="utf-8")
    # spelled in parts, so that this file does not name them either
    for forbidden in ("../" + "shared", "/" + "work/"):
        assert forbidden not in text, f"{doc.relative_to(ROOT)} names {forbidden!r}"


def test_slugs_follow_github():
    assert heading_slug("What `max_steps` counts") == "what-max_steps-counts"
    assert heading_slug("Sampler/trainer mismatch correction") == "samplertrainer-mismatch-correction"
    assert heading_slug("Precision: fp32 master weights, bf16 compute") == "precision-fp32-master-weights-bf16-compute"


def test_the_custom_metric_example_is_the_tested_code():
    text = (ROOT / "docs" / "callbacks.md").read_text(encoding="utf-8")
    block = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    example = block[block.index("class HighRatioFraction"):].strip()
    assert example in (ROOT / "tests" / "user_metrics.py").read_text(encoding="utf-8")


def test_every_doc_page_is_in_the_index_and_the_readme_links_the_index():
    linked = {Path(t.partition("#")[0]).name for t in relative_links(ROOT / "docs" / "index.md")}
    missing = [p.name for p in DOCS[1:] if p.name != "index.md" and p.name not in linked]
    assert not missing, f"docs/index.md does not link {missing}"
    assert "docs/index.md" in relative_links(ROOT / "README.md")

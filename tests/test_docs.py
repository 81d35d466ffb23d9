"""The project's docs stand alone: no citation of files outside the repository."""
from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def tracked_text_files() -> list[Path]:
    names = subprocess.run(["git", "ls-files", "*.md", "*.py", "*.toml", "Makefile"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split()
    return [ROOT / n for n in names if (ROOT / n).is_file()]


def test_no_file_cites_the_private_spec() -> None:
    spec = "vpt" + "-spec"  # spelled apart so that this file does not match itself
    offenders = [str(p.relative_to(ROOT)) for p in tracked_text_files() if spec in p.read_text(errors="replace")]
    assert not offenders, f"cite the paper or the official repository by name instead: {offenders}"


def test_training_docs_cite_the_paper_and_the_official_repository() -> None:
    text = (ROOT / "docs" / "training.md").read_text()
    assert "KMnsit/VPT" in text and "ECCV 2022" in text

"""Every shell and Python example in README.md and docs/*.md runs, or says why it does not.

Each fenced `bash`, `sh`, `console` or `python` block is preceded by a marker comment:
`<!-- example: run -->` or `<!-- example: skip (the reason) -->`. The runnable ones run in document order
(README.md, then docs/ by name) in one sandbox, as a reader following the docs would, against a real
`vpt-serve serve` process on a free loopback port with the tests' tiny ViT; the only rewrite is the
server's address (`127.0.0.1:8000` / `localhost:8000` become the test server's). The sandbox holds the
files the examples name (`flowers.zip`, `rose.jpg`, `data/digits/`, ...): small digits datasets. In
shell examples `curl` fails on an HTTP error status, so a 4xx answer fails the example.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.fixtures.digits import digit_images, make_digits_tree, make_digits_zip
from tests.fixtures.live_server import ServerProcess

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LANGS = {"bash": "shell", "sh": "shell", "shell": "shell", "console": "console", "python": "python", "py": "python"}
MARKER = re.compile(r"^<!--\s*example:\s*(run|skip)\s*(?:\((.+)\))?\s*-->$")
FENCE = re.compile(r"^```(\w*)\s*$")
ADDRESS = re.compile(r"(?:127\.0\.0\.1|localhost):8000")
CURL_FAILS = 'curl() { command curl --fail-with-body -sS "$@"; }\n'  # an HTTP error fails the example


@dataclass(frozen=True)
class Example:
    path: Path
    line: int                # of the opening fence, 1-based
    lang: str                # shell | console | python
    code: str
    action: str | None       # run | skip | None (no marker)
    reason: str | None

    @property
    def name(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def _marker(lines: list[str], fence: int) -> tuple[str | None, str | None]:
    for back in range(fence - 1, -1, -1):
        text = lines[back].strip()
        if text:
            m = MARKER.match(text)
            return (m.group(1), m.group(2)) if m else (None, None)
    return None, None


def examples() -> list[Example]:
    found = []
    for path in DOCS:
        lines = path.read_text().splitlines()
        i = 0
        while i < len(lines):
            m = FENCE.match(lines[i])
            if not m:
                i += 1
                continue
            end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
            if m.group(1) in LANGS:
                action, reason = _marker(lines, i)
                found.append(Example(path, i + 1, LANGS[m.group(1)], "\n".join(lines[i + 1:end]) + "\n", action,
                                     reason))
            i = end + 1
    return found


EXAMPLES = examples()
RUNNABLE = [e for e in EXAMPLES if e.action == "run"]


def test_every_example_says_whether_it_runs() -> None:
    unmarked = [e.name for e in EXAMPLES if e.action is None]
    assert not unmarked, f"add <!-- example: run --> or <!-- example: skip (why) --> before: {unmarked}"
    assert all(e.reason for e in EXAMPLES if e.action == "skip"), "every skip names its reason"
    assert len(RUNNABLE) >= 6, [e.name for e in RUNNABLE]


def test_unlabelled_blocks_hold_no_commands() -> None:
    """A shell command in an unlabelled block would escape the examples test: label it."""
    for path in DOCS:
        lines, inside, lang = path.read_text().splitlines(), False, ""
        for n, line in enumerate(lines, 1):
            m = FENCE.match(line)
            if m and not inside:
                inside, lang = True, m.group(1)
            elif line.startswith("```") and inside:
                inside = False
            elif inside and lang == "" and re.match(r"^\s*(\$ |\.venv/bin/|vpt |vpt-serve |curl |make |python )", line):
                pytest.fail(f"{path.relative_to(ROOT)}:{n} runs a command in an unlabelled block: {line.strip()}")


# -- the sandbox and the server ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The files the examples name: datasets of digits (3 classes, 10 images each) and single images."""
    root = tmp_path_factory.mktemp("docs-examples")
    small = {"classes": range(3), "per_class": 10}
    make_digits_zip(root / "flowers.zip", **small)
    make_digits_zip(root / "digits.zip", **small)
    for folder in ("data/flowers", "data/digits", "digits", "more_digits"):
        make_digits_tree(root / folder, seed=1 if folder == "more_digits" else 0, **small)
    for name, label, index in (("rose.jpg", 1, 40), ("tulip.jpg", 2, 41), ("seven.png", 2, 42),
                               ("one.png", 1, 43)):
        image = digit_images([label], per_class=1, skip=index)[0][1]
        image.save(root / name, format="JPEG" if name.endswith(".jpg") else "PNG")
    return root


@pytest.fixture(scope="module")
def docs_server(tmp_path_factory: pytest.TempPathFactory, tiny_vit_env: dict[str, str]) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("docs-server")
    proc = ServerProcess({**tiny_vit_env, "VPT_STORE": str(root / "store"), "VPT_FRONTEND_WORKERS": "1",
                          "VPT_MAX_WAIT_MS": "5"}, root / "server.log").start()
    yield proc
    proc.stop()


def _env(server: ServerProcess, tiny_vit_env: dict[str, str]) -> dict[str, str]:
    bin_dir = str(Path(sys.executable).parent)  # vpt and vpt-serve of this environment
    env = {k: v for k, v in os.environ.items() if not k.startswith("VPT_")}
    return {**env, **tiny_vit_env, "PATH": bin_dir + os.pathsep + env.get("PATH", ""),
            "VPT_BASE_URL": server.base_url, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}


def _commands(console: str) -> str:
    """The `$ ` lines of a transcript (with their continuation lines) as a script."""
    script, going_on = [], False
    for line in console.splitlines():
        if line.startswith("$ ") or going_on:
            script.append(line.removeprefix("$ "))
            going_on = line.rstrip().endswith("\\")
    return "\n".join(script) + "\n"


def _shown_words(console: str) -> list[str]:
    """The first word of each output line a transcript shows (not its commands, elisions or progress bars)."""
    words, going_on = [], False
    for line in console.splitlines():
        if line.startswith("$ ") or going_on:
            going_on = line.rstrip().endswith("\\")
            continue
        text = line.strip()
        if text and text != "..." and not text.startswith("["):
            words.append(text.split()[0])
    return words


@pytest.mark.parametrize("example", RUNNABLE, ids=[e.name for e in RUNNABLE])
def test_example_runs(example: Example, sandbox: Path, docs_server: ServerProcess,
                      tiny_vit_env: dict[str, str]) -> None:
    code = ADDRESS.sub(docs_server.base_url.removeprefix("http://"), example.code)
    env = _env(docs_server, tiny_vit_env)
    if example.lang == "python":
        argv = [sys.executable, "-c", code]
    else:
        argv = ["bash", "-e", "-c", CURL_FAILS + (_commands(code) if example.lang == "console" else code)]
    done = subprocess.run(argv, check=False, cwd=sandbox, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{example.name} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    if example.lang == "console":  # what the transcript shows, the program still prints
        printed = {line.split()[0] for line in (done.stdout + done.stderr).splitlines() if line.split()}
        missing = [w for w in _shown_words(code) if w not in printed]
        assert not missing, f"{example.name}: shown but not printed: {missing}\n{done.stdout[-3000:]}"

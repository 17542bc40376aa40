"""docs/quickstart.md, run as a newcomer would: every shell command of its ```bash blocks, in order, in a fresh
directory, with the installed ``adaptive`` on PATH; the recipe its ```yaml block names is saved under that
name; a ```text block that shows a ``$ command`` and its error output is run and compared. Only the
install commands, which build the environment this test already runs in, are not run."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "docs" / "quickstart.md"
INSTALL = ("python3 -m venv", "pip install")  # set-up commands: only in the Install section
FENCE = re.compile(r"^```(\w+)\n(.*?)^```", re.S | re.M)


def sections(text: str) -> list[tuple[str, str, str]]:
    """(section heading, fence language, block body) of every fenced block, in order."""
    out, heading, pos = [], "", 0
    for match in FENCE.finditer(text):
        headings = re.findall(r"^## (.+)$", text[pos:match.start()], re.M)
        heading = headings[-1] if headings else heading
        pos = match.end()
        out.append((heading, match.group(1), match.group(2)))
    return out


def commands(body: str) -> list[str]:
    """The commands of a bash block: backslash continuations joined, blank lines dropped."""
    joined = re.sub(r"\\\n\s*", " ", body)
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.strip().startswith("#")]


def is_install(command: str) -> bool:
    return command.startswith(INSTALL)


@pytest.fixture
def shell(tmp_path):
    bin_dir = Path(sys.executable).parent
    env = {k: v for k, v in os.environ.items() if not k.startswith("ADAPTIVE_")}
    # one thread per process, as conftest.py gives in-process tests: CI runs two test workers on two cores
    env.update(PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}", COLUMNS="200", OMP_NUM_THREADS="1")
    assert (bin_dir / "adaptive").exists(), "the adaptive console script is not installed next to this python"

    def run(command: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=300)

    return run


def test_the_quickstart_parses_into_blocks():
    blocks = sections(QUICKSTART.read_text())
    langs = [lang for _, lang, _ in blocks]
    assert langs.count("bash") >= 5 and "yaml" in langs and "text" in langs
    install = [c for heading, lang, body in blocks if lang == "bash" for c in commands(body) if is_install(c)]
    assert install, "the Install section no longer shows how to install"
    outside = [c for heading, lang, body in blocks if lang == "bash" and heading != "Install"
               for c in commands(body) if is_install(c)]
    assert not outside, f"set-up commands outside the Install section would be skipped: {outside}"


@pytest.mark.slow
def test_every_quickstart_command_runs_in_a_fresh_directory(shell, tmp_path):
    ran = 0
    for heading, lang, body in sections(QUICKSTART.read_text()):
        if lang == "yaml":
            first = body.splitlines()[0]
            assert first.startswith("# ") and first.endswith(".yaml"), f"a yaml block without its file name: {first}"
            (tmp_path / first[2:].strip()).write_text(body)
        elif lang == "bash":
            for command in commands(body):
                if heading == "Install" and is_install(command):
                    continue
                done = shell(command)
                assert done.returncode == 0, f"{command!r} failed ({done.returncode}):\n{done.stderr[-3000:]}"
                assert "Traceback" not in done.stderr, f"{command!r}:\n{done.stderr[-3000:]}"
                ran += 1
        elif lang == "text" and body.startswith("$ "):
            check_shown_output(shell, body)
            ran += 1
    assert ran >= 12


def check_shown_output(shell, body: str) -> None:
    """A ``$ command`` followed by its output: the command gives that output (``...`` elides the rest of
    a line) and, when it shows an error, exits with status 2."""
    command, *expected = body.rstrip("\n").splitlines()
    done = shell(command[2:])
    output = done.stdout + done.stderr
    if any(line.startswith("error:") for line in expected):
        assert done.returncode == 2, f"{command}: exit {done.returncode}\n{output}"
    lines = [" ".join(line.split()) for line in output.splitlines()]
    for line in expected:
        shown = " ".join(line.split("...")[0].split())
        assert any(got.startswith(shown) for got in lines), f"{command}: no line starts with {shown!r} in\n{output}"
    assert shlex.split(command[2:])[0] == "adaptive"

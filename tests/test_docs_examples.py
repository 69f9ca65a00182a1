"""Every documentation example runs verbatim.

The rule (documentation authors: write examples that satisfy it):

* Files: ``README.md``, ``analyses/README.md`` and every ``docs/**/*.md`` (found by glob, so a new page is
  picked up without touching this test).
* Python: every ```` ```python ```` block. The blocks of one file run in order in one fresh interpreter, like
  a notebook (a later block may use names an earlier block defined), with an empty temporary folder as the
  working directory (so relative outputs such as ``runs/`` land there). Examples use the built-in models
  (``HookedVLM.from_pretrained("tiny-qwen2.5-vl")``), the synthetic samples and files they write themselves;
  a comment may say how to swap in a real checkpoint. A failure names the file and the block's first line.
* Bash: in every ```` ```bash ```` / ```` ```sh ```` / ```` ```console ```` block, each command (lines joined
  at trailing backslashes, then split at ``&&`` and ``;``) that starts with ``hooked-vlm`` runs, in order, in
  that file's working folder, after the file's python blocks and in the same interpreter, through
  ``hooked_vlm.cli.main`` (the console script's entry point, see test_cli's ``test_entry_point_is_declared``;
  this saves one torch import per command); everything else (venv creation, ``pip install``,
  ``python -m pytest``, ``cd``) is set-up and is skipped. Each must exit 0.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<lang>[\w+-]*)[^\n]*\n(?P<body>.*?)^(?P=indent)```[ \t]*$", re.M | re.S)
SHELL_LANGS = {"bash", "sh", "shell", "console"}


def doc_files() -> list[Path]:
    files = [REPO / "README.md", REPO / "analyses" / "README.md", *sorted((REPO / "docs").glob("**/*.md"))]
    return [f for f in files if f.is_file()]


def blocks(path: Path, langs: set[str]) -> list[tuple[int, str]]:
    """(first line number, dedented body) of each fenced block in one of ``langs``."""
    text = path.read_text()
    found = []
    for m in FENCE.finditer(text):
        if m.group("lang").lower() in langs:
            indent = len(m.group("indent"))
            body = "".join(line[indent:] if line[:indent].strip() == "" else line for line in m.group("body").splitlines(True))
            found.append((text.count("\n", 0, m.start()) + 2, body))
    return found


def cli_commands(body: str) -> list[list[str]]:
    """The ``hooked-vlm ...`` commands of a shell block (see the module docstring)."""
    joined = re.sub(r"\\\n", " ", body)
    commands = []
    for line in joined.splitlines():
        line = line.strip().removeprefix("$ ")
        if not line or line.startswith("#"):
            continue
        for part in re.split(r"&&|;", line):
            words = shlex.split(part, comments=True)
            if words and words[0] == "hooked-vlm":
                commands.append(words[1:])
    return commands


DRIVER = """
import linecache, sys
blocks = {blocks!r}
namespace = {{"__name__": "__main__"}}
for line, code in blocks:
    name = f"{path}:{{line}}"
    linecache.cache[name] = (len(code), None, code.splitlines(True), name)  # nnsight reads a trace's source back
    try:
        exec(compile(code, name, "exec"), namespace)
    except BaseException:
        print(f"DOC EXAMPLE FAILED: {path}, the block starting at line {{line}}", file=sys.stderr)
        raise
commands = {commands!r}
if commands:
    from hooked_vlm import cli
for args in commands:
    rc = cli.main(args)
    if rc != 0:
        sys.exit(f"DOC EXAMPLE FAILED: {path}: hooked-vlm {{' '.join(args)}} exited {{rc}}")
"""


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MPLBACKEND="Agg", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env


FILES = [f.relative_to(REPO).as_posix() for f in doc_files()]


def test_the_rule_finds_the_documentation():
    assert {"README.md", "analyses/README.md"} <= set(FILES) and any(f.startswith("docs/") for f in FILES)
    assert cli_commands("python3 -m venv .venv && . .venv/bin/activate && pip install -e . && hooked-vlm inspect \\\n  --model tiny-clip\n"
                        "# hooked-vlm skipped\npython -m pytest -q; hooked-vlm models") == [["inspect", "--model", "tiny-clip"], ["models"]]
    sample = "text\n```python\nx = 1\n```\n  ```python\n  y = 2\n  ```\n```bash\nhooked-vlm models\n```\n"
    probe = REPO / "tests" / ".doc_probe.md"
    try:
        probe.write_text(sample)
        assert blocks(probe, {"python"}) == [(3, "x = 1\n"), (6, "y = 2\n")]
    finally:
        probe.unlink()


@pytest.mark.slow
@pytest.mark.parametrize("doc", FILES)
def test_documentation_examples_run(doc, tmp_path):
    path = REPO / doc
    python = blocks(path, {"python", "py"})
    shell = [cmd for _, body in blocks(path, SHELL_LANGS) for cmd in cli_commands(body)]
    assert python or shell or not blocks(path, {"python", "py", *SHELL_LANGS}), doc
    if python or shell:
        driver = tmp_path / "_run_doc_examples.py"
        driver.write_text(DRIVER.format(blocks=python, commands=shell, path=doc))
        run = subprocess.run([sys.executable, str(driver)], cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, f"{doc}:\n{run.stderr[-4000:]}"

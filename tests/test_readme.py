"""Every command block of README.md (```sh, ```bash, ```console) runs as written against a real server, or
says why it cannot in the suite with `<!-- readme-test: skip (REASON) -->` on the line before it.

The blocks of one section run in order in one `bash -euo pipefail` session (later blocks use the files
earlier ones made), in a fresh folder, with `headserve` on the PATH and HEADSERVE_ADDRESS and
HEADSERVE_API_KEY pointing at the suite's server under a tenant of their own."""

from __future__ import annotations

import dataclasses
import os
import pathlib
import re
import subprocess
import sys

import pytest

from conftest import make_tenant

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"
COMMAND_LANGUAGES = {"sh", "bash", "shell", "console"}
SKIP = re.compile(r"<!--\s*readme-test:\s*skip\b(?:\s*\((?P<reason>.*)\))?\s*-->")
FENCE = re.compile(r"^```(?P<lang>[\w+-]*)\s*$")
# What the suite cannot run; a block that needs one of these must carry a skip marker saying so.
NEEDS = {
    r"\bmake\s+(serve|test)\b": "starts a server or the suite",
    r"\bheadserve\s+serve\b": "starts a server",
    r"\bgrpcurl\b": "grpcurl",
    r"\bdocker\b|\bdocker-compose\b": "Docker",
    r"\bkubectl\b|\bhelm\b": "a Kubernetes cluster",
    r"\bnvidia-smi\b": "a GPU",
}
# A block that runs must reach the server through HEADSERVE_ADDRESS, not an address of its own.
HARD_CODED_ADDRESS = re.compile(r"--address\b|\b(localhost|127\.0\.0\.1|0\.0\.0\.0):\d+")


@dataclasses.dataclass
class Block:
    line: int  # of the opening fence, 1-based
    section: str
    language: str
    code: str
    skip: str | None  # the reason, when marked to skip ("" when the marker gives none)

    def script(self) -> str:
        """The commands: a console block's `$ ` lines (and their continuations), else the whole block."""
        if self.language != "console":
            return self.code
        commands, continued = [], False
        for line in self.code.splitlines():
            if continued or line.startswith("$ "):
                commands.append(line if continued else line[2:])
                continued = line.rstrip().endswith("\\")
        return "\n".join(commands) + "\n"


def readme_blocks(text: str) -> tuple[list[Block], list[int]]:
    """The command blocks, and the lines of skip markers that do not stand right before one."""
    lines = text.splitlines()
    blocks, dangling = [], []
    section, pending, i = "", None, 0
    while i < len(lines):
        line = lines[i]
        fence = FENCE.match(line)
        if line.startswith("## "):
            section = line[3:].strip()
        if (marker := SKIP.search(line)) is not None:
            if pending is not None:
                dangling.append(pending[0])
            pending = (i + 1, (marker.group("reason") or "").strip())
            i += 1
            continue
        if fence is not None:
            end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith("```")), len(lines))
            language = fence.group("lang").lower()
            if language in COMMAND_LANGUAGES:
                blocks.append(Block(i + 1, section, language, "\n".join(lines[i + 1 : end]) + "\n",
                                    pending[1] if pending else None))
            elif pending is not None:
                dangling.append(pending[0])
            pending, i = None, end + 1
            continue
        if line.strip() and pending is not None:  # the marker must be the line before the fence
            dangling.append(pending[0])
            pending = None
        i += 1
    if pending is not None:
        dangling.append(pending[0])
    return blocks, dangling


BLOCKS, DANGLING = readme_blocks(README.read_text(encoding="utf-8"))
RUNNABLE = [b for b in BLOCKS if b.skip is None]
SECTIONS = list(dict.fromkeys(b.section for b in RUNNABLE))


def test_readme_has_command_blocks_that_run():
    assert RUNNABLE, "README.md has no command block the suite runs"
    assert any("headserve create" in b.code for b in RUNNABLE), "the CLI walk-through is not run"


def test_every_skipped_block_says_why():
    missing = [f"README.md:{b.line}" for b in BLOCKS if b.skip is not None and len(b.skip) < 8]
    assert not missing, f"skip markers without a reason (<!-- readme-test: skip (REASON) -->): {missing}"
    assert not DANGLING, f"skip markers not on the line right before a command block: README.md:{DANGLING}"


@pytest.mark.parametrize("block", RUNNABLE, ids=lambda b: f"line{b.line}")
def test_blocks_that_run_need_nothing_the_suite_lacks(block):
    for pattern, what in NEEDS.items():
        assert not re.search(pattern, block.code), (
            f"README.md:{block.line} needs {what}: mark it with <!-- readme-test: skip (needs {what}) --> on "
            "the line before the block, or change it so it runs against a given server")
    assert not HARD_CODED_ADDRESS.search(block.code), (
        f"README.md:{block.line} names an address; let the CLI take $HEADSERVE_ADDRESS (or its default)")


@pytest.fixture(scope="module")
def readme_tenant(server):
    """A tenant of its own, so the README's task ids (topics, ...) meet no other test's."""
    return make_tenant(server, "readme")


# `bash -e` does not stop at a failing command inside `a && b` (the README's `headserve add topics --text
# more.csv && headserve train topics` failed silently that way): every `headserve` run that fails is
# also written down, and fails the section unless its blocks expect a failure (a line `! command`).
WRAPPER = """\
headserve() {
  local status=0
  command headserve "$@" || status=$?
  if [ "$status" -ne 0 ]; then printf 'headserve %s: exit %s\\n' "$*" "$status" >> "$README_FAILURES"; fi
  return "$status"
}
"""


def run_blocks(blocks: list[Block], cwd: pathlib.Path,
               env: dict[str, str]) -> tuple[int, str, str, list[str]]:
    """Runs the blocks in order in one bash session; returns its exit status, stdout, stderr and the
    headserve commands that failed."""
    failures = cwd / ".readme-failures"
    script = "set -euo pipefail\n" + WRAPPER + "".join(
        f"echo '--- README.md:{b.line}' >&2\n{b.script()}" for b in blocks)
    env = {
        **env,
        "PATH": f"{pathlib.Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        "README_FAILURES": str(failures),
        "COLUMNS": "100",
    }
    result = subprocess.run(["bash", "-c", script], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=240)
    failed = failures.read_text().splitlines() if failures.exists() else []
    failures.unlink(missing_ok=True)
    return result.returncode, result.stdout, result.stderr, failed


def test_a_failing_command_inside_an_and_list_fails_its_section(tmp_path):
    """The trap the walk-through had: a file never made, in `a && b`, where bash -e goes on."""
    code = "headserve add topics --text more.csv && headserve train topics\necho after\n"
    block = Block(1, "s", "sh", code, None)
    status, out, _, failed = run_blocks([block], tmp_path, {**os.environ, "HEADSERVE_ADDRESS": "127.0.0.1:9"})
    assert status == 0 and "after" in out  # what bash -e alone lets through
    assert failed == ["headserve add topics --text more.csv: exit 2"]


@pytest.mark.parametrize("section", SECTIONS)
def test_readme_section_runs_as_written(section, server, readme_tenant, tmp_path):
    blocks = [b for b in RUNNABLE if b.section == section]
    for block in blocks:  # never start what the suite cannot run (a server, Docker): fail instead
        test_blocks_that_run_need_nothing_the_suite_lacks(block)
    env = {**os.environ, "HEADSERVE_ADDRESS": server.address, "HEADSERVE_API_KEY": readme_tenant.api_key}
    status, out, err, failed = run_blocks(blocks, tmp_path, env)
    assert status == 0, (f"README.md section {section!r} failed (exit {status}):\n"
                         f"--- stdout (end)\n{out[-3000:]}\n--- stderr (end)\n{err[-3000:]}")
    expects_failures = any(line.startswith("! ") for b in blocks for line in b.script().splitlines())
    assert expects_failures or not failed, f"README.md section {section!r}: {failed}\n{err[-3000:]}"

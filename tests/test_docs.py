"""The docs cannot go stale: every command README.md and docs/*.md show is run or checked.

The fence of a code block says what the test does with it (docs/architecture.md, "Docs
that run"):
- ```bash: each command (``\\`` continuations joined, ``#`` comments dropped) runs, in
  document order, in one scratch folder shared by every page (``PAGES`` order, so a page
  may use what an earlier one wrote, e.g. ``out/tiny/hf``), which links the repository's
  top-level files; ``make`` targets are dry-run (``make -n``: tests/test_cli_and_demo.py
  runs the demo, CI runs ``make lint`` and ``make test``).
- ```bash parse: commands that need a TPU / GPU, a cluster, hub weights or long CPU time.
  Their program must answer ``--help`` and list every ``--option`` the command uses; a
  ``--config`` file is loaded and its ``--set`` overrides applied, so a renamed key fails.
- ```python: run as a script in the scratch folder.
- ```text: output, not run.
Beside the blocks, every ``ppllava_jax.…`` name the pages write must resolve and every
``configs/``, ``scripts/``, ``benchmarks/`` file they name must exist.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from ppllava_jax.config import apply_overrides, load_config

REPO = Path(__file__).resolve().parents[1]
PAGES = [
  "README.md",
  "docs/architecture.md",
  "docs/models.md",
  "docs/training.md",
  "docs/data.md",
  "docs/evaluation.md",
  "docs/dpo.md",
  "docs/scaling.md",
  "docs/benchmarks.md",
  "docs/differences.md",
]
KINDS = ("bash", "bash parse", "python", "text")
FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", re.M | re.S)
SCRIPTS_RUN_TRAIN = ("scripts/tpu_pod.sh", "scripts/slurm_gpu.sbatch")  # they run train.py "$@"


@dataclasses.dataclass(frozen=True)
class Block:
  page: str
  line: int
  kind: str
  text: str

  def where(self) -> str:
    return f"{self.page}:{self.line}"


def _blocks() -> list[Block]:
  found = []
  for page in PAGES:
    text = (REPO / page).read_text()
    for m in FENCE.finditer(text):
      line = text.count("\n", 0, m.start()) + 1
      found.append(Block(page, line, m.group(1).strip(), m.group(2)))
  return found


def commands(text: str) -> list[str]:
  """The commands of a shell block: continuation lines joined, comment lines dropped."""
  out, current = [], ""
  for raw in text.splitlines():
    line = raw.rstrip()
    if not current and (not line.strip() or line.lstrip().startswith("#")):
      continue
    if line.endswith("\\"):
      current += line[:-1] + " "
      continue
    out.append((current + line).strip())
    current = ""
  if current:
    out.append(current.strip())
  return out


BLOCKS = _blocks()


def test_every_page_is_listed_and_every_fence_is_a_known_kind():
  pages = {"README.md"} | {f"docs/{p.name}" for p in (REPO / "docs").glob("*.md")}
  assert pages == set(PAGES), f"pages not in PAGES or missing: {pages ^ set(PAGES)}"
  unknown = [f"{b.where()}: ```{b.kind}" for b in BLOCKS if b.kind not in KINDS]
  assert not unknown, f"fences must be one of {KINDS}:\n" + "\n".join(unknown)
  assert any(b.kind == "bash" for b in BLOCKS) and any(b.kind == "bash parse" for b in BLOCKS)


def _resolves(name: str) -> bool:
  parts = name.split(".")
  for cut in range(len(parts), 0, -1):
    try:
      obj = importlib.import_module(".".join(parts[:cut]))
    except ImportError:
      continue
    try:
      for attr in parts[cut:]:
        obj = getattr(obj, attr)
    except AttributeError:
      return False
    return True
  return False


def test_every_module_path_and_file_the_pages_name_exists():
  stale = []
  for page in PAGES:
    text = (REPO / page).read_text()
    for name in sorted(set(re.findall(r"\bppllava_jax(?:\.[A-Za-z_][A-Za-z0-9_]*)+", text))):
      if not _resolves(name):
        stale.append(f"{page}: {name}")
    for path in sorted(set(re.findall(r"\b(?:configs|scripts|benchmarks)/[\w./-]+\.\w+", text))):
      if not (REPO / path).exists():
        stale.append(f"{page}: {path}")
  assert not stale, "names that no longer exist:\n" + "\n".join(stale)


# ---- ```bash parse: programs, options, config keys -----------------------------------


def _program(tokens: list[str]) -> tuple[list[str], list[str]]:
  """(the command line of the Python program a doc command runs, its arguments): through
  ``bash scripts/localhost.sh PROG``, the scripts that run ``train.py``, and ``sbatch``."""
  while tokens and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", tokens[0]):
    tokens = tokens[1:]  # environment assignments
  head, rest = tokens[0], tokens[1:]
  if head == "sbatch":
    while rest and rest[0].startswith("-"):
      rest = rest[1:]
    head, rest = "bash", rest
  if head == "bash":
    script, rest = rest[0], rest[1:]
    assert (REPO / script).is_file(), f"no script {script}"
    assert subprocess.run(["bash", "-n", str(REPO / script)]).returncode == 0, script
    if script == "scripts/localhost.sh":
      return _program(["python", *rest])
    assert script in SCRIPTS_RUN_TRAIN, f"what {script} runs is unknown to this test"
    return [sys.executable, "train.py"], rest
  assert head == "python", f"a doc command runs {head!r}; this test knows python and bash"
  if rest[0] == "-m":
    return [sys.executable, "-m", rest[1]], rest[2:]
  assert (REPO / rest[0]).is_file(), f"no file {rest[0]}"
  return [sys.executable, rest[0]], rest[1:]


@functools.cache
def _help(program: tuple[str, ...]) -> tuple[int, str]:
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  done = subprocess.run(
    [*program, "--help"], cwd=REPO, capture_output=True, text=True, timeout=300, env=env
  )
  return done.returncode, done.stdout + done.stderr


def _check_parse(command: str) -> None:
  program, args = _program(shlex.split(command))
  if args and not args[0].startswith("-") and _help((*program, args[0]))[0] == 0:
    program, args = [*program, args[0]], args[1:]  # a subcommand: train.py export, to-hf
  rc, text = _help(tuple(program))
  assert rc == 0, f"{' '.join(program)} --help failed:\n{text[-2000:]}"
  for option in {a.split("=")[0] for a in args if a.startswith("--")}:
    assert re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", text), (
      f"{' '.join(program[1:])} has no option {option}"
    )
  if "--config" in args:
    cfg = load_config(REPO / args[args.index("--config") + 1])
    apply_overrides(cfg, [args[i + 1] for i, a in enumerate(args) if a == "--set"])


@pytest.mark.parametrize(
  "block", [b for b in BLOCKS if b.kind == "bash parse"], ids=lambda b: b.where()
)
def test_parse_blocks_name_real_programs_options_and_config_keys(block):
  for command in commands(block.text):
    if command.startswith("make "):
      _check_make(command)
      continue
    try:
      _check_parse(command)
    except (AssertionError, ValueError, FileNotFoundError, KeyError) as err:
      pytest.fail(f"{block.where()}: {command}\n{err}")


def _check_make(command: str) -> None:
  target = command.split()[1]
  done = subprocess.run(["make", "-n", target], cwd=REPO, capture_output=True, text=True)
  assert done.returncode == 0, f"make {target}: {done.stderr}"


# ---- ```bash and ```python: run ------------------------------------------------------


@pytest.fixture(scope="module")
def scratch(tmp_path_factory, compile_cache):
  folder = tmp_path_factory.mktemp("docs")
  for entry in REPO.iterdir():
    if entry.name not in (".git", "out") and not entry.name.startswith(".venv"):
      (folder / entry.name).symlink_to(entry)
  return folder


def _run(argv: list[str], folder: Path, env: dict, what: str) -> None:
  done = subprocess.run(
    argv,
    cwd=folder,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
    stdin=subprocess.DEVNULL,
  )
  if done.returncode != 0:
    pytest.fail(f"{what} exited {done.returncode}:\n{(done.stdout + done.stderr)[-4000:]}")


@pytest.mark.slow
def test_every_runnable_block_runs_in_page_order(scratch, compile_cache):
  """Every ```bash and ```python block of every page, in order, in one scratch folder."""
  env = dict(
    os.environ,
    PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    JAX_PLATFORMS="cpu",
    JAX_COMPILATION_CACHE_DIR=str(compile_cache),
  )
  env.pop("XLA_FLAGS", None)  # as a user's shell has it
  ran = 0
  for block in BLOCKS:
    if block.kind == "python":
      script = scratch / f"block_{ran}.py"
      script.write_text(block.text)
      _run([sys.executable, str(script)], scratch, env, f"{block.where()}: the python block")
      ran += 1
    elif block.kind == "bash":
      for command in commands(block.text):
        if command.startswith("make "):
          _check_make(command)
          continue
        _run(
          ["bash", "-euo", "pipefail", "-c", command], scratch, env, f"{block.where()}: {command}"
        )
        ran += 1
  assert ran, "no runnable block"

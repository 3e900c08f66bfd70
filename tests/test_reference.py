"""The reference pages of the docs (docs/reference/) stay true to the code.

The generated pages (cli.md, names.md) must equal what ``python -m pixelz_dist.cli.reference`` writes now; the
hand-written ones must name every environment variable, exit code, launch-script variable, metrics-row key and
snapshot key that the code and a real run have. All in one process, no subprocess: a tiny ``train_model`` run (a
linear regression, a few iterations) provides the real files.
"""

from __future__ import annotations

import ast
import difflib
import functools
import inspect
import json
import logging
import re
import types
import unicodedata
from pathlib import Path

import pytest
import torch

from engine_helpers import LinReg, make_data, quick

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "docs" / "reference"
PACKAGE = ROOT / "pixelz_dist"
LAUNCH = ROOT / "launch"
# an environment variable's name: at least three characters, capitals, digits and underscores
ENV_NAME = re.compile(r"[A-Z][A-Z0-9_]{2,}")


def page(name: str) -> str:
    return (REFERENCE / name).read_text(encoding="utf-8")


def documented(name: str, text: str) -> bool:
    return f"`{name}`" in text


def scripts() -> list[Path]:
    return sorted(p for p in LAUNCH.rglob("*") if p.suffix in (".sh", ".sbatch"))


# -- the generated pages ----------------------------------------------------------------------------------------------
def test_generated_pages_are_up_to_date():
    from pixelz_dist.cli.reference import generate

    for rel, text in generate().items():
        path = ROOT / rel
        current = path.read_text(encoding="utf-8") if path.exists() else ""
        if current != text:
            diff = "".join(list(difflib.unified_diff(current.splitlines(True), text.splitlines(True), rel,
                                                     "generated", n=0))[:20])
            pytest.fail(f"{rel} is out of date: run python -m pixelz_dist.cli.reference\n{diff}")


def test_name_tables_name_real_keywords_and_options():
    """The tables the commands call train_model / find_lr with (and names.md is generated from) name keywords those
    functions have and options their parsers have: a renamed keyword or option fails here, not in a user's run."""
    from pixelz_dist import train_model
    from pixelz_dist.cli import passthrough as pt
    from pixelz_dist.cli.options import build_parser
    from pixelz_dist.lr_finder.search import find_lr

    for func, command, tables in (
            (train_model, "train", (pt.TRAIN_MODEL_ARGUMENTS, pt.TRAIN_MODEL_OPTIONS, pt.STEP_OPTIONS,
                                    pt.SCHEDULE_OPTIONS, pt.EMA_OPTIONS)),
            (find_lr, "find_lr", (pt.FIND_LR_ARGUMENTS,))):
        params = inspect.signature(func).parameters
        flags = build_parser(command)._option_string_actions
        for table in tables:
            for row in table:
                assert row[1] in params, f"{row[1]!r} is no keyword of {func.__name__}"
                assert row[0] in flags, f"{row[0]} is no option of {command}"
        keywords = [row[1] for table in tables for row in table]
        assert len(keywords) == len(set(keywords)), "a keyword set by two options"


def test_train_command_passes_the_options_as_names_md_says(tmp_path, monkeypatch, caplog):
    """``python -m pixelz_dist.train`` hands every option of the tables to train_model under its keyword (the
    renamed ones included: --iters is num_iters, --workers num_workers, --resume load_snapshot_path)."""
    import pixelz_dist.engine.train_model as engine
    from pixelz_dist import train
    from pixelz_dist.cli import passthrough as pt

    seen = {}
    @functools.wraps(engine.train_model)  # its signature: the parse-time check reads train_model's defaults
    def fake_train_model(*args, **kwargs):
        seen.update(kwargs, args=args)

    monkeypatch.setattr(engine, "train_model", fake_train_model)
    argv = ["--model", "engine_helpers:LinReg", "--dataset", "engine_helpers:make_data", "--iters", "3",
            "--workers", "0", "--seed", "5", "--batch-size", "2", "--resume", "auto",
            "--snapshot-prefix", str(tmp_path / "snap"), "--monitor-key", "val_x", "--monitor-mode", "max",
            "--no-async-snapshots", "--ema", "0.5", "--warmup-iters", "2", "--clip-grad-norm", "1.5", "--no-curves"]
    with caplog.at_level(logging.INFO, logger="pixelz_dist"):  # puts back the level the command sets
        assert train.main(argv) == 0
    expected = {"num_iters": 3, "num_workers": 0, "seed": 5, "batch_size": 2, "load_snapshot_path": "auto",
                "monitor": "val_x", "monitor_mode": "max", "snapshot_async": False, "ema": 0.5, "warmup_iters": 2,
                "clip_grad_norm": 1.5, "num_epochs": None, "shuffle": True, "snapshot_prefix": str(tmp_path / "snap")}
    assert {k: seen[k] for k in expected} == expected
    tables = pt.TRAIN_MODEL_ARGUMENTS + pt.TRAIN_MODEL_OPTIONS + pt.STEP_OPTIONS + pt.SCHEDULE_OPTIONS + pt.EMA_OPTIONS
    assert {row[1] for row in tables} <= set(seen)


# -- environment variables --------------------------------------------------------------------------------------------
def python_env_reads() -> dict[str, str]:
    """Environment variables the package reads, with the module: in the modules that use ``os.environ``, the string
    constants that are looked up (``environ["X"]``, ``.get("X")``, ``.setdefault("X", ...)``, ``.pop("X")``,
    ``"X" in environ``) or bound to a module-level ``*_VAR`` / ``*_VARIABLE`` name."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        source = path.read_text(encoding="utf-8")
        if "os.environ" not in source and "getenv" not in source:
            continue
        tree = ast.parse(source)
        looked_up = []
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and node.args and (
                    isinstance(node.func, ast.Attribute) and node.func.attr in ("get", "setdefault", "pop", "getenv")
                    or isinstance(node.func, ast.Name) and node.func.id in ("get", "getenv")):
                looked_up.append(node.args[0])
            elif isinstance(node, ast.Subscript):
                looked_up.append(node.slice)
            elif isinstance(node, ast.Compare) and isinstance(node.ops[0], (ast.In, ast.NotIn)):
                looked_up.append(node.left)
        looked_up += [node.value for node in tree.body if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id.endswith(("_VAR", "_VARIABLE")) for t in node.targets)]
        for node in looked_up:
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and ENV_NAME.fullmatch(node.value):
                found.setdefault(node.value, str(path.relative_to(ROOT)))
    return found


def shell_env_reads() -> dict[str, str]:
    """Variables the launch scripts read from the environment: ``${VAR:-default}`` (and ``-``, ``?``, ``=``
    forms), and SLURM's ``$SLURM_*``."""
    found = {}
    for path in scripts():
        text = path.read_text(encoding="utf-8")
        names = re.findall(r"\$\{([A-Z][A-Z0-9_]*):?[-?=]", text) + re.findall(r"\$\{?(SLURM_[A-Z_]+)", text)
        for name in names:
            found.setdefault(name, str(path.relative_to(ROOT)))
    return found


def test_every_environment_variable_is_documented():
    text = page("environment.md")
    python, shell = python_env_reads(), shell_env_reads()
    # the scans find what they must (a scan that finds nothing would pass vacuously)
    assert {"PIXELZ_DIST_TIMEOUT", "PIXELZ_LOG_ALL_RANKS", "PIXELZ_JPEG_BACKEND", "RANK", "LOCAL_RANK",
            "WORLD_SIZE", "LOCAL_WORLD_SIZE", "SLURM_CPUS_PER_TASK", "CUBLAS_WORKSPACE_CONFIG"} <= set(python)
    assert {"PYTHON", "NPROC", "HEAD_ADDR", "PIXELZ_LAUNCH_DIR", "SLURM_JOB_ID", "STOP_GRACE"} <= set(shell)
    headers = {name for path in scripts() for name in header_variables(path)}
    missing = {name: where for name, where in {**python, **shell, **dict.fromkeys(headers, "a header")}.items()
               if not documented(name, text)}
    assert not missing, f"docs/reference/environment.md does not name these variables: {missing}"


# -- exit codes -------------------------------------------------------------------------------------------------------
def code_exit_codes() -> dict[int, str]:
    """Every exit code in the code: ``*_EXIT_CODE`` constants, ``exit_code`` class attributes, the literal returns of
    the commands' ``main`` functions, ``sys.exit(N)``, and the launch scripts' ``exit N`` / ``return N``."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        where = str(path.relative_to(ROOT))
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) \
                    and isinstance(node.value.value, int) and any(
                        isinstance(t, ast.Name) and (t.id.endswith("EXIT_CODE") or t.id == "exit_code")
                        for t in node.targets):
                found.setdefault(node.value.value, where)
            elif isinstance(node, ast.FunctionDef) and node.name == "main":
                for sub in ast.walk(node):  # return 2; return 0 if ok else 1
                    if isinstance(sub, ast.Return) and sub.value is not None:
                        for value in ast.walk(sub.value):
                            if isinstance(value, ast.Constant) and type(value.value) is int:
                                found.setdefault(value.value, where)
            elif isinstance(node, ast.Call) and ast.unparse(node.func) == "sys.exit" and node.args \
                    and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, int):
                found.setdefault(node.args[0].value, where)
    for path in scripts():
        for code in re.findall(r"\b(?:exit|return) (\d+)\b", path.read_text(encoding="utf-8")):
            found.setdefault(int(code), str(path.relative_to(ROOT)))
    return found


def test_every_exit_code_is_documented():
    from pixelz_dist.distributed.preemption import INTERRUPT_EXIT_CODE, PREEMPTION_EXIT_CODE
    from pixelz_dist.errors import WORKER_DIED_EXIT_CODE, PixelzError

    codes = code_exit_codes()
    assert {0, 1, 2, PixelzError.exit_code, WORKER_DIED_EXIT_CODE, PREEMPTION_EXIT_CODE,
            INTERRUPT_EXIT_CODE} <= set(codes)
    text = page("exit-codes.md")
    rows = set(re.findall(r"^\| `(\d+)` \|", text, re.M))
    missing = {code: where for code, where in codes.items() if str(code) not in rows}
    assert not missing, f"docs/reference/exit-codes.md has no row for these exit codes: {missing}"
    for name in ("WORKER_DIED_EXIT_CODE", "PREEMPTION_EXIT_CODE", "INTERRUPT_EXIT_CODE"):
        assert documented(name, text)


# -- launch scripts ---------------------------------------------------------------------------------------------------
def header_variables(path: Path) -> list[str]:
    """The variables a script's header documents: the names that start the lines of its ``Variables`` block
    (``#   NAME  meaning``, ``#   A, B  meaning``, ``#   A / B  meaning``), an inline ``Variables (...): A, B, C``
    list, and ``export NAME`` advice."""
    header = []
    for line in path.read_text(encoding="utf-8").splitlines()[1:]:
        if not line.startswith("#"):
            break
        header.append(line)
    names, in_block = [], False
    for line in header:
        if re.search(r"\bVariables\b[^:]*:", line):
            in_block = True
        elif in_block:  # a name at the start of a line (continuation lines are indented deeper)
            m = re.match(r"#\s{2,4}([A-Z][A-Z0-9_]+(?:\s*[,/]\s*[A-Z][A-Z0-9_]+)*)(?:\s|$)", line)
            if m:
                names += re.findall(r"[A-Z][A-Z0-9_]+", m.group(1))
        names += [n for group in re.findall(r"\bexport ((?:[A-Z][A-Z0-9_]+(?: / )?)+)", line)
                  for n in group.split(" / ")]
    joined = " ".join(line.lstrip("#").strip() for line in header)
    for listed in re.findall(r"\bVariables \([^)]*\):((?:\s*[A-Z][A-Z0-9_]+,?)+)", joined):
        names += re.findall(r"[A-Z][A-Z0-9_]+", listed)
    return list(dict.fromkeys(names))


def test_every_launch_script_variable_is_documented():
    text = page("launch-scripts.md")
    found = {str(path.relative_to(LAUNCH)): header_variables(path) for path in scripts()}
    flat = {name for names in found.values() for name in names}
    assert {"PYTHON", "NPROC", "MODULE", "NNODES", "HEAD_ADDR", "PORT", "JOB_ID", "MAX_RESTARTS", "RDZV_PORT",
            "REQUEUE", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME", "SUBNET",
            "NS_PREFIX", "SLURM", "SLURMCTLD_PORT", "SLURMD_PORT", "START_TIMEOUT", "STOP_GRACE"} <= flat
    missing = {script: [n for n in names if not documented(n, text)] for script, names in found.items()}
    missing = {k: v for k, v in missing.items() if v}
    assert not missing, f"docs/reference/launch-scripts.md does not name these header variables: {missing}"
    for path in scripts():
        if "local_" not in str(path):
            assert path.name in text, f"docs/reference/launch-scripts.md does not describe {path.name}"


# -- a real run: metrics rows and snapshots ---------------------------------------------------------------------------
def mae(output, batch):
    return torch.zeros(len(batch[0]))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run of 4 iterations with validation, EMA, warmup, clipping and keep_best, resumed from iteration 2 to 6,
    and its snapshots evaluated by the follower: every kind of row and file."""
    from pixelz_dist.callbacks.validation import Validation
    from pixelz_dist.evaluation.follow import SnapshotFollower

    prefix = tmp_path_factory.mktemp("reference") / "snap"
    common = dict(display_iter=2, snapshot_prefix=str(prefix), snapshot_interval=2, clip_grad_norm=10.0, ema=0.9,
                  warmup_iters=10, keep_best=1, snapshot_async=False)
    quick(LinReg(), make_data(8), num_iters=4, callbacks=[Validation(make_data(4, seed=1), 2, {"mae": mae})],
          **common)
    quick(LinReg(), make_data(8), num_iters=6, callbacks=[Validation(make_data(4, seed=1), 2, {"mae": mae})],
          load_snapshot_path=f"{prefix}_iter_2.pt", **common)
    SnapshotFollower(str(prefix), lambda snapshot, path: {"loss": 0.5, "mae": 0.0}).run_once()
    return prefix


def read_rows(path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def table_keys(text: str) -> set[str]:
    """The backticked names in the first column of a page's tables."""
    return set(re.findall(r"^\| `([^`]+)` \|", text, re.M))


def test_every_metrics_key_is_documented(run, monkeypatch):
    from pixelz_dist.engine import report

    rows = read_rows(f"{run}_metrics.jsonl")
    kinds = {"training": [r for r in rows if "loss" in r], "validation": [r for r in rows if "val_loss" in r],
             "resume": [r for r in rows if "resumed_at" in r]}
    assert all(kinds.values()), "the run wrote every kind of row"
    # the keys a CPU run does not write: a window with a skipped step, --display-gpu on a GPU
    written = []
    monkeypatch.setattr(report.torch.cuda, "memory_allocated", lambda device: 0)
    monkeypatch.setattr(report.torch.cuda, "memory_reserved", lambda device: 0)
    monkeypatch.setattr(report.torch.cuda, "max_memory_allocated", lambda device: 0)
    reporter = report.Reporter(types.SimpleNamespace(add_json=written.append), 1, torch.device("cpu"), True,
                               types.SimpleNamespace(type="cuda"))
    reporter.meter.add_losses([torch.tensor(1.0)])
    reporter.meter.skipped = 1
    reporter.report(1, 10, 0.1, torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1))
    keys = {k for r in rows + written for k in r} - {"val_mae"}
    assert {"skipped_steps", "gpu_peak_mib", "grad_norm", "resumed_at", "val_loss"} <= keys
    text = page("metrics-file.md")
    documented_keys = table_keys(text)
    assert "val_<metric>" in documented_keys  # val_mae
    assert not keys - documented_keys, f"docs/reference/metrics-file.md lacks {sorted(keys - documented_keys)}"

    eval_rows = read_rows(f"{run}_eval.jsonl")
    assert eval_rows
    eval_keys = {k for r in eval_rows for k in r} - {"mae"}
    assert "<metric>" in documented_keys  # mae
    lacking = sorted(eval_keys - documented_keys)
    assert not lacking, f"docs/reference/metrics-file.md lacks {lacking}"


def test_every_snapshot_key_is_documented(run):
    snap = torch.load(f"{run}_iter_6.pt", map_location="cpu", weights_only=True)
    text = page("snapshot-format.md")
    top = table_keys(text)
    assert not set(snap) - top, f"docs/reference/snapshot-format.md lacks the keys {sorted(set(snap) - top)}"
    assert snap["format_version"] == 3 and "version 3" in text
    assert snap["meta"]["final"] is True
    nested = {"meta": snap["meta"], "ema": snap["ema"], "data": snap["data"], "epoch_loss": snap["epoch_loss"],
              "progress": snap["progress"], "warmup": snap["warmup"], "rng": snap["rng"][0]}
    missing = {part: [k for k in value if f'"{k}"' not in text] for part, value in nested.items()}
    missing = {k: v for k, v in missing.items() if v}
    assert not missing, f"docs/reference/snapshot-format.md does not name these keys: {missing}"
    assert all(f'"{k}"' in text for k in snap["callbacks"]["1:KeepBest"]) or "<index>:<class name>" in text

    # what the page says about taking the weights out works
    from pixelz_dist import ema_state_dict

    model = LinReg()
    model.load_state_dict(snap["model"])
    model.load_state_dict(ema_state_dict(snap))


def test_every_file_beside_the_snapshots_is_documented(run):
    text = page("snapshot-format.md")
    names = set()
    for path in run.parent.iterdir():
        name = re.sub(r"_iter_\d+", "_iter_N", path.name)
        names.add(re.sub(r"\d{8}-\d{6}", "<time>", name))
    assert {"snap.lock", "snap_best.pt", "snap_iter_N.pt", "snap_iter_N.pt.abandoned-<time>", "snap_metrics.jsonl",
            "snap_order.tsv", "snap_eval.jsonl"} <= names
    assert not {n for n in names if not documented(n, text)}, names


# -- links ------------------------------------------------------------------------------------------------------------
def slug(heading: str) -> str:
    """Python-Markdown's toc anchor of a heading (MkDocs' default)."""
    value = unicodedata.normalize("NFKD", heading.replace("`", "")).encode("ascii", "ignore").decode()
    value = re.sub(r"[^\w\s-]", "", value).strip().lower()
    return re.sub(r"[-\s]+", "-", value)


def test_links_between_reference_pages_resolve():
    """Relative links only, to pages of docs/; links into docs/reference/ land on an existing page and heading."""
    for path in sorted(REFERENCE.glob("*.md")):
        text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            assert not target.startswith(("/", "http://", "https://")), f"{path.name}: {target}"
            file, _, anchor = target.partition("#")
            resolved = (path.parent / file).resolve() if file else path
            assert resolved.is_relative_to((ROOT / "docs").resolve()) and resolved.suffix == ".md", \
                f"{path.name}: {target}"
            if resolved.parent != REFERENCE.resolve():
                continue  # another section's page (the docs site's): checked by mkdocs build --strict
            assert resolved.exists(), f"{path.name}: {target}"
            if anchor:
                headings = re.findall(r"^#+ (.+)$", resolved.read_text(encoding="utf-8"), re.M)
                assert anchor in {slug(h) for h in headings}, f"{path.name}: no heading for {target}"


def test_reference_generator_check_mode(tmp_path, capsys):
    """``--check`` says which page is stale and writes nothing; without it the pages are written."""
    from pixelz_dist.cli.reference import PAGES, main

    assert main(["--root", str(tmp_path), "--check"]) == 1
    assert "docs/reference/cli.md" in capsys.readouterr().err
    assert not (tmp_path / "docs").exists()
    assert main(["--root", str(tmp_path)]) == 0
    assert main(["--root", str(tmp_path), "--check"]) == 0
    assert all((tmp_path / rel).read_text(encoding="utf-8") == (ROOT / rel).read_text(encoding="utf-8")
               for rel in PAGES)



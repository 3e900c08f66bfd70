"""The documentation: it builds without a warning, its commands parse with the real parsers, and the tutorial runs.

- ``mkdocs build --strict``: a broken link or anchor, or a page missing from ``mkdocs.yml``'s nav, fails the suite.
- Every shell command of README.md and docs/tutorial.md that starts a pixelz_dist entry point (``python -m
  pixelz_dist.X``, ``pixelz-*``, ``torchrun ... -m pixelz_dist.X``, the launch scripts) is parsed by that entry
  point's own argument parser (and torchrun's by torchrun's), so a renamed option breaks this test, not a user.
- The README's segmentation example (``seg.py`` and ``run.toml``, taken from the README) trains.
- The tutorial's commands, taken from docs/tutorial.md, run in order on small demo data with small iteration counts.
"""

import argparse
import ast
import importlib
import json
import os
import re
import shlex
import subprocess
import sys

import pytest
import torch

from conftest import DIST_VARS

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")  # installed with torch, beside python
PAGES_WITH_COMMANDS = ("README.md", "docs/tutorial.md")
LAUNCH_SCRIPTS = {"launch/slurm_train.sbatch": ("pixelz_dist.train", ["--resume", "auto"]),
                  "launch/slurm_find_lr.sbatch": ("pixelz_dist.find_lr", []),
                  "launch/torchrun_single_node.sh": ("pixelz_dist.train", []),
                  "launch/torchrun_multi_node.sh": ("pixelz_dist.train", [])}


def read(path: str) -> str:
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        return f.read()


def fenced_blocks(text: str, languages: tuple[str, ...]) -> list[str]:
    return [m.group(2) for m in re.finditer(r"^```(\w*)[^\n]*\n(.*?)^```", text, re.MULTILINE | re.DOTALL)
            if m.group(1) in languages]


def shell_commands(text: str) -> list[list[str]]:
    """The simple commands of the page's bash blocks, as argument lists (continuations joined, comments dropped,
    ``a && b`` and ``a; b`` split, leading ``VAR=value`` assignments dropped)."""
    commands = []
    for block in fenced_blocks(text, ("bash", "sh", "shell")):
        for line in block.replace("\\\n", " ").splitlines():
            current: list[str] = []
            for token in shlex.split(line, comments=True) + [";"]:
                if token in ("&&", ";", "||", "&", "|"):
                    while current and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", current[0]):
                        current.pop(0)
                    if current:
                        commands.append(current)
                    current = []
                else:
                    current.append(token.rstrip(";"))
    return commands


def entry_point(command: list[str]) -> tuple[str, list[str]] | None:
    """``(module, argv)`` when ``command`` starts a pixelz_dist entry point, else None."""
    scripts = tomllib.loads(read("pyproject.toml"))["project"]["scripts"]
    head, args = command[0], command[1:]
    if head in ("python", "python3") and args[:1] == ["-m"] and args[1].startswith("pixelz_dist."):
        return args[1], args[2:]
    if head in scripts:
        return scripts[head].split(":")[0], args
    if head == "torchrun":
        from torch.distributed.run import get_args_parser

        parsed = get_args_parser().parse_args(args)  # what torchrun itself makes of the line
        if parsed.module and parsed.training_script.startswith("pixelz_dist."):
            return parsed.training_script, parsed.training_script_args
        return None
    if head == "sbatch":  # sbatch [--option=value ...] SCRIPT ARGS
        rest = list(args)
        while rest and rest[0].startswith("-"):
            rest.pop(0)
        if not rest:
            return None
        head, args = rest[0], rest[1:]
    if head in LAUNCH_SCRIPTS:
        module, first = LAUNCH_SCRIPTS[head]
        return module, first + args
    return None


class _Parsed(Exception):
    def __init__(self, namespace):
        super().__init__("parsed")
        self.namespace = namespace


def parse_with_entry_point(module: str, argv: list[str], monkeypatch) -> argparse.Namespace:
    """Run ``module.main(argv)`` until its argument parser has parsed ``argv``, then stop it. (At
    ``parse_known_args``, which every ``parse_args`` calls, also a parser's own override; arguments left over are
    what any ``parse_args`` refuses.)"""
    original = argparse.ArgumentParser.parse_known_args

    def parse_then_stop(self, args=None, namespace=None):
        namespace, extras = original(self, args, namespace)
        if extras:
            pytest.fail(f"{module} {shlex.join(argv)}: its parser does not know {extras}")
        raise _Parsed(namespace)

    with monkeypatch.context() as m:
        m.setattr(argparse.ArgumentParser, "parse_known_args", parse_then_stop)
        try:
            main = importlib.import_module(module).main
            getattr(main, "__wrapped__", main)(list(argv))  # past torchrun's @record, which wants a real stderr
        except _Parsed as parsed:
            return parsed.namespace
        except SystemExit as e:
            pytest.fail(f"{module} {shlex.join(argv)}: its parser refused the command (exit {e.code})")
    pytest.fail(f"{module}.main returned without parsing its arguments")


# -- the site ----------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_mkdocs_build_strict_has_no_warning(tmp_path):
    try:
        import material  # noqa: F401
        import mkdocs  # noqa: F401
    except ImportError:
        if os.environ.get("CI"):
            raise  # CI installs the test extra, which has them: the documentation must be checked there
        pytest.skip('mkdocs / mkdocs-material not installed (pip install -e ".[docs]")')
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}  # the theme's end-of-life banner, not our pages
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert not re.search(r"^WARNING\b", output, re.MULTILINE), output
    assert (tmp_path / "site" / "tutorial" / "index.html").is_file()


# -- the commands on the pages ----------------------------------------------------------------------------------
@pytest.mark.parametrize("page", PAGES_WITH_COMMANDS)
def test_every_documented_command_parses_with_its_entry_points_parser(page, monkeypatch, capsys):
    parsed = []
    for command in shell_commands(read(page)):
        found = entry_point(command)
        if found is not None:
            module, argv = found
            parse_with_entry_point(module, argv, monkeypatch)
            parsed.append(module)
    for block in fenced_blocks(read(page), ("python",)):
        ast.parse(block)  # the Python examples are at least Python
    expected = {"README.md": {"pixelz_dist.train", "pixelz_dist.make_demo"},
                "docs/tutorial.md": {"pixelz_dist.train", "pixelz_dist.make_demo", "pixelz_dist.plot",
                                     "pixelz_dist.evaluate"}}[page]
    assert expected <= set(parsed), f"{page}: commands of {expected - set(parsed)} not found on the page"


def test_a_renamed_option_is_refused_by_the_check(monkeypatch, capsys):
    """The check above can fail: an option the parser does not know is a failure, for the torchrun form too."""
    command = shlex.split("torchrun --standalone --nproc_per_node=2 -m pixelz_dist.train --demo --iterations 5")
    module, argv = entry_point(command)
    assert module == "pixelz_dist.train" and argv == ["--demo", "--iterations", "5"]
    with pytest.raises(pytest.fail.Exception, match="does not know"):
        parse_with_entry_point(module, argv, monkeypatch)
    with pytest.raises(pytest.fail.Exception, match="refused"):  # a known option with a bad value
        parse_with_entry_point(module, ["--demo", "--iters", "five"], monkeypatch)
    assert entry_point(shlex.split("sbatch --nodes=2 launch/slurm_train.sbatch --config run.toml")) == (
        "pixelz_dist.train", ["--resume", "auto", "--config", "run.toml"])


# -- the README's example ---------------------------------------------------------------------------------------
def test_readme_segmentation_example_trains(tmp_path, monkeypatch):
    """seg.py and run.toml as the README shows them: the factories import, the config file is read, training runs."""
    from pixelz_dist.cli.segmentation_demo import make_segmentation_demo
    from pixelz_dist.train import main

    readme = read("README.md")
    (seg,) = [b for b in fenced_blocks(readme, ("python",)) if "def build_model" in b]
    (toml,) = fenced_blocks(readme, ("toml",))
    (tmp_path / "seg.py").write_text(seg)
    (tmp_path / "run.toml").write_text(toml)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "seg", raising=False)
    make_segmentation_demo(tmp_path / "demo_seg", 8, 2, 32, 0)
    assert main(["--config", "run.toml", "--iters", "2", "--snapshot-interval", "1", "--no-curves",
                 "--workers", "0"]) == 0
    snapshot = torch.load(tmp_path / "runs" / "seg" / "snap_iter_2.pt", weights_only=True)
    assert snapshot["model"]["net.0.weight"].shape[0] == 32  # [model_arg] width = 32 reached the factory


# -- the tutorial, as written -----------------------------------------------------------------------------------
SMALL = {"--iters": "12", "--val-interval": "4", "--snapshot-interval": "4", "--warmup-iters": "4"}


def small(argv: list[str]) -> list[str]:
    """The tutorial's command with small iteration counts and intervals (nothing else changed)."""
    return [SMALL.get(argv[i - 1], a) if i else a for i, a in enumerate(argv)]


@pytest.mark.slow
@pytest.mark.distributed
def test_tutorial_runs_as_written_on_small_demo_data(tmp_path, monkeypatch, capsys):
    """make_demo, the torchrun training, its resume, the curves and the evaluation, from docs/tutorial.md. Between
    the training and the resume, the final snapshot is removed (as a kill just before it was written would leave the
    run): the resumed run then trains the last iterations again and ends with the very same weights and EMA. The
    torchrun commands run as processes; the one-process commands run their entry point's main in this process (the
    same argv, without another interpreter start and torch import)."""
    steps = [c for c in shell_commands(read("docs/tutorial.md")) if entry_point(c) is not None]
    kinds = [(entry_point(c)[0], "--resume" in c) for c in steps]
    assert kinds == [("pixelz_dist.make_demo", False), ("pixelz_dist.train", False), ("pixelz_dist.train", True),
                     ("pixelz_dist.plot", False), ("pixelz_dist.evaluate", False)], kinds
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p))
    monkeypatch.chdir(tmp_path)
    prefix = tmp_path / "runs" / "seg" / "snap"

    def run(command) -> str:
        argv = small(command)
        if argv[0] == "torchrun":
            proc = subprocess.run([TORCHRUN, *argv[1:]], cwd=tmp_path, env=env, capture_output=True, text=True,
                                  timeout=240)
            assert proc.returncode == 0, f"{shlex.join(argv)}\n{proc.stdout}\n{proc.stderr}"
            return proc.stderr
        module, args = entry_point(argv)
        if module == "pixelz_dist.make_demo":
            args += ["--train", "16", "--val", "8", "--size", "32"]  # small demo data
        capsys.readouterr()
        assert importlib.import_module(module).main(args) == 0, shlex.join(argv)
        return capsys.readouterr().out

    make_demo, train, resume, plot, evaluate = steps
    run(make_demo)
    run(train)
    straight = torch.load(f"{prefix}_iter_12.pt", weights_only=True)
    assert straight["meta"]["final"] and "ema" in straight
    os.remove(f"{prefix}_iter_12.pt")
    log = run(resume)
    assert "resumed from" in log and "snap_iter_8.pt" in log, log
    resumed = torch.load(f"{prefix}_iter_12.pt", weights_only=True)
    for part in ("model", "ema"):
        a, b = (s[part] if part == "model" else s[part]["state_dict"] for s in (straight, resumed))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part
    assert os.path.isfile(f"{prefix}_best.pt") and os.path.isfile(f"{prefix}_config.toml")
    assert run(plot).strip().endswith("snap_curves.png")
    run(evaluate)
    with open(f"{prefix}_eval.jsonl") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    assert [r["iteration"] for r in rows] == [8, 12] and all(r["ema"] and "miou" in r for r in rows), rows

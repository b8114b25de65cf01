"""The dataclass command line (nanochat/cli.py) and every entry point built on it: forms, errors, help."""

import dataclasses
import glob
import importlib
import os
import re
import shlex
import subprocess
import sys

import pytest

from nanochat.cli import flag, format_help, parse_args, parse_flags, passthrough, positional, required
from nanochat.common import UserError, run_cli
from tests.conftest import ROOT


@dataclasses.dataclass
class Demo:
    run_dir: str = positional("a run folder")
    out: str = required("output folder")
    depth: int = flag(4, "layers")
    lr: float = flag(0.02, "learning rate")
    once: bool = flag(False, "stop after one pass")
    mode: str = flag("fast", "how", choices=["fast", "exact"])
    files: list[str] = flag([], "input files")
    rel: list[float] = flag([0.1, 0.01], "sizes")
    an_unusually_long_flag_name: str = flag("long", "sets the column")


@dataclasses.dataclass
class Runner:
    out: str = required("output folder")
    seeds: str = flag("42", "comma list")
    paths: list[str] = positional("run folders", default=[])
    a_flag_with_a_default_too_long_for_the_column: str = flag("x" * 20, "its description goes on the next line")
    train_flags: list[str] = passthrough("flags for the training script")


@dataclasses.dataclass
class Plain:
    depth: int = flag(4, "layers")


def parse(cls, *argv):
    return parse_args(cls, list(argv), prog="demo", description="A demo.")


def error(cls, *argv):
    with pytest.raises(UserError) as e:
        parse(cls, *argv)
    return str(e.value)


def test_both_value_forms_dashes_and_types():
    cfg = parse(Demo, "R", "--out", "o", "--depth=8", "--lr", "1e-3", "--mode=exact", "--an-unusually-long-flag-name", "x")
    assert (cfg.run_dir, cfg.out, cfg.depth, cfg.lr, cfg.mode, cfg.an_unusually_long_flag_name) == ("R", "o", 8, 1e-3, "exact", "x")
    assert cfg.files == [] and cfg.rel == [0.1, 0.01] and cfg.once is False
    assert parse(Demo, "R", "--out=o", "--depth=1e3").depth == 1000


def test_a_bool_flag_alone_is_true_and_takes_only_a_truth_value_after_it():
    assert parse(Demo, "--once", "R", "--out=o").once is True  # R is the positional, not --once's value
    cfg = parse(Demo, "--once", "false", "R", "--out=o")
    assert cfg.once is False and cfg.run_dir == "R"
    assert parse(Demo, "R", "--out=o", "--once=yes").once is True


def test_positional_arguments():
    assert parse(Demo, "--out=o", "R").run_dir == "R"
    assert "missing RUN_DIR" in error(Demo, "--out=o")
    assert "unexpected argument 'S'; RUN_DIR already given" in error(Demo, "R", "S", "--out=o")
    assert "unexpected argument 'x'; flags look like --name=value" in error(Plain, "x")
    runner = parse(Runner, "a", "--out=o", "b", "c")
    assert runner.paths == ["a", "b", "c"] and runner.train_flags == []  # a list positional takes all that remain
    assert parse(Runner, "--out=o").paths == []


def test_list_values():
    cfg = parse(Demo, "R", "--files", "a.txt", "b.jsonl", "c.parquet", "--out=o", "--rel", "1e-2", "1e-3")
    assert cfg.files == ["a.txt", "b.jsonl", "c.parquet"] and cfg.rel == [1e-2, 1e-3]
    assert parse(Demo, "R", "--out=o", "--files=one two").files == ["one two"]  # '=' gives exactly one value
    assert "--files needs at least one value" in error(Demo, "R", "--out=o", "--files", "--depth=2")
    assert "--rel expects float, got 'x'" in error(Demo, "R", "--out=o", "--rel", "1", "x")
    assert Demo("R", "o").files is not Demo("R", "o").files  # a list default is never shared


def test_a_repeated_flag_is_rejected():
    assert error(Demo, "R", "--out=o", "--depth=2", "--depth=3") == "--depth is given twice; give each flag once"
    assert "--depth is given twice" in error(Demo, "R", "--out=o", "--depth=2", "--depth", "2")
    assert "--an_unusually_long_flag_name is given twice" in error(
        Demo, "R", "--out=o", "--an-unusually-long-flag-name=a", "--an_unusually_long_flag_name=b")
    assert "--files is given twice" in error(Demo, "R", "--out=o", "--files", "a", "--files", "b")


def test_everything_after_a_double_dash_passes_through_unparsed():
    cfg = parse(Runner, "--out=o", "--", "--depth=4", "--depth=5", "--help", "x")
    assert cfg.train_flags == ["--depth=4", "--depth=5", "--help", "x"] and cfg.seeds == "42"
    assert parse(Runner, "--out=o", "--").train_flags == []
    assert "unexpected '--'" in error(Demo, "R", "--out=o", "--", "--depth=4")


def test_errors_name_the_problem():
    assert "missing --out" in error(Demo, "R")
    assert "missing RUN_DIR, --out" in error(Demo)
    assert "--mode must be one of fast, exact; got 'slow'" in error(Demo, "R", "--out=o", "--mode=slow")
    assert "--depth expects int, got 'four'" in error(Demo, "R", "--out=o", "--depth=four")
    assert "--once expects true or false" in error(Demo, "R", "--out=o", "--once=maybe")
    assert "did you mean --depth?" in error(Demo, "R", "--out=o", "--dpeth=2")
    assert "--lr needs a value" in error(Demo, "R", "--out=o", "--lr", "--depth=2")
    assert "--lr needs a value" in error(Demo, "R", "--out=o", "--lr")


def test_parse_flags_returns_only_what_was_given():
    assert parse_flags(Demo, ["R", "--out=o", "--depth=4"], prog="demo", description="") == {"run_dir": "R", "out": "o", "depth": 4}


def description_column(help_text):
    """The columns where descriptions start in the arguments and flags sections: one value if they line up."""
    cols = set()
    for block in help_text.split("\n\n")[-2:]:
        if not block.startswith(("arguments:", "flags:")):
            continue
        for line in block.splitlines()[1:]:
            if line.startswith("   "):  # the description under a left column too long for it
                cols.add(len(line) - len(line.lstrip()))
            elif m := re.match(r"  \S.*?  +(?=\S)", line):
                cols.add(m.end())
    return cols


def test_help_lines_up_the_descriptions():
    text = format_help(Demo, "demo", "A demo.")
    assert text.startswith("usage: demo RUN_DIR [--flag=value ...]")
    width = len("--an_unusually_long_flag_name='long'")
    assert description_column(text) == {2 + width + 2}
    assert "--mode='fast'" in text and "(one of: fast, exact)" in text and "--out=<required>" in text
    assert "--rel 0.1 0.01" in text and "--files ..." in text
    runner = format_help(Runner, "runner", "R.")
    assert runner.startswith("usage: runner [PATHS ...] [--flag=value ...] [-- TRAIN_FLAGS ...]")
    assert "  -- TRAIN_FLAGS ..." in runner and description_column(runner) == {2 + 40 + 2}
    assert re.search(r"^  --a_flag_with_a_default_too_long_for_the_column='x+'\n {44}its description", runner, re.M)


CONFIGS = {  # entry point -> its config dataclass (module, name)
    "scripts.base_train": ("nanochat.train", "TrainConfig"),
    "scripts.base_train_adaptive_svd": ("nanochat.adaptive_cycle", "AdaptiveConfig"),
    "scripts.base_eval": ("scripts.base_eval", "EvalConfig"),
    "scripts.tok_train": ("scripts.tok_train", "TokTrainConfig"),
    "scripts.bench_train": ("scripts.bench_train", "BenchConfig"),
    "scripts.bench_adaptive": ("scripts.bench_adaptive", "BenchConfig"),
    "scripts.bench_distributed": ("scripts.bench_distributed", "BenchConfig"),
    "scripts.bench_svd": ("scripts.bench_svd", "BenchConfig"),
    "scripts.compare_runs": ("scripts.compare_runs", "CompareConfig"),
    "scripts.forgetting": ("scripts.forgetting", "ForgettingConfig"),
    "scripts.monitor_svd": ("scripts.monitor_svd", "MonitorConfig"),
    "scripts.plot_svd": ("scripts.plot_svd", "PlotConfig"),
    "scripts.prepare_data": ("scripts.prepare_data", "PrepareConfig"),
    "scripts.compare_dtypes": ("scripts.compare_dtypes", "CompareDtypesConfig"),
    "scripts.gpu_check": ("scripts.gpu_check", "CheckConfig"),
    "scripts.method_checks": ("scripts.method_checks", "ChecksConfig"),
}


def test_every_entry_point_is_listed_here():
    scripts = {f"scripts.{os.path.basename(p)[:-3]}" for p in glob.glob(os.path.join(ROOT, "scripts", "*.py"))
               if "\ndef main(" in open(p).read()}
    assert scripts == set(CONFIGS)


def config_class(module):
    where, name = CONFIGS[module]
    return getattr(importlib.import_module(where), name)


@pytest.mark.parametrize("module", sorted(CONFIGS))
def test_every_entry_point_helps_and_rejects_a_bad_flag_in_one_line(module, capsys):
    main = importlib.import_module(module).main
    with pytest.raises(SystemExit) as e:
        run_cli(main, ["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and out.startswith(f"usage: python -m {module}") and "--help" in out
    assert len(description_column(out)) == 1, out
    with pytest.raises(SystemExit) as e:
        run_cli(main, ["--no_such_flag=1"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "unknown flag --no_such_flag" in err


def test_a_converted_script_from_the_command_line():
    r = subprocess.run([sys.executable, "-m", "scripts.monitor_svd", "--once", "--once"], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr == "error: --once is given twice; give each flag once\n"


def documented_commands():
    """(doc, module, args) of every `python -m scripts.X ...` line of the README and experiments/*.md."""
    found = []
    for path in [os.path.join(ROOT, "README.md"), *sorted(glob.glob(os.path.join(ROOT, "experiments", "*.md")))]:
        text = re.sub(r"\\\n\s*", " ", open(path).read())  # join continued lines
        for m in re.finditer(r"^\s*python -m (scripts\.\w+)(.*)$", text, re.M):
            args = shlex.split(m.group(2), comments=True)
            if not any(a.startswith("[") for a in args):  # a synopsis such as `[--flags]`, not a command
                found.append((os.path.basename(path), m.group(1), args))
    return found


def test_every_documented_command_parses():
    commands = documented_commands()
    assert {m for _, m, _ in commands} >= {"scripts.bench_svd", "scripts.compare_runs", "scripts.forgetting",
                                          "scripts.monitor_svd", "scripts.plot_svd", "scripts.prepare_data"}
    for doc, module, args in commands:
        try:
            cfg = parse_args(config_class(module), args, prog=module, description="")
            if getattr(cfg, "train_flags", None):
                parse_args(config_class("scripts.base_train_adaptive_svd"), cfg.train_flags, prog=module, description="")
        except UserError as e:
            pytest.fail(f"{doc}: python -m {module} {' '.join(args)}: {e}")


def test_wandb_writes_next_to_the_run_not_into_the_current_directory(tmp_path, monkeypatch):
    from nanochat.train import TrainConfig, _init_wandb
    cwd, run_dir = tmp_path / "cwd", tmp_path / "out/base_checkpoints/d2"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_DIR", raising=False)
    run = _init_wandb(TrainConfig(run="where"), True, str(run_dir))
    run.log({"loss": 1.0}, step=1)
    run.finish()
    assert list((run_dir / "wandb").glob("offline-run-*")) and list(cwd.iterdir()) == []

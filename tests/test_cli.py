"""The dataclass command line (nanochat/cli.py) and every entry point built on it: forms, errors, help."""

import dataclasses
import glob
import importlib
import os
import re
import shlex
import subprocess
import sys
import typing

import pytest

from nanochat.cli import (above, at_least, between, check_config, flag, format_help, merge_flags, one_of, parse_args,
                          parse_flags, passthrough, positional, required)
from nanochat.common import UserError, run_cli
from tests.conftest import ROOT


@dataclasses.dataclass
class Demo:
    run_dir: str = positional("a run folder")
    out: str = required("output folder")
    depth: int = flag(4, "layers", at_least(1).or_(-1))
    lr: float = flag(0.02, "learning rate", above(0))
    once: bool = flag(False, "stop after one pass")
    mode: str = flag("fast", "how", one_of("fast", "exact"))
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
    assert error(Demo, "R", "--out=o", "--mode=slow") == "--mode=slow is not valid: use fast or exact"
    assert "--depth expects int, got 'four'" in error(Demo, "R", "--out=o", "--depth=four")
    assert "--once expects true or false" in error(Demo, "R", "--out=o", "--once=maybe")
    assert "did you mean --depth?" in error(Demo, "R", "--out=o", "--dpeth=2")
    assert "--lr needs a value" in error(Demo, "R", "--out=o", "--lr", "--depth=2")
    assert "--lr needs a value" in error(Demo, "R", "--out=o", "--lr")


def test_parse_flags_returns_only_what_was_given():
    assert parse_flags(Demo, ["R", "--out=o", "--depth=4"], prog="demo", description="") == {"run_dir": "R", "out": "o", "depth": 4}


def test_a_value_is_checked_where_its_flag_is_declared():
    assert error(Demo, "R", "--out=o", "--lr=0") == "--lr=0 is out of range: use > 0"
    assert error(Demo, "R", "--out=o", "--depth=0") == "--depth=0 is out of range: use >= 1 or -1"
    assert parse(Demo, "R", "--out=o", "--depth=-1").depth == -1


@pytest.mark.parametrize("text", ["inf", "-inf", "nan", "Infinity", "1e999"])
def test_a_float_flag_is_finite(text):
    assert error(Demo, "R", "--out=o", f"--lr={text}") == f"--lr={text} is not a finite number: use > 0"
    assert error(Demo, "R", "--out=o", "--rel", "0.1", text) == f"--rel={text} is not a finite number"


def test_the_check_helpers_state_their_rules():
    assert (at_least(1).rule, above(0).rule, between(0, 1).rule, between(0, 1, open_hi=True).rule) == (
        ">= 1", "> 0", "in [0, 1]", "in [0, 1)")
    assert one_of("a").rule == "a" and one_of("", "cpu", "cuda").rule == '"" (empty), cpu or cuda'
    edges = between(0, 0.5, open_lo=True)
    assert [edges.ok(v) for v in (0, 1e-9, 0.5, 0.6)] == [False, True, True, False]
    assert [at_least(1).or_(-1).ok(v) for v in (-2, -1, 0, 1)] == [False, True, False, True]


@dataclasses.dataclass
class Rules:
    lo: float = flag(0.1, "low", between(0, 1))
    hi: float = flag(0.9, "high", between(0, 1))
    compile: bool | None = flag(None, "tri-state")

    CHECKS = ((lambda c: c.lo < c.hi, "--lo={lo} must be below --hi={hi}"),)


@dataclasses.dataclass
class MoreRules(Rules):
    n: int = flag(1, "count", at_least(1))

    CHECKS = ((lambda c: c.n * c.lo < 1, "--n={n} times --lo={lo:g} reaches 1"),)


def test_rules_between_flags_are_declared_with_the_class_and_its_bases():
    assert parse(Rules, "--lo=0.5", "--hi=0.6").lo == 0.5
    assert error(Rules, "--lo=0.7", "--hi=0.6") == "--lo=0.7 must be below --hi=0.6"
    assert error(MoreRules, "--n=20") == "--n=20 times --lo=0.1 reaches 1"
    assert error(MoreRules, "--n=20", "--lo=0.95") == "--lo=0.95 must be below --hi=0.9; --n=20 times --lo=0.95 reaches 1"
    with pytest.raises(UserError, match=r"^--hi=2 is out of range: use in \[0, 1\]$"):  # a field first, then the rules
        check_config(MoreRules(lo=0.95, hi=2))
    with pytest.raises(UserError, match="--lo=nan is not a finite number"):  # a config built in Python is checked too
        check_config(Rules(lo=float("nan")))
    with pytest.raises(UserError, match="--compile='true' is a str"):
        check_config(Rules(compile="true"))


def test_a_tri_state_flag_takes_true_false_or_auto():
    assert parse(Rules).compile is None
    assert [parse(Rules, f"--compile={v}").compile for v in ("true", "no", "auto", "AUTO")] == [True, False, None, None]
    assert parse(Rules, "--compile").compile is True and parse(Rules, "--compile", "auto").compile is None
    assert error(Rules, "--compile=maybe") == "--compile expects true, false or auto, got 'maybe'"
    assert "--compile=auto" in format_help(Rules, "r", "R.")


def test_merge_flags_the_last_flag_wins():
    base = ["--", "--a=1", "--b-c=2", "--d", "4", "--files", "x", "y", "--keep=5", "--flag"]
    assert merge_flags(base, ["--b_c=3", "--d=5", "--files", "z"]) == [
        "--", "--a=1", "--keep=5", "--flag", "--b_c=3", "--d=5", "--files", "z"]
    assert merge_flags(base, ["--flag=false", "--a", "-1"]) == [
        "--", "--b-c=2", "--d", "4", "--files", "x", "y", "--keep=5", "--flag=false", "--a", "-1"]
    assert merge_flags(["--a=1"], ["--a=2", "--a=3"]) == ["--a=2", "--a=3"]  # repeated here: the parser refuses it
    assert merge_flags(["--a=1"], []) == ["--a=1"]


def test_the_merge_command_quotes_what_it_prints():
    r = subprocess.run([sys.executable, "-m", "nanochat.cli", "merge", "2", "--a=1", "--run=my run", "--a=x y", "'q'"],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and shlex.split(r.stdout) == ["--run=my run", "--a=x y", "'q'"]
    r = subprocess.run([sys.executable, "-m", "nanochat.cli", "merge", "5", "--a=1"], cwd=ROOT, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 1 and r.stderr.startswith("error: usage: python -m nanochat.cli merge N WORD...")


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
    assert "--mode='fast'" in text and "how (valid: fast or exact)" in text and "--out=<required>" in text
    assert "learning rate (valid: > 0)" in text and "layers (valid: >= 1 or -1)" in text
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
    "scripts.bench_analysis": ("scripts.bench_analysis", "BenchConfig"),
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
    "scripts.rebuild_evidence": ("scripts.rebuild_evidence", "RebuildConfig"),
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


@pytest.mark.parametrize("module,args,expect", [
    ("scripts.base_train", ["--matrix_lr=inf"], "--matrix_lr=inf is not a finite number: use > 0"),
    ("scripts.base_train", ["--embedding_lr=1e400"], "--embedding_lr=1e400 is not a finite number: use > 0"),
    ("scripts.base_train", ["--unembedding_lr=0"], "--unembedding_lr=0 is out of range: use > 0"),
    ("scripts.base_train", ["--weight_decay=nan"], "--weight_decay=nan is not a finite number: use >= 0"),
    ("scripts.base_train", ["--weight_decay=-5"], "--weight_decay=-5 is out of range: use >= 0"),
    ("scripts.base_train", ["--grad_clip=-1"], "--grad_clip=-1 is out of range: use >= 0"),
    ("scripts.base_train", ["--final_lr_frac=1.5"], "--final_lr_frac=1.5 is out of range: use in [0, 1]"),
    ("scripts.base_train", ["--target_flops=inf"], "--target_flops=inf is not a finite number: use > 0 or -1.0"),
    ("scripts.base_train", ["--warmup_ratio=0.5", "--warmdown_ratio=0.6"],
     "--warmup_ratio=0.5 and --warmdown_ratio=0.6 add up to more than 1"),
    ("scripts.base_train", ["--depth=-3"], "--depth=-3 is out of range: use >= 1 or -1"),
    ("scripts.base_train", ["--compile=maybe"], "--compile expects true, false or auto, got 'maybe'"),
    ("scripts.base_train", ["--dtype=float16"], "--dtype=float16 is not valid: use auto, float32 or bfloat16"),
    ("scripts.base_train_adaptive_svd", ["--depth=0"], "--depth=0 is out of range: use >= 1 or -1"),
    ("scripts.base_train_adaptive_svd", ["--depth=2", "--adaptive_svd_target_layer=2"],
     "--adaptive_svd_target_layer=2 is out of range for --depth=2"),
    ("scripts.base_train_adaptive_svd", ["--svd_alpha=inf"], "--svd_alpha=inf is not a finite number: use in (0, 1)"),
    ("scripts.base_train_adaptive_svd", ["--svd_interval=0"], "--svd_interval=0 is out of range: use >= 1"),
    ("scripts.bench_adaptive", ["--compile=auto"], "--compile expects true or false, got 'auto'"),
    ("scripts.forgetting", ["--rewarm_ratio=nan"], "--rewarm_ratio=nan is not a finite number: use in (0, 0.8]"),
    ("scripts.monitor_svd", ["R", "--poll=0"], "--poll=0 is out of range: use > 0"),
])
def test_a_bad_value_is_one_line_before_anything_starts(module, args, expect, cli):
    code, out, err = cli(module, *args)
    assert code == 2 and err.startswith(f"error: {expect}") and err.count("\n") == 1, err
    assert "Traceback" not in err and out == ""


def flag_fields(module):
    """(field, its type) of every flag of an entry point's config."""
    cls = config_class(module)
    types = typing.get_type_hints(cls)
    return [(f, types[f.name]) for f in dataclasses.fields(cls) if not f.metadata.get("passthrough")]


@pytest.mark.parametrize("module", sorted(CONFIGS))
def test_every_float_flag_refuses_non_finite_values_and_every_default_meets_its_rule(module):
    cls = config_class(module)
    for f, typ in flag_fields(module):
        default = f.default if f.default is not dataclasses.MISSING else None
        if default is not None and "valid" in f.metadata:
            assert f.metadata["valid"](default), f"{module} --{f.name}={default!r} breaks its own rule {f.metadata['rule']}"
        if typ is float or typ == list[float]:
            for text in ("inf", "nan"):
                with pytest.raises(UserError, match=f"--{f.name}={text} is not a finite number"):
                    parse_flags(cls, [f"--{f.name}={text}"], prog=module, description="")


def test_yes_no_flags_are_booleans():
    """A str flag that defaults to or accepts true and false is a boolean in disguise (with auto: `bool | None`)."""
    for module in CONFIGS:
        for f, typ in flag_fields(module):
            if typ is str and isinstance(f.default, str):
                assert f.default.lower() not in ("true", "false", "yes", "no"), f"{module} --{f.name}"
                valid = f.metadata.get("valid")
                assert not (valid and valid("true") and valid("false")), f"{module} --{f.name}"

"""Each command line reads its flags once into a declared, frozen options dataclass; the modules below it take that
(or plain values), never an argparse namespace, and only the command-line modules import argparse."""
import ast
import dataclasses
import json
import os

import pytest

from conftest import ROOT
from gluon_imagenet.export import cli as export_cli
from gluon_imagenet.export.options import ExportOptions
from gluon_imagenet.sweep_eval import cli as sweep_cli
from gluon_imagenet.sweep_eval.options import SweepOptions
from gluon_imagenet.sweep_eval.plan import SweepError
from gluon_imagenet.train import cli as train_cli
from gluon_imagenet.train.options import TrainOptions
from gluon_imagenet.train.setup import SetupError

PACKAGE = os.path.join(ROOT, "gluon_imagenet")

# The modules that are command lines (python -m ..., tools/im2rec_multi.py): the only ones that may read argv.
COMMAND_LINES = {"train/cli.py", "sweep_eval/cli.py", "export/cli.py", "doctor/cli.py", "data/pack.py",
                 "data/demo.py", "predict.py", "report.py", "recipe.py", "gpu_settings.py"}


@pytest.mark.parametrize("parse_args, argv, options_type", [
    (train_cli.parse_args, ["--recipe", "r.yaml", "--run-dir", "run"], TrainOptions),
    (sweep_cli.parse_args, ["--run-dir", "run"], SweepOptions),
    (export_cli.parse_args, ["--run-dir", "run", "--best"], ExportOptions),
])
def test_each_command_line_returns_its_frozen_options(parse_args, argv, options_type):
    options = parse_args(argv)
    assert type(options) is options_type
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.run_dir = "elsewhere"  # nothing below the command line changes an option


def test_train_options_keep_the_parsers_defaults_and_go_into_run_json_whole():
    options = train_cli.parse_args(["--recipe", "r.yaml", "--run-dir", "run", "--seed", "3", "--no-amp"])
    assert (options.recipe, options.run_dir, options.seed, options.amp) == ("r.yaml", "run", 3, False)
    assert (options.data_root, options.model, options.log_every, options.memory_check) == (
        "recordio", "resnet50_v1b", 20, None)  # argparse's defaults, not the dataclass's (it has none)
    saved = json.loads(json.dumps(options.as_dict()))  # run.json's `args`
    assert set(saved) == {f.name for f in dataclasses.fields(TrainOptions)}
    assert TrainOptions(**saved) == options


def test_train_parse_args_refuses_values_that_mean_nothing():
    with pytest.raises(SetupError, match="--log-every 0: must be >= 1"):
        train_cli.parse_args(["--recipe", "r.yaml", "--run-dir", "run", "--log-every", "0"])
    with pytest.raises(SetupError, match="--run-dir is required"):
        train_cli.parse_args(["--recipe", "r.yaml"])
    assert train_cli.parse_args(["--recipe", "r.yaml", "--io-only"]).run_dir is None


@pytest.mark.parametrize("argv, scales", [
    ([], (1.0,)),
    (["--eval-scale", "1.25"], (1.25,)),
    (["--eval-scales", "1.15,1,1.3"], (1.15, 1.0, 1.3)),
])
def test_sweep_scales_are_parsed_once_and_the_first_is_the_eval_scale(argv, scales):
    options = sweep_cli.parse_args(["--run-dir", "run", *argv])
    assert options.scales == scales and options.eval_scale == scales[0]
    names = {f.name for f in dataclasses.fields(SweepOptions)}
    assert "eval_scales" not in names and "eval_scale" not in names  # one owner: `scales`


def test_sweep_parse_args_refuses_values_that_mean_nothing():
    with pytest.raises(SweepError, match="--batch-size 0: must be a whole number >= 1"):
        sweep_cli.parse_args(["--run-dir", "run", "--batch-size", "0"])
    with pytest.raises(SweepError, match="give one of them"):
        sweep_cli.parse_args(["--run-dir", "run", "--eval-scale", "1.2", "--eval-scales", "1,1.2"])


def test_export_options_are_the_flags_as_given():
    options = export_cli.parse_args(["--run-dir", "run", "--checkpoint", "360", "--out", "m", "--onnx"])
    assert options == ExportOptions(run_dir="run", checkpoint="360", best=False, by=None, out="m", data_root=None,
                                    onnx=True)


def package_modules() -> dict[str, str]:
    """{path under gluon_imagenet/: source} of every module of the package."""
    sources = {}
    for folder, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                with open(path, encoding="utf-8") as f:
                    sources[os.path.relpath(path, PACKAGE).replace(os.sep, "/")] = f.read()
    return sources


def imports_argparse(source: str) -> bool:
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] == "argparse" for a in node.names):
            return True
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "argparse":
            return True
    return False


def test_imports_argparse_sees_every_form():
    assert imports_argparse("import argparse") and imports_argparse("import os, argparse as ap")
    assert imports_argparse("def f():\n    from argparse import Namespace")
    assert not imports_argparse("import os  # argparse\nx = 'argparse'")


def test_only_command_line_modules_import_argparse():
    sources = package_modules()
    assert COMMAND_LINES <= set(sources), f"not in the package (moved?): {sorted(COMMAND_LINES - set(sources))}"
    below = sorted(path for path, source in sources.items() if path not in COMMAND_LINES and imports_argparse(source))
    assert not below, (f"{below} import argparse: only a command line reads its flags; give the modules below it "
                       "the command's options dataclass (e.g. train/options.py) or plain values")


def test_the_command_line_modules_are_command_lines():
    """The list above stays true: each entry reads its own argv (parse_args, or main for gpu_settings and recipe,
    whose command lines are a sub-command or one word)."""
    sources = package_modules()
    for path in sorted(COMMAND_LINES):
        functions = {node.name for node in ast.walk(ast.parse(sources[path])) if isinstance(node, ast.FunctionDef)}
        assert "parse_args" in functions or "main" in functions, path

"""Command-line errors (pdm_jax/cli.py), in-process through a real absl parser with
ml_collections' config flag: each is one `error:` line and exit code 2."""

import pytest
from absl import flags
from ml_collections import config_flags

from pdm_jax import cli
from tests.conftest import REPO


def _parse(capsys, *args: str) -> str:
    """The one stderr line `cli.parse_flags` writes for `args`, after checking the exit code."""
    argv = ["prog", *args, "--workdir=w"]
    values = flags.FlagValues()
    config_flags.DEFINE_config_file(
        "config", None, "config", flag_values=values, lock_config=True, sys_argv=argv
    )
    flags.DEFINE_string("workdir", None, "workdir", flag_values=values)
    with pytest.raises(SystemExit) as stop:
        cli.parse_flags(argv, parse=values)
    assert stop.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def test_a_missing_config_file_is_named(capsys):
    assert _parse(capsys, "--config=configs/tfft.py") == (
        "error: --config: configs/tfft.py: no such file"
    )
    assert _parse(capsys, "--config", "configs/tfft.py") == (
        "error: --config: configs/tfft.py: no such file"
    )


def test_a_broken_config_file_reports_its_own_exception_and_line(tmp_path, capsys):
    syntax = tmp_path / "syntax.py"
    syntax.write_text("import ml_collections\n\ndef get_config(:\n    pass\n")
    assert _parse(capsys, f"--config={syntax}") == (
        f"error: --config: {syntax}: SyntaxError: invalid syntax (line 3)"
    )
    raising = tmp_path / "raising.py"
    raising.write_text("def get_config():\n    return {}['model']\n")
    assert _parse(capsys, f"--config={raising}") == (
        f"error: --config: {raising}: KeyError: 'model' (line 2)"
    )
    empty = tmp_path / "empty.py"
    empty.write_text("X = 1\n")
    assert _parse(capsys, f"--config={empty}") == (
        f"error: --config: {empty}: defines no get_config()"
    )


def test_a_config_file_with_an_argument_is_run_with_it(tmp_path, capsys):
    path = tmp_path / "arg.py"
    path.write_text(
        "def get_config(arg):\n    if arg != 'ok':\n        raise ValueError(f'bad {arg}')\n"
    )
    assert cli.config_file_error(f"{path}:ok") is None
    assert _parse(capsys, f"--config={path}:no") == (
        f"error: --config: {path}: ValueError: bad no (line 3)"
    )


@pytest.mark.parametrize(
    ("arg", "line"),
    [
        (
            "--config.train.num_step=10",
            "error: --config.train.num_step: no such config key (did you mean train.num_steps?)",
        ),
        (
            "--config.trian.num_steps=10",
            "error: --config.trian.num_steps: no such config key (did you mean train.num_steps?)",
        ),
        ("--config.train.bogus=1", "error: --config.train.bogus: no such config key"),
        (
            "--config.train.batch_size=abc",
            "error: --config.train.batch_size: cannot parse 'abc' (invalid literal for int() "
            "with base 10: 'abc')",
        ),
    ],
)
def test_a_bad_key_or_value_is_one_line_without_escapes(capsys, arg, line):
    assert _parse(capsys, f"--config={REPO / 'configs' / 'tft.py'}", arg) == line

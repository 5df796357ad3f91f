"""Property-based fuzzing (Hypothesis) of `--config.KEY=VALUE` over every key of both model
configs: the real flag parser `main` uses, then `configuration.validate` and what `main` does
with a config before it reads data (the layout, the model built abstractly, the optimizer).

Why: a value of the wrong type or range must end as the one `error:` line naming its key (exit
2), not as a traceback minutes into a run or as a silently non-finite loss. Cases are
derandomized and counted (one case: one generated value on one key of one config).
"""

import collections
import contextlib
import functools
import io
import itertools
import math
import re

import jax
import pytest
from absl import flags
from flax import nnx
from hypothesis import given
from hypothesis import strategies as st
from ml_collections import config_flags

from pdm_jax import cli, configuration, hardware, models, optim
from pdm_jax.errors import PdmError
from pdm_jax.hardware.targets import devices
from pdm_jax.jsonio import flatten
from pdm_jax.models import layers
from tests.conftest import REPO, assert_one_line_naming, fuzz_settings, load_config

# ml_collections imports each config file with the loader API Python 3.12 removes (its to fix).
pytestmark = pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")

# Generated values per key.
EXAMPLES = 6
RAN: collections.Counter = collections.Counter()

# --- `--config.KEY=VALUE` over every key of both model configs.

CONFIG_KEYS = {name: sorted(flatten(load_config(name).to_dict())) for name in ("tft", "cnn_bilstm")}
VALUES = st.one_of(
    st.sampled_from(["", "abc", "-1", "0", "0.5", "1e400", "nan", "-inf", "1e-320", "None"]),
    st.sampled_from([str(2**31), str(10**30), "True", "()", "(0,)", "('x',)", "[1]", "{}"]),
    st.sampled_from(["(0.5, 0.5)", "auto", "é", "a\nb", "FD009", "float16", "host:port"]),
    st.integers(min_value=-(2**70), max_value=2**70).map(str),
    st.floats().map(repr),
    st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\x00"), max_size=10),
    st.lists(st.one_of(st.integers(-3, 2**40), st.floats(), st.text(max_size=3)), max_size=3).map(
        lambda xs: repr(tuple(xs))
    ),
)
PLATFORM = hardware.detect(
    hardware.Snapshot.from_dict(
        {"devices": devices("cpu", 1, backend="cpu"), "cpu_count": 2, "host_memory_bytes": 8 << 30}
    )
)
# Keys whose bad value is reported under the key it conflicts with (`validate`'s cross-checks).
RELATED = {
    "data.source": {"data.paths"},
    "model.tft.heads": {"model.tft.hidden"},
    "model.cnn_bilstm.channels": {"model.cnn_bilstm.dilations"},
    "distributed.num_processes": {"distributed.process_id"},
    "train.eval_every": {"checkpoint.every_steps"},
}


def _override(name: str, key: str, value: str) -> tuple[object, str]:
    """(config, '') as `main` parses `--config.KEY=VALUE` with its real flag parser, or (None,
    the stderr it wrote) when that exited 2."""
    argv = ["main", f"--config={REPO / 'configs' / name}.py", f"--config.{key}={value}"]
    values = flags.FlagValues()
    config_flags.DEFINE_config_file(
        "config", None, "config", flag_values=values, lock_config=True, sys_argv=argv
    )
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        try:
            cli.parse_flags(argv, parse=values)
        except SystemExit as stop:
            assert stop.code == 2
            return None, stderr.getvalue()
    return values.config, ""


@functools.cache
def _base_params(name: str) -> object:
    config = load_config(name)
    return _abstract_params(config, hardware.decide(PLATFORM, config).dtype)


def _abstract_params(config: object, dtype: str) -> object:
    """The model built as `main` builds it, abstractly (shapes only: a huge size costs nothing)."""
    spec = layers.spec_from_config(config.model, 4, config.data.window, dtype=dtype)
    return nnx.state(nnx.eval_shape(lambda: models.build(spec, config.seed)), nnx.Param)


# A stack of hundreds of layers is a valid config whose abstract build alone takes minutes (542
# LSTM layers: 224 s); its values pass `validate`, which is what such a case checks.
DEPTHS = ("model.cnn_bilstm.lstm_layers",)


def _before_training(config: object, name: str, key: str) -> None:
    """What `main` does with a config before the data: its checks and the layout, then the model
    (for the keys it reads) or the optimizer and schedule (for train.*)."""
    configuration.validate(config)
    layout = hardware.decide(PLATFORM, config)
    unread = "cnn_bilstm" if config.model.name == "tft" else "tft"
    deep = key in DEPTHS and configuration.value_at(config, key) > 8
    builds = key in ("seed", "data.window") or (
        key.startswith(("model.", "compute.")) and not key.startswith(f"model.{unread}.")
    )
    if builds and not deep:
        _abstract_params(config, layout.dtype)
    elif key.startswith("train."):
        optimizer, schedule = optim.make_optimizer(config.train)
        jax.eval_shape(optimizer.init, _base_params(name))
        assert math.isfinite(float(schedule(0)))


@fuzz_settings(EXAMPLES)
@given(value=VALUES)
def _fuzz_overrides(value: str) -> None:
    for name, key in itertools.chain.from_iterable(
        ((name, key) for key in keys) for name, keys in CONFIG_KEYS.items()
    ):
        RAN["configs"] += 1
        config, stderr = _override(name, key, value)
        if config is None:
            lines = stderr.splitlines()
            assert len(lines) == 1 and lines[0].startswith(f"error: --config.{key}"), stderr
            continue
        try:
            _before_training(config, name, key)
        except PdmError as err:
            assert_one_line_naming(err, "config.")
            named = re.match(r"config\.([\w.]+): ", str(err))
            assert named and named.group(1) in {key, *RELATED.get(key, ())}, (key, str(err))


def test_every_config_key_takes_bad_values_as_one_line_errors():
    _fuzz_overrides()
    pairs = sum(len(keys) for keys in CONFIG_KEYS.values())
    print(f"config overrides: {RAN['configs']} cases ({pairs} keys x generated values)")
    assert RAN["configs"] >= EXAMPLES * pairs

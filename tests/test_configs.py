"""Every shipped config loads and passes validation; a per-subset config trains on its subset."""

import re

import pytest

from pdm_jax import configuration
from pdm_jax.jsonio import flatten
from tests.conftest import REPO, load_config

CONFIGS = sorted(p.stem for p in (REPO / "configs").glob("*.py") if p.stem != "common")


def test_the_configs_directory_holds_the_documented_configs():
    assert {"tft", "cnn_bilstm", "cnn_bilstm_fd001", "cnn_bilstm_fd003"} <= set(CONFIGS)


@pytest.mark.parametrize("name", CONFIGS)
def test_config_loads_and_validates(name):
    cfg = load_config(name)
    configuration.validate(cfg)
    subset = re.search(r"_(fd00\d)$", name)
    if subset:  # configs/<model>_fd00N.py: that subset, that model, the base's other choices
        assert cfg.data.subset == subset.group(1).upper()
        base = load_config(name[: subset.start()])
        assert cfg.model.name == base.model.name
        flat_base = flatten(base.to_dict())
        changed = {k for k, v in flatten(cfg.to_dict()).items() if flat_base.get(k) != v}
        assert changed <= {
            "data.subset",
            "data.window",
            "data.baseline_cycles",
            "train.learning_rate",
        }, changed


def test_per_subset_config_is_what_the_readme_names():
    readme = (REPO / "README.md").read_text()
    for name in CONFIGS:
        if re.search(r"_fd00\d$", name):
            assert f"configs/{name}.py" in readme, name

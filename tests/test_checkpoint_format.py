"""Checkpoint format compatibility: a frozen format-1 checkpoint (tests/fixtures/checkpoint_v1,
`v1_state()` and `META` saved as step 4 when the format was 1) must keep restoring, bit for bit,
whatever later code changes; a checkpoint newer than the code is refused in one line. The frozen
format-2 run is tests/fixtures/run_v2 (tests/test_checkpoint_v2.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import jax
import numpy as np
import pytest

from pdm_jax import checkpoint
from pdm_jax.checkpoint import meta as checkpoint_meta
from pdm_jax.errors import ConfigError

FIXTURE = Path(__file__).with_name("fixtures") / "checkpoint_v1"
META = {
    "data": {"next_batch": 96, "epoch": 1, "seed": 0},
    "early_stopping": {"best_rmse": 21.5, "best_step": 4, "stale": 1},
    "config": {"model": {"name": "cnn_bilstm"}, "seed": 0},
    "fingerprint": "f" * 64,
}


def v1_state() -> dict[str, Any]:
    """The state the fixture holds: params, an AdamW-like state and best params."""
    rng = np.random.default_rng(1)

    def params() -> dict[str, Any]:
        return {
            "conv": {"kernel": rng.normal(size=(3, 4, 8)).astype(np.float32)},
            "head": {"bias": rng.normal(size=(1,)).astype(np.float32)},
        }

    return {
        "params": params(),
        "opt_state": (np.int32(5), {"mu": params(), "nu": params()}),
        "best_params": params(),
    }


def test_format_1_checkpoint_restores_bitwise(tmp_path):
    store_dir = tmp_path / "store"
    shutil.copytree(FIXTURE, store_dir)  # restoring may write nothing, but never to the repo
    with checkpoint.CheckpointStore(str(store_dir), create=False) as store:
        assert store.all_steps() == [4]
        expected = v1_state()
        restored, meta = store.restore(jax.tree.map(np.zeros_like, expected))
    assert meta == {**META, "format_version": 1, "step": 4}
    assert jax.tree.structure(restored) == jax.tree.structure(expected)
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(expected), strict=True):
        assert np.asarray(got).dtype == want.dtype
        assert np.asarray(got).tobytes() == np.asarray(want).tobytes()


def test_a_checkpoint_newer_than_the_code_is_one_line(tmp_path, monkeypatch):
    uri = str(tmp_path / "store")
    monkeypatch.setattr(checkpoint_meta, "FORMAT_VERSION", 2)
    with checkpoint.CheckpointStore(uri) as store:
        store.save(3, v1_state(), META)
        assert store.wait()
    monkeypatch.setattr(checkpoint_meta, "FORMAT_VERSION", 1)
    with checkpoint.CheckpointStore(uri, create=False) as store, pytest.raises(ConfigError) as err:
        store.restore(jax.tree.map(np.zeros_like, v1_state()))
    assert str(err.value) == (
        f"checkpoint {uri} step 3 has format 2, newer than this pdm-jax reads (1); upgrade pdm-jax"
    )


def test_a_checkpoint_from_before_a_config_key_existed_still_resumes():
    """A run saved before data.min_history / model.target_offset existed compares as having the
    values that behave as the old code did; any other value is a real difference."""
    from pdm_jax.configuration import load_config

    current = load_config("common").to_dict()  # target_offset 0.0, as before the key
    saved = json.loads(json.dumps(current))
    del saved["data"]["min_history"], saved["model"]["target_offset"]
    del saved["compute"]["infer_microbatch"]  # a hardware key: resumable anyway
    assert checkpoint.config_differences(saved, current) == []
    current["data"]["min_history"] = 10
    current["model"]["target_offset"] = 60.0
    differ = checkpoint.config_differences(saved, current)
    assert differ == ["data.min_history", "model.target_offset"]

"""Temporal Fusion Transformer on C-MAPSS FD001 (the README's main job)."""

import importlib.util
import pathlib

import ml_collections


def _common():
    path = pathlib.Path(__file__).with_name("common.py")
    spec = importlib.util.spec_from_file_location("pdm_jax_configs_common", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def get_config() -> ml_collections.ConfigDict:
    config = _common().get_config()
    config.model.name = "tft"
    config.model.quantiles = (0.1, 0.5, 0.9)
    return config

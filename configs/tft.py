"""Temporal Fusion Transformer on C-MAPSS FD001 (the README's main job)."""

import pathlib

import ml_collections

from pdm_jax.configuration import load_module

common = load_module(pathlib.Path(__file__).with_name("common.py"))


def get_config() -> ml_collections.ConfigDict:
    config = common.get_config()
    config.model.name = "tft"
    config.model.quantiles = (0.1, 0.5, 0.9)
    return config

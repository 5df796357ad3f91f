"""Hybrid CNN-BiLSTM on C-MAPSS FD001."""

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
    config.model.name = "cnn_bilstm"
    config.model.quantiles = ()  # point prediction (MSE)
    return config

"""Hybrid CNN-BiLSTM on C-MAPSS FD001."""

import pathlib

import ml_collections

from pdm_jax.configuration import load_module

common = load_module(pathlib.Path(__file__).with_name("common.py"))


def get_config() -> ml_collections.ConfigDict:
    config = common.get_config()
    config.model.name = "cnn_bilstm"
    config.model.quantiles = ()  # point prediction (MSE)
    return config

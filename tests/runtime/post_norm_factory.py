"""A model file for ``moec`` specs (``path.py:own_bank``): the post-expert-norm layer of
tests/capture/test_post_norm.py (experts module with a per-expert RMSNorm scale on each output
row), for the expert-parallel tests, which load models by spec in every rank."""

from __future__ import annotations

import importlib.util
import pathlib

import torch


def _post_norm_tests():
    path = pathlib.Path(__file__).resolve().parents[1] / "capture" / "test_post_norm.py"
    spec = importlib.util.spec_from_file_location("moec_tests_post_norm", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def own_bank():
    tests = _post_norm_tests()
    return tests._model("own-bank"), (torch.randn(2, 6, tests.H),)

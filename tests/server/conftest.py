"""Fixtures of the server tests: the tiny random Llama, and a live server over it."""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from serverutil import live_server  # noqa: E402


@pytest.fixture(scope="session")
def tiny(tiny_model_dir):
    from rarefy.models.loader import load_model
    return load_model(str(tiny_model_dir), device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def server(tiny):
    with live_server(tiny) as srv:
        yield srv


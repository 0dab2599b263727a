"""The sweep's HF model with unpadded inputs (ids above the special ids, attention mask all ones):
the pad-token check of benchmarks/zoo_review.md.

    ZOO_FAMILY=mpnet healthcheck benchmarks/zoo/checks/no_padding.py:model --format json
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import zoo_sweep  # noqa: E402

FAMILY = os.environ.get("ZOO_FAMILY", "mpnet")
SPEC = {"key": f"hf_{FAMILY}", "family": FAMILY, "source": "hf", "name": FAMILY, "input_size": [], "params": None}


def model() -> torch.nn.Module:
    return zoo_sweep.build_model(SPEC)


def example_inputs() -> dict:
    inputs = zoo_sweep.build_inputs(SPEC, model())
    inputs["input_ids"] = torch.randint(4, 1000, inputs["input_ids"].shape, generator=torch.Generator().manual_seed(1))
    if "attention_mask" in inputs:
        inputs["attention_mask"] = torch.ones_like(inputs["attention_mask"])
    return inputs

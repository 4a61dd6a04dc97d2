"""The step-lever benchmark: every variant timed, each against the fused step, batch sizes compared per image."""

from __future__ import annotations

import json

import pytest

from transfer.benchmarks import step_levers

pytestmark = pytest.mark.usefixtures("tiny_models")


def test_every_variant_is_timed_and_compared_with_the_fused_step(capsys: pytest.CaptureFixture[str]):
    tiny = ["--model", "tiny_test_cnn", "--size", "16", "--batch", "4", "--batches", "2", "4", "--frozen-layers", "0"]
    step_levers.main([*tiny, "--repeats", "2", "--steps", "1"])
    rows = {r["variant"]: r for r in map(json.loads, capsys.readouterr().out.splitlines())}
    assert list(rows) == ["loop", "fused", "bf16", "batch 2"]  # the --batch itself is not timed twice
    for row in rows.values():
        assert row["seconds_per_step"] > 0
        assert row["images_per_s"] == pytest.approx(
            (2 if row["variant"] == "batch 2" else 4) / row["seconds_per_step"], rel=0.01
        )

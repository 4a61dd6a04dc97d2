"""predict's on-screen table: a header row naming the columns above the predictions."""

from __future__ import annotations

import pytest

from transfer.deploy.predict import print_table


def _result(image: str, label: str, prob: float, true: str | None = None) -> dict:
    topk = [[label, prob], ["dog", 0.2], ["ship", 0.1]]
    return {"image": image, "label": label, "prob": prob, "topk": topk, "true": true, "error": None}


def test_the_table_starts_with_a_header_aligned_with_its_columns(capsys: pytest.CaptureFixture[str]):
    print_table([_result("photos/a_long_name.png", "cat", 0.7, true="cat"), _result("b.png", "cat", 0.6, "dog")])
    header, first, second = capsys.readouterr().out.splitlines()
    assert header.split()[:3] == ["image", "prediction", "prob"] and header.rstrip().endswith("true label")
    assert first.index("cat") == header.index("prediction") and first.index("0.700") == header.index("prob")
    assert first.endswith(" ok") and second.endswith("(true: dog)")


def test_without_known_labels_the_header_has_no_truth_column(capsys: pytest.CaptureFixture[str]):
    print_table([_result("a.png", "cat", 0.7)])
    header, row = capsys.readouterr().out.splitlines()
    assert "true" not in header and row.startswith("a.png")

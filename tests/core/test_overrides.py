"""Paths and shell patterns on the command line survive Hydra's override grammar."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser

from transfer.core.overrides import path_specs, quote_path_overrides

KEYS = ("images", "parity.images")


def hydra_value(arg: str):
    return OverridesParser.create().parse_override(arg).value()


@pytest.mark.parametrize(
    "typed",
    [
        "photos/000[0-3].jpg",
        "photos/00[0-4]?.jpg",
        "a.jpg,b.jpg",
        "it's/[ab]*.png",
        r"back\slash/[x].jpg",
        "end\\[x]",
        "trailing[0]\\",
    ],
)
def test_a_pattern_hydra_would_misread_reaches_the_tool_unchanged(typed: str):
    (arg,) = quote_path_overrides([f"images={typed}"], KEYS)
    assert hydra_value(arg) == typed


@pytest.mark.parametrize("arg", ["images=photos/*.jpg", "images=[a.jpg,b.jpg]", "images=photos/**/*.png", "topk=3"])
def test_what_hydra_already_reads_right_is_left_alone(arg: str):
    assert quote_path_overrides([arg], KEYS) == [arg]


def test_only_the_path_settings_are_touched():
    args = ["ckpt=run/a,b", "parity.images=x[0].png", "-m", "images"]
    assert quote_path_overrides(args, KEYS) == ["ckpt=run/a,b", "parity.images='x[0].png'", "-m", "images"]


def test_specs_split_at_commas_unless_the_path_exists(tmp_path: Path):
    odd = tmp_path / "a,b.jpg"
    odd.write_bytes(b"")
    assert path_specs("x.jpg, y/*.png") == ["x.jpg", "y/*.png"]
    assert path_specs(["x.jpg", "z.jpg"]) == ["x.jpg", "z.jpg"]
    assert path_specs(str(odd)) == [str(odd)]

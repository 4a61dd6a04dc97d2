"""``data.augment`` values are checked as what each step needs, before any transform is built."""

from __future__ import annotations

from pathlib import Path

import pytest

from transfer.core.errors import ConfigError
from transfer.data.transforms import check_augment


@pytest.mark.parametrize(
    "key, value, said",
    [
        ("color_jitter", -1, "four numbers >= 0"),
        ("color_jitter", [0.2, 0.2], "four numbers >= 0"),
        ("color_jitter", [0.2, 0.2, 0.2, 0.9], "hue <= 0.5"),
        ("crop_padding", -4, "a whole number of px >= 0"),
        ("crop_padding", 2.5, "a whole number of px >= 0"),
        ("resized_crop_scale", [0.9, 0.3], "0 < low <= high <= 1"),
        ("resized_crop_scale", 0.5, "two area fractions"),
        ("hflip", "yes", "true or false"),
        ("rotation", 400, "degrees in [0, 180]"),
    ],
)
def test_a_value_the_step_cannot_use_is_refused_by_name(key: str, value, said: str):
    with pytest.raises(ConfigError, match=rf"data\.augment\.{key}=.* must be .*{said.split()[0]}") as err:
        check_augment({key: value})
    assert said in str(err.value)


@pytest.mark.parametrize(("group", "native_size"), [("cifar10", 32), ("imagefolder", None)])
def test_the_shipped_recipes_pass(group: str, native_size: int | None):
    from omegaconf import OmegaConf

    from transfer.conf import CONF_DIR

    augment = OmegaConf.to_container(OmegaConf.load(Path(CONF_DIR) / "data" / f"{group}.yaml").augment)
    assert isinstance(augment, dict) and augment
    check_augment(augment, native_size)


def test_the_classic_recipes_and_null_steps_pass():
    check_augment({"crop_padding": 4, "hflip": True, "color_jitter": [0.2, 0.2, 0.2, 0.1], "rotation": 15})
    check_augment({"resized_crop_scale": (0.35, 1.0), "hflip": True, "color_jitter": None, "rotation": 0})

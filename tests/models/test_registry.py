"""The model registry: a taken name warns, and test architectures exist only while a test registers them."""

from __future__ import annotations

import dataclasses
import warnings

import pytest

from tests.tiny_models import TINY_ARCHS, TINY_CNN, registered
from transfer.models import REGISTRY, create_model, register


def test_the_production_registry_holds_no_test_architectures():
    assert not {a.name for a in TINY_ARCHS} & set(REGISTRY)
    assert all(a.family != "test" for a in REGISTRY.values())


def test_the_fixture_registers_for_one_test(tiny_models):
    assert REGISTRY["tiny_test_cnn"] is TINY_CNN
    assert create_model("tiny_test_cnn", 4, pretrained=False).head.out_features == 4


def test_registered_restores_the_registry_even_an_entry_it_replaced():
    before = dict(REGISTRY)
    patched = dataclasses.replace(REGISTRY["resnet18"], family="patched")
    with pytest.warns(UserWarning, match="'resnet18' is already registered"), registered(TINY_CNN, patched):
        assert REGISTRY["resnet18"] is patched and "tiny_test_cnn" in REGISTRY
    assert before == REGISTRY and REGISTRY["resnet18"] is before["resnet18"]


def test_a_taken_name_warns_and_the_new_definition_wins():
    other = dataclasses.replace(TINY_CNN, family="other")
    with registered(TINY_CNN):
        with pytest.warns(UserWarning, match=r"'tiny_test_cnn' is already registered \(family test\)"):
            assert register(other) is other
        assert REGISTRY["tiny_test_cnn"] is other
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # registering the same object again (a module re-import) is silent
            register(other)

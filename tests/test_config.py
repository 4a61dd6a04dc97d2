"""The composed configs: experiments, and every model group file against the factory's signature."""
from __future__ import annotations

import inspect
from pathlib import Path

import pytest

from transfer.models import REGISTRY, create_model, resolve_adapt
from transfer.run import CONF_DIR

MODEL_FILES = sorted(p.stem for p in (Path(CONF_DIR) / "model").glob("*.yaml"))


def test_every_registered_model_has_a_config_and_back():
    assert set(MODEL_FILES) == {n for n, a in REGISTRY.items() if a.family != "test"}


@pytest.mark.parametrize("name", MODEL_FILES)
def test_model_configs_match_the_factory(compose_cfg, name: str):
    cfg = compose_cfg(f"model={name}")
    accepted = set(inspect.signature(create_model).parameters) - {"num_classes"}
    assert set(cfg.model) <= accepted and cfg.model.name == name
    # auto at CIFAR's 32 px is what the listing recommends, except where a small-input size was measured to win
    expected = "resize" if REGISTRY[name].small_input_size else REGISTRY[name].default_adapt
    assert cfg.model.adapt == "auto" and resolve_adapt(name, cfg.model.adapt, None, native_size=32) == expected


def test_seed_experiments_pin_the_source_recipe(compose_cfg):
    r18 = compose_cfg("+experiment=seed_resnet18")
    assert (r18.model.name, r18.trainer.max_epochs, r18.finetune.unfreeze_at_epoch) == ("resnet18", 40, 5)
    assert (r18.optimizer.lr, r18.optimizer.weight_decay, r18.scheduler.factor, r18.scheduler.patience) == (
        1e-3, 1e-4, 0.5, 2)
    alex = compose_cfg("+experiment=seed_alexnet")
    assert (alex.model.name, alex.model.adapt, alex.trainer.max_epochs) == ("alexnet", "native", 20)


def test_defaults_follow_the_source_material(compose_cfg):
    cfg = compose_cfg()
    assert (cfg.data.batch_size, cfg.trainer.max_epochs, cfg.finetune.unfreeze_at_epoch) == (64, 40, 5)
    assert cfg.data.augment.color_jitter == [0.2, 0.2, 0.2, 0.1] and cfg.data.augment.rotation == 15


def test_pretrained_vs_scratch_is_a_two_job_sweep():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=["+experiment=pretrained_vs_scratch"], return_hydra_config=True)
    assert str(cfg.hydra.mode) == "RunMode.MULTIRUN"
    assert cfg.hydra.sweeper.params["model.pretrained"] == "true,false"


def test_ddp_and_slurm_launcher_configs_compose(compose_cfg):
    cfg = compose_cfg("trainer=ddp", "trainer.num_nodes=2")
    assert cfg.trainer.strategy == "ddp" and cfg.trainer.num_nodes == 2 and cfg.trainer.accelerator == "gpu"
    assert compose_cfg("trainer=ddp_cpu").trainer.accelerator == "cpu"
    from hydra import compose, initialize_config_dir

    from transfer.run import CONF_DIR
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        full = compose("config", overrides=["hydra/launcher=slurm"], return_hydra_config=True)
    launcher = full.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher") and launcher.tasks_per_node == 1


def test_speed_defaults_are_the_documented_ones(compose_cfg):
    cfg = compose_cfg()
    assert cfg.data.augment_on == "device" and cfg.compute.channels_last and not cfg.compute.compile
    assert cfg.trainer.precision == "auto" and cfg.finetune.cache_features is False

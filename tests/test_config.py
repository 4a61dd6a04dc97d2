"""The composed configs: experiments, and every model group file against the factory's signature."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from transfer.conf import CONF_DIR
from transfer.models import REGISTRY, create_model, resolve_adapt

MODEL_FILES = sorted(p.stem for p in (Path(CONF_DIR) / "model").glob("*.yaml"))


def test_every_registered_model_has_a_config_and_back():
    assert set(MODEL_FILES) == set(REGISTRY)


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
        1e-3,
        1e-4,
        0.5,
        2,
    )
    alex = compose_cfg("+experiment=seed_alexnet")
    assert (alex.model.name, alex.model.adapt, alex.trainer.max_epochs) == ("alexnet", "native", 20)


def test_defaults_are_the_measured_recipe(compose_cfg):
    cfg = compose_cfg()
    assert (cfg.model.name, cfg.model.adapt, cfg.optimizer._target_, cfg.scheduler._target_) == (
        "efficientnet_lite0",
        "auto",
        "torch.optim.AdamW",
        "torch.optim.lr_scheduler.OneCycleLR",
    )
    assert cfg.scheduler.total_steps is None and cfg.scheduler.interval == "step"  # sized by the trainer
    assert (cfg.finetune.unfreeze_at_epoch, cfg.label_smoothing, cfg.tta) == (0, 0.1, True)
    assert cfg.callbacks.ema._target_ == "transfer.training.ema.EMA"
    assert cfg.data.augment.color_jitter is None and not cfg.data.augment.rotation


def test_seed_experiment_restores_every_setting_of_the_source_recipe(compose_cfg):
    cfg = compose_cfg("+experiment=seed_resnet18")
    source = {
        "model.name": "resnet18",
        "model.adapt": "native",
        "model.pretrained": True,
        "optimizer._target_": "torch.optim.Adam",
        "optimizer.lr": 1e-3,
        "optimizer.weight_decay": 1e-4,
        "scheduler._target_": "torch.optim.lr_scheduler.ReduceLROnPlateau",
        "trainer.max_epochs": 40,
        "finetune.unfreeze_at_epoch": 5,
        "finetune.backbone_lr_ratio": 0.1,
        "finetune.layer_decay": 1.0,
        "finetune.bn": "train",
        "data.batch_size": 64,
        "data.image_size": None,
        "label_smoothing": 0.0,
        "mix.mixup_alpha": 0.0,
        "mix.cutmix_alpha": 0.0,
        "tta": False,
        "data.augment.color_jitter": [0.2, 0.2, 0.2, 0.1],
        "data.augment.rotation": 15,
    }
    assert {k: OmegaConf.select(cfg, k) for k in source} == source
    assert (
        cfg.callbacks.ema is None
        and cfg.callbacks.divergence_guard._target_ == "transfer.training.guard.DivergenceGuard"
    )
    assert cfg.data.augment.crop_padding == 4 and cfg.data.augment.hflip


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

    from transfer.conf import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        full = compose("config", overrides=["hydra/launcher=slurm"], return_hydra_config=True)
    launcher = full.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher") and launcher.tasks_per_node == 1


def test_speed_defaults_are_the_documented_ones(compose_cfg):
    cfg = compose_cfg()
    assert cfg.data.augment_on == "device" and cfg.compute.channels_last and not cfg.compute.compile
    assert cfg.trainer.precision == "auto" and cfg.finetune.cache_features is False


def test_logger_group_builds_every_logger_into_the_run_directory(compose_cfg, tmp_path):
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    from transfer.core.errors import ConfigError
    from transfer.training.train import build_loggers

    loggers = build_loggers(compose_cfg("logger=csv"), tmp_path)
    assert [type(lg) for lg in loggers] == [TensorBoardLogger, CSVLogger]
    assert all(Path(lg.log_dir).parent == tmp_path for lg in loggers)
    assert build_loggers(compose_cfg("~logger.tensorboard"), tmp_path) == []
    with pytest.raises(ConfigError, match="logger.broken"):
        build_loggers(compose_cfg("+logger.broken._target_=no.such.Logger"), tmp_path)

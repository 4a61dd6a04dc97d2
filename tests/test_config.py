"""The composed configs: experiments, and every model group file against the factory's signature."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from transfer.conf import CONF_DIR
from transfer.models import REGISTRY, create_model, resolve_adapt

MODEL_FILES = sorted(p.stem for p in (Path(CONF_DIR) / "model").glob("*.yaml"))
# What every model file composed to before they shared conf/model/_base/defaults.yaml: the base's values, and per
# model the ones that differ. `python -m transfer.run model=<name>` must compose exactly this.
BASE = {"pretrained": True, "weights": None, "adapt": "auto", "drop_rate": 0.0, "frozen_layers": 0}
DIFFERS = {
    **{f"efficientnet_b{i}": {"drop_rate": d} for i, d in enumerate((0.2, 0.2, 0.25, 0.25, 0.3, 0.3, 0.35, 0.35))},
    **{f"efficientnet_lite{i}": {"drop_rate": 0.2} for i in range(1, 3)},
    "efficientnet_lite0": {"drop_rate": 0.2, "frozen_layers": 4},
    **{name: {"drop_rate": 0.2} for name in ("googlenet", "inception_resnet_v2", "mobilenet_v2")},
    **{name: {"drop_rate": 0.2} for name in ("mobilenet_v3_large", "mobilenet_v3_small")},
    "inception_v3": {"drop_rate": 0.5},
    "lenet5": {"pretrained": False},
    "vgg16": {"frozen_layers": 10},
}


def test_every_registered_model_has_a_config_and_back():
    assert set(MODEL_FILES) == set(REGISTRY)


def test_the_shared_model_base_is_not_offered_as_a_model():
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        options = GlobalHydra.instance().config_loader().get_group_options("model")
    assert sorted(options) == MODEL_FILES


def test_every_model_file_composes_as_before(compose_cfg):
    for name in MODEL_FILES:
        assert OmegaConf.to_container(compose_cfg(f"model={name}").model) == {
            "name": name,
            **BASE,
            **DIFFERS.get(name, {}),
        }, name


def test_the_factory_defaults_are_the_config_defaults():
    """One source of defaults: calling create_model without a setting means what the config means."""
    base = OmegaConf.to_container(OmegaConf.load(Path(CONF_DIR) / "model" / "_base" / "defaults.yaml"))
    assert isinstance(base, dict) and base.pop("name") == "???" and base == BASE
    defaults = {k: p.default for k, p in inspect.signature(create_model).parameters.items() if k in base}
    assert defaults == base


@pytest.mark.parametrize("name", MODEL_FILES)
def test_model_configs_match_the_factory(compose_cfg, name: str):
    cfg = compose_cfg(f"model={name}")
    accepted = set(inspect.signature(create_model).parameters) - {"num_classes"}
    assert set(cfg.model) <= accepted and cfg.model.name == name
    # auto at CIFAR's 32 px: the adapted stem, except for transformers (their pretrained geometry) and where a
    # small-input size was measured to beat it (the unmodified network on upsampled images)
    pretrained = REGISTRY[name].pretrained_cfg
    expected = "resize" if pretrained.auto_adapt == "resize" or pretrained.small_input_size else "native"
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
    assert (cfg.model.frozen_layers, cfg.optimizer.lr) == (4, 2e-3)  # docs/recipe.md "Frozen layers"
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


def test_a_scratch_model_trains_the_layers_frozen_layers_would_keep(compose_cfg, caplog):
    from transfer.training.train import model_args

    assert model_args(compose_cfg("model=vgg16"), "native")["frozen_layers"] == 10
    with caplog.at_level("WARNING"):
        assert model_args(compose_cfg("model=vgg16", "model.pretrained=false"), "native")["frozen_layers"] == 0
    assert "model.frozen_layers=10" in caplog.text and "every layer trains" in caplog.text


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
    with pytest.raises(ConfigError, match=r"logger\.broken"):
        build_loggers(compose_cfg("+logger.broken._target_=no.such.Logger"), tmp_path)

"""Inside residual blocks: how much each block changes its input, and how gradients flow through it.

A residual block computes ``H(x) = F(x) + S(x)`` (``S`` the identity, or a 1x1 projection when the shape
changes). Per block, over a batch of real images, this measures

* ``rel_norm`` = ||F(x)|| / ||S(x)||: how much the block changes its input (small: close to identity);
* ``cos`` = cos(F(x), S(x)): whether the block adds to or cancels what it receives;
* from one backward pass, the gradient reaching ``x`` through the shortcut, ||S'(x)^T g||, and through the
  residual branch, ||F'(x)^T g|| (``g`` the gradient at the sum): the two terms of d(x + F(x))/dx = 1 + dF/dx. The
  shortcut term is why gradients survive depth.

``plain=True`` removes the shortcuts (``H(x) = F(x)``) to train the same depth without them.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from timm.models import _efficientnet_blocks as timm_blocks
from torch import Tensor, nn
from torchvision.models import efficientnet, mobilenetv2, mobilenetv3, resnet

from transfer.core.errors import ConfigError, WeightsUnavailableError
from transfer.core.plots import plain_vs_residual_figure, residual_figure
from transfer.data import datamodule_from_config
from transfer.deploy.load import find_checkpoint
from transfer.models import create_model
from transfer.training.module import Classifier
from transfer.training.train import resolve_input

Branch = Callable[[Any, Tensor], Tensor]  # a block of the type FAMILIES files it under


def _basic(b: resnet.BasicBlock, x: Tensor) -> Tensor:
    return b.bn2(b.conv2(b.relu(b.bn1(b.conv1(x)))))


def _bottleneck(b: resnet.Bottleneck, x: Tensor) -> Tensor:
    return b.bn3(b.conv3(b.relu(b.bn2(b.conv2(b.relu(b.bn1(b.conv1(x))))))))


def _timm_branch(b: timm_blocks.InvertedResidual | timm_blocks.DepthwiseSeparableConv, x: Tensor) -> Tensor:
    # timm's blocks add their skip inside forward when has_skip is set; run that forward without it to get F.
    b.has_skip = False
    try:
        block_class: type[nn.Module] = type(b)  # the class's forward: the instance's is replaced while measuring
        return block_class.forward(b, x)
    finally:
        b.has_skip = True


# block type -> (residual branch F, activation applied after the sum)
FAMILIES: dict[type, tuple[Branch, Callable[[Tensor], Tensor]]] = {
    resnet.BasicBlock: (_basic, F.relu),
    resnet.Bottleneck: (_bottleneck, F.relu),
    mobilenetv2.InvertedResidual: (lambda b, x: b.conv(x), lambda t: t),
    mobilenetv3.InvertedResidual: (lambda b, x: b.block(x), lambda t: t),
    efficientnet.MBConv: (lambda b, x: b.stochastic_depth(b.block(x)), lambda t: t),
    timm_blocks.InvertedResidual: (_timm_branch, lambda t: t),  # EfficientNet-Lite, timm MobileNets
    timm_blocks.DepthwiseSeparableConv: (_timm_branch, lambda t: t),
}


def residual_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Blocks with a shortcut, in forward order (mobile blocks without one, e.g. strided, are skipped)."""
    return [
        (name, m)
        for name, m in model.named_modules()
        if type(m) in FAMILIES and getattr(m, "use_res_connect", True) and getattr(m, "has_skip", True)
    ]


def _shortcut(block: nn.Module, x: Tensor) -> Tensor:
    down = getattr(block, "downsample", None)
    return down(x) if down is not None else x


@dataclass
class BlockStats:
    """Measures of one block over a batch (see the module docstring)."""

    block: str
    kind: str
    rel_norm: float
    cos: float
    grad_shortcut: float
    grad_residual: float


@contextmanager
def instrument(model: nn.Module, plain: bool = False, record: bool = True) -> Iterator[list[dict[str, Any]]]:
    """Run ``model`` with every residual block's input, branch and shortcut recorded (and, if ``plain``, without
    the shortcut). Yields the list the records are appended to, one dict per block call; ``record=False`` keeps
    nothing (for training loops, where kept activations would hold every step's graph in memory)."""
    records: list[dict[str, Any]] = []
    blocks = residual_blocks(model)
    for name, block in blocks:
        branch, post = FAMILIES[type(block)]

        def forward(x: Tensor, block=block, name=name, branch=branch, post=post) -> Tensor:
            f = branch(block, x)
            s = _shortcut(block, x)
            if record:
                records.append({"block": name, "kind": type(block).__name__, "x": x, "f": f, "s": s})
            return post(f if plain else f + s)

        block.forward = forward  # instance attribute: nn.Module.__call__ picks it up
    try:
        yield records
    finally:
        for _, block in blocks:
            del block.forward


def measure(x: Tensor, f: Tensor, s: Tensor, g: Tensor) -> tuple[float, float, float, float]:
    """``(rel_norm, cos, grad_shortcut, grad_residual)`` for one block, given the gradient ``g`` at its sum.

    Args:
        x: block input (part of the autograd graph).
        f: residual branch output ``F(x)``.
        s: shortcut output ``S(x)``.
        g: gradient of the loss with respect to ``F(x) + S(x)``.
    """
    f_flat, s_flat = f.detach().flatten(1), s.detach().flatten(1)
    rel = float(f_flat.norm() / s_flat.norm().clamp_min(1e-12))
    cos = float(F.cosine_similarity(f_flat, s_flat, dim=1).mean())
    grad_res = torch.autograd.grad(f, x, g, retain_graph=True)[0]
    grad_short = g if s is x else torch.autograd.grad(s, x, g, retain_graph=True)[0]
    return rel, cos, float(grad_short.norm()), float(grad_res.norm())


def inspect_blocks(model: nn.Module, images: Tensor, targets: Tensor) -> list[BlockStats]:
    """Measure every residual block of ``model`` on one batch (model in eval mode: statistics, not training)."""
    model.eval()
    images = images.clone().requires_grad_(True)  # so even the first block's input is in the graph
    with instrument(model) as records:
        logits = model(images)
        for r in records:
            r["f"].retain_grad()
        F.cross_entropy(logits, targets).backward(retain_graph=True)
        stats = [BlockStats(r["block"], r["kind"], *measure(r["x"], r["f"], r["s"], r["f"].grad)) for r in records]
    model.zero_grad(set_to_none=True)
    return stats


def stats_table(stats: list[BlockStats]) -> str:
    """A fixed-width text table."""
    head = f"{'block':<22}{'kind':<18}{'|F|/|x|':>9}{'cos':>8}{'grad via x':>12}{'grad via F':>12}"
    rows = [
        f"{s.block:<22}{s.kind:<18}{s.rel_norm:>9.3f}{s.cos:>8.3f}{s.grad_shortcut:>12.3g}{s.grad_residual:>12.3g}"
        for s in stats
    ]
    return "\n".join([head, *rows])


def as_rows(stats: list[BlockStats], weights: str) -> list[dict[str, Any]]:
    """JSON-ready rows tagged with which weights were measured."""
    return [{"weights": weights, **asdict(s)} for s in stats]


def train_plain_vs_residual(
    make_model: Callable[[], nn.Module], batches: list[tuple[Tensor, Tensor]], steps: int, lr: float = 1e-3
) -> dict[str, dict[str, list[Any]]]:
    """Train two identically initialised copies, with and without shortcuts, on the same batches.

    Args:
        make_model: returns a fresh model (seeded inside, so both copies start equal).
        batches: ``(images, targets)`` cycled through.
        steps: optimisation steps per copy.
        lr: Adam learning rate.

    Returns:
        Per variant: ``loss`` per step and ``grad_norm`` per residual block (mean over steps of the norm of the
        gradient of the block's parameters), in forward order.
    """
    out: dict[str, dict[str, list[Any]]] = {}
    for variant in ("residual", "plain"):
        model = make_model().train()
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        blocks = residual_blocks(model)
        losses, grad_sums = [], [0.0] * len(blocks)
        with instrument(model, plain=variant == "plain", record=False):
            for step in range(steps):
                x, y = batches[step % len(batches)]
                opt.zero_grad(set_to_none=True)
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                for i, (_, block) in enumerate(blocks):
                    grads = [p.grad.norm() ** 2 for p in block.parameters() if p.grad is not None]
                    grad_sums[i] += float(torch.stack(grads).sum().sqrt()) if grads else 0.0
                opt.step()
                losses.append(float(loss.detach()))
        out[variant] = {
            "loss": losses,
            "grad_norm": [g / max(steps, 1) for g in grad_sums],
            "blocks": [name for name, _ in blocks],
        }
    return out


def _weight_sets(cfg: Any, num_classes: int, adapt: str) -> dict[str, nn.Module]:
    """random, pretrained (when available) and the fine-tuned checkpoint (when given) versions of the model."""
    args = {"name": cfg.model.name, "num_classes": num_classes, "adapt": adapt}
    torch.manual_seed(cfg.seed)
    sets: dict[str, nn.Module] = {"random": create_model(pretrained=False, **args)}
    if cfg.model.pretrained or cfg.model.weights:  # model.pretrained=false: random (and checkpoint) only
        try:
            sets["pretrained"] = create_model(pretrained=True, weights=cfg.model.weights, **args)
        except WeightsUnavailableError as err:
            print(f"pretrained weights skipped: {err}")
    if cfg.ckpt:
        sets["fine-tuned"] = Classifier.from_checkpoint(find_checkpoint(cfg.ckpt)).model
    return sets


def run(cfg: DictConfig, out: Path) -> dict[str, list[BlockStats]]:
    """The command: measure every weight set on one validation batch, optionally train plain vs residual."""
    adapt, preprocess = resolve_input(cfg)
    datamodule = datamodule_from_config(cfg.data, preprocess, eval_batch_size=int(cfg.images))
    sets = _weight_sets(cfg, len(datamodule.classes), adapt)
    if not residual_blocks(sets["random"]):
        raise ConfigError(
            f"model={cfg.model.name} has no residual blocks this tool knows "
            f"({', '.join(t.__name__ for t in FAMILIES)}); try resnet18, resnet50 or mobilenet_v2."
        )
    datamodule.prepare_data()
    datamodule.setup("fit")
    x, y, _ = datamodule.prepare_batch(next(iter(datamodule.val_dataloader())), train=False)
    stats = {label: inspect_blocks(model, x, y) for label, model in sets.items()}
    out.mkdir(parents=True, exist_ok=True)
    rows = [row for label, s in stats.items() for row in as_rows(s, label)]
    (out / "residuals.json").write_text(json.dumps(rows, indent=1))
    (out / "residuals.md").write_text("\n\n".join(f"## {k}\n```\n{stats_table(v)}\n```" for k, v in stats.items()))
    residual_figure(stats, out / "residuals.png", f"{cfg.model.name}: inside the residual blocks")
    for label, s in stats.items():
        print(f"\n{label}\n{stats_table(s)}")
    steps = int(cfg.plain_vs_residual.steps)
    if steps > 0:
        loader = iter(datamodule.train_dataloader())
        batches = [
            datamodule.prepare_batch(next(loader), train=True)[:2] for _ in range(int(cfg.plain_vs_residual.batches))
        ]

        def fresh() -> nn.Module:
            torch.manual_seed(cfg.seed)
            return create_model(cfg.model.name, len(datamodule.classes), pretrained=False, adapt=adapt)

        result = train_plain_vs_residual(fresh, batches, steps, float(cfg.plain_vs_residual.lr))
        (out / "plain_vs_residual.json").write_text(json.dumps(result, indent=1))
        plain_vs_residual_figure(result, out / "plain_vs_residual.png", f"{cfg.model.name}, from scratch")
        for variant, data in result.items():
            print(
                f"{variant}: final loss {data['loss'][-1]:.3f}, first-block grad {data['grad_norm'][0]:.3g}, "
                f"last-block grad {data['grad_norm'][-1]:.3g}"
            )
    print(f"\noutputs in {out}")
    return stats

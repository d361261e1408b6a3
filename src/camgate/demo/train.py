"""Train the demo classifiers (one per synthetic variant) on CPU and write a model card for each.

``train("clean", cache)`` and ``train("shortcut", cache)`` give two resnet18 models that both
classify the synthetic underpass well; the shortcut one does so by looking at the wall lamp,
which the heatmap gate is meant to catch. Results are cached by a hash of every parameter that
changes them (data generation, training, torch version).
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torchvision
import yaml
from PIL import Image

from . import synth

TRAIN_VERSION = 1  # bump when training changes, so cached models are retrained
BODY_STAGES = ("layer4", "layer3", "layer2", "layer1", "conv1")  # a resnet18 body's stages, trainable from the top
MEAN = (0.5, 0.5, 0.5)  # synthetic images: no reason for ImageNet statistics
STD = (0.25, 0.25, 0.25)


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a trained demo model (together with variant and seed)."""

    n_train: int = 800
    n_test: int = 400
    size: tuple[int, int] = synth.DEFAULT_SIZE  # (H, W); stride 16 at layer3 -> 8x10 CAM
    arch: str = "resnet18"
    target_layer: str = "layer3"
    epochs: int = 5
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 1e-4
    flip: bool = True  # the tunnel is near-symmetric, so mirrored scenes are plausible
    # A zero, frozen classifier bias makes every class, "empty" included, rest on positive evidence
    # somewhere in the image; with a bias, "empty" is learnt as "no object" and Grad-CAM is all zero.
    fc_bias: bool = False


def _digest(blob: dict) -> str:
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


def data_hash(variant: str, seed: int, config: TrainConfig) -> str:
    return _digest({"variant": variant, "seed": seed, "n_train": config.n_train, "n_test": config.n_test,
                    "size": list(config.size), "synth": synth.SYNTH_VERSION})


def config_hash(variant: str, seed: int, config: TrainConfig) -> str:
    return _digest({"data": data_hash(variant, seed, config), "config": asdict(config), "train": TRAIN_VERSION,
                    "torch": torch.__version__, "torchvision": torchvision.__version__})


def _load(manifest: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Manifest -> (uint8 N,3,H,W images, int64 labels), held in memory (the sets are small)."""
    with open(manifest, newline="") as f:
        rows = list(csv.DictReader(f))
    x = np.stack([np.asarray(Image.open(manifest.parent / r["image"]).convert("RGB")) for r in rows])
    y = np.array([synth.CLASSES.index(r["label"]) for r in rows])
    return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(y)


def _normalise(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return (x.float() / 255.0 - mean) / std


@torch.no_grad()
def _predict(model: torch.nn.Module, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    model.eval()
    return torch.cat([model(_normalise(x[i:i + batch_size])).argmax(1) for i in range(0, len(x), batch_size)])


def fit(x: torch.Tensor, y: torch.Tensor, config: TrainConfig, seed: int, log=None) -> torch.nn.Module:
    """Train from random init (nothing is downloaded). Deterministic for a given seed, thread count,
    machine and library versions (float summation order differs between CPUs and builds).
    ``log``: called with a line per epoch."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = torchvision.models.get_model(config.arch, weights=None, num_classes=len(synth.CLASSES))
    if not config.fc_bias:
        fc = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]  # the classifier head
        torch.nn.init.zeros_(fc.bias)
        fc.bias.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    steps = config.epochs * -(-len(x) // config.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=config.lr, total_steps=steps, pct_start=0.2)
    model.train()
    t0 = time.perf_counter()
    for epoch in range(config.epochs):
        order = torch.randperm(len(x), generator=gen)
        total = 0.0
        for i in range(0, len(x), config.batch_size):
            idx = order[i:i + config.batch_size]
            xb = _normalise(x[idx])
            if config.flip:
                flip = torch.rand(len(idx), generator=gen) < 0.5
                xb[flip] = xb[flip].flip(-1)
            loss = torch.nn.functional.cross_entropy(model(xb), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.detach().item() * len(idx)
        if log:
            log(f"epoch {epoch + 1}/{config.epochs}: loss {total / len(x):.3f} ({time.perf_counter() - t0:.0f} s)")
    return model.eval()


def train(variant: str, cache_dir, seed: int = 0, config: TrainConfig | None = None, log=None) -> Path:
    """Generate the ``variant`` data set and train its model; return the model card's path.

    Layout under ``cache_dir``: ``data/underpass-<variant>-<hash>/`` (manifests, images, masks) and
    ``models/underpass-<variant>-<hash>/`` (``card.yaml``, ``model.safetensors``, ``metrics.json``).
    An existing card for the same hash is returned without training.
    """
    config = config or TrainConfig()
    config = replace(config, size=(int(config.size[0]), int(config.size[1])))
    key = config_hash(variant, seed, config)
    cache = Path(cache_dir)
    model_dir = cache / "models" / f"underpass-{variant}-{key}"
    card_path = model_dir / "card.yaml"
    say = (lambda msg: log(f"{variant}: {msg}")) if log else (lambda msg: None)
    if card_path.exists() and (model_dir / "metrics.json").exists():
        say(f"trained model cached ({model_dir})")
        return card_path

    # params.json is written last, so its presence means a complete data set.
    data_dir = cache / "data" / f"underpass-{variant}-{data_hash(variant, seed, config)}"
    t0 = time.perf_counter()
    if (data_dir / "params.json").exists():
        test_csv = data_dir / "test.csv"
    else:
        say(f"generating {config.n_train} + {config.n_test} images")
        test_csv = synth.generate(data_dir, variant, config.n_train, config.n_test, seed=seed, size=config.size)
    t_data = time.perf_counter() - t0
    x_train, y_train = _load(test_csv.parent / "train.csv")
    x_test, y_test = _load(test_csv)

    say(f"training {config.arch} for {config.epochs} epochs on {len(x_train)} images (CPU)")
    t0 = time.perf_counter()
    model = fit(x_train, y_train, config, seed, log=say)
    t_train = time.perf_counter() - t0
    pred = _predict(model, x_test, 64)
    acc = round(float((pred == y_test).float().mean()), 4) if len(y_test) else None
    say(f"test accuracy {acc}")
    per_class = {c: round(float((pred[y_test == i] == i).float().mean()), 4) if (y_test == i).any() else None
                 for i, c in enumerate(synth.CLASSES)}
    train_acc = round(float((_predict(model, x_train, 64) == y_train).float().mean()), 4)

    card = {
        "name": f"underpass-{variant}",
        "arch": f"torchvision/{config.arch}",
        "num_classes": len(synth.CLASSES),
        "classes": list(synth.CLASSES),
        "weights": "model.safetensors",
        "input": {"size": list(config.size), "mean": list(MEAN), "std": list(STD), "resize": "stretch"},
        "target_layer": config.target_layer,
    }
    metrics = {"variant": variant, "seed": seed, "hash": key, "test_accuracy": acc,
               "train_accuracy": train_acc, "per_class_test_accuracy": per_class,
               "n_train": config.n_train, "n_test": config.n_test, "train_seconds": round(t_train, 2),
               "datagen_seconds": round(t_data, 2), "threads": torch.get_num_threads(),
               "config": asdict(config), "torch": torch.__version__,
               "data": os.path.relpath(test_csv, model_dir)}

    save_model(model_dir, model, card, metrics)
    return card_path


def load_body(body: torch.nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """Load a torchvision resnet18 state dict (the classification demo's) into the resnet18 body of the
    demo's ``what`` (detector, segmenter); ValueError when it does not fit."""
    kept = {k: v for k, v in state.items() if not k.startswith("fc.") and not k.endswith("num_batches_tracked")}
    missing, unexpected = body.load_state_dict(kept, strict=False)
    if missing or unexpected:
        raise ValueError(f"classifier weights do not fit the {what}'s body: missing {missing}, "
                         f"unexpected {unexpected}")


def train_on_body(what: str, prefix: str, variant: str, cache_dir, seed: int, config, key: str, data_key: str,
                  generate, fit, card: dict, log=None, labels: str = "labels") -> Path:
    """What training the demo's detector and segmenter share around their own ``fit``: the cache (an
    existing card for ``key`` is returned as it is), the body from the variant's classifier
    (``config.init``: ``classifier`` | ``none``), the data set, the metrics and the saved model.

    ``config`` has ``init``, ``trainable_layers`` (of :data:`BODY_STAGES`), ``size``, ``n_train``,
    ``n_test``; ``generate(data_dir)`` writes the data set (images with ``labels``) and returns its
    test manifest; ``fit(test_csv, init_state, say)`` -> (model, test figures, training seconds).
    Layout under ``cache_dir``: ``data/<prefix>-<variant>-<data_key>/`` and ``models/<prefix>-<variant>-<key>/``.
    """
    from safetensors.torch import load_file

    if config.init not in ("classifier", "none"):
        raise ValueError(f"init must be 'classifier' or 'none', got {config.init!r}")
    if not 0 <= config.trainable_layers <= len(BODY_STAGES):
        raise ValueError(f"trainable_layers must be in 0..{len(BODY_STAGES)}, got {config.trainable_layers}")
    if config.init == "classifier" and tuple(config.size) != tuple(TrainConfig().size):
        raise ValueError(f"init 'classifier' needs the classifier's image size {TrainConfig().size}")
    cache = Path(cache_dir)
    model_dir = cache / "models" / f"{prefix}-{variant}-{key}"
    card_path = model_dir / "card.yaml"
    say = (lambda msg: log(f"{variant} {what}: {msg}")) if log else (lambda msg: None)
    if card_path.exists() and (model_dir / "metrics.json").exists():
        say(f"trained model cached ({model_dir})")
        return card_path

    init_state, init_card = None, None
    if config.init == "classifier":
        init_card = train(variant, cache, seed=seed, log=log)
        init_state = load_file(str(init_card.parent / yaml.safe_load(init_card.read_text())["weights"]))

    # params.json is written last, so its presence means a complete data set.
    data_dir = cache / "data" / f"{prefix}-{variant}-{data_key}"
    t0 = time.perf_counter()
    if (data_dir / "params.json").exists():
        test_csv = data_dir / "test.csv"
    else:
        say(f"generating {config.n_train} + {config.n_test} images with {labels}")
        test_csv = generate(data_dir)
    t_data = time.perf_counter() - t0
    model, test_quality, t_train = fit(test_csv, init_state, say)
    metrics = {"variant": variant, "seed": seed, "hash": key, "test": test_quality,
               "n_train": config.n_train, "n_test": config.n_test, "train_seconds": round(t_train, 2),
               "datagen_seconds": round(t_data, 2), "threads": torch.get_num_threads(),
               "config": asdict(config), "torch": torch.__version__,
               "init": None if init_card is None else os.path.relpath(init_card, model_dir),
               "data": os.path.relpath(test_csv, model_dir)}
    save_model(model_dir, model, card, metrics)
    return card_path


def save_model(model_dir: Path, model: torch.nn.Module, card: dict, metrics: dict) -> None:
    """``card.yaml``, ``model.safetensors`` and ``metrics.json`` into ``model_dir``, written into a
    temporary sibling and renamed, so a half-written model is never taken as cached."""
    from safetensors.torch import save_file

    model_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{model_dir.name}-", dir=model_dir.parent))
    try:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"))
        (tmp / "card.yaml").write_text(yaml.safe_dump(card, sort_keys=False, default_flow_style=None))
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        # mkdtemp/safetensors create owner-only files; the cache is meant to be shared (e.g. mounted)
        os.chmod(tmp, 0o755)
        for f in tmp.iterdir():
            os.chmod(f, 0o644)
        if model_dir.exists():
            shutil.rmtree(model_dir)
        os.replace(tmp, model_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

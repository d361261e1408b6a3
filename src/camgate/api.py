"""The Python API: tensors, arrays or URIs in; maps, or results and a decision, out. No files needed.

Two calls for notebooks and test suites, on the code paths ``camgate run`` and ``camgate gate`` use
(:class:`camgate.runner.Runner`, the CAM engine, :func:`camgate.runner.apply_metrics`, the mask
decoding and :func:`camgate.data.decode.model_view`), so their numbers equal the command line's:

- :func:`explain` -> :class:`Explanation`: raw maps (what the results' ``cam`` column stores) and
  the model's predictions;
- :func:`evaluate` -> ``(results, decision)``: the results table as a pandas DataFrame (the columns
  and statuses ``camgate run`` writes) and the policy's :class:`camgate.gating.Decision`.

**Model**: an ``nn.Module`` (with ``input``, ``target_layer``, optional ``num_classes``, ``classes``,
``reshape``), a model card (path/URI, dict or :class:`~camgate.model.ModelCard`) or a
:class:`~camgate.model.LoadedModel` (:func:`camgate.load_model`; load a card once and pass that
to call repeatedly without reloading the weights).

**Images are pixels, not model inputs**: camgate preprocesses them as it does an image file
(crop/resize with PIL to ``input.size``, then ``(x - mean) / std``). A float tensor or array holds
values in [0, 1] and is taken as 8-bit pixels (``round(x * 255)``): exactly what ``camgate run`` sees
in the same images saved as 8-bit PNG, so both give the same numbers (pixels of other precision lose
at most half an 8-bit step). Accepted: a tensor ``(B, 3|1, H, W)`` (float in [0, 1] or uint8), an
array ``(B, H, W, 3)``, or a list of PIL images, arrays ``(H, W, 3)``/``(H, W)`` (uint8 or float in
[0, 1]), tensors ``(3, H, W)`` and URIs (local paths, s3://); a single PIL image or URI is a batch
of one.

**Masks**: per image, an array/tensor ``(H, W)`` (bool or integers; non-zero = invalid, or
``invalid_ids``/``invert`` as :class:`~camgate.data.MaskSpec` says) or a URI, resized to its image
with nearest-neighbour, as the data contract says; a tensor ``(B, H, W)`` or a list of them. One
2-D array or one URI is a static mask (every image's).

**The module is left as it was**: ``requires_grad`` flags, train/eval mode of every submodule, and
where its parameters and buffers are (tensors and memory format). While a call runs it is in eval
mode with frozen parameters; ``device="auto"`` uses the module where it is, another device moves it
there for the call and back after.
"""
from __future__ import annotations

import io
import math
import os
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace

import numpy as np
import torch
from PIL import Image
from torch import nn

from . import __version__
from .data.decode import MaskSpec, Sample, decode_image, decode_mask, load_sample, model_view, storage_error_kind
from .data.geometry import InputSpec
from .data.manifest import DataError, Item
from .errors import ConfigError
from .gating.decision import Decision
from .gating.decision import evaluate as judge
from .gating.policy import load_policy
from .io import results as res
from .io import storage
from .metrics.invalid import check_topk
from .model.card import ModelCard
from .model.layers import check_layers, default_target_layers, resolve_layers
from .model.load import LoadedModel, load_model, pick_device
from .runner.common import triage
from .runner.heatmaps import Runner, make_runner
from .settings import default

__all__ = ["Explanation", "evaluate", "explain"]


@dataclass
class Explanation:
    """What :func:`explain` returns; every tensor on the CPU, row ``i`` = image ``i``.

    ``maps``: float32 ``(B, h, w)``, the raw ReLU'd low-resolution maps, un-normalised (the values the
    results' ``cam`` column stores and the metrics are computed from; :meth:`normalized` gives the
    display view). ``predicted_class``/``target_class``: int64 ``(B,)``, the argmax of the logits and
    the class explained. ``predicted_score``: float32 ``(B,)``, the softmax probability of the
    predicted class. ``logits``: float32 ``(B, K)`` (``probs``: their softmax).

    A segmentation or multi-label model's rows are (image, class explained) pairs, in image order:
    ``image_index`` (int64) says whose image each row is, ``predicted_class`` = ``target_class`` the class,
    ``predicted_score`` its mean probability over its region (segmentation) or its sigmoid probability;
    ``logits`` is None. An image with nothing to explain has no row."""

    maps: torch.Tensor
    predicted_class: torch.Tensor
    predicted_score: torch.Tensor
    target_class: torch.Tensor
    logits: torch.Tensor | None
    method: str
    target_layer: str | None  # None for black-box methods
    classes: list[str] | None = None
    input_size: tuple[int, int] = (224, 224)  # (height, width) the model saw
    image_index: torch.Tensor | None = None  # per-(image, class) rows: each row's image; None = row i is image i

    @property
    def probs(self) -> torch.Tensor | None:
        return None if self.logits is None else torch.softmax(self.logits, 1)

    @property
    def predicted_label(self) -> list[str] | None:
        return [self.classes[int(c)] for c in self.predicted_class] if self.classes else None

    def normalized(self, size: tuple[int, int] | None = None) -> torch.Tensor:
        """Maps min-max scaled and upsampled bilinearly to ``size`` (default: the model input), for display."""
        from .cam import normalized

        return normalized(self.maps, tuple(size or self.input_size))

    def __len__(self) -> int:
        return self.maps.shape[0]


def explain(model, images, *, method: str = default("method"), target: str | int = default("target"),
            target_layer: str | Sequence[str] | None = None, input=None, num_classes: int | None = None,
            classes: Sequence[str] | None = None, reshape: str | None = None, labels: Sequence | None = None,
            device: str = default("device"), batch_size: int = default("batch_size"),
            budget: int = default("budget"), seed: int = default("seed"), amp: str = default("amp"),
            task: str | None = None, explained_classes: str | Sequence | None = None,
            score_threshold: float = default("score_threshold")) -> Explanation:
    """Heatmaps and predictions for a batch of images.

    ``target``: ``'predicted'``, ``'label'`` (then ``labels``: a class index or name per image) or a
    class index. ``task``: an nn.Module's task, ``'classification'`` only (a card states its own). A
    segmentation or multi-label model card gives a row per (image, class explained), as ``camgate run``:
    the classes present in the prediction or positive at ``score_threshold``, or ``explained_classes``
    (ids or names); a multi-label model's ``target='label'`` takes ``labels`` (per image a list or a
    ``;``-separated string). Detectors are refused with a :class:`camgate.errors.ConfigError` pointing to
    :func:`camgate.run`. ``budget``/``seed``: the black-box
    methods' forward passes per image and base seed
    (image ``i`` is seeded like manifest row ``i``). ``amp``: ``off|bf16|fp16``. See the module's
    docstring for ``model``, ``images`` and ``device``. A problem of the call (argument, image that
    cannot be read, target) raises :class:`camgate.errors.ConfigError` naming it.

    Example::

        >>> model = torchvision.models.resnet18(num_classes=4)
        >>> ex = camgate.explain(model, torch.rand(8, 3, 64, 64), target_layer="layer4",
        ...                      input={"size": [64, 64]})
        >>> ex.maps.shape, ex.predicted_class.shape
        (torch.Size([8, 2, 2]), torch.Size([8]))
    """
    _check_task(task)
    imgs = _images(images)
    labels = _per_image(labels, len(imgs), "labels")
    with _loaded(model, input=input, target_layer=target_layer, num_classes=num_classes, classes=classes,
                 reshape=reshape, device=device, task=task) as lm:
        if lm.card.task != "classification":
            return _explain_classes(lm, imgs, labels, method, target, batch_size, budget, seed, amp,
                                    explained_classes, score_threshold)
        if explained_classes is not None:
            raise ConfigError("explained_classes: for segmentation and multi-label models; use target")
        runner = Runner(lm, method, target, analyze=False, budget=budget, seed=seed, amp=amp)
        try:
            items = _items(imgs, None, labels, None, None)
            parts = []
            for start in range(0, len(items), _batch_size(batch_size)):
                batch = [_sample(it, img, None, lm.input, MaskSpec(), False)
                         for it, img in zip(items[start:start + batch_size], imgs[start:start + batch_size])]
                parts.append(_explain_batch(runner, batch))
        finally:
            runner.engine.close()
    cat = [torch.cat(p) for p in zip(*parts)]
    return Explanation(cat[0], cat[1], cat[2], cat[3], cat[4], runner.engine.method, runner.layer_name,
                       lm.card.classes, tuple(lm.input.size))


def evaluate(model, images, masks, *, policy=None, method: str = default("method"),
             target: str | int = default("target"),
             target_layer: str | Sequence[str] | None = None, input=None, num_classes: int | None = None,
             classes: Sequence[str] | None = None, reshape: str | None = None, labels: Sequence | None = None,
             image_ids: Sequence[str] | None = None, metadata=None, invert: bool = False,
             invalid_ids: Sequence[int] | None = None, mask_spec: MaskSpec | None = None,
             topk: float = default("topk"), device: str = default("device"),
             batch_size: int = default("batch_size"), budget: int = default("budget"), seed: int = default("seed"),
             amp: str = default("amp"), task: str | None = None, explained_classes: str | Sequence | None = None,
             score_threshold: float = default("score_threshold")):
    """``camgate run`` + ``camgate gate`` in memory -> ``(results, decision)``.

    A segmentation or multi-label model card gives one row per (image, class explained) with its
    task's columns and statuses (see :func:`explain` for ``explained_classes``/``score_threshold``).

    ``results``: a pandas DataFrame, one row per image in order, with the columns and statuses of a
    ``camgate run`` results file (``row``, ``image_id``, ``image``, ``mask``, ``status``, ``error``,
    ``label``, ``predicted_class``, ``predicted_score``, ``target_class``, ``method``, ``target_layer``,
    ``invalid_activation_ratio``, ``invalid_area_ratio``, ``peak_in_invalid``, ``topk_invalid_share``,
    ``cam_height``, ``cam_width``, ``cam``, ... plus the ``metadata`` columns); the run's metadata is in
    ``results.attrs['camgate']``, a row's map is ``camgate.io.results.cam_array(results.iloc[i])``. ``image``
    and ``mask`` hold the URIs given, None for in-memory ones. As in ``run``, a problem of one image (a
    file that cannot be read, the model's NaN) is that row's ``error``; problems of the call raise
    :class:`camgate.errors.ConfigError`.

    ``decision``: :class:`camgate.gating.Decision` of ``policy`` (a dict, a
    :class:`camgate.gating.Policy` or a path/URI of a policy YAML; None = the default rules) on those
    results. ``labels``/``image_ids``/``metadata`` (a DataFrame, a list of dicts or a dict of lists,
    one value per image) are the manifest's ``label``, ``image_id`` and metadata columns: for
    ``target='label'``, per-class rules and slices. ``invert``/``invalid_ids`` (or a ``mask_spec``):
    the masks mark the valid region / are label maps with these invalid ids. ``topk``: the hottest
    fraction for ``topk_invalid_share``. The rest as for :func:`explain`.

    Example::

        >>> masks = torch.zeros(8, 64, 64, dtype=torch.bool); masks[:, :16] = True
        >>> results, decision = camgate.evaluate(model, images, masks, target_layer="layer4",
        ...                                      input={"size": [64, 64]},
        ...                                      policy={"rules": {"mean_invalid_activation_ratio": 0.3}})
        >>> decision.passed, results["invalid_activation_ratio"].mean()
    """
    import pyarrow as pa

    _check_task(task)
    check_topk(topk)
    if mask_spec is None:
        ids = None if invalid_ids is None else tuple(int(i) for i in invalid_ids)
        mask_spec = MaskSpec(bool(invert), ids or None)
    elif invert or invalid_ids is not None:
        raise ConfigError("give either mask_spec or invert/invalid_ids, not both")
    policy = load_policy({} if policy is None else policy)  # a bad policy fails before any compute
    imgs = _images(images)
    n = len(imgs)
    if masks is None:
        raise ConfigError("masks: evaluate needs a mask per image (or one static mask); use explain for maps only")
    mks = _masks(masks, n)
    labels = _per_image(labels, n, "labels")
    ids = _per_image(image_ids, n, "image_ids")
    metas = _metadata(metadata, n)
    with _loaded(model, input=input, target_layer=target_layer, num_classes=num_classes, classes=classes,
                 reshape=reshape, device=device, task=task) as lm:
        runner = make_runner(lm, method, target, True, topk, budget=budget, seed=seed, amp=amp,
                             score_threshold=score_threshold, classes=_classes_setting(explained_classes))
        items = _items(imgs, mks, labels, ids, metas)
        runner.meta_types = meta_cols = res.meta_types(it.meta for it in items)
        rows: list[dict] = []
        try:
            for start in range(0, n, _batch_size(batch_size)):
                end = start + batch_size
                rows += runner.process([_sample(it, img, m, lm.input, mask_spec, True)
                                        for it, img, m in zip(items[start:end], imgs[start:end], mks[start:end])])
        finally:
            runner.engine.close()
        md = {"camgate_version": __version__, "stage": "results", "source": "python-api",
              "model": lm.metadata(), "model_card_sha256": lm.card.sha256, "weights_sha256": lm.weights_sha256,
              "method": runner.engine.method, "target": str(runner.target),
              "target_layer": [] if runner.black_box else lm.target_layers,
              **({"budget": budget, "seed": seed} if runner.black_box else {}),
              "data": None, "static_mask": None, "mask_spec": mask_spec.to_dict(), "topk": topk,
              "policy": policy.to_dict(), "amp": runner.amp,
              # what the gate reads of the task (its statuses); a run writes the whole identity
              res.IDENTITY_KEY: {"task": lm.card.task}}
    schema = res.schema(meta_cols, md, res.task_fields(lm.card.task))
    table = pa.table({name: [r.get(name) for r in rows] for name in schema.names}, schema=schema)
    decision: Decision = judge(table, policy)
    df = table.to_pandas()
    df.attrs["camgate"] = md
    return df, decision


# --- the model --------------------------------------------------------------------------------------

@contextmanager
def _loaded(model, *, input, target_layer, num_classes, classes, reshape, device, task=None):
    """Any accepted ``model`` -> a LoadedModel for the call; an nn.Module is restored on the way out."""
    module_only = {"input": input, "num_classes": num_classes, "classes": classes, "reshape": reshape,
                   "task": task}
    if isinstance(model, nn.Module):
        with _borrowed(model, _module_device(model, device)) as dev:
            yield _module_model(model, dev, input, target_layer, num_classes, classes, reshape)
        return
    given = [k for k, v in module_only.items() if v is not None]
    if given:
        raise ConfigError(f"{', '.join(given)}: only for an nn.Module; a model card states its own")
    if isinstance(model, LoadedModel):
        yield _classifier(_with_layers(model, target_layer) if target_layer else model)
        return
    if isinstance(model, Mapping):
        model = ModelCard.from_dict(dict(model))
    elif isinstance(model, os.PathLike):
        model = os.fspath(model)
    if not isinstance(model, (str, ModelCard)):
        raise ConfigError(f"model: expected an nn.Module, a model card (path/URI, dict or ModelCard) or a "
                          f"LoadedModel, got {type(model).__name__}")
    yield _classifier(load_model(model, device=device, target_layer=target_layer))


def _classifier(lm: LoadedModel) -> LoadedModel:
    if lm.card.task == "detection":  # its rows need ground truth and boxes that have no place here
        raise ConfigError(f"explain/evaluate take classifiers, segmentation and multi-label models; model card "
                          f"{lm.card.name!r} is a detector (task detection): camgate.run gives its per-detection "
                          f"maps and metrics")
    return lm


def _classes_setting(value) -> str | None:
    """``explained_classes`` (a string or a sequence of ids/names) -> the ``classes`` setting's form."""
    if value is None or isinstance(value, str):
        return value
    return ",".join(str(v) for v in value)


def _explain_classes(lm, imgs, labels, method, target, batch_size, budget, seed, amp, explained, threshold):
    """explain() for a segmentation or multi-label model: its runner's rows that have a map."""
    runner = make_runner(lm, method, target, False, default("topk"), budget=budget, seed=seed, amp=amp,
                         score_threshold=threshold, classes=_classes_setting(explained))
    labels = [";".join(map(str, v)) if isinstance(v, (list, tuple)) else v for v in labels]
    rows = []
    try:
        items = _items(imgs, None, labels, None, None)
        for start in range(0, len(items), _batch_size(batch_size)):
            rows += runner.process([_sample(it, img, None, lm.input, MaskSpec(), False)
                                    for it, img in zip(items[start:start + batch_size],
                                                       imgs[start:start + batch_size])])
    finally:
        runner.engine.close()
    bad = next((r for r in rows if r["status"] == "error"), None)
    if bad is not None:
        raise DataError(bad["error"])
    rows = [r for r in rows if r.get("cam") is not None]
    maps = [torch.from_numpy(res.cam_array(r).copy()) for r in rows]

    def long(key: str) -> torch.Tensor:
        return torch.tensor([int(r[key]) for r in rows], dtype=torch.long)

    score = torch.tensor([math.nan if r.get("predicted_score") is None else r["predicted_score"] for r in rows],
                         dtype=torch.float32)
    return Explanation(torch.stack(maps) if maps else torch.zeros(0, 0, 0), long("predicted_class"), score,
                       long("target_class"), None, runner.engine.method, runner.layer_name, lm.card.classes,
                       tuple(lm.input.size), image_index=long("row"))


def _check_task(task) -> None:
    """An nn.Module's task: its outputs are read as one image's class logits, so only classification."""
    if task in (None, "classification"):
        return
    from .model.card import TASKS

    if task not in TASKS:
        raise ConfigError(f"task must be one of {list(TASKS)}, got {task!r}")
    raise ConfigError(f"explain/evaluate take single-label classifiers, not task {task!r}: write a model card "
                      f"with 'task: {task}' and call camgate.run for its per-object maps and metrics")


def _module_device(module: nn.Module, device: str) -> torch.device:
    if device == "auto":  # where the module is
        t = next(module.parameters(), None)
        if t is None:
            t = next(module.buffers(), None)
        return t.device if t is not None else torch.device("cpu")
    return pick_device(device)


@contextmanager
def _borrowed(module: nn.Module, device: torch.device):
    """The module in eval mode with frozen parameters on ``device`` for the call; as it was afterwards.

    Every parameter keeps its object; its tensor (``.data``, and its ``.grad``'s), every buffer, every
    ``requires_grad`` flag and every submodule's ``training`` flag are put back as they were, so a move
    to another device or to channels_last (CUDA) is undone whatever happens during the call."""
    mods = list(module.modules())
    training = [(m, m.training) for m in mods]
    params = [(m, name, p, p.data, p.requires_grad, p.grad, None if p.grad is None else p.grad.data)
              for m in mods for name, p in m._parameters.items() if p is not None]
    buffers = [(m, name, b) for m in mods for name, b in m._buffers.items() if b is not None]
    try:
        module.eval().requires_grad_(False)
        module.to(device)
        yield device
    finally:
        with torch.no_grad():
            for m, name, p, data, flag, grad, gdata in params:
                m._parameters[name] = p  # (torch may swap Parameter objects on conversion)
                p.data = data
                p.grad = grad
                if grad is not None:
                    grad.data = gdata
                p.requires_grad_(flag)
        for m, name, b in buffers:
            m._buffers[name] = b
        for m, flag in training:
            m.training = flag


def _module_model(module: nn.Module, dev: torch.device, input, target_layer, num_classes, classes,
                  reshape) -> LoadedModel:
    """An nn.Module -> LoadedModel, validated the way ``load_model`` validates a card's model."""
    spec = _input_spec(input)
    name = type(module).__name__
    layers = _layer_list(target_layer) or default_target_layers(module, name)
    resolve_layers(module, layers)
    if reshape not in (None, "vit", "swin"):
        raise ConfigError(f"reshape must be 'vit' or 'swin', got {reshape!r}")
    fn, out = check_layers(module, layers, reshape, dev, spec.size)
    if not torch.is_tensor(out) or out.ndim != 2:
        shape = tuple(out.shape) if torch.is_tensor(out) else type(out).__name__
        raise ConfigError(f"model: output has shape {shape}, expected logits (N, num_classes)")
    k = int(out.shape[1])
    if num_classes is not None and int(num_classes) != k:
        raise ConfigError(f"num_classes: {num_classes} given but the model outputs {k} logits")
    if classes is not None:
        classes = [str(c) for c in classes]
        if len(classes) != k:
            raise ConfigError(f"classes: {len(classes)} names for the model's {k} classes")
    card = ModelCard(name=name, arch=f"{type(module).__module__}:{name}", num_classes=k, classes=classes,
                     input=spec, target_layer=layers, reshape=reshape)
    return LoadedModel(card, module, layers, "", dev, fn)


def _with_layers(lm: LoadedModel, target_layer) -> LoadedModel:
    layers = _layer_list(target_layer)
    if lm.model is None:
        raise ConfigError(f"target_layer: model card kind {lm.card.kind!r} is a black box, it has no layers")
    resolve_layers(lm.model, layers)
    fn, _ = check_layers(lm.model, layers, lm.card.reshape, lm.device, lm.input.size)
    return replace(lm, target_layers=layers, reshape_transform=fn)


def _layer_list(target_layer) -> list[str] | None:
    if not target_layer:
        return None
    layers = [target_layer] if isinstance(target_layer, str) else list(target_layer)
    if not all(isinstance(x, str) and x for x in layers):
        raise ConfigError(f"target_layer: expected a dotted module path or a list of them, got {target_layer!r}")
    return layers


def _input_spec(input) -> InputSpec:
    if input is None:
        return InputSpec()
    if isinstance(input, InputSpec):
        return input
    if isinstance(input, (int, tuple, list)):
        return InputSpec.from_card({"size": input})
    if isinstance(input, Mapping):
        return InputSpec.from_card(dict(input))
    raise ConfigError(f"input: expected an InputSpec, a dict (size, mean, std, resize) or a size, "
                      f"got {type(input).__name__}")


# --- images and masks -------------------------------------------------------------------------------

def _images(images) -> list:
    """``images`` -> a list, each an RGB PIL image or a URI string; ConfigError naming the problem."""
    if isinstance(images, (str, os.PathLike, Image.Image)):
        images = [images]
    if torch.is_tensor(images):
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ConfigError(f"images: a tensor must be (B, 3, H, W) (or (B, 1, H, W)), got shape "
                              f"{tuple(images.shape)}" + ("; for one image use x[None]" if images.ndim == 3 else ""))
        images = list(_host(images).permute(0, 2, 3, 1).numpy())
    elif isinstance(images, np.ndarray):
        if images.ndim != 4 or images.shape[3] not in (1, 3):
            raise ConfigError(f"images: an array must be (B, H, W, 3), got shape {images.shape}; "
                              f"for one image use [array]")
        images = list(images)
    elif not isinstance(images, Sequence):
        raise ConfigError(f"images: expected a tensor (B, 3, H, W), an array (B, H, W, 3) or a list of PIL "
                          f"images, arrays, tensors or URIs, got {type(images).__name__}")
    if not len(images):
        raise ConfigError("images: no images")
    return [_image(x, i) for i, x in enumerate(images)]


def _image(x, i: int):
    if isinstance(x, os.PathLike):
        return os.fspath(x)
    if isinstance(x, str):
        return x
    if isinstance(x, Image.Image):
        return x if x.mode == "RGB" else _rgb(x, i)
    if torch.is_tensor(x):
        if x.ndim != 3 or x.shape[0] not in (1, 3):
            raise ConfigError(f"images[{i}]: a tensor must be (3, H, W), got shape {tuple(x.shape)}")
        x = _host(x).permute(1, 2, 0).numpy()
    if not isinstance(x, np.ndarray):
        raise ConfigError(f"images[{i}]: expected a PIL image, an array, a tensor or a URI, got {type(x).__name__}")
    if x.ndim == 3 and x.shape[2] == 1:
        x = x[..., 0]
    if x.ndim not in (2, 3) or (x.ndim == 3 and x.shape[2] not in (3, 4)):
        raise ConfigError(f"images[{i}]: an array must be (H, W, 3) or (H, W), got shape {x.shape}")
    if min(x.shape[:2]) < 1:
        raise ConfigError(f"images[{i}]: no pixels (shape {x.shape})")
    if x.dtype == np.uint8:
        a = x
    elif x.dtype.kind == "f":
        if not np.isfinite(x).all() or x.min() < 0 or x.max() > 1:
            raise ConfigError(f"images[{i}]: float pixels must be in [0, 1] (camgate normalises with the model's "
                              f"input mean/std), got values in [{np.nanmin(x):.3g}, {np.nanmax(x):.3g}]")
        a = np.round(x.astype(np.float64) * 255).astype(np.uint8)  # 8-bit pixels, as an image file holds
    else:
        raise ConfigError(f"images[{i}]: pixels must be uint8 or float in [0, 1], got {x.dtype}")
    img = Image.fromarray(np.ascontiguousarray(a))
    return img if img.mode == "RGB" else img.convert("RGB")


def _host(t: torch.Tensor) -> torch.Tensor:
    """A tensor on the CPU, half/bfloat16 widened to float32 (numpy has no bfloat16)."""
    t = t.detach().cpu()
    return t.float() if t.is_floating_point() and t.dtype != torch.float64 else t


def _rgb(img: Image.Image, i: int) -> Image.Image:
    """A PIL image of another mode -> RGB, as ``camgate run`` decodes a file of that mode."""
    buf = io.BytesIO()
    try:
        img.save(buf, format="TIFF")  # holds every mode decode_image has a rule for (I;16, I, F, P, ...)
    except (OSError, ValueError, KeyError):
        return img.convert("RGB")
    try:
        return decode_image(buf.getvalue(), f"images[{i}]")
    except ValueError as e:
        raise ConfigError(f"images[{i}]: {e}") from e


def _masks(masks, n: int) -> list:
    """``masks`` -> one per image: a 2-D array, a URI or None. One 2-D array or URI = a static mask."""
    if isinstance(masks, (str, os.PathLike)):
        return [os.fspath(masks)] * n
    if torch.is_tensor(masks) or isinstance(masks, np.ndarray):
        a = masks.detach().cpu().numpy() if torch.is_tensor(masks) else masks
        if a.ndim == 2:
            return [a] * n
        if a.ndim != 3:
            raise ConfigError(f"masks: expected (B, H, W) or one (H, W) mask for all images, got shape {a.shape}")
        masks = list(a)
    elif not isinstance(masks, Sequence):
        raise ConfigError(f"masks: expected a tensor/array (B, H, W), a list of (H, W) arrays or URIs, or one "
                          f"static mask, got {type(masks).__name__}")
    if len(masks) != n:
        raise ConfigError(f"masks: {len(masks)} masks for {n} images (give one per image, or one static mask)")
    out = []
    for i, m in enumerate(masks):
        if m is None or isinstance(m, str):
            out.append(m)
        elif isinstance(m, os.PathLike):
            out.append(os.fspath(m))
        else:
            a = m.detach().cpu().numpy() if torch.is_tensor(m) else np.asarray(m)
            if a.ndim != 2 or min(a.shape) < 1 or a.dtype.kind not in "biuf":
                raise ConfigError(f"masks[{i}]: expected a 2-D (H, W) bool or integer mask, got "
                                  f"shape {a.shape} dtype {a.dtype}")
            out.append(a)
    return out


def _array_mask(a: np.ndarray, spec: MaskSpec, size: tuple[int, int]) -> np.ndarray:
    """A mask array -> bool invalid pixels at image ``size`` = (w, h): decode_mask's rule on decoded pixels."""
    invalid = np.isin(a, np.asarray(spec.invalid_ids)) if spec.invalid_ids is not None else a != 0
    if spec.invert:
        invalid = ~invalid
    if (invalid.shape[1], invalid.shape[0]) != tuple(size):
        invalid = np.asarray(Image.fromarray(invalid.astype(np.uint8)).resize(tuple(size), Image.NEAREST)) != 0
    return invalid


def _per_image(values, n: int, what: str) -> list:
    if values is None:
        return [None] * n
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) and not hasattr(values, "__len__"):
        raise ConfigError(f"{what}: expected one value per image, got {type(values).__name__}")
    values = list(values.tolist() if hasattr(values, "tolist") else values)
    if len(values) != n:
        raise ConfigError(f"{what}: {len(values)} values for {n} images")
    return values


def _metadata(metadata, n: int) -> list[dict]:
    if metadata is None:
        return [{} for _ in range(n)]
    if hasattr(metadata, "to_dict") and hasattr(metadata, "columns"):  # a pandas DataFrame
        metadata = metadata.to_dict("records")
    elif isinstance(metadata, Mapping):
        cols = {k: _per_image(v, n, f"metadata[{k!r}]") for k, v in metadata.items()}
        metadata = [{k: v[i] for k, v in cols.items()} for i in range(n)]
    if not isinstance(metadata, Sequence) or not all(isinstance(m, Mapping) for m in metadata):
        raise ConfigError("metadata: expected a DataFrame, a list of dicts or a dict of lists")
    if len(metadata) != n:
        raise ConfigError(f"metadata: {len(metadata)} rows for {n} images")
    reserved = {"image", "mask", "label", "image_id", "row"}
    clash = sorted({k for m in metadata for k in m} & reserved)
    if clash:
        raise ConfigError(f"metadata: {clash} are given by images/masks/labels/image_ids, not metadata")
    return [{str(k): (None if isinstance(v, float) and math.isnan(v) else v) for k, v in m.items()}
            for m in metadata]


def _items(imgs: list, masks: list | None, labels: list, ids: list | None, metas: list | None) -> list[Item]:
    """One manifest item per image: row ``i``, the URIs given (None for in-memory data)."""
    out = []
    for i, img in enumerate(imgs):
        uri = img if isinstance(img, str) else None
        mask = masks[i] if masks is not None and isinstance(masks[i], str) else None
        image_id = ids[i] if ids is not None and ids[i] is not None else (
            os.path.splitext(os.path.basename(uri.rstrip("/")))[0] if uri else str(i))
        label = labels[i]
        out.append(Item(index=i, image_id=str(image_id), image=uri, mask=mask,
                        label=label.item() if isinstance(label, np.generic) else label,
                        meta=metas[i] if metas is not None else {}))
    return out


def _sample(item: Item, img, mask, spec: InputSpec, mask_spec: MaskSpec, with_mask: bool) -> Sample:
    """An image (+ mask) -> the Sample ``camgate run`` makes of such a file; never raises (error rows)."""
    if isinstance(img, str) and (mask is None or isinstance(mask, str)):
        return load_sample(item, spec, mask_spec, None, with_mask)  # files: exactly run's path
    what, name = "image", item.image or f"images[{item.index}]"
    try:
        if isinstance(img, str):
            img = decode_image(storage.read_bytes(img), img)
        x = spec.image_tensor(img)
        full = None
        if with_mask and mask is not None:
            what, name = "mask", item.mask or f"masks[{item.index}]"
            full = decode_mask(storage.read_bytes(mask), mask, mask_spec, img.size) if isinstance(mask, str) \
                else _array_mask(mask, mask_spec, img.size)
        m = None if full is None else torch.from_numpy(model_view(full, spec, img.size))
        return Sample(item, x, m, None, img.size)
    except (storage.StorageError, ValueError) as e:
        return Sample(item, None, None, f"{what} {name} (id {item.image_id}): {e}", error_kind=storage_error_kind(e))


def _batch_size(batch_size) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size: expected an integer >= 1, got {batch_size!r}")
    return batch_size


def _explain_batch(runner: Runner, batch: list[Sample]) -> tuple[torch.Tensor, ...]:
    """One batch through the engine as ``Runner`` computes it -> (maps, pred, score, target, logits) on the CPU."""
    from .data import device as gpu

    _, targets, failed = triage(batch, runner.target, runner.lm.card, need_mask=False)
    if failed:
        raise DataError(next(iter(failed.values()))[0])
    dev = runner.lm.device
    x = torch.stack([s.x for s in batch]).to(dev).contiguous(memory_format=runner.memory_format)
    t = torch.tensor(targets, device=dev)
    with gpu.autocast(dev, runner.amp):
        cb = runner.engine(x, t, [s.item.index for s in batch]) if runner.black_box else runner.engine(x, t)
    logits = cb.logits.detach().float()
    probs = torch.softmax(logits, 1)
    pred = probs.argmax(1)
    return (cb.cams.detach().float().cpu(), pred.cpu(), probs.gather(1, pred[:, None])[:, 0].cpu(),
            cb.targets.detach().long().cpu(), logits.cpu())

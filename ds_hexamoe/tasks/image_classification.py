"""Image-classification data and the Swin-MoE task: datasets, collate, ``build_image_task``, and the
validation top-1 accuracy the worker reports beside the loss (``val_accuracy``).

Two sources, chosen by ``task_options.dataset``:

* ``"digits"``: scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes; no download),
  upscaled bilinearly to ``image_size``. The embedded CPU default.
* ``"imagefolder"``: a local ``ImageFolder`` tree (``train_dir/<class>/<image>``) read through
  ``datasets``; images are resized and normalized by the checkpoint's image processor when
  ``model.path`` has one, else by a plain resize + ImageNet normalization.

A recipe (dict) for the image task::

    {"task": "image-classification",
     "task_options": {"dataset": "digits", "image_size": 32, "validation_fraction": 0.15},
     "model": {"config": {"image_size": 32, "patch_size": 4, ..., "num_experts": 4, "router": {"top_k": 2}}},
     "training": {...}, "deepspeed": {...}, "hexamoe": {...}}

``model.config`` holds ``SwinConfig`` fields plus the MoE keys of :class:`~ds_hexamoe.models.SwinMoEConfig`
(``num_experts``, ``moe_layers``, ``router``, ``router_init_std``, ``add_aux_loss``); with ``model.path``
(a local Swin checkpoint) the config keys are MoE keys only.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ..config import ConfigError
from .base import EvalMetric, TaskParts, WorkerContext

MOE_KEYS = ("num_experts", "moe_layers", "router", "router_init_std", "add_aux_loss")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass
class ImageTaskOptions:
    """``task_options`` of an image-classification recipe."""

    dataset: str = "digits"
    image_size: int = 32
    num_channels: int | None = None  # digits: channels to replicate to (default: the model's)
    train_dir: str | None = None
    validation_dir: str | None = None
    validation_fraction: float = 0.15
    seed: int = 0

    @classmethod
    def from_dict(cls, d: dict | None, base_dir: str | None = None) -> "ImageTaskOptions":
        d = dict(d or {})
        allowed = {f for f in cls.__dataclass_fields__}
        for key in d:
            if key not in allowed:
                raise ConfigError(f"task_options.{key}: unknown key; allowed keys are {sorted(allowed)}")
        opt = cls(**d)
        if opt.dataset not in ("digits", "imagefolder"):
            raise ConfigError(f"task_options.dataset: got {opt.dataset!r}; expected 'digits' or 'imagefolder'")
        if not isinstance(opt.image_size, int) or opt.image_size < 8:
            raise ConfigError(f"task_options.image_size: got {opt.image_size!r}; expected an integer >= 8")
        if not 0.0 <= opt.validation_fraction < 1.0:
            raise ConfigError(f"task_options.validation_fraction: got {opt.validation_fraction!r}; expected a number in [0, 1)")
        if opt.dataset == "imagefolder":
            for key in ("train_dir", "validation_dir"):
                path = getattr(opt, key)
                if path is None:
                    if key == "train_dir":
                        raise ConfigError("task_options.train_dir: required for dataset 'imagefolder' "
                                          "(a folder with one sub-folder of images per class)")
                    continue
                path = os.path.expanduser(path)
                if not os.path.isabs(path) and base_dir is not None:
                    path = os.path.join(base_dir, path)
                if not os.path.isdir(path):
                    raise ConfigError(f"task_options.{key}: {path!r} is not a folder; give an ImageFolder tree "
                                      "(<dir>/<class>/<image>)")
                setattr(opt, key, os.path.abspath(path))
        return opt


class TensorImageDataset(Dataset):
    """Images and labels held as tensors: items ``{"pixel_values": [C, H, W], "labels": int}``."""

    def __init__(self, pixels: torch.Tensor, labels: torch.Tensor, num_labels: int):
        self.pixels, self.labels, self.num_labels = pixels, labels, num_labels

    def __len__(self) -> int:
        return self.labels.numel()

    def __getitem__(self, i: int) -> dict:
        return {"pixel_values": self.pixels[i], "labels": int(self.labels[i])}


def digits_datasets(image_size: int = 32, num_channels: int = 1, validation_fraction: float = 0.15,
                    seed: int = 0) -> tuple[TensorImageDataset, TensorImageDataset | None]:
    """scikit-learn's digits, upscaled to ``image_size`` and normalized to mean 0 / std 1; a seeded split."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ImportError("the digits data set needs scikit-learn: pip install scikit-learn") from None
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0  # [N, 1, 8, 8] in [0, 1]
    x = torch.nn.functional.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    x = (x - x.mean()) / x.std()
    x = x.expand(-1, num_channels, -1, -1).contiguous()
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_val = int(round(len(y) * validation_fraction))
    val, train = perm[:n_val], perm[n_val:]
    val_ds = TensorImageDataset(x[val], y[val], 10) if n_val else None
    return TensorImageDataset(x[train], y[train], 10), val_ds


class FolderImageDataset(Dataset):
    """A ``datasets`` ImageFolder split, resized and normalized on access."""

    def __init__(self, hf_split, transform: Callable, num_labels: int, label_names: list[str]):
        self.data, self.transform, self.num_labels, self.label_names = hf_split, transform, num_labels, label_names

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict:
        row = self.data[int(i)]
        return {"pixel_values": self.transform(row["image"]), "labels": int(row["label"])}


def _image_transform(image_size: int, num_channels: int, processor=None) -> Callable:
    if processor is not None:
        def apply(img):
            img = img.convert("RGB" if num_channels == 3 else "L")
            return processor(images=img, return_tensors="pt")["pixel_values"][0]
        return apply
    mean = torch.tensor(IMAGENET_MEAN if num_channels == 3 else (0.5,)).view(-1, 1, 1)
    std = torch.tensor(IMAGENET_STD if num_channels == 3 else (0.5,)).view(-1, 1, 1)

    def plain(img):
        img = img.convert("RGB" if num_channels == 3 else "L").resize((image_size, image_size))
        arr = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)
        arr = arr.permute(2, 0, 1) if arr.dim() == 3 else arr.unsqueeze(0)
        return (arr - mean) / std

    return plain


def imagefolder_datasets(opt: ImageTaskOptions, num_channels: int, processor=None):
    from datasets import load_dataset

    train = load_dataset("imagefolder", data_dir=opt.train_dir, split="train")
    names = train.features["label"].names
    if opt.validation_dir is not None:
        val = load_dataset("imagefolder", data_dir=opt.validation_dir, split="train")
    elif opt.validation_fraction > 0:
        parts = train.train_test_split(test_size=opt.validation_fraction, seed=opt.seed, stratify_by_column="label")
        train, val = parts["train"], parts["test"]
    else:
        val = None
    tf = _image_transform(opt.image_size, num_channels, processor)
    mk = lambda split: FolderImageDataset(split, tf, len(names), names)  # noqa: E731
    return mk(train), (mk(val) if val is not None else None)


def collate_images(items: list[dict]) -> dict[str, torch.Tensor]:
    return {"pixel_values": torch.stack([it["pixel_values"] for it in items]),
            "labels": torch.tensor([it["labels"] for it in items], dtype=torch.long)}


@dataclass
class ImageTask:
    model: torch.nn.Module
    train: Dataset
    validation: Dataset | None
    collate: Callable[[list], dict] = collate_images
    num_labels: int = 10
    label_names: list[str] = field(default_factory=list)
    processor: Any = None


def _split_model_config(model: dict) -> tuple[str | None, dict, dict]:
    if not isinstance(model, dict):
        raise ConfigError(f"model: got {model!r}; expected an object with 'path' and/or 'config'")
    unknown = set(model) - {"path", "config", "experts_implementation", "trust_remote_code"}
    if unknown:
        raise ConfigError(f"model.{sorted(unknown)[0]}: unknown key; allowed keys are ['config', 'path']")
    path, cfg = model.get("path"), dict(model.get("config") or {})
    if path is None and not cfg:
        raise ConfigError("model: give 'config' (SwinConfig fields + MoE keys) or 'path' (a local Swin checkpoint)")
    cfg.pop("model_type", None)
    moe = {k: cfg.pop(k) for k in MOE_KEYS if k in cfg}
    if path is not None and cfg:
        raise ConfigError(f"model.config.{sorted(cfg)[0]}: with 'path' only the MoE keys {list(MOE_KEYS)} may be set")
    return path, cfg, moe


def build_image_task(recipe: dict, base_dir: str | None = None, seed: int | None = None) -> ImageTask:
    """Model (an upcycled Swin-MoE), train/validation datasets and the collate function of a recipe dict."""
    from ..models import build_swin_moe

    task = recipe.get("task", "image-classification")
    if task != "image-classification":
        raise ConfigError(f"task: got {task!r}; build_image_task serves 'image-classification'")
    opt = ImageTaskOptions.from_dict(recipe.get("task_options"), base_dir)
    path, swin_cfg, moe = _split_model_config(recipe.get("model", {}))
    if path is not None:
        path = os.path.expanduser(path)
        if not os.path.isabs(path) and base_dir is not None:
            path = os.path.join(base_dir, path)
        if not os.path.isdir(path):
            raise ConfigError(f"model.path: {path!r} is not a folder; give a local Swin checkpoint directory")
    processor, label_names = None, []
    if opt.dataset == "digits":
        channels = opt.num_channels or swin_cfg.get("num_channels", 3)
        train, val = digits_datasets(opt.image_size, channels, opt.validation_fraction, opt.seed)
        num_labels, label_names = 10, [str(i) for i in range(10)]
    else:
        channels = opt.num_channels or swin_cfg.get("num_channels", 3)
        if path is not None and os.path.exists(os.path.join(path, "preprocessor_config.json")):
            from transformers import AutoImageProcessor

            processor = AutoImageProcessor.from_pretrained(path)
        train, val = imagefolder_datasets(opt, channels, processor)
        num_labels, label_names = train.num_labels, train.label_names
    if path is None:
        swin_cfg.setdefault("image_size", opt.image_size)
        if swin_cfg["image_size"] != opt.image_size:
            raise ConfigError(f"model.config.image_size: got {swin_cfg['image_size']}; expected task_options.image_size "
                              f"({opt.image_size})")
        swin_cfg.setdefault("num_channels", channels)
        swin_cfg["num_labels"] = num_labels
        swin_cfg.setdefault("id2label", {i: n for i, n in enumerate(label_names)})
        swin_cfg.setdefault("label2id", {n: i for i, n in enumerate(label_names)})
    model = build_swin_moe(path if path is not None else swin_cfg, num_labels=num_labels, seed=seed, **moe)
    return ImageTask(model=model, train=train, validation=val, num_labels=num_labels, label_names=label_names,
                     processor=processor)


def top1_correct(batch: dict, out) -> tuple[torch.Tensor, int]:
    """Correct top-1 predictions of one batch and its number of images (the accuracy's parts)."""
    labels = batch["labels"]
    return (out.logits.argmax(-1) == labels).sum(), int(labels.numel())


def image_classification_task(recipe, ctx: WorkerContext) -> TaskParts:
    """The ``"image-classification"`` task of the recipe worker: a ``Recipe`` in, a ``TaskParts`` out."""
    d = recipe.to_dict() if hasattr(recipe, "to_dict") else dict(recipe)
    seed = getattr(getattr(recipe, "training", None), "seed", None)
    with ctx.main_first():  # rank 0 fills the datasets cache first
        task = build_image_task(d, base_dir=getattr(recipe, "base_dir", None), seed=seed)
    return TaskParts(model=task.model, train=task.train, validation=task.validation, collate=task.collate,
                     processor=task.processor, unit="img", count=lambda b: int(b["labels"].numel()),
                     eval_metric=EvalMetric("accuracy", top1_correct))

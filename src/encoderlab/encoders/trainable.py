"""The trainable-encoder contract: grad-enabled towers for prompt learning, partial fine-tuning and LoRA.

An ``Encoder`` runs under ``inference_mode``; a trainer needs the same computation with gradients. Adapters that
opt in (``hf:`` CLIP / SigLIP / ALIGN, ``open_clip:`` ViT models, ``hf-vision:`` ViT / DeiT / DINOv2 / ResNet and
``hf-text:`` BERT-family single towers) expose each tower as a ``torch.nn.Module`` mapping
pixel values / token dicts to the *projected* features ``encode_pixels`` / ``encode_text_batch`` return, and their
parameters as groups ordered input -> output, so "unfreeze the last N" is ``groups[-N:]``.

The modules share the encoder's weights (no copy): training them changes the encoder. Their ``train()`` / ``eval()``
also forget the encoder's cached fingerprint, so extraction after training keys the store by the new weights.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

from ..errors import EncoderlabError

TRAINABLE_KINDS = ("hf: dual encoders (CLIP, SigLIP, ALIGN, FLAVA), open_clip: ViT models, hf-vision: ViT / DeiT / "
                   "DINOv2 / ResNet backbones, hf-text: BERT-family encoders, the packaged EfficientNets and aligned "
                   "pairs (local:DIR) of trainable towers")
ParameterGroups = list[tuple[str, list[torch.nn.Parameter]]]


@runtime_checkable
class TrainableEncoder(Protocol):
    """What a trainer needs from an encoder besides the ``Encoder`` contract."""

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """The exact text-module inputs for ``texts`` (CPU tensors)."""
        ...

    def image_module(self) -> torch.nn.Module:
        """Pixel values [B, C, H, W] -> projected image features, with gradients."""
        ...

    def text_module(self) -> torch.nn.Module:
        """A ``tokenize`` dict -> projected text features, with gradients."""
        ...

    def parameter_groups(self, tower: str) -> ParameterGroups:
        """(name, parameters) of the "image" or "text" tower, input -> output: embeddings, blocks, norm, projection."""
        ...

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Copies of the parameters that require grad, by the model's own names (what a trainer may have changed)."""
        ...

    def load_trainable_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Load a ``trainable_state_dict`` back (other parameters keep their values)."""
        ...


def is_trainable(encoder: object) -> bool:
    """True when ``encoder`` implements ``TrainableEncoder``."""
    return isinstance(encoder, TrainableEncoder)


def as_trainable(encoder: object) -> TrainableEncoder:
    """``encoder`` typed as a ``TrainableEncoder``, or a clear error naming it and the kinds that are."""
    if not is_trainable(encoder):
        spec = getattr(encoder, "spec", type(encoder).__name__)
        raise EncoderlabError(f"encoder {spec!r} ({type(encoder).__name__}) is not trainable",
                              f"use one of the trainable kinds: {TRAINABLE_KINDS}")
    return encoder  # type: ignore[return-value]


@dataclass(frozen=True)
class TowerLayout:
    """Where one tower's parameters live in a model, as name prefixes, input -> output.

    ``before``: named parts ahead of the blocks (embeddings); ``blocks``: the prefix of the numbered blocks
    (``{blocks}.{i}.``); ``after``: named parts after them (final norm, pooling head, projection), output last.
    """

    before: tuple[tuple[str, tuple[str, ...]], ...]
    blocks: str
    after: tuple[tuple[str, tuple[str, ...]], ...]

    def roots(self) -> list[str]:
        """Top-level attributes of the model that hold this tower (each registered once in a ``TowerModule``)."""
        prefixes = [p for _, ps in (*self.before, *self.after) for p in ps] + [self.blocks]
        return list(dict.fromkeys(p.split(".")[0] for p in prefixes))


def trainable_module(encoder: object) -> torch.nn.Module:
    """The module whose parameters train: the encoder's ``trainable_model`` where it keeps one apart from its
    inference network (the packaged EfficientNet folds its batch norms for inference; an aligned pair joins its
    towers and heads), else its ``model``."""
    trainable = getattr(encoder, "trainable_model", None)
    model = trainable if isinstance(trainable, torch.nn.Module) else getattr(encoder, "model", None)
    if not isinstance(model, torch.nn.Module):
        raise EncoderlabError(f"{getattr(encoder, 'spec', encoder)!r} has no torch model to fine-tune",
                              "use --train heads")
    return model


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def layout_groups(model: torch.nn.Module, layout: TowerLayout, what: str = "model") -> ParameterGroups:
    """The tower's parameters grouped by ``layout``: before-parts, ``block.0`` .. ``block.N-1``, after-parts.

    Every parameter under the tower's roots must fall in a group: one that does not means the model's layout
    changed (a new transformers / open_clip version), and silently leaving it out would freeze it unnoticed.
    """
    parts = [*layout.before, *layout.after]
    named: dict[str, list[torch.nn.Parameter]] = {group: [] for group, _ in parts}
    blocks: dict[int, list[torch.nn.Parameter]] = {}
    roots, stray = layout.roots(), []
    for name, param in model.named_parameters():
        if not any(_under(name, r) for r in roots):
            continue  # the other tower, or shared scores (logit_scale)
        index = name[len(layout.blocks) + 1 :].split(".")[0] if name.startswith(layout.blocks + ".") else ""
        if index.isdigit():
            blocks.setdefault(int(index), []).append(param)
            continue
        group = next((g for g, prefixes in parts if any(_under(name, p) for p in prefixes)), None)
        if group is None:
            stray.append(name)
        else:
            named[group].append(param)
    if stray:
        raise EncoderlabError(f"{what}: the tower layout does not place parameters {stray[:5]}",
                              "this model version is not supported for training; please report it")
    groups = [*((g, named[g]) for g, _ in layout.before), *((f"block.{i}", blocks[i]) for i in sorted(blocks)),
              *((g, named[g]) for g, _ in layout.after)]
    return [(name, params) for name, params in groups if params]


class TowerModule(torch.nn.Module):
    """A grad-enabled view of one tower of ``model``: its parts registered (parameters, train/eval), forward the
    model's own feature function, so its outputs are the encoder's by construction."""

    def __init__(self, model: torch.nn.Module, layout: TowerLayout, forward: Callable[..., torch.Tensor],
                 on_train: Callable[[], None] | None = None) -> None:
        super().__init__()
        self.parts = torch.nn.ModuleDict()
        self.tensors = torch.nn.ParameterDict()
        for root in layout.roots():
            value = getattr(model, root, None)
            if isinstance(value, torch.nn.Module):
                self.parts[root] = value
            elif isinstance(value, torch.nn.Parameter):
                self.tensors[root] = value
        # Plain attributes, not submodules: the other tower's parameters stay out of parameters().
        self._feature_fn = forward
        self._on_train = on_train

    def forward(self, inputs: Any) -> torch.Tensor:
        return self._feature_fn(inputs)

    def train(self, mode: bool = True) -> TowerModule:
        super().train(mode)
        if self._on_train is not None:  # weights may change (or have changed): the cached fingerprint is stale
            self._on_train()
        return self


class ModelBackedTrainable:
    """The ``TrainableEncoder`` methods that follow from one wrapped ``torch.nn.Module``, for adapters to inherit.

    The adapter provides ``model``, ``spec``, ``tower_layout(tower)`` and ``_weights_changed()`` (which must drop
    any cached weight digest, so the store is keyed by the new weights after training).
    """

    model: torch.nn.Module
    spec: str

    def tower_layout(self, tower: str) -> TowerLayout:  # pragma: no cover - provided by the adapter
        raise NotImplementedError

    def _weights_changed(self) -> None:  # pragma: no cover - provided by the adapter
        raise NotImplementedError

    def parameter_groups(self, tower: str) -> ParameterGroups:
        return layout_groups(self.model, self.tower_layout(tower), what=self.spec)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return trainable_state(self.model)

    def load_trainable_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        load_trainable_state(self.model, state, what=self.spec)
        self._weights_changed()


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Detached copies of ``model``'s parameters that require grad, by name."""
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: torch.nn.Module, state: Mapping[str, torch.Tensor], what: str = "model") -> None:
    """Copy ``state`` into ``model``'s parameters of the same names; unknown names or shapes are an error."""
    params = dict(model.named_parameters())
    unknown = [k for k in state if k not in params]
    if unknown:
        raise EncoderlabError(f"{what} has no parameters {unknown[:5]}",
                              "load a trainable_state_dict saved from the same model")
    wrong = [k for k, v in state.items() if tuple(v.shape) != tuple(params[k].shape)]
    if wrong:
        raise EncoderlabError(f"{what}: shapes differ for {wrong[:5]}", "load a state saved from the same model")
    with torch.no_grad():
        for k, v in state.items():
            params[k].copy_(v.to(params[k].device, params[k].dtype))

"""The trainable contract for aligned pairs (``encoders.trainable``): both towers and both projection heads.

An aligned model's embeddings are ``head(normalize(tower(x)))``. Trained as a whole, its parameter groups per tower
are the tower's own groups (input -> output) followed by ``"head"``, its projection: ``--train last:1`` trains the
projection alone (what ``align`` trained), ``last:2`` adds the tower's last group, and so on. Each tower must be
trainable itself (the packaged EfficientNet and ``hf-text:`` / ``hf-vision:`` towers are).

``trainable_model`` joins the towers' networks, the heads and the (log) temperature under one module, so the names a
fine-tuned pair saves its changed tensors by are ``image.*``, ``text.*``, ``image_head.*``, ``text_head.*`` and
``logit_scale`` — a ``finetuned`` model directory over an aligned base loads them back by those names.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from .base import Encoder, state_dict_digest
from .trainable import ParameterGroups, as_trainable, load_trainable_state, trainable_module, trainable_state

HEAD_GROUP = "head"


class PairModel(torch.nn.Module):
    """Both towers' trainable networks, the projection heads and the log temperature of an aligned pair."""

    def __init__(self, image: torch.nn.Module, text: torch.nn.Module, heads: Mapping[str, torch.nn.Module],
                 logit_scale: float) -> None:
        super().__init__()
        self.image, self.text = image, text
        self.image_head, self.text_head = heads["image"], heads["text"]
        self.logit_scale = torch.nn.Parameter(torch.tensor(math.log(logit_scale)), requires_grad=False)


class HeadOnTower(torch.nn.Module):
    """A tower module (or the suffix of one) followed by the projection head, as ``HeadFn`` but with gradients."""

    def __init__(self, tower: Any, head: torch.nn.Module, input_normalize: bool, on_train: Any) -> None:
        super().__init__()
        self.tower, self.head = tower, head
        self.input_normalize = input_normalize
        self._on_train = on_train

    def forward(self, inputs: Any) -> torch.Tensor:
        x = self.tower(inputs).float()
        return self.head(F.normalize(x, dim=-1) if self.input_normalize else x)

    def train(self, mode: bool = True) -> HeadOnTower:
        super().train(mode)
        self._on_train()  # the heads may change (or have changed): the cached digest is stale
        return self


class TrainablePair:
    """``TrainableEncoder`` for ``AlignedDualEncoder`` (which provides ``towers``, ``heads``, ``input_normalize``,
    ``logit_scale``, ``spec`` and ``_heads_digest``)."""

    towers: dict[str, Encoder]
    heads: dict[str, torch.nn.Module]
    input_normalize: bool
    logit_scale: float
    spec: str
    _pair_model: PairModel | None = None
    _heads_digest: str | None

    @property
    def trainable_model(self) -> PairModel:
        """The towers' trainable networks, heads and temperature as one module (built on first use)."""
        if self._pair_model is None:
            nets = {m: trainable_module(as_trainable(t)) for m, t in self.towers.items()}
            self._pair_model = PairModel(nets["image"], nets["text"], self.heads, self.logit_scale)
        return self._pair_model

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        return as_trainable(self.towers["text"]).tokenize(texts)

    def parameter_groups(self, tower: str) -> ParameterGroups:
        """The tower's own groups, then its projection head (``"head"``)."""
        groups = as_trainable(self._tower(tower)).parameter_groups(tower)
        return [*groups, (HEAD_GROUP, list(self.heads[tower].parameters()))]

    def image_module(self) -> HeadOnTower:
        self.trainable_model  # noqa: B018 - the joint module exists before any part trains
        tower = as_trainable(self._tower("image")).image_module()
        return HeadOnTower(tower, self.heads["image"], self.input_normalize, self._weights_changed)

    def text_module(self) -> HeadOnTower:
        self.trainable_model  # noqa: B018
        tower = as_trainable(self._tower("text")).text_module()
        return HeadOnTower(tower, self.heads["text"], self.input_normalize, self._weights_changed)

    def image_split(self, first_trained: str) -> tuple[Any, Any] | None:
        """(prefix, suffix) around ``first_trained`` for the frozen-prefix cache: at the head the whole tower is the
        prefix; inside the tower, the tower's own split with the head after its suffix (None where it has none)."""
        head = self.heads["image"]
        if first_trained == HEAD_GROUP:
            tower = as_trainable(self._tower("image")).image_module()
            return tower, HeadOnTower(torch.nn.Identity(), head, self.input_normalize, self._weights_changed)
        split = getattr(self._tower("image"), "image_split", None)
        parts = split(first_trained) if callable(split) else None
        if parts is None:
            return None
        return parts[0], HeadOnTower(parts[1], head, self.input_normalize, self._weights_changed)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return trainable_state(self.trainable_model)

    def load_trainable_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        load_trainable_state(self.trainable_model, state, what=self.spec)
        self._weights_changed()

    def _tower(self, tower: str) -> Encoder:
        from ..errors import EncoderlabError

        if tower not in self.towers:
            raise EncoderlabError(f"{self.spec!r} has no {tower!r} tower", "use image or text")
        return self.towers[tower]

    def _weights_changed(self) -> None:
        """Towers, heads or temperature may have changed: every cached digest follows the weights again."""
        for tower in self.towers.values():
            getattr(tower, "_weights_changed", lambda: None)()
        self._heads_digest = None
        if self._pair_model is not None:
            self.logit_scale = float(self._pair_model.logit_scale.detach().float().exp())

    def heads_digest(self) -> str:
        if self._heads_digest is None:
            self._heads_digest = state_dict_digest(torch.nn.ModuleDict(self.heads))
        return self._heads_digest

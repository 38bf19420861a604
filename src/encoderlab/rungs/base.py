"""The rung registry: what each rung of the ladder is, what it needs, what it chooses, and how to run it.

A rung is data (``Rung``): its name, its level on the ladder (1 frozen, 2 shallow head, 3 small adaptation,
4 larger adaptation), its task, what it needs from the encoder and the data (``dual``, ``labels``, ``captions``),
the knobs it chooses on validation and records, and its ``run(inputs, options) -> RunResult``. Rungs that fit a
head on frozen features also carry ``make_head(context)``, so one runner (``rungs.probe``) fits every such head
through the same ``fit(X, y, X_val, y_val)`` with the same protocol: nothing dispatches on rung names.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..data.manifest import Dataset
from ..encoders.base import Encoder
from ..errors import EncoderlabError
from ..registry import Registry
from ..store import EmbeddingStore

if TYPE_CHECKING:
    from ..extract.labelled import LabelledEmbeddings
    from ..heads._base import Head
    from ..heads.zeroshot import ZeroShotClassifier
    from ..results import RunResult

#: what a rung may need: a dual (image + text) encoder, labelled items, captions (image–text pairs)
NEEDS = ("dual", "labels", "captions")
#: which features a head rung reads: the encoder's own embedding space, or (for an encoder built on another's
#: features, such as an aligned pair) the tower's own features, which a projection head can only lose from
FEATURES = ("joint", "tower")
#: how a head rung chooses its knobs: on validation data ("val"), or not at all, with fixed defaults from its paper
#: ("fixed": the validation-free protocol — few-shot adaptation rarely has more validation labels than shots)
SELECTIONS = ("val", "fixed")


@dataclass
class HeadContext:
    """What a head factory may use: the seed of this fit, whether to refit on train+val, options, a zero-shot head.

    ``selection`` is the protocol (:data:`SELECTIONS`): with "fixed" the head gets no validation data and must not
    carve any from its training items — its factory builds it with the fixed defaults of its paper.
    ``zero_shot`` is built on first use (only heads that wrap the zero-shot classifier ask for it).
    """

    seed: int
    refit: bool
    class_weight: str | None = None
    selection: str = "val"
    zero_shot_factory: Callable[[], ZeroShotClassifier] | None = None
    _zero_shot: ZeroShotClassifier | None = field(default=None, repr=False)

    @property
    def zero_shot(self) -> ZeroShotClassifier:
        if self._zero_shot is None:
            if self.zero_shot_factory is None:
                raise EncoderlabError("this head needs a zero-shot classifier, and none can be built here",
                                      "use a dual encoder (image and text towers)")
            self._zero_shot = self.zero_shot_factory()
        return self._zero_shot


@dataclass
class RungOptions:
    """Options shared by every rung (each rung reads the ones it uses); ``selection``: see :data:`SELECTIONS`."""

    shots: Sequence[int] = ()
    seeds: int = 3
    full: bool = True
    selection: str = "val"
    class_weight: str | None = None
    templates: str | Sequence[str] = "clip80"
    class_names: Mapping[str, str] | None = None
    split: str = "test"
    compare_templates: bool = False
    n_boot: int = 1000
    seed: int = 0
    encoder_ms: float | None = None
    chunk_size: int = 1024
    progress: bool = True


@dataclass
class RungInputs:
    """One encoder, one dataset, one store, and the labelled embeddings every classification rung shares.

    ``labelled`` (the encoder's own space) and ``tower_labelled`` (the tower's features, for encoders built on
    another's) are computed once and reused by every rung, so all rungs see the same rows, splits and items.
    ``probe_features``: "auto" (tower features for head rungs that allow them), "joint" or "tower".
    """

    encoder: Encoder
    dataset: Dataset
    store: EmbeddingStore
    modality: str | None = None
    probe_features: str = "auto"
    progress: bool = True
    _labelled: LabelledEmbeddings | None = field(default=None, repr=False)
    _tower: LabelledEmbeddings | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.probe_features not in ("auto", "joint", "tower"):
            raise EncoderlabError(f"unknown probe_features {self.probe_features!r}", "use auto, joint or tower")
        # every rung sees the same validation split, carved once when the source has none
        self.dataset = self.dataset.ensure_validation()

    @property
    def dual(self) -> bool:
        return "image" in self.encoder.modalities and "text" in self.encoder.modalities

    def labelled(self) -> LabelledEmbeddings:
        if self._labelled is None:
            from ..extract.labelled import labelled_embeddings

            self._labelled = labelled_embeddings(self.encoder, self.dataset, self.store, modality=self.modality,
                                                 progress=self.progress)
        return self._labelled

    def features_for(self, rung: Rung) -> tuple[Encoder, LabelledEmbeddings, str]:
        """``(encoder, labelled embeddings, "joint"|"tower")`` a head rung should read."""
        joint = self.labelled()
        source = self.encoder.feature_source(joint.modality)  # type: ignore[arg-type]
        if self.probe_features == "tower" and source is None:
            raise EncoderlabError(f"{self.encoder.spec!r} is not built on another encoder's features",
                                  "use probe_features 'auto' or 'joint'")
        if rung.features != "tower" or source is None or self.probe_features == "joint":
            return self.encoder, joint, "joint"
        if self._tower is None:
            from ..extract.labelled import labelled_embeddings

            self._tower = labelled_embeddings(source.base, self.dataset, self.store, modality=joint.modality,
                                              progress=self.progress)
            if list(self._tower.ids) != list(joint.ids):  # paired comparisons need the very same items
                raise EncoderlabError("tower and joint features cover different items", "use probe_features 'joint'")
        return source.base, self._tower, "tower"


RunFn = Callable[[RungInputs, RungOptions], "RunResult"]
HeadFactory = Callable[[HeadContext], "Head"]


@dataclass(frozen=True)
class Rung:
    """One rung of the ladder (see the module docstring)."""

    name: str
    level: int
    task: str  # "classification" or "retrieval"
    description: str
    needs: tuple[str, ...]
    knobs: tuple[str, ...]  # hyper-parameters it chooses (on validation) and records in results.json
    run: RunFn
    features: str = "joint"
    make_head: HeadFactory | None = None
    rank: int = 0  # order within a level (tables list rungs by level, then rank)
    #: a rung-specific requirement beyond ``needs``: why ``encoder`` cannot host this rung, or None
    supports: Callable[[Encoder], str | None] | None = None

    def __post_init__(self) -> None:
        bad = [n for n in self.needs if n not in NEEDS]
        if bad or self.features not in FEATURES or self.task not in ("classification", "retrieval"):
            raise ValueError(f"rung {self.name!r}: needs {bad} not in {NEEDS}, or features/task invalid")

    def unmet(self, encoder: Encoder, dataset: Dataset) -> str | None:
        """Why this rung cannot run on ``encoder`` and ``dataset`` (None when it can)."""
        if "dual" in self.needs and not ("image" in encoder.modalities and "text" in encoder.modalities):
            return "needs a dual encoder (image and text towers)"
        if "labels" in self.needs and not dataset.classes:
            return "needs labelled items (the dataset has no labels)"
        if self.supports is not None and (why := self.supports(encoder)) is not None:
            return why
        if "captions" in self.needs and not (dataset.has_texts and dataset.has_images):
            return "needs image–caption pairs (the dataset has no captions)" if dataset.has_images else \
                "needs image–caption pairs (the dataset has no images)"
        return None

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "level": self.level, "task": self.task, "description": self.description,
                "needs": list(self.needs), "knobs": list(self.knobs), "features": self.features,
                "head": self.make_head is not None}


RUNGS: Registry[Rung] = Registry("rung", builtins=("encoderlab.rungs.builtin",))


def register_rung(rung: Rung) -> Rung:
    """Add a rung to the registry (a later registration of the same name replaces it)."""
    return RUNGS.register(rung.name, rung)


def create_rung(name: str) -> Rung:
    """The rung called ``name``; an unknown name fails with close matches and the known rungs."""
    return RUNGS.get(name)


def list_rungs(pattern: str | None = None, *, task: str | None = None, head: bool | None = None) -> list[str]:
    """Rung names in ladder order (level, then rank), filtered by glob/substring, task, and having a head."""
    names = RUNGS.names(pattern)
    rungs = [RUNGS.get(n) for n in names]
    rungs = [r for r in rungs
             if (task is None or r.task == task) and (head is None or (r.make_head is not None) == head)]
    return [r.name for r in sorted(rungs, key=lambda r: (r.level, r.rank, r.name))]

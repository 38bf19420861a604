"""Heads on frozen embeddings, as scikit-learn-style estimators (``fit`` returns self; learned attributes end in ``_``).

- ``ZeroShotClassifier``: class prompts' text embeddings as the classifier (no labels);
- ``LinearProbe``: multinomial logistic regression, L-BFGS in torch, L2 strength chosen on validation;
- ``KNNClassifier``: cosine k-nearest neighbours with optional similarity-weighted votes;
- ``TipAdapter``: zero-shot logits plus a training-free cache of few-shot features (dual encoders);
- ``TipAdapterF``: Tip-Adapter with its cache keys fine-tuned (Tip-Adapter-F);
- ``ClassAdaptiveLinearProbe``: CLAP, a zero-shot-initialised linear probe held near the zero-shot classifier.
"""

from .clap import ClassAdaptiveLinearProbe
from .knn import KNNClassifier
from .linear import LinearProbe
from .tip import TipAdapter
from .tip_f import TipAdapterF
from .zeroshot import ZeroShotClassifier

__all__ = ["ClassAdaptiveLinearProbe", "KNNClassifier", "LinearProbe", "TipAdapter", "TipAdapterF",
           "ZeroShotClassifier"]

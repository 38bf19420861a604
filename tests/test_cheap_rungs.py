"""The cheap rungs on cached features: Tip-Adapter-F and CLAP, and the validation-free protocol (selection="fixed").

Synthetic tasks mimic a weak aligned model (emoji-like: 256-d, 10 classes, a noisy text classifier, logit scale 20):
class centres, images around them, text prototypes = centres + noise.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from encoderlab.cli import main
from encoderlab.data import load_dataset
from encoderlab.encoders import create_encoder
from encoderlab.errors import EncoderlabError
from encoderlab.extract import labelled_embeddings
from encoderlab.heads import ClassAdaptiveLinearProbe, TipAdapter, TipAdapterF
from encoderlab.rungs import list_rungs, run_probe
from encoderlab.store import EmbeddingStore
from encoderlab.testing import color_dataset, color_spec, registered_color_encoder

SCALE = 20.0  # about the aligned demo model's logit scale (18.7): zero-shot logits do not drown the cache


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def task(shots: int, seed: int, d: int = 256, text_noise: float = 5.0, noise: float = 4.0, k: int = 10):
    """``(text, (X, y) train, (Xv, yv) min(shots, 4) per class, (Xt, yt) 50 per class)``: zero-shot ~ 0.26."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 1, (k, d))
    text = centers + text_noise * rng.normal(0, 1, (k, d))

    def images(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = np.repeat(np.arange(k), n)
        return (centers[y] + noise * rng.normal(0, 1, (len(y), d))).astype(np.float32), y

    return text.astype(np.float32), images(shots), images(min(shots, 4)), images(50)


def zero_shot_head(text: np.ndarray, X: np.ndarray, y: np.ndarray) -> TipAdapter:
    return TipAdapter(text, alphas=[0.0], betas=[1.0], logit_scale=SCALE).fit(X, y)  # alpha 0: exactly zero-shot


# ---- Tip-Adapter-F ---------------------------------------------------------------------------------------------
def test_tip_f_beats_tip_adapter_with_the_same_validation():
    tip, tip_f = [], []
    for seed in range(3):
        text, (X, y), (Xv, yv), (Xt, yt) = task(16, seed)
        tip.append(TipAdapter(text, logit_scale=SCALE, refit=False).fit(X, y, Xv, yv).score(Xt, yt))
        head = TipAdapterF(text, logit_scale=SCALE, refit=False).fit(X, y, Xv, yv)
        tip_f.append(head.score(Xt, yt))
        assert [e["epochs"] for e in head.epoch_sweep_] == list(range(21)) and head.best_epochs_ <= 20
        assert head.n_trainable_params == 160 * 256 and head.cache_size_ == 160
        assert np.array_equal(head.fit_counts_, np.full(10, 16))
    assert np.mean(tip_f) > np.mean(tip) + 0.02, (tip, tip_f)


def test_tip_f_epoch_zero_is_tip_adapter_and_training_lowers_the_loss():
    text, (X, y), _, (Xt, _) = task(8, 0)
    untrained = TipAdapterF(text, logit_scale=SCALE, epochs=0, val_fraction=0.0).fit(X, y)
    tip = TipAdapter(text, logit_scale=SCALE, val_fraction=0.0).fit(X, y)
    assert np.allclose(untrained.decision_function(Xt), tip.decision_function(Xt), atol=1e-5)
    trained = TipAdapterF(text, logit_scale=SCALE, val_fraction=0.0, lr=1e-2).fit(X, y)
    assert len(trained.loss_curve_) == 20 and trained.loss_curve_[-1] < trained.loss_curve_[0]
    assert not np.allclose(trained.decision_function(Xt), tip.decision_function(Xt), atol=1e-3)


def test_tip_f_refit_holds_train_and_val():
    text, (X, y), (Xv, yv), _ = task(4, 1)
    head = TipAdapterF(text, logit_scale=SCALE, refit=True).fit(X, y, Xv, yv)
    assert head.cache_size_ == len(y) + len(yv) and head.n_fit_items_ == 80


# ---- CLAP --------------------------------------------------------------------------------------------------------
def test_clap_beats_zero_shot_and_stays_near_it_at_one_shot():
    zs, clap, drift, free_drift, agree, free_agree = [], [], [], [], [], []
    for seed in range(3):
        text, (X, y), _, (Xt, yt) = task(1, seed)
        zs_pred = zero_shot_head(text, X, y).predict(Xt)
        zs.append(float((zs_pred == yt).mean()))
        head = ClassAdaptiveLinearProbe(text, penalties=[1.0], val_fraction=0.0, logit_scale=SCALE).fit(X, y)
        free = ClassAdaptiveLinearProbe(text, penalties=[0.0], val_fraction=0.0, logit_scale=SCALE).fit(X, y)  # ZS-LP
        clap.append(head.score(Xt, yt))
        drift.append(head.drift_.mean())
        free_drift.append(free.drift_.mean())
        agree.append(float((head.predict(Xt) == zs_pred).mean()))
        free_agree.append(float((free.predict(Xt) == zs_pred).mean()))
        assert head.sweep_ == [] and head.best_penalty_ == 1.0 and head.n_trainable_params == 10 * 256
        assert np.all((head.multipliers_ > 0) & (head.multipliers_ <= 1))
    assert np.mean(clap) > np.mean(zs) + 0.03, (zs, clap)
    # the penalty is what keeps it near zero-shot: without it the same probe moves several times further
    assert np.mean(drift) < 0.4 * np.mean(free_drift) and np.mean(agree) > np.mean(free_agree) + 0.2


def test_clap_chooses_its_penalty_on_validation_strongest_first():
    text, (X, y), (Xv, yv), (Xt, yt) = task(8, 2)
    head = ClassAdaptiveLinearProbe(text, logit_scale=SCALE, refit=False).fit(X, y, Xv, yv)
    assert [s["penalty"] for s in head.sweep_] == [10.0, 3.0, 1.0, 0.3, 0.1, 0.0]
    assert head.best_penalty_ in (10.0, 3.0, 1.0, 0.3, 0.1, 0.0) and head.score(Xt, yt) > 0.3
    refit = ClassAdaptiveLinearProbe(text, logit_scale=SCALE, refit=True).fit(X, y, Xv, yv)
    assert refit.n_fit_items_ == len(y) + len(yv)


# ---- determinism and bad arguments -----------------------------------------------------------------------------
def test_fits_are_deterministic_for_a_seed():
    text, (X, y), (Xv, yv), (Xt, _) = task(30, 3)  # 300 items: more than one mini-batch, so the order matters
    a = TipAdapterF(text, logit_scale=SCALE, seed=5).fit(X, y, Xv, yv)
    b = TipAdapterF(text, logit_scale=SCALE, seed=5).fit(X, y, Xv, yv)
    assert np.array_equal(a.decision_function(Xt), b.decision_function(Xt)) and a.epoch_sweep_ == b.epoch_sweep_
    c = ClassAdaptiveLinearProbe(text, logit_scale=SCALE, seed=5).fit(X, y, Xv, yv)
    d = ClassAdaptiveLinearProbe(text, logit_scale=SCALE, seed=5).fit(X, y, Xv, yv)
    assert np.array_equal(c.prototypes_, d.prototypes_) and c.sweep_ == d.sweep_


@pytest.mark.parametrize("kwargs, match", [
    ({"epochs": -1}, "epochs"), ({"epochs": 2.5}, "epochs"), ({"lr": 0.0}, "lr"), ({"batch_size": 0}, "batch_size"),
    ({"train_beta": 0.0}, "train_beta"), ({"alphas": [-1.0]}, "alphas"), ({"scoring": "f1"}, "scoring"),
])
def test_tip_f_bad_arguments(kwargs, match):
    text, (X, y), _, _ = task(2, 0, d=16)
    with pytest.raises(EncoderlabError, match=match):
        TipAdapterF(text, **kwargs).fit(X, y)


@pytest.mark.parametrize("kwargs, match", [
    ({"penalties": [-1.0]}, "penalties"), ({"penalties": []}, "penalties"), ({"epochs": 1.5}, "epochs"),
    ({"lr": -0.1}, "lr"), ({"batch_size": 0}, "batch_size"), ({"scoring": "f1"}, "scoring"),
])
def test_clap_bad_arguments(kwargs, match):
    text, (X, y), _, _ = task(2, 0, d=16)
    with pytest.raises(EncoderlabError, match=match):
        ClassAdaptiveLinearProbe(text, **kwargs).fit(X, y)


def test_heads_refuse_bad_data_and_unfitted_use():
    text, (X, y), _, _ = task(2, 0, d=16)
    for head in (TipAdapterF(text), ClassAdaptiveLinearProbe(text)):
        with pytest.raises(EncoderlabError, match="not fitted"):
            head.predict(X)
        with pytest.raises(EncoderlabError, match="rows"):
            type(head)(text[:9]).fit(X, y)
        with pytest.raises(EncoderlabError, match="together"):
            head.fit(X, y, X_val=X)
        with pytest.raises(EncoderlabError, match="not in the training labels"):
            head.fit(X, y, X, np.full(len(y), 42))


# ---- the validation-free protocol ------------------------------------------------------------------------------
@pytest.fixture
def color_emb(tmp_path):
    with registered_color_encoder():
        enc = create_encoder("test-color", device="cpu")
        store = EmbeddingStore(tmp_path / "store")
        data = load_dataset(color_spec(color_dataset(tmp_path / "colors")))
        yield enc, labelled_embeddings(enc, data, store, progress=False), store


def _val_poisoned(emb):
    """The same embeddings with every validation row NaN: any head reading one fails ("NaN")."""
    val = emb.index("val")
    X = emb.X.copy()
    X[val] = np.nan
    emb.X = X
    return emb


@pytest.mark.parametrize("name", list_rungs(head=True))
def test_validation_free_protocol_never_reads_validation_data(name, color_emb, monkeypatch):
    enc, emb, store = color_emb
    drawn: list[str] = []
    k_shot = type(emb).k_shot
    monkeypatch.setattr(type(emb), "k_shot", lambda self, k, seed, split="train": drawn.append(split) or
                        k_shot(self, k, seed, split))
    poisoned = _val_poisoned(emb)
    result = run_probe(enc, poisoned, store, method=name, shots=[1, 2], seeds=2, full=False, n_boot=50,
                       templates="name", selection="fixed")
    assert set(drawn) == {"train"}  # the few-shot validation sample is not even drawn
    assert result.config["selection"] == "fixed" and "no validation data" in result.config["protocol"]["few_shot"]
    for s in result.extra["settings"]:
        k = int(s["setting"].split("-")[0])
        assert s["selection"] == "fixed" and s["val_items"] == 0 and s["val_digest"] is None
        assert s["chosen_by"] in ("fixed", "train")  # train: kNN's leave-one-out on its own support set
        assert s["final_model_items_per_class"] == dict.fromkeys(emb.classes, k)  # nothing carved off either
    # the poison works: the protocol that does read validation data trips over it
    with pytest.raises(EncoderlabError, match="NaN"):
        run_probe(enc, poisoned, store, method=name, shots=[1], seeds=1, full=False, n_boot=50, templates="name")


def test_both_protocols_fit_the_same_support_sets(color_emb):
    enc, emb, store = color_emb
    runs = {sel: run_probe(enc, emb, store, method="clap", shots=[1, 2], seeds=2, n_boot=50, templates="name",
                           selection=sel) for sel in ("val", "fixed")}
    digests = {sel: [(s["setting"], s["seed"], s["train_digest"]) for s in r.extra["settings"]
                     if s["setting"] != "full"] for sel, r in runs.items()}
    assert digests["val"] == digests["fixed"] and len(set(d for *_, d in digests["val"])) == 4
    full = {sel: next(s for s in r.extra["settings"] if s["setting"] == "full") for sel, r in runs.items()}
    # validation-free full data: train + val are its training items, the same labels as the refit model holds
    assert full["fixed"]["val_items"] == 0 and full["fixed"]["chosen_by"] == "fixed"
    assert full["fixed"]["final_model_items"] == full["val"]["final_model_items"]
    assert {s["chosen_by"] for s in runs["val"].extra["settings"]} <= {"val", "k-shot-val", "fixed"}


def test_selection_is_checked(color_emb, capsys):
    enc, emb, store = color_emb
    with pytest.raises(EncoderlabError, match="not a protocol"):
        run_probe(enc, emb, store, method="tip-f", shots=[1], selection="test")
    assert main(["probe", "--encoder", "test-color", "--data", "emoji", "--selection", "best"]) == 2
    assert "invalid choice: 'best'" in capsys.readouterr().err


# ---- cost on emoji-sized data ----------------------------------------------------------------------------------
@pytest.mark.parametrize("shots", [1, 16])
def test_fits_take_seconds_on_emoji_sized_data(shots):
    """1,521 x 256 features, 10 classes (the emoji set): every (shots, seed) fit in well under a few seconds."""
    rng = np.random.default_rng(0)
    centers = rng.normal(0, 1, (10, 256))
    y = np.arange(1521) % 10
    X = (centers[y] + 3 * rng.normal(0, 1, (1521, 256))).astype(np.float32)
    text = (centers + 4 * rng.normal(0, 1, (10, 256))).astype(np.float32)
    sup = np.concatenate([np.flatnonzero(y == c)[:shots] for c in range(10)])
    val = np.concatenate([np.flatnonzero(y == c)[-min(shots, 4):] for c in range(10)])
    for make in (lambda: TipAdapterF(text, logit_scale=SCALE, refit=False),
                 lambda: ClassAdaptiveLinearProbe(text, logit_scale=SCALE, refit=False)):
        t0 = time.perf_counter()
        make().fit(X[sup], y[sup], X[val], y[val])
        assert time.perf_counter() - t0 < 10.0

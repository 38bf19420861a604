"""``encoderlab store export``: a dataset's embeddings from the store to parquet or .npy + parquet, row for row."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from encoderlab.cli import main
from encoderlab.data import load_dataset
from encoderlab.errors import EncoderlabError
from encoderlab.extract.export import export_embeddings
from encoderlab.hashing import image_key, text_key
from encoderlab.store import EmbeddingStore
from encoderlab.testing import ColorEncoder, color_dataset, color_spec, registered_color_encoder


@pytest.fixture
def color_encoder():
    with registered_color_encoder() as name:
        yield name


@pytest.fixture
def data(tmp_path) -> str:
    return color_spec(color_dataset(tmp_path / "colors", n_per_class=4))


def export(tmp_path: Path, capsys, data: str, to: str, *extra: str) -> tuple[int, dict, str]:
    code = main(["store", "export", "--encoder", "test-color", "--data", data, "--to", str(tmp_path / to),
                 "--store", str(tmp_path / "store"), "--json", *extra])
    out, err = capsys.readouterr()
    return code, (json.loads(out) if code == 0 else {}), err


def space(tmp_path: Path, modality: str):
    return EmbeddingStore(tmp_path / "store").space(ColorEncoder().fingerprint(modality))


def test_parquet_round_trips_the_store_values_and_a_second_export_encodes_nothing(tmp_path, capsys, data,
                                                                                   color_encoder):
    code, out, err = export(tmp_path, capsys, data, "emb.parquet")
    assert code == 0, err
    assert (out["modality"], out["rows"], out["dim"], out["encoded"], out["cached"]) == ("image", 12, 3, 12, 0)
    assert out["skipped"] == [] and out["files"] == [str(tmp_path / "emb.parquet")]
    table = pq.read_table(tmp_path / "emb.parquet")
    assert table.column_names == ["id", "path", "label", "split", "caption", "captions", "embedding"]
    kind = table.schema.field("embedding").type
    assert pa.types.is_fixed_size_list(kind) and kind.list_size == 3 and kind.value_type == pa.float32()
    rows = table.to_pylist()
    ds = load_dataset(data)
    assert [r["id"] for r in rows] == ds.table["id"].tolist()  # the dataset's order
    assert rows[0]["label"] == "red_thing" and rows[0]["captions"] == ["a red square number 0", "a coloured square"]
    assert rows[0]["caption"] == "a red square number 0" and rows[0]["path"] == ds.table["image"].iat[0]
    X = np.array([r["embedding"] for r in rows], dtype=np.float32)
    np.testing.assert_array_equal(X, space(tmp_path, "image").get([image_key(r["path"]) for r in rows]))
    info = json.loads(table.schema.metadata[b"encoderlab"])
    assert info["encoder"] == "test-color" and info["modality"] == "image" and info["rows"] == 12

    code, again, err = export(tmp_path, capsys, data, "emb.parquet")
    assert code == 0, err
    assert (again["encoded"], again["cached"], again["rows"]) == (0, 12, 12)
    assert pq.read_table(tmp_path / "emb.parquet").equals(table)


def test_npy_with_a_metadata_parquet_beside_it_row_for_row(tmp_path, capsys, data, color_encoder):
    code, out, err = export(tmp_path, capsys, data, "out/emb.npy", "--split", "train")
    assert code == 0, err
    assert out["files"] == [str(tmp_path / "out" / "emb.npy"), str(tmp_path / "out" / "emb.parquet")]
    X = np.load(tmp_path / "out" / "emb.npy")
    meta = pq.read_table(tmp_path / "out" / "emb.parquet")
    assert X.dtype == np.float32 and X.shape == (out["rows"], 3) == (meta.num_rows, 3)
    assert "embedding" not in meta.column_names and set(meta.column("split").to_pylist()) == {"train"}
    paths = meta.column("path").to_pylist()
    np.testing.assert_array_equal(X, space(tmp_path, "image").get([image_key(p) for p in paths]))
    info = json.loads(meta.schema.metadata[b"encoderlab"])
    assert info["npy_sha256"] == hashlib.sha256((tmp_path / "out" / "emb.npy").read_bytes()).hexdigest()
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.endswith(".tmp")]  # atomic writes left nothing


def test_text_modality_exports_each_rows_first_caption(tmp_path, capsys, data, color_encoder):
    code, out, err = export(tmp_path, capsys, data, "text.parquet", "--modality", "text")
    assert code == 0, err
    assert (out["modality"], out["rows"], out["encoded"]) == ("text", 12, 12)  # the shared 2nd caption is not needed
    rows = pq.read_table(tmp_path / "text.parquet").to_pylist()
    X = np.array([r["embedding"] for r in rows], dtype=np.float32)
    np.testing.assert_array_equal(X, space(tmp_path, "text").get([text_key(r["caption"]) for r in rows]))
    np.testing.assert_allclose(X[0], np.array([220, 30, 30]) / 255 - 0.5, atol=1e-6)  # "a red square ..."


def test_an_unusable_image_is_left_out_and_reported(tmp_path, capsys, data, color_encoder):
    bad = tmp_path / "colors" / "green_2.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    code, out, err = export(tmp_path, capsys, data, "emb.parquet")
    assert code == 0, err
    assert out["rows"] == 11 and out["n_skipped"] == 1
    assert out["skipped"][0]["id"] == "green_2.png" and out["skipped"][0]["path"] == str(bad)
    assert out["skipped"][0]["reason"]
    assert f"{bad}: {out['skipped'][0]['reason']}" in err  # by path and reason on stderr, also with --json
    ids = pq.read_table(tmp_path / "emb.parquet").column("id").to_pylist()
    assert "green_2.png" not in ids and len(ids) == 11


def test_bad_targets_and_missing_towers_fail_fast_with_the_fix(tmp_path, capsys, data, color_encoder):
    code, _, err = export(tmp_path, capsys, data, "emb.csv")
    assert code == 1 and "unknown suffix '.csv'" in err and ".parquet" in err and ".npy" in err
    assert not (tmp_path / "store").exists()  # nothing was loaded or encoded
    code, _, err = export(tmp_path, capsys, data, "emb")
    assert code == 1 and "unknown suffix '(none)'" in err

    class ImageOnly(ColorEncoder):
        def __init__(self) -> None:
            super().__init__()
            self.modalities = ("image",)

    ds = load_dataset(data)
    with pytest.raises(EncoderlabError, match="has no text tower"):
        export_embeddings(ImageOnly(), ds, EmbeddingStore(tmp_path / "store"), tmp_path / "t.parquet", "text")
    with pytest.raises(EncoderlabError, match="unknown export modality 'both'"):
        export_embeddings(ImageOnly(), ds, EmbeddingStore(tmp_path / "store"), tmp_path / "t.parquet", "both")
    assert not (tmp_path / "t.parquet").exists() and not (tmp_path / "store").exists()

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from schemas.taxonomy import load_taxonomy
from training.deepfashion import (
    category_attribute_labels,
    inshop_labels,
    load_cropped,
    read_category_attribute,
    read_inshop,
)
from training.fmnist import load_fashion_mnist, read_idx
from training.losses import MISSING

DF = Path(__file__).parent / "fixtures" / "deepfashion"


def test_category_attribute_files_parse():
    rec = read_category_attribute(DF / "category")
    assert rec.category_names == ["Anorak", "Blouse", "Jeans", "Dress"]
    assert rec.category_types == [1, 1, 2, 3]
    assert rec.images[2] == "img/Distressed_Skinny_Jeans/img_00000001.jpg"
    assert rec.category.tolist() == [1, 1, 2, 3, 0]  # 1-based in the file
    assert rec.attribute_names[3] == "long sleeve"  # names may contain spaces
    assert rec.attributes.shape == (5, 11) and rec.attributes[3, 10] == 0
    assert rec.bbox[0].tolist() == [5, 10, 50, 70]
    assert rec.partition.tolist() == ["train", "train", "val", "test", "train"]


def test_category_attribute_labels_map_onto_taxonomy_with_missing_groups():
    tax = load_taxonomy("deepfashion")
    data, part = category_attribute_labels(read_category_attribute(DF / "category"), tax, DF / "category")
    names = tax.category_names
    assert [names[i] for i in data.category] == ["Blouse", "Blouse", "Jeans", "Dress", "Anorak"]
    tex = tax.group("texture").values
    assert data.groups["texture"][0] == tex.index("floral")
    assert data.groups["texture"][1] == MISSING  # floral and striped: ambiguous, masked
    assert data.groups["texture"][2] == MISSING  # no texture attribute at all
    assert data.groups["sleeve"][0] == tax.group("sleeve").values.index("long_sleeve")
    assert data.groups["fabric"][2] == tax.group("fabric").values.index("denim")
    assert data.groups["fit"][0] == tax.group("fit").values.index("loose")
    assert data.groups["length"][3] == tax.group("length").values.index("maxi_length")
    assert (data.item_ids == MISSING).all()


def test_bbox_crop_on_real_jpeg():
    tax = load_taxonomy("deepfashion")
    data, _ = category_attribute_labels(read_category_attribute(DF / "category"), tax, DF / "category")
    img = load_cropped(data.images[0])
    assert img.shape == (60, 45, 3) and img.dtype == np.uint8  # (y2-y1, x2-x1)
    clamped = load_cropped(data.images[3])  # box larger than the image is clamped
    assert clamped.shape == (77, 57, 3)


def test_inshop_partition_and_items():
    rec = read_inshop(DF / "inshop")
    assert rec.partition.tolist() == ["train", "train", "query", "gallery", "gallery", "gallery"]
    assert rec.item_ids[2] == "id_00000080" and rec.bbox.shape == (6, 4)
    data, _ = inshop_labels(rec, load_taxonomy("deepfashion"), DF / "inshop")
    assert data.item_ids.tolist() == [0, 0, 1, 1, 1, 2]
    assert (data.category == MISSING).all()


def test_reader_rejects_a_wrong_count(tmp_path):
    import shutil

    root = tmp_path / "category"
    shutil.copytree(DF / "category", root)
    p = root / "Anno" / "list_category_img.txt"
    lines = p.read_text().splitlines()
    p.write_text("\n".join(["9"] + lines[1:]) + "\n")
    with pytest.raises(ValueError, match="declares 9 entries"):
        read_category_attribute(root)


def test_fashion_mnist_real_files(fmnist_dir):
    x, y = load_fashion_mnist(fmnist_dir, "test")
    assert x.shape == (10000, 28, 28) and x.dtype == np.uint8
    assert y.dtype == np.int64 and set(np.unique(y)) == set(range(10))
    assert np.bincount(y).tolist() == [1000] * 10


def test_idx_round_trip_and_bad_magic(tmp_path):
    arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    path = tmp_path / "x-idx3-ubyte.gz"
    with gzip.open(path, "wb") as f:
        f.write(bytes([0, 0, 8, 3]) + struct.pack(">3I", 2, 3, 4) + arr.tobytes())
    np.testing.assert_array_equal(read_idx(path), arr)
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x01\x02\x08\x01" + struct.pack(">I", 1) + b"\x00")
    with pytest.raises(ValueError, match="not an idx file"):
        read_idx(bad)
    with pytest.raises(ValueError, match="split must be"):
        load_fashion_mnist(tmp_path, "validation")

"""Live queries: same-category/type filters and similarity conditioned on an attribute group's mask."""
from __future__ import annotations

import numpy as np
import pytest
from similar_helpers import add_listings, unit

from similar import query

DIM = 16
SHAPE = np.r_[np.ones(8), np.zeros(8)].astype(np.float32)   # first half of the embedding: shape
COLOUR = 1 - SHAPE                                            # second half: colour


def _item(shape: int, colour: int, rng) -> np.ndarray:
    v = np.zeros(DIM, np.float32)
    v[shape] = 1.0
    v[8 + colour] = 0.6
    return unit(v + 0.02 * rng.normal(size=DIM))


@pytest.fixture()
def catalogue(db):
    """Query q: shape 0, colour 0. s: same shape, other colour. c: other shape, same colour."""
    rng = np.random.default_rng(0)
    items = {"q": (0, 0), "s1": (0, 3), "s2": (0, 4), "c1": (5, 0), "c2": (6, 0), "z": (7, 7)}
    ids = list(items)
    vecs = np.stack([_item(*items[i], rng) for i in ids])
    tags = {"q": {"category": "Dress", "type": "full"}, "s1": {"category": "Dress", "type": "full"},
            "s2": {"category": "Skirt", "type": "bottom"}, "c1": {"category": "Dress", "type": "full"},
            "c2": {"category": "Tee", "type": "top"}, "z": {"category": "Tee", "type": "top"}}
    add_listings(db, ids, vecs, tags=tags)
    return ids


def _ids(ns):
    return [n.listing_id for n in ns]


def test_conditioned_mode_ranks_differently_from_plain(db, catalogue):
    plain = query.similar_to(db, "q", "m1", k=5)
    by_colour = query.similar_to(db, "q", "m1", k=5, mask=COLOUR)
    assert set(_ids(plain)[:2]) == {"s1", "s2"}         # overall: the shape dominates
    assert set(_ids(by_colour)[:2]) == {"c1", "c2"}     # by colour: same colour, any shape
    assert by_colour[0].score > 0.95 > 0.8 > plain[0].score
    with pytest.raises(ValueError, match="dimensions"):
        query.similar_to(db, "q", "m1", mask=np.ones(DIM + 1))


def test_condition_is_masked_then_normalised():
    e = unit(np.array([[3.0, 4.0, 0.0]]))
    out = query.condition(e, np.array([1.0, 0.0, 0.0]))
    np.testing.assert_allclose(out, [[1.0, 0.0, 0.0]])
    assert query.condition(e, None) is e


def test_same_category_and_same_type_filters(db, catalogue):
    same_cat = query.similar_to(db, "q", "m1", k=5, same_category=True)
    assert _ids(same_cat) == ["s1", "c1"]
    same_type = query.similar_to(db, "q", "m1", k=5, same_type=True, mask=COLOUR)
    assert _ids(same_type) == ["c1", "s1"]
    db.execute("UPDATE listings SET status = 'deleted' WHERE listing_id = 's1'")
    assert _ids(query.similar_to(db, "q", "m1", k=5, same_category=True)) == ["c1"]
    with pytest.raises(LookupError, match="no 'category' tag"):
        db.execute("DELETE FROM listing_tags WHERE listing_id = 'q'")
        query.similar_to(db, "q", "m1", same_category=True)


def test_a_shelf_embeddings_category_part_is_left_out_of_the_condition():
    e = unit(np.array([[3.0, 4.0, 0.5, 0.5]]))  # 2 image dimensions + a 2-dimensional category part
    np.testing.assert_allclose(query.condition(e, np.array([1.0, 0.0])), [[1.0, 0.0]])


def test_other_colours_finds_the_same_shape_in_another_colour(db):
    """With the colour group's mask: the query's own colourways rank first once colour is taken out, and only
    listings whose colour tag differs are shown."""
    rng = np.random.default_rng(1)
    items = {"q": (0, 0, "red"), "q-blue": (0, 3, "blue"), "q-green": (0, 4, "green"),
             "red-other": (5, 0, "red"), "red-same": (0, 0, "red"), "blue-other": (6, 3, "blue"),
             "untagged": (0, 5, None)}
    ids = list(items)
    vecs = np.stack([_item(s, c, rng) for s, c, _ in items.values()])
    tags = {i: ({"colour": col} if col else {}) | {"category": "Dress"} for i, (_, _, col) in items.items()}
    add_listings(db, ids, vecs, tags=tags)
    found = query.similar_to(db, "q", "m1", k=3, mask=COLOUR, other_colours=True)
    assert _ids(found)[:2] in (["q-blue", "q-green"], ["q-green", "q-blue"])
    assert not {"red-other", "red-same", "untagged", "q"} & set(_ids(found))  # same colour or no colour tag
    # the plain ranking of the same candidates puts the same-colour duplicate first
    assert _ids(query.similar_to(db, "q", "m1", k=1))[0] == "red-same"
    with pytest.raises(LookupError, match="colour"):
        query.similar_to(db, "untagged", "m1", mask=COLOUR, other_colours=True)
    with pytest.raises(ValueError, match="mask"):
        query.similar_to(db, "q", "m1", other_colours=True)


def test_colour_free_weights_dimensions_by_how_little_colour_uses_them():
    mask = np.array([0.1, 0.1, 1.0, 1.0])
    e = unit(np.array([[1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 1.0, 1.0]]))
    out = query.colour_free(e, mask)
    np.testing.assert_allclose(out[0], [1.0, 0.0, 0.0, 0.0], atol=1e-6)  # its colour part is gone
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-6)
    shelf = np.c_[e * np.sqrt(0.7), np.array([[1.0], [0.0]]) * np.sqrt(0.3)]  # + a category part
    kept = query.colour_free(shelf, mask)
    np.testing.assert_allclose(kept[0, 4], np.sqrt(0.3), rtol=1e-6)  # the category part stays as it was
    # drop-top: the mask's top quarter of dimensions zeroed
    dropped = query.colour_free(unit(np.array([[1.0, 0.0, 0.0, 1.0]])), np.array([0.1, 0.2, 0.3, 1.0]), "drop-top")
    np.testing.assert_allclose(dropped[0], [1.0, 0.0, 0.0, 0.0], atol=1e-6)

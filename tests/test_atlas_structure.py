"""The atlas's structure figures (jsae.analysis.atlas.structure) against a direct NumPy count."""

import numpy as np
from atlas_fixtures import random_atlas_data

from jsae.analysis.atlas.structure import describe, is_content_word, structure


def test_structure_counts_live_neighbours_and_content_named_clusters():
    data = random_atlas_data(n_features=60, seed=3)
    data.cluster_labels = {0: "the · of · and", 1: "river · water", 2: "War · battle",
                           3: "an · river", 4: "▁Golden · gate", 5: "12 · 13"}
    data.cos_vals[5, 0] = np.nan  # a live feature without a neighbour is left out
    s = structure(data)
    live = data.density > 0
    nn = data.cos_vals[live, 0]
    nn = nn[np.isfinite(nn) & (data.cos_ids[live, 0] >= 0)]
    assert s["live"] == int(live.sum()) < 60
    assert s["median_nn_cos"] == float(np.median(nn))
    # "river" and "War" lead their labels; "the", "an", "▁Golden" and "12" do not count
    assert (s["clusters"], s["content_clusters"]) == (6, 2)
    assert "6 clusters, 2 named by a content word" in describe(s)
    assert is_content_word("Paris") and not is_content_word("which") and not is_content_word("▁x")


def test_without_sklearn_the_figures_still_print(monkeypatch):
    """An atlas built with --map none needs no sklearn: its structure line must not fail."""
    monkeypatch.setattr("jsae.analysis.atlas.structure._function_words", lambda: None)
    s = structure(random_atlas_data(n_features=20, seed=1))
    assert s["content_clusters"] is None and s["median_nn_cos"] is not None
    assert describe(s).endswith("clusters") and "content" not in describe(s)

"""cryptsnap.overlay's names file and which layers a state reads through (no mount needed)."""

from __future__ import annotations

import pytest

from cryptsnap import overlay


def layers_with(tmp_path, numbers, names):
    layers = tmp_path / "layers"
    for n in numbers:
        (layers / str(n)).mkdir(parents=True)
    (layers / "work").mkdir()
    (layers / "6").mkdir()  # a run's layer, cut before it was named: no state's
    overlay.write_names(layers, names)
    return layers


def test_a_state_reads_its_layer_and_every_one_below_up_to_the_next_state(tmp_path):
    layers = layers_with(tmp_path, [0, 1, 2, 4], [(0, "A"), (1, "B"), (2, "C"), (4, "D")])
    assert overlay.read_names(layers) == [(0, "A"), (1, "B"), (2, "C"), (4, "D")]
    assert overlay.layers_of(layers, "A") == [0]
    assert overlay.layers_of(layers, "C") == [2, 1, 0]
    assert overlay.layers_of(layers, "D") == [4, 2, 1, 0]
    assert overlay.unnamed(layers) == [6]
    assert overlay.next_layer(layers) == 5  # (6 is removed before a new layer is made: snapshot.remove_partials)
    with pytest.raises(KeyError):
        overlay.layers_of(layers, "E")


def test_during_a_merge_the_layer_merged_in_still_belongs_to_the_state_above_the_dropped_one(tmp_path):
    # B dropped: the names say C begins at B's layer 1, while layer 2 is being merged into it.
    layers = layers_with(tmp_path, [0, 1, 2, 4], [(0, "A"), (1, "C"), (4, "D")])
    (layers / "merging-2").write_text("{}")
    assert overlay.layers_of(layers, "C") == [2, 1, 0]
    assert overlay.layers_of(layers, "A") == [0]
    (layers / "merging-2").unlink()  # had the merge not begun, layer 2 would be no state's
    assert overlay.layers_of(layers, "C") == [1, 0]


def test_names_are_replaced_whole_and_read_back_with_spaces_kept(tmp_path):
    layers = layers_with(tmp_path, [0], [(0, "2026-12-07T200000Z")])
    overlay.write_names(layers, [(0, "2026-12-07T200000Z"), (3, "a name with spaces")])
    assert overlay.read_names(layers) == [(0, "2026-12-07T200000Z"), (3, "a name with spaces")]
    assert sorted(p.name for p in layers.iterdir()) == ["0", "6", "names", "work"]
    assert overlay.read_names(tmp_path) == []  # no names file: no state

"""The connection-cut test's seeds (tests/system/test_cuts.py): which cuts a run of seeds makes."""

from tests.support.runs import PHASES
from tests.system.test_cuts import KINDS, ROUND, Cut


def test_any_round_of_seeds_aims_at_every_phase_with_each_kind_of_cut():
    for first in (0, 5, 100):
        cuts = [Cut.draw(seed) for seed in range(first, first + ROUND)]
        assert {(cut.phase, cut.kind) for cut in cuts} == {(p, k) for p in PHASES for k in KINDS}


def test_a_seed_is_the_same_cut_every_time_and_its_delay_is_drawn():
    assert Cut.draw(7) == Cut.draw(7)  # CRYPTSNAP_CUT_FIRST_SEED replays a failure
    delays = {Cut.draw(seed).delay for seed in range(ROUND)}
    assert len(delays) > 7 and all(0 <= d <= 0.5 for d in delays)

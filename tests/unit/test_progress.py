"""The fraction a backup reports from rsync's progress lines (snapshot.progress_reader)."""

from __future__ import annotations

from cryptsnap.snapshot import progress_reader

# rsync's --info=progress2 lines under incremental recursion, copying 97 MB of which half was
# already there (a real run's, some left out): its percentage counts the files found so far, so it
# falls (26% -> 24%) when the list is complete.
INCREMENTAL = """\
         32,768   0%    0.00kB/s    0:00:00
      1,390,076   2%   99.57MB/s    0:00:00 (xfr#19, ir-chk=1031/1081)
     21,287,880  24%   20.35MB/s    0:00:00 (xfr#319, ir-chk=1031/1381)
     22,950,852  26%   19.62MB/s    0:00:01 (xfr#338, ir-chk=1012/1381)
     24,398,292  24%   20.49MB/s    0:00:01 (xfr#358, to-chk=942/1531)
     49,640,240  50%   20.07MB/s    0:00:02 (xfr#750, to-chk=0/1531)
"""


def read(lines: str, expected: int | None = None) -> list[tuple[float, int]]:
    seen: list[tuple[float, int]] = []
    reader = progress_reader(lambda fraction, transferred: seen.append((fraction, transferred)), expected)
    for line in lines.splitlines():
        reader(line)
    return seen


def test_without_a_total_of_its_own_it_is_rsyncs_percentage():
    seen = read(INCREMENTAL)
    assert [f for f, _ in seen] == [0.0, 0.02, 0.24, 0.26, 0.24, 0.5]  # falls: why a total is needed
    assert seen[-1][1] == 49_640_240


def test_against_the_walks_total_it_only_rises_and_stays_below_one():
    seen = read(INCREMENTAL, expected=97_000_000)
    fractions = [f for f, _ in seen]
    assert fractions == sorted(fractions) and len(set(fractions)) == len(fractions)
    assert abs(fractions[-1] - 49_640_240 / 97_000_000) < 1e-9
    grown = read(INCREMENTAL, expected=40_000_000)  # files grew during the run: 1.0 is the caller's to say
    assert max(f for f, _ in grown) == 0.99
    assert [f for f, _ in read(INCREMENTAL, expected=0)] == [0.0] * 6  # an empty tree
    assert read("sending incremental file list\nd01/f1\n", expected=10) == []

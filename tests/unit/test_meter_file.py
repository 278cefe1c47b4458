"""The meter's counter file: reset, add from several writers, read."""

from cryptsnap import meter


def test_counters_add_up_across_writers(tmp_path):
    path = tmp_path / "traffic"
    assert meter.read(path) == meter.Traffic(0, 0)  # no file yet: nothing counted
    meter.reset(path)
    first, second = meter._Counter(str(path)), meter._Counter(str(path))
    first.add(100, 0)
    second.add(0, 250)
    first.add(5, 5)
    assert meter.read(path) == meter.Traffic(105, 255)
    meter.reset(path)
    assert meter.read(path) == meter.Traffic(0, 0)
    assert meter.Traffic(5, 7) - meter.Traffic(2, 3) == meter.Traffic(3, 4)

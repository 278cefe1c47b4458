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


def test_an_allowance_grows_at_its_rate_up_to_a_quarter_second():
    now = [0.0]
    allowance = meter.Allowance(100_000, clock=lambda: now[0])
    assert allowance.available() == 25_000  # a full quarter second saved up at the start
    allowance.spend(25_000)
    assert allowance.available() == 0
    assert abs(allowance.wait() - 0.25) < 1e-9  # until a chunk's worth (the burst is smaller) is back
    now[0] = 0.1
    assert allowance.available() == 10_000
    now[0] = 10.0
    assert allowance.available() == 25_000, "saved up beyond the burst"
    slow = meter.Allowance(1024, clock=lambda: now[0])
    assert slow.burst == 4096  # never less than a few packets

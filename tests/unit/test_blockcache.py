"""The metadata block cache: what it keeps and when it trusts itself."""

from __future__ import annotations

import os

import pytest

from cryptsnap.blockcache import BLOCK, CacheFailed, Ranges, Store

SIZE = 4 * 1024 * 1024
ANCHOR = 16 * BLOCK


class Remote:
    """The server's copy of the image, counting what is read from it."""

    def __init__(self):
        self.data = bytearray(os.urandom(SIZE))
        self.read_bytes = 0

    def read(self, offset: int, length: int) -> bytes:
        self.read_bytes += length
        return bytes(self.data[offset : offset + length])

    def write(self, offset: int, data: bytes) -> None:
        self.data[offset : offset + len(data)] = data


def open_store(tmp_path, remote: Remote, identity: str = "uuid:4M") -> tuple[Store, str]:
    store = Store(tmp_path / "cache", identity, SIZE)
    return store, store.open(ANCHOR, remote.read)


def through(store: Store, remote: Remote, offset: int, data: bytes) -> None:
    """A write as cryptsnap.nbd does it: the server first, then the cache."""
    remote.write(offset, data)
    store.written(offset, data)


def saved_with_anchor(tmp_path, remote: Remote) -> None:
    """A cache saved clean after a run that wrote the anchor block."""
    store, _ = open_store(tmp_path, remote)
    through(store, remote, ANCHOR, b"s" * BLOCK)
    store.save(ANCHOR)
    store.close()


def test_ranges_merge_and_cover():
    ranges = Ranges([(100, 200), (0, 50), (150, 300), (300, 310)])
    assert ranges.as_list() == [[0, 50], [100, 310]]
    assert [ranges.covers(x) for x in (0, 49, 50, 99, 100, 309, 310)] == [True, True, False, False, True, True, False]
    assert not Ranges().covers(0)


def test_reads_are_kept_and_served_locally(tmp_path):
    remote = Remote()
    store, verdict = open_store(tmp_path, remote)
    assert verdict.startswith("empty")
    first = store.read(1024 * 1024, 8 * BLOCK, remote.read)
    assert first == remote.data[1024 * 1024 : 1024 * 1024 + 8 * BLOCK]
    assert remote.read_bytes == 8 * BLOCK
    # A read that straddles cached and uncached blocks fetches only the missing ones.
    again = store.read(1024 * 1024 + 4 * BLOCK, 8 * BLOCK, remote.read)
    assert again == remote.data[1024 * 1024 + 4 * BLOCK : 1024 * 1024 + 12 * BLOCK]
    assert remote.read_bytes == 12 * BLOCK
    assert (store.hits, store.misses) == (4, 12)


def test_writes_are_kept_inside_metadata_ranges_or_where_already_held(tmp_path):
    remote = Remote()
    store, _ = open_store(tmp_path, remote)
    store.cover([(2 * 1024 * 1024, 3 * 1024 * 1024)])
    metadata, data, held = 2 * 1024 * 1024, 3 * 1024 * 1024, 3 * 1024 * 1024 + 64 * BLOCK
    store.read(held, BLOCK, remote.read)
    for offset in (metadata, data, held):
        through(store, remote, offset, bytes([7]) * BLOCK)
    assert store.has(metadata) and store.has(held) and not store.has(data)
    assert store.read(held, BLOCK, remote.read) == bytes([7]) * BLOCK  # the write, not the old read
    store.forget(metadata, BLOCK)
    assert not store.has(metadata)


def test_a_clean_cache_is_kept_only_while_the_image_still_has_its_superblock(tmp_path):
    remote = Remote()
    store, _ = open_store(tmp_path, remote)
    store.cover([(1024 * 1024, 2 * 1024 * 1024)])
    through(store, remote, ANCHOR, b"s" * BLOCK)  # a commit's superblock
    through(store, remote, 1024 * 1024, b"m" * BLOCK)
    store.save(ANCHOR)
    store.close()

    store, verdict = open_store(tmp_path, remote)
    assert verdict == "kept: 2 blocks", verdict
    assert store.ranges.covers(1024 * 1024)  # the covered ranges carry over to the next run
    before = remote.read_bytes
    assert store.read(1024 * 1024, BLOCK, remote.read) == b"m" * BLOCK
    assert remote.read_bytes == before
    store.close()  # not saved: this run "crashed"

    store, verdict = open_store(tmp_path, remote)
    assert verdict == "emptied: the last run did not close it cleanly"
    assert store.count() == 0
    through(store, remote, ANCHOR, b"t" * BLOCK)
    store.save(ANCHOR)
    store.close()

    remote.write(ANCHOR, b"u" * BLOCK)  # another writer committed
    store, verdict = open_store(tmp_path, remote)
    assert verdict.startswith("emptied: the image was written by someone else")
    assert not store.has(ANCHOR)
    store.save(ANCHOR)
    store.close()
    store, verdict = open_store(tmp_path, remote)
    assert verdict == "emptied: it does not hold the anchor block"
    through(store, remote, ANCHOR, b"v" * BLOCK)
    store.save(ANCHOR)
    store.close()
    assert open_store(tmp_path, remote, identity="other:4M")[1].startswith("emptied: it belongs to another image")


def test_unreadable_cache_files_empty_it(tmp_path):
    remote = Remote()
    saved_with_anchor(tmp_path, remote)
    (tmp_path / "cache" / "present").write_bytes(b"not zlib")
    assert open_store(tmp_path, remote)[1].startswith("emptied: unreadable")


def test_an_unusable_cache_directory_is_reported_as_the_cache_failing(tmp_path):
    (tmp_path / "cache").write_text("a file where the directory should be")
    with pytest.raises(CacheFailed, match="cannot be used"):
        open_store(tmp_path, Remote())


def test_a_failing_read_of_the_server_is_not_taken_for_a_cache_failure(tmp_path):
    remote = Remote()
    saved_with_anchor(tmp_path, remote)

    def unreachable(offset, length):
        raise OSError(5, "Input/output error")

    with pytest.raises(OSError) as raised:
        Store(tmp_path / "cache", "uuid:4M", SIZE).open(ANCHOR, unreachable)
    assert not isinstance(raised.value, CacheFailed)


def test_a_saved_cache_lists_its_blocks_in_runs_for_the_check(tmp_path):
    remote = Remote()
    store, _ = open_store(tmp_path, remote)
    held = [ANCHOR, 100 * BLOCK, 101 * BLOCK, 102 * BLOCK, 700 * BLOCK, 1023 * BLOCK]
    for offset in held:
        store.read(offset, BLOCK, remote.read)
    store.save(ANCHOR)
    store.close()
    unsaved = Store(tmp_path / "cache", "uuid:4M", SIZE)
    assert unsaved.load_saved()["anchor"] == ANCHOR
    assert list(unsaved.held_runs(0, 1 << 20)) == [(ANCHOR, BLOCK), (100 * BLOCK, 3 * BLOCK), (700 * BLOCK, BLOCK),
                                                   (1023 * BLOCK, BLOCK)]  # fmt: skip
    assert list(unsaved.held_runs(101 * BLOCK, 2 * BLOCK)) == [(101 * BLOCK, 2 * BLOCK), (700 * BLOCK, BLOCK),
                                                               (1023 * BLOCK, BLOCK)]  # fmt: skip
    assert list(unsaved.held_runs(100 * BLOCK, BLOCK))[:3] == [(100 * BLOCK, BLOCK), (101 * BLOCK, BLOCK),
                                                               (102 * BLOCK, BLOCK)]  # fmt: skip
    assert unsaved.saved_block(100 * BLOCK, 3 * BLOCK) == bytes(remote.data[100 * BLOCK : 103 * BLOCK])
    assert unsaved.saved_block(99 * BLOCK, 2 * BLOCK) is None  # not all of it held
    assert Store(tmp_path / "cache", "another:4M", SIZE).load_saved().startswith("emptied: it belongs to another")
    assert Store(tmp_path / "nothing", "uuid:4M", SIZE).load_saved() == "empty: no cache yet"

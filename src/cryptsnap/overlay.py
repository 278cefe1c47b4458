"""History kept as overlay layers in one file system: the layer store (docs/performance.md,
"A layered mode on btrfs, as it would run"; not yet a mode a target can choose).

Layout under LAYERS (a directory of the image's btrfs):

    0/            the oldest kept state, whole
    1/, 2/, ...   what each later run changed, as overlayfs writes an upper directory:
                  changed files whole, their directories copied up, a deleted name as a
                  whiteout (a character device 0/0), a directory rebuilt as opaque
    names         which state begins at which layer ("LAYER NAME" a line, oldest first);
                  a layer it does not name (and no merge is taking in) is no state's
    merging-N     a merge under way (`drop`): the new names and layer N's directories'
                  attributes, written before its first move

A state is its own layer and every layer below it, up to the next state's layer: during a
merge the layer being merged in still belongs to the state above the dropped one. Stock tools
read a state by mounting those layers read-only, newest first, named relative to LAYERS to
keep the options within the page the kernel takes (500 layers at most):

    cd LAYERS && mount -t overlay overlay -o ro,lowerdir=3:1:0 /mnt/restore

(the oldest state, a single layer, is LAYERS/0 itself). Every step here is a rename, unlink,
mkdir or attribute change inside one btrfs, whose commits keep them in order: a cut leaves
the steps up to some point, and every kept state reads the same at each of them.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path

from . import commands, runner

OVERLAY_XATTRS = b"trusted.overlay."
OPAQUE = "trusted.overlay.opaque"
NAMES = "names"
MOST_LAYERS = 500  # lower layers overlayfs stacks (Linux 6.1 to 6.18)
PLAN_PREFIX = "merging-"


def stack(layers: Path, below: int | None = None) -> list[int]:
    """The layers of the kept states, newest first (those numbered under BELOW): the named
    ones and one being merged in. A layer no state names yet (a run's, cut before it was
    named) is no state's."""
    numbers = {layer for layer, _ in read_names(layers)} | {_merging(plan) for plan in _plans(layers)}
    return sorted((n for n in numbers if (below is None or n < below) and (layers / str(n)).is_dir()), reverse=True)


def unnamed(layers: Path) -> list[int]:
    """Layers no kept state reads through: a run's, cut before it was named."""
    kept = set(stack(layers))
    return sorted(int(p.name) for p in layers.iterdir() if p.name.isdigit() and int(p.name) not in kept)


def next_layer(layers: Path) -> int:
    """The number for a new layer: above the kept states' (an unnamed one in the way is
    removed first: snapshot.remove_partials)."""
    return max(stack(layers), default=-1) + 1


def read_names(layers: Path) -> list[tuple[int, str]]:
    """(layer, name) of every kept state, oldest first."""
    try:
        text = (layers / NAMES).read_text()
    except FileNotFoundError:
        return []
    return [(int(layer), name) for layer, name in (line.split(" ", 1) for line in text.splitlines())]


def write_names(layers: Path, states: list[tuple[int, str]]) -> None:
    """Replaced whole (renamed into place): a cut leaves the old list or the new one."""
    written = layers / (NAMES + ".new")
    written.write_text("".join(f"{layer} {name}\n" for layer, name in states))
    os.rename(written, layers / NAMES)


def layers_of(layers: Path, name: str) -> list[int]:
    """The layers the state NAME reads through, newest first."""
    states = read_names(layers)
    index = _index(states, name)
    return stack(layers, below=states[index + 1][0] if index + 1 < len(states) else None)


def _index(states: list[tuple[int, str]], name: str) -> int:
    """Where NAME stands among the kept states (KeyError: it is not one)."""
    for index, (_, state) in enumerate(states):
        if state == name:
            return index
    raise KeyError(name)


@contextlib.contextmanager
def read_only(layers: Path, numbers: list[int], where: Path) -> Iterator[Path]:
    """The state made of NUMBERS (newest first) mounted read-only at WHERE, as a restore mounts
    it; a single layer is that layer itself (overlayfs stacks two at least)."""
    if len(numbers) == 1:
        yield layers / str(numbers[0])
        return
    where.mkdir(exist_ok=True)
    with _mounted(layers, _read_only_options(numbers), where):
        yield where


def mount_view(layers: Path, name: str, where: Path) -> None:
    """The state NAME mounted read-only at WHERE and left mounted (a view that outlives the
    process: `cryptsnap mount`); a single layer bound there."""
    numbers = layers_of(layers, name)
    if len(numbers) == 1:
        runner.run(commands.bind_mount(str(layers / str(numbers[0])), str(where)))
    else:
        runner.run(commands.mount_overlay(_read_only_options(numbers), str(where)), cwd=layers)


def _read_only_options(numbers: list[int]) -> str:
    return f"ro,lowerdir={':'.join(map(str, numbers))}"


def view(layers: Path, name: str, where: Path) -> contextlib.AbstractContextManager[Path]:
    """The state NAME, read-only (read_only)."""
    return read_only(layers, layers_of(layers, name), where)


@contextlib.contextmanager
def writable(layers: Path, n: int, work: Path, merged: Path, existing: bool = False) -> Iterator[Path]:
    """A new layer N made and mounted over the kept states' layers at MERGED, where writing
    changes the newest state into the next one (WORK: overlayfs's work directory, on the
    same file system); a merge left by a cut is finished first. The caller names the layer
    (write_names) once it is complete: till then it is no state's. EXISTING: layer N is one
    a cut left, gone on from."""
    finish(layers)
    lower = ":".join(map(str, stack(layers)))
    if not existing:
        (layers / str(n)).mkdir()
    work.mkdir(exist_ok=True)
    merged.mkdir(exist_ok=True)
    # Whatever the kernel's defaults: a layer holds only what `merge` knows (changed entries
    # whole, whiteouts, opaque directories), no redirected directory or metadata-only copy.
    # Every path relative to LAYERS (where mount runs): an absolute one holding a comma or a
    # colon (a runtime_dir's) would split the options.
    options = (f"lowerdir={lower},upperdir={n},workdir={os.path.relpath(work, layers)},"
               "redirect_dir=off,metacopy=off,index=off")
    with _mounted(layers, options, merged):
        yield merged


@contextlib.contextmanager
def _mounted(layers: Path, options: str, where: Path) -> Iterator[None]:
    runner.run(commands.mount_overlay(options, str(where)), cwd=layers)
    try:
        yield
    finally:
        runner.run(commands.unmount(str(where)))


def drop(layers: Path, name: str) -> None:
    """Drop the state NAME (retention), any but the newest: the next state's layer is merged
    into NAME's (`merge`), which the next state then begins at. A merge left by a cut is
    finished first (`finish`)."""
    finish(layers)
    states = read_names(layers)
    index = _index(states, name)
    if index + 1 == len(states):
        raise ValueError(f"{name} is the newest state: only older ones are dropped")
    into, (upper, following) = states[index][0], states[index + 1]
    names = [*states[:index], (into, following), *states[index + 2:]]
    source = layers / str(upper)
    directories = {str(d.relative_to(source)): directory_attributes(d)
                   for d in [source, *source.rglob("*")] if d.is_dir() and not d.is_symlink()}  # fmt: skip
    plan = layers / f"{PLAN_PREFIX}{upper}"
    written = plan.with_name(plan.name + ".new")
    written.write_text(json.dumps({"names": names, "directories": directories}))
    os.rename(written, plan)
    finish(layers)


def finish(layers: Path) -> None:
    """Finish a merge a cut left (none: nothing to do): the names first, so that the state
    being dropped is no longer listed before the first move changes what it reads."""
    for plan in _plans(layers):
        upper = _merging(plan)
        written = json.loads(plan.read_text())
        write_names(layers, [(layer, name) for layer, name in written["names"]])
        merge(layers, upper, written["directories"])
        plan.unlink()
    for unfinished in layers.glob(f"{PLAN_PREFIX}*.new"):  # a plan cut while written: no move was made
        unfinished.unlink()


def _plans(layers: Path) -> list[Path]:
    return sorted(p for p in layers.glob(f"{PLAN_PREFIX}[0-9]*") if p.name[len(PLAN_PREFIX):].isdigit())


def _merging(plan: Path) -> int:
    return int(plan.name[len(PLAN_PREFIX):])


def merge(layers: Path, upper: int, directories: dict[str, list]) -> None:
    """Layer UPPER's entries moved into the layer below it by renames (no file's data moves),
    which then holds what both held; UPPER is removed. Into layer 0 a whiteout deletes and is
    dropped; higher up, a whiteout or an opaque directory is kept where a layer further down
    still holds the name. Every state reads the same at every step (an entry is moved only
    after the lower layer's own was removed, and UPPER's still shadows it meanwhile), but for
    the times of the directories being merged, which the moves change: DIRECTORIES holds their
    attributes from before the first move (directory_attributes), which the lower layer's are
    set to. Run again after a cut, it finishes (tests/host/test_overlay_merge.py)."""
    source = layers / str(upper)
    if not source.exists():  # cut after its last step
        return
    below = stack(layers, below=upper)
    _merge(source, layers / str(below[0]), [layers / str(n) for n in below[1:]], directories, Path("."))


def _merge(source: Path, into: Path, below: list[Path], directories: dict[str, list], where: Path) -> None:
    for entry in os.scandir(source):
        moved, target = Path(entry.path), into / entry.name
        if is_whiteout(entry):  # a name deleted
            remove(target)
            if held_below(below, entry.name):  # still hides the name further down
                os.rename(moved, target)
            else:
                moved.unlink()
        elif entry.is_dir(follow_symlinks=False) and not opaque(moved) and target.is_dir() and not target.is_symlink():
            _merge(moved, target, [layer / entry.name for layer in below], directories, where / entry.name)
        else:  # (its markers taken off while the lower entry, gone, leaves them nothing to hide)
            remove(target)
            strip_overlay_xattrs(moved, keep_opaque=held_below(below, entry.name))
            os.rename(moved, target)
    give_attributes(into, directories[str(where)])
    source.rmdir()


def is_whiteout(entry: os.DirEntry) -> bool:
    st = entry.stat(follow_symlinks=False)
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif os.path.lexists(path):
        path.unlink()


def held_below(below: list[Path], name: str) -> bool:
    """Whether a layer further down holds NAME (asked only where a marker may be kept: a
    directory merged in place needs no look at up to 500 layers for each of its entries)."""
    return any(os.path.lexists(layer / name) for layer in below)


def own_xattrs(path: Path) -> dict[str, bytes]:
    """PATH's extended attributes (ACLs among them), overlayfs's own left out."""
    return {name: os.getxattr(path, name, follow_symlinks=False) for name in os.listxattr(path, follow_symlinks=False)
            if not name.encode().startswith(OVERLAY_XATTRS)}  # fmt: skip


def directory_attributes(directory: Path) -> list:
    st = directory.lstat()
    xattrs = {name: value.hex() for name, value in own_xattrs(directory).items()}
    return [st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode), st.st_atime_ns, st.st_mtime_ns, xattrs]


def give_attributes(directory: Path, attributes: list) -> None:
    """A directory's owner, mode, extended attributes and times (directory_attributes), onto
    DIRECTORY, the same one in the lower layer; its times last, as the other changes move its
    ctime alone. Only a directory that is not opaque is merged: the lower one's own opaque mark
    (hiding what lies further down) stays as it was."""
    uid, gid, mode, atime_ns, mtime_ns, hexed = attributes
    xattrs = {name: bytes.fromhex(value) for name, value in hexed.items()}
    os.chown(directory, uid, gid, follow_symlinks=False)
    for name in os.listxattr(directory, follow_symlinks=False):
        if name not in xattrs and name != OPAQUE:
            os.removexattr(directory, name, follow_symlinks=False)
    for name, value in xattrs.items():
        os.setxattr(directory, name, value, follow_symlinks=False)
    os.chmod(directory, mode)  # after the ACL, whose mask moves the group bits
    os.utime(directory, ns=(atime_ns, mtime_ns), follow_symlinks=False)


def opaque(directory: Path) -> bool:
    with contextlib.suppress(OSError):
        return os.getxattr(directory, OPAQUE, follow_symlinks=False) == b"y"
    return False


def strip_overlay_xattrs(path: Path, keep_opaque: bool = False) -> None:
    """overlayfs's own attributes (opaque, origin) mean nothing in the bottom layer; higher
    up, an opaque directory still hides what lies further down."""
    for name in os.listxattr(path, follow_symlinks=False):
        if name.encode().startswith(OVERLAY_XATTRS) and not (keep_opaque and name == OPAQUE):
            os.removexattr(path, name, follow_symlinks=False)

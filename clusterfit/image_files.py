"""Datasets made of image files, an ImageFolder tree or a file list (local or `s3://`), and what can
be wrong with one image.

Every way an image can be unusable has a reason (`REASONS`): `BadImageError` names the file, the
reason and what was found, and with DATA.ON_BAD_IMAGE=skip a step's summary counts skipped images
per reason. An image stays a dataset index whatever is wrong with it, so the order, the identity
and the labels of the other images do not depend on which ones can be read. A store that fails as
a whole (unreachable, no credentials) is not a bad image: its StorageError fails the step.

A local dataset is read from below its root only. A symlink (or a linked folder) that leads out of
the root is refused as `outside_root` before it is opened: on a shared cluster it would let anyone
who can write into a dataset make the job read, and embed into features, files of anyone the job
can read. A link that stays within the root is followed, and so is one into a folder DATA.LINK_ROOTS
names (a subset built as links into a big dataset elsewhere): an explicit opt-in, folder by folder.
The root is the folder DATA_PATHS names for an ImageFolder, and the deepest folder holding every
entry for a file list. Files are opened
non-blocking and checked with fstat before a byte is read, so a FIFO, socket or device named
`x.jpg` is refused (`not_a_file`) rather than hanging the reader or reading forever; the check is
repeated on what was opened (`/proc/self/fd`), so a link swapped after the first check cannot slip
past.

An ImageFolder tree is listed as torchvision's ImageFolder lists it: every entry that is not a
folder and whose name ends in an image extension (any case) is an image, readable or not (a
dangling link, a FIFO), and linked folders are followed. Unlike torchvision, a linked folder that
leads out of the root (refused) or back into its own ancestors (a loop) is not walked, and hidden
files (`.name`, such as macOS's `._x.jpg`) are left out. A file list names its images itself:
every entry is read, whatever its extension, and one that is not an image is `not_an_image`.
"""

from __future__ import annotations

import errno
import io
import logging
import os
import posixpath
import stat
from collections import Counter
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
from PIL import Image, UnidentifiedImageError

from clusterfit.config import Config
from clusterfit.errors import UserError
from clusterfit.storage import LocalBackend, NotFound, StorageError, Store, inside_root, open_store, read_uri, split_uri

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # torchvision's

# Why an image cannot be used: the keys a step's summary counts skipped images under.
REASONS = {
    "outside_root": "a symlink that leads out of the dataset root",
    "dangling_link": "a symlink to nothing",
    "link_loop": "symlinks that lead back to themselves",
    "missing": "no such file or object",
    "not_a_file": "a folder, FIFO, socket or device, not a regular file",
    "unreadable": "the system refused to read it",
    "bad_name": "a name the store cannot hold",
    "zero_bytes": "an empty file",
    "truncated": "image data that ends early",
    "not_an_image": "no image format recognised",
    "corrupt": "image data that does not decode",
    "too_large": "more pixels than PIL's decompression-bomb limit",
}


def count_reasons(reasons: list[str]) -> dict[str, int]:
    """How many images were skipped for each reason, by reason name."""
    return dict(sorted(Counter(reasons).items()))


class DatasetError(UserError, ValueError):
    """A dataset that cannot be read; the message names the config key, folder or file."""


class BadImageError(DatasetError):
    """One image that cannot be used; `reason` is its key in REASONS.

    Also built from a message alone: a DataLoader worker's exception reaches the main process as
    `type(exc)(<the worker's formatted traceback>)`, whose last line is the original message."""

    def __init__(self, message: str, reason: str = "") -> None:
        if message.startswith("Caught ") and "Traceback" in message:
            message = message.rstrip().rpartition("\n")[2].partition(": ")[2] or message
        if not reason:
            found = next((r for r in REASONS if f"cannot read image ({r})" in message), "unreadable")
            reason = found
        self.reason = reason
        super().__init__(message)


def bad_image(name: str, reason: str, detail: str) -> BadImageError:
    return BadImageError(f"{name}: cannot read image ({reason}): {detail}", reason)


def decode_image(data: bytes, name: str) -> Image.Image:
    """The RGB image in `data`, the bytes of the file `name`."""
    if not data:
        raise bad_image(name, "zero_bytes", "the file is empty (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.convert("RGB")
    except Image.DecompressionBombError as exc:
        raise bad_image(name, "too_large", str(exc)) from exc
    except UnidentifiedImageError:
        raise bad_image(name, "not_an_image", f"no image format recognised in its {len(data)} bytes") from None
    except (OSError, EOFError) as exc:
        reason = "truncated" if "truncated" in str(exc).lower() or isinstance(exc, EOFError) else "corrupt"
        raise bad_image(name, reason, f"{exc} ({len(data)} bytes)") from exc
    except Exception as exc:  # PIL's decoders also raise ValueError, SyntaxError, struct.error on bad data
        raise bad_image(name, "corrupt", f"{type(exc).__name__}: {exc}") from exc


def is_within(path: str, roots: tuple[str, ...]) -> bool:
    """Whether the real path `path` is one of `roots` (real paths) or below one."""
    return any(path == root or path.startswith(root.rstrip("/") + "/") for root in roots)


def link_roots(cfg: Config) -> tuple[str, ...]:
    """DATA.LINK_ROOTS as real paths: the folders besides the dataset root that local symlinks may lead into."""
    return tuple(link_root(value) for value in cfg.DATA.LINK_ROOTS)


def link_root(value: str) -> str:
    """The real path of the local folder `value` (an absolute path or a file:// URI)."""
    parsed = urlparse(value)
    path = unquote(parsed.path) if parsed.scheme == "file" and parsed.netloc in ("", "localhost") else value
    if not posixpath.isabs(path):
        raise DatasetError(f"DATA.LINK_ROOTS: {value!r} is not an absolute local path (or a file:// URI)")
    if not os.path.isdir(path):
        raise DatasetError(f"DATA.LINK_ROOTS: {value!r}: no such folder; list folders that symlinks may lead into")
    return os.path.realpath(path)


def read_local_image(path: str, roots: tuple[str, ...], name: str) -> bytes:
    """The bytes of the regular file at `path`, where it, and whatever links it goes through, stay below one
    of `roots` (real paths: the dataset root, then DATA.LINK_ROOTS); otherwise a BadImageError naming `name`."""
    try:
        real = os.path.realpath(path)
    except ValueError as exc:  # a NUL in the name
        raise bad_image(name, "bad_name", str(exc)) from None
    if not is_within(real, roots):  # refused before it is opened: opening some devices does something
        raise outside_root(name, real, roots)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except ValueError as exc:  # a NUL in the name
        raise bad_image(name, "bad_name", str(exc)) from None
    except OSError as exc:
        raise open_failure(path, name, exc) from None
    try:
        opened = opened_path(fd)
        if opened is not None and not is_within(opened, roots):  # a link swapped since the check above
            raise outside_root(name, opened, roots)
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise bad_image(name, "not_a_file", f"a {file_kind(mode)}, not a regular file")
        with open(fd, "rb", closefd=False) as handle:
            return handle.read()
    except OSError as exc:
        raise bad_image(name, "unreadable", exc.strerror or str(exc)) from None
    finally:
        os.close(fd)


def outside_root(name: str, real: str, roots: tuple[str, ...]) -> BadImageError:
    return bad_image(
        name,
        "outside_root",
        f"leads through a symlink to {real}, {outside(roots)}: not followed, as it could expose files of others "
        "on a shared machine; copy the image into the dataset, name a root that holds both, or list its folder "
        "in DATA.LINK_ROOTS",
    )


def outside(roots: tuple[str, ...]) -> str:
    """Where a refused link does not lead, for a message: `roots` is the dataset root, then DATA.LINK_ROOTS."""
    listed = f" and DATA.LINK_ROOTS ({', '.join(roots[1:])})" if roots[1:] else ""
    return f"outside the dataset root {roots[0]}{listed}"


def open_failure(path: str, name: str, exc: OSError) -> BadImageError:
    """Why os.open(path) failed, as a BadImageError."""
    if exc.errno == errno.ENOENT and os.path.islink(path):
        return bad_image(name, "dangling_link", f"a symlink to {os.readlink(path)}, which does not exist")
    if exc.errno in (errno.ENOENT, errno.ENOTDIR):
        return bad_image(name, "missing", "no such file")
    if exc.errno == errno.ELOOP:
        return bad_image(name, "link_loop", "symlinks that lead back to themselves")
    if exc.errno == errno.ENXIO:  # what opening a socket gives
        return bad_image(name, "not_a_file", "a socket, not a regular file")
    if exc.errno == errno.ENAMETOOLONG:
        return bad_image(name, "bad_name", "a name longer than the file system allows")
    return bad_image(name, "unreadable", exc.strerror or str(exc))


def opened_path(fd: int) -> str | None:
    """The real path of what `fd` is open on; None where /proc does not say."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return None


def file_kind(mode: int) -> str:
    kinds = ((stat.S_ISDIR, "folder"), (stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "device"))
    return next((kind for test, kind in kinds if test(mode)), "device")


def common_folder(paths: list[str]) -> str:
    """The deepest folder holding every one of the absolute POSIX `paths` ('/' for none)."""
    return posixpath.commonpath([posixpath.dirname(p) for p in paths]) if paths else "/"


def list_image_tree(root: str, on_bad_image: str, where: str, link_roots: tuple[str, ...] = ()) -> list[str]:
    """The names (relative, '/'-separated, unsorted) of the entries with an image extension below the local
    folder `root`; `where` names it in errors. A linked folder that leads out of the root and of `link_roots`
    (real paths) fails with DatasetError, or with `on_bad_image` "skip" is left out with a warning."""
    roots = (os.path.realpath(root), *link_roots)
    found: list[str] = []
    pending = [(root, "", frozenset([identity(root)]))]
    while pending:
        folder, prefix, ancestors = pending.pop()
        for entry in scan(folder, where):
            key = prefix + entry.name
            if entry.is_dir(follow_symlinks=False):
                pending.append((entry.path, key + "/", ancestors | {identity(entry.path)}))
            elif entry.is_symlink() and os.path.isdir(entry.path):
                target = os.path.realpath(entry.path)
                if not is_within(target, roots):
                    refuse_linked_folder(f"{where}: {key}", target, roots, on_bad_image)
                elif identity(entry.path) in ancestors:
                    log.warning("%s: %s links back to a folder above it (%s); not walked", where, key, target)
                else:
                    pending.append((entry.path, key + "/", ancestors | {identity(entry.path)}))
            elif entry.name.lower().endswith(IMAGE_SUFFIXES):
                found.append(key)
    return found


def scan(folder: str, where: str) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(folder) as entries:
            return list(entries)
    except OSError as exc:
        raise DatasetError(f"{where}: cannot list the folder {folder}: {exc.strerror or exc}") from None


def identity(path: str) -> tuple[int, int]:
    info = os.stat(path)
    return info.st_dev, info.st_ino


def refuse_linked_folder(name: str, target: str, roots: tuple[str, ...], on_bad_image: str) -> None:
    message = (
        f"{name}: a symlink to the folder {target}, {outside(roots)}: not walked, as it could expose files of "
        "others on a shared machine; copy the images into the dataset, name a root that holds both, or list its "
        "folder in DATA.LINK_ROOTS"
    )
    if on_bad_image != "skip":
        raise DatasetError(message + " (or set DATA.ON_BAD_IMAGE=skip to leave it out)")
    log.warning("%s", message)


# ---------------------------------------------------------------------------------------------
# The two sources made of image files: an ImageFolder tree and a file list.


class FileSource:
    """Images named by keys below one store root (a folder tree or a file list). `written`: each
    image's name as the file list spells it (its identity), where that differs from its key. `within`:
    the folder (a key prefix, "" for the root) that local symlinks must not lead out of, except into one of
    `link_roots` (real paths, DATA.LINK_ROOTS)."""

    def __init__(
        self,
        store: Store,
        keys: list[str],
        targets: np.ndarray | None,
        classes: list[str],
        written: list[str] | None = None,
        within: str = "",
        link_roots: tuple[str, ...] = (),
    ) -> None:
        self.store = store
        self.keys = keys
        self.targets = targets
        self.classes = classes
        self.written = written if written is not None else keys
        local = store.backend.root if isinstance(store.backend, LocalBackend) else None
        self.local_root = os.fspath(local) if local is not None else None
        real_root = os.path.realpath(os.path.join(self.local_root, within)) if self.local_root else ""
        self.real_roots = (real_root, *link_roots)

    def __len__(self) -> int:
        return len(self.keys)

    def name(self, index: int) -> str:
        return self.store.uri(self.keys[index])

    def key(self, index: int) -> str:
        return self.written[index]

    def load(self, index: int) -> Image.Image:
        return decode_image(self.read(index), self.name(index))

    def read(self, index: int) -> bytes:
        """The image's bytes. A missing or unusable file is a BadImageError; a store that fails (unreachable,
        no credentials) raises its StorageError, which DATA.ON_BAD_IMAGE=skip does not skip."""
        key, name = self.keys[index], self.name(index)
        try:  # the key check of the store, on a local name that is not UTF-8 too
            inside_root(key.encode(errors="surrogateescape").decode(errors="replace"), self.store.root)
        except StorageError as exc:
            raise bad_image(name, "bad_name", str(exc)) from None
        if self.local_root is not None:
            return read_local_image(os.path.join(self.local_root, key), self.real_roots, name)
        try:
            return self.store.get_bytes(key)
        except NotFound:
            raise bad_image(name, "missing", "no such object") from None


def folder_source(path: str, cfg: Config, key: str, class_list: tuple[list[str], str] | None = None) -> FileSource:
    """An ImageFolder tree; `class_list`: (the classes whose ids to use, the key naming where they come from)
    instead of this tree's own."""
    store, allowed = open_store(path, cfg.STORAGE), link_roots(cfg)
    if isinstance(store.backend, LocalBackend):
        if not store.backend.root.is_dir():
            raise DatasetError(f"{key}: {path}: no such folder")
        listed = list_image_tree(os.fspath(store.backend.root), cfg.DATA.ON_BAD_IMAGE, f"{key}: {path}", allowed)
    else:
        listed = [k for k in store.list("") if k.lower().endswith(IMAGE_SUFFIXES)]
    keys = [k for k in listed if "/" in k and not k.rpartition("/")[2].startswith(".")]
    if not keys:
        raise DatasetError(
            f"{key}: {path}: no images found in <root>/<class>/<image> layout ({', '.join(IMAGE_SUFFIXES)})"
        )
    classes = sorted({k.split("/", 1)[0] for k in keys})
    if class_list is not None:
        classes = known_classes(classes, class_list, f"{key}: {path}")
    class_index = {c: i for i, c in enumerate(classes)}
    # torchvision's order: by class, then by folder (a folder's own files before its subfolders'), then name.
    keys.sort(key=lambda k: (class_index[k.split("/", 1)[0]], k.rpartition("/")[0], k.rpartition("/")[2]))
    targets = np.array([class_index[k.split("/", 1)[0]] for k in keys], dtype=np.int64)
    return FileSource(store, keys, targets, classes, link_roots=allowed)


def filelist_source(path: str, cfg: Config, key: str) -> FileSource:
    try:
        text = read_uri(path, cfg.STORAGE).decode("utf-8-sig")  # -sig: a list saved by Windows' Notepad
    except Exception as exc:
        raise DatasetError(f"{key}: {path}: cannot read file list: {exc}") from exc
    head, _ = split_uri(path if "://" in path else Path(path).absolute().as_uri())
    names, labels = parse_file_list(text, f"{key}: {path}")
    targets = np.array(labels, dtype=np.int64) if labels else None
    root, located = list_locations(head, names)
    within = common_folder(["/" + k for k in located]).lstrip("/")  # the dataset root: symlinks stay below it
    store = open_store(root, cfg.STORAGE)
    return FileSource(store, located, targets, [], written=names, within=within, link_roots=link_roots(cfg))


def parse_file_list(text: str, where: str) -> tuple[list[str], list[int]]:
    """A file list's (names, labels): one `path[,label]` a line; blank lines and lines starting with # skipped.
    Labels are non-negative int64 ids on every line or on none."""
    names: list[str] = []
    labels: list[int] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.startswith("#"):
            continue
        name, _, label = line.strip().partition(",")
        if not name.strip():
            raise DatasetError(f"{where}:{number}: no path before the label: {line.strip()!r}")
        names.append(name.strip())
        if label.strip():
            try:
                labels.append(int(label))
            except ValueError:
                raise DatasetError(f"{where}:{number}: label {label!r} is not an integer") from None
            if not 0 <= labels[-1] <= np.iinfo(np.int64).max:
                raise DatasetError(f"{where}:{number}: label {label.strip()} is not a class id (0 or more, int64)")
    if labels and len(labels) != len(names):
        raise DatasetError(f"{where}: {len(labels)} of {len(names)} lines have a label; label all or none")
    if not names:
        raise DatasetError(f"{where}: no images listed (one `path[,label]` a line)")
    return names, labels


def list_locations(head: str, names: list[str]) -> tuple[str, list[str]]:
    """A file list's entries, relative to its folder `head` or absolute (`/data/x.jpg`, as VISSL's lists
    are), as keys below one root: the file system's (`file:///`) or the bucket's. `..` is resolved
    against the folder, as a shell would, never above that root."""
    parsed = urlparse(head)
    if parsed.scheme == "s3":
        folder, root = parsed.path, f"s3://{parsed.netloc}"
    else:
        folder, root = unquote(parsed.path) if parsed.scheme == "file" else head, "file:///"
    located = []
    for name in names:
        joined = posixpath.normpath(posixpath.join("/", folder, name))  # an absolute name replaces the folder
        located.append(joined.lstrip("/"))
    return root, located


def known_classes(found: list[str], class_list: tuple[list[str], str], where: str) -> list[str]:
    """`class_list`'s classes, once every class folder in `found` is one of them."""
    classes, origin = class_list
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise DatasetError(
            f"{where}: class folder(s) {', '.join(map(repr, unknown[:10]))} not among the {len(classes)} classes of "
            f"{origin}; class ids are TRAIN's, so every TEST class must be a TRAIN class"
        )
    return classes

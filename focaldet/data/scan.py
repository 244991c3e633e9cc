"""Scanning image files before they are used: every image decoded once, in parallel, cached.

`scan_images` decodes every file of a dataset with the decoder training uses
(`focaldet.data.images.decode_image`, in a thread pool: OpenCV releases the GIL) and
returns an `ImageScan` per file: decodable or not, its decoded size, whether it is a
truncated JPEG, its EXIF orientation and the conversion to 8-bit RGB it needs. The data
doctor reports them; the data module refuses (or skips, ``bad_images: skip``) bad files
when it is set up, so that no run dies on an image halfway through an epoch.

Results are cached per image folder in ``$FOCALDET_CACHE`` (default
``$XDG_CACHE_HOME/focaldet`` or ``~/.cache/focaldet``), never next to the data, which may
be read-only. An entry is reused only while the file's size and modification time (ns)
are unchanged and the cache was written by the same scan version and OpenCV; anything
else -- a changed file, a stale, corrupt or unwritable cache -- just means a rescan.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2

from focaldet.atomic import atomic_write
from focaldet.data.images import decode_image, is_truncated_jpeg, read_header

__all__ = ["ImageScan", "cache_dir", "format_mismatch", "scan_image", "scan_images"]

SCAN_VERSION = 1

# PIL mode -> what reading it as 8-bit RGB does (modes not listed need no conversion).
_CONVERSIONS = {
    "1": "1-bit -> RGB",
    "L": "grayscale -> RGB",
    "LA": "grayscale+alpha -> RGB (alpha dropped)",
    "P": "palette -> RGB",
    "PA": "palette+alpha -> RGB (alpha dropped)",
    "RGBA": "RGBA -> RGB (alpha dropped)",
    "CMYK": "CMYK -> RGB",
    "I": "32-bit -> 8-bit RGB",
    "I;16": "16-bit -> 8-bit RGB",
    "I;16B": "16-bit -> 8-bit RGB",
    "I;16L": "16-bit -> 8-bit RGB",
    "F": "float -> 8-bit RGB",
}
_EXTENSION_FORMATS = {
    ".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".bmp": "BMP", ".tif": "TIFF", ".tiff": "TIFF", ".webp": "WEBP",
}


@dataclass(frozen=True)
class ImageScan:
    """One file as `scan_image` found it.

    ``status`` is ``"ok"``, ``"missing"`` or ``"undecodable"``; ``size`` the decoded
    ``(h, w)`` (EXIF orientation applied); ``stored_size`` the ``(h, w)`` before the
    orientation; ``conversion`` e.g. ``"CMYK -> RGB"``; ``format`` what the header says.
    """

    status: str
    size: tuple[int, int] | None = None
    stored_size: tuple[int, int] | None = None
    truncated: bool = False
    orientation: int = 1
    conversion: str | None = None
    format: str | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def problem(self, height: int | None = None, width: int | None = None) -> str | None:
        """Why the file cannot be used as an image of ``height x width`` (the JSON size),
        in a few words; ``None`` when it can."""
        if not self.ok:
            return self.error
        if height is not None and self.size != (int(height), int(width)):
            h, w = self.size
            text = f"{w}x{h} (w x h) on disk but {int(width)}x{int(height)} in the JSON"
            if self.orientation != 1 and self.stored_size == (int(height), int(width)):
                text += f" (EXIF orientation {self.orientation} turns it; the JSON has the unturned size)"
            return text
        return None

    @classmethod
    def from_dict(cls, d: dict) -> ImageScan:
        d = dict(d)
        for key in ("size", "stored_size"):
            d[key] = tuple(d[key]) if d.get(key) is not None else None
        return cls(**d)


def scan_image(path: str | os.PathLike) -> ImageScan:
    """Decode one file as training will (full size) and read its header."""
    import numpy as np

    try:
        buffer = np.fromfile(path, dtype=np.uint8)
    except FileNotFoundError:
        return ImageScan("missing", error="file not found")
    except OSError as e:
        return ImageScan("undecodable", error=f"cannot read: {e.strerror or e}")
    if buffer.size == 0:
        return ImageScan("undecodable", error="empty file (0 bytes)")
    header = read_header(buffer)
    image = decode_image(buffer)
    if image is None:
        what = f"{header.format} " if header is not None else ""
        return ImageScan("undecodable", format=header.format if header else None,
                         error=f"not a decodable {what}image (corrupt or unsupported format)")
    size = (int(image.shape[0]), int(image.shape[1]))
    return ImageScan(
        "ok",
        size=size,
        stored_size=header.stored_size if header is not None else size,
        truncated=is_truncated_jpeg(buffer),
        orientation=header.orientation if header is not None else 1,
        conversion=_CONVERSIONS.get(header.mode) if header is not None else None,
        format=header.format if header is not None else None,
    )


def format_mismatch(file_name: str, scan: ImageScan) -> str | None:
    """The real format of a file whose extension says another one (``"PNG"``), else ``None``."""
    expected = _EXTENSION_FORMATS.get(Path(file_name).suffix.lower())
    if scan.format is None or expected is None or scan.format == expected:
        return None
    return None if (expected, scan.format) == ("JPEG", "MPO") else scan.format  # MPO: multi-picture JPEG


# --------------------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------------------


def cache_dir() -> Path:
    """``$FOCALDET_CACHE``, else ``$XDG_CACHE_HOME/focaldet``, else ``~/.cache/focaldet``."""
    if os.environ.get("FOCALDET_CACHE"):
        return Path(os.environ["FOCALDET_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "focaldet"


def _cache_file(root: Path) -> Path:
    digest = hashlib.sha1(str(root).encode()).hexdigest()[:16]
    return cache_dir() / "image-scan" / f"{root.name or 'root'}-{digest}.json"


def _cache_tag() -> str:
    return f"{SCAN_VERSION}/{cv2.__version__}"


# cache file -> ((size, mtime_ns) of the file, its entries): a process reads each version once
# (the train and val splits of one image folder share a cache file)
_LOADED: dict[Path, tuple[tuple[int, int], dict[str, list]]] = {}


def _file_version(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def release_cache_memory() -> None:
    """Drop the cache files kept in memory (the data module calls it at the end of ``setup``)."""
    _LOADED.clear()


def _load_cache(root: Path) -> dict[str, list]:
    path = _cache_file(root)
    version = _file_version(path)
    if version is not None and path in _LOADED and _LOADED[path][0] == version:
        return _LOADED[path][1]
    try:
        saved = json.loads(path.read_text())
        if saved.get("tag") == _cache_tag() and saved.get("root") == str(root) and isinstance(saved["files"], dict):
            _LOADED[path] = (version, saved["files"])
            return saved["files"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass  # no cache, or one we cannot use: rescan
    return {}


def _save_cache(root: Path, files: dict[str, list]) -> None:
    """Write atomically (temporary file, then rename); a cache that cannot be written is skipped."""
    path = _cache_file(root)
    try:
        with atomic_write(path) as f:
            json.dump({"tag": _cache_tag(), "root": str(root), "files": files}, f)
        version = _file_version(path)
        if version is not None:
            _LOADED[path] = (version, files)
    except OSError:
        pass


# --------------------------------------------------------------------------------------
# Scanning a folder
# --------------------------------------------------------------------------------------


def _default_workers() -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, 16))


def scan_images(
    root: str | os.PathLike,
    file_names: Iterable[str],
    workers: int | None = None,
    progress: bool | None = None,
    cache: bool = True,
    desc: str = "scanning images",
) -> dict[str, ImageScan]:
    """`ImageScan` of each ``root / file_name`` (the names as given), decoding in ``workers``
    threads (default: the usable CPUs, at most 16) the files the cache does not know.

    ``progress``: a tqdm bar on stderr; ``None`` shows it when stderr is a terminal.

    In a ``torch.distributed`` run of 2+ processes this is a collective (every rank calls it
    with the same names) and the job decodes each file once, not once per rank: rank 0
    reads the cache and broadcasts what it knows and which files are left, rank ``r``
    decodes the files ``r, r + world, ...`` of those, the results are all-gathered, and
    rank 0 alone writes the cache. With ``$FOCALDET_CACHE`` on storage every node sees,
    the next job (on any node) finds every file cached.
    """
    root = Path(root).resolve()
    names = list(dict.fromkeys(str(n) for n in file_names))
    group = _process_group()
    if group is not None:
        return _scan_distributed(root, names, workers, progress, cache, desc, *group)
    saved, stats, results, todo = _from_cache(root, names, cache)
    if todo:
        results.update(_decode(root, todo, workers, progress, desc))
        if cache:
            _write_cache(root, saved, stats, results, todo)
    return {name: results[name] for name in names}


def _from_cache(root: Path, names: list[str], cache: bool):
    """``(saved cache, {name: (size, mtime_ns)}, {name: ImageScan known without decoding},
    [names to decode])``: missing or unreadable files and unchanged cached ones are known."""
    saved = _load_cache(root) if cache else {}
    stats: dict[str, tuple[int, int]] = {}
    results: dict[str, ImageScan] = {}
    todo: list[str] = []
    folder = str(root)
    for name in names:
        try:
            st = os.stat(os.path.join(folder, name))  # not root / name: pathlib costs more than the stat
        except FileNotFoundError:
            results[name] = ImageScan("missing", error="file not found")
            continue
        except OSError as e:
            results[name] = ImageScan("undecodable", error=f"cannot read: {e.strerror or e}")
            continue
        stats[name] = (st.st_size, st.st_mtime_ns)
        entry = saved.get(name)
        if isinstance(entry, list) and len(entry) == 3 and tuple(entry[:2]) == stats[name]:
            try:
                results[name] = ImageScan.from_dict(entry[2])
                continue
            except (TypeError, ValueError, AttributeError):
                pass
        todo.append(name)
    return saved, stats, results, todo


def _decode(root: Path, names: list[str], workers: int | None, progress: bool | None, desc: str) -> dict[str, ImageScan]:
    """`scan_image` of each name, in a thread pool."""
    from tqdm.auto import tqdm

    results: dict[str, ImageScan] = {}
    with ThreadPoolExecutor(max_workers=workers or _default_workers()) as pool:
        scans = pool.map(lambda n: scan_image(root / n), names)
        bar = tqdm(scans, total=len(names), desc=desc, unit="img", disable=None if progress is None else not progress,
                   leave=False)
        for name, scan in zip(names, bar):
            results[name] = scan
    return results


def _write_cache(root: Path, saved: dict, stats: dict, results: dict[str, ImageScan], todo: list[str]) -> None:
    files = {n: e for n, e in saved.items() if isinstance(e, list)}
    files.update({n: [*stats[n], asdict(results[n])] for n in todo})
    _save_cache(root, files)


# --------------------------------------------------------------------------------------
# One scan per job under torch.distributed
# --------------------------------------------------------------------------------------


def _process_group() -> tuple[int, int] | None:
    """``(rank, world size)`` of an initialised ``torch.distributed`` run of 2+ processes."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return None
    return dist.get_rank(), dist.get_world_size()


def _scan_distributed(root: Path, names: list[str], workers: int | None, progress: bool | None, cache: bool,
                      desc: str, rank: int, world: int) -> dict[str, ImageScan]:
    """`scan_images` split over the ranks (see its docstring). Rank 0's view of the cache
    decides, so ranks with node-local caches still agree on the split."""
    import torch.distributed as dist

    plan: list = [None]
    if rank == 0:
        saved, stats, known, todo = _from_cache(root, names, cache)
        plan[0] = ({n: asdict(v) for n, v in known.items()}, todo)
    dist.broadcast_object_list(plan, src=0)
    known_dicts, todo = plan[0]
    mine = todo[rank::world]  # (about len(todo) / world) files decoded by this rank
    decoded = _decode(root, mine, workers, progress if rank == 0 else False, desc) if mine else {}
    shares: list = [None] * world
    dist.all_gather_object(shares, {n: asdict(v) for n, v in decoded.items()})
    results = {n: ImageScan.from_dict(v) for n, v in known_dicts.items()}
    for share in shares:
        results.update({n: ImageScan.from_dict(v) for n, v in share.items()})
    if rank == 0 and cache and todo:
        _write_cache(root, saved, stats, results, todo)
    return {name: results[name] for name in names}

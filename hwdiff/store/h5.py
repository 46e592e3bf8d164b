"""Low-level HDF5 for capture files: datasets created with their checksum (Fletcher-32, or a
``crc32`` attribute on a scalar) through cached property lists, quick scalar attributes, the
compression filters, and reads that turn a failed checksum into a :class:`CorruptDataError`.
"""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ..errors import CaptureFormatError, CorruptDataError, HwdiffError
from .format import COMPRESSIONS, PLUGIN_FILTERS


def compression_options(name: str | None) -> dict[str, Any]:
    """``create_dataset`` keywords of a :data:`COMPRESSIONS` name (None: no filter but the checksum)."""
    if name is None:
        return {}
    if name in ("gzip", "lzf"):
        return {"compression": name, "shuffle": True}
    if name not in COMPRESSIONS:
        raise HwdiffError(
            f"compression must be one of {', '.join(COMPRESSIONS)} or none, got {name!r}"
        )
    try:
        import hdf5plugin
    except ImportError as exc:
        raise HwdiffError(
            f"compression {name} needs the hdf5plugin package (pip install hdf5plugin), "
            "and so does every machine that reads the file; gzip and lzf need nothing"
        ) from exc
    if name == "lz4":
        return dict(hdf5plugin.Blosc(cname="lz4", clevel=5, shuffle=hdf5plugin.Blosc.BITSHUFFLE))
    return dict(hdf5plugin.Blosc2(cname="zstd", clevel=1, filters=hdf5plugin.Blosc2.SHUFFLE))


_SCALAR = h5py.h5s.create(h5py.h5s.SCALAR)
_ATTR_TYPES: dict[
    type, tuple[Any, Any, Any]
] = {}  # Python type → (numpy dtype, stored type, memory type)


def set_attrs(obj: h5py.Group | h5py.Dataset, values: dict[str, Any]) -> None:
    """``obj.attrs.update(values)`` in about half the time for new scalar str / int / float / bool
    attributes (h5py's ``attrs.create`` spends most of its ~40 µs in Python; a capture writes ~700),
    with the very HDF5 types h5py gives them; anything else, or a name already there, goes through h5py."""
    for key, value in values.items():
        kind, name = type(value), key.encode()
        fast = kind in (str, float, bool) or (kind is int and -(2**63) <= value < 2**63)
        if not fast or h5py.h5a.exists(obj.id, name):
            obj.attrs[key] = value
            continue
        if kind not in _ATTR_TYPES:
            dtype = h5py.string_dtype() if kind is str else np.asarray(value).dtype
            _ATTR_TYPES[kind] = (
                dtype,
                h5py.h5t.py_create(dtype, logical=True),
                h5py.h5t.py_create(dtype),
            )
        dtype, stored, memory = _ATTR_TYPES[kind]
        h5py.h5a.create(obj.id, name, stored, _SCALAR).write(
            np.array(value, dtype=dtype), mtype=memory
        )


# Property lists as h5py's high-level calls make them (no timestamps; intermediate groups created; str
# names in UTF-8), built once: a capture creates ~100-400 groups and datasets, and h5py's high-level
# create_group / create_dataset spend most of their time in Python rebuilding them (docs/benchmarks.md).
_GROUP_PLIST = h5py.h5p.create(h5py.h5p.GROUP_CREATE)
_GROUP_PLIST.set_obj_track_times(False)
_LINK_PLIST = h5py.h5p.create(h5py.h5p.LINK_CREATE)
_LINK_PLIST.set_create_intermediate_group(True)
_LINK_PLIST.set_char_encoding(h5py.h5t.CSET_UTF8)
_DATASET_PLISTS: dict[
    tuple, Any
] = {}  # (chunks or None, fletcher32) → dataset creation property list
_TYPES: dict[np.dtype, Any] = {}  # numpy dtype → HDF5 type, as h5py makes it (py_create, logical)


def new_group(parent: h5py.Group, name: str) -> h5py.Group:
    """``parent.create_group(name)`` with the same group properties, through HDF5's own call."""
    if (
        h5py.get_config().track_order
    ):  # h5py's global option changes the properties: its own call then
        return parent.create_group(name)
    return h5py.Group(
        h5py.h5g.create(parent.id, name.encode(), lcpl=_LINK_PLIST, gcpl=_GROUP_PLIST)
    )


def _dataset_plist(chunks: tuple[int, ...] | None) -> Any:
    key = (chunks, chunks is not None)
    plist = _DATASET_PLISTS.get(key)
    if plist is None:
        plist = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
        if chunks is not None:
            plist.set_chunk(chunks)
            plist.set_fletcher32()
        plist.set_obj_track_times(False)
        plist = _DATASET_PLISTS[key] = plist
    return plist


def _new_dataset(
    group: h5py.Group,
    name: str,
    shape: tuple[int, ...],
    dtype: np.dtype,
    chunks: tuple[int, ...] | None,
    data: np.ndarray | None = None,
) -> h5py.Dataset:
    """A new dataset with the properties ``create_dataset`` gives it (Fletcher-32 when chunked, no
    other filter), made through HDF5's own calls with cached property lists and types."""
    dtype = np.dtype(dtype)
    kind = _TYPES.get(dtype)
    if kind is None:
        kind = _TYPES[dtype] = h5py.h5t.py_create(dtype, logical=True)
    space = _SCALAR if shape == () else h5py.h5s.create_simple(shape)
    dataset = h5py.h5d.create(
        group.id, name.encode(), kind, space, dcpl=_dataset_plist(chunks), lcpl=_LINK_PLIST
    )
    if data is not None:
        dataset.write(h5py.h5s.ALL, h5py.h5s.ALL, data)
    return h5py.Dataset(dataset)


def create_checked(
    group: h5py.Group, name: str, *, data: Any = None, **kwargs: Any
) -> h5py.Dataset:
    """``group.create_dataset`` with a checksum: the Fletcher-32 filter on every chunked or
    chunkable dataset, a ``crc32`` attribute of the bytes on a scalar one (HDF5 filters need chunks)."""
    shape = kwargs.get("shape", np.shape(data) if data is not None else ())
    fast = _fast_dataset(group, name, data, shape, kwargs)
    if fast is not None:
        return fast
    if len(shape) == 0:
        dataset = group.create_dataset(name, data=data, **kwargs)
        # the bytes a reader gets back: a numeric or record value is stored as given (h5py made the
        # dataset's type from it); a string or object is read back
        value = np.asarray(data)
        if (
            value.dtype.hasobject
            or value.dtype.kind in "OSU"
            or (value.dtype.kind == "V" and not value.dtype.names)
        ):
            value = np.asarray(dataset[()])
        set_attrs(dataset, {"crc32": zlib.crc32(value.tobytes())})
        return dataset
    if 0 in shape:
        return group.create_dataset(name, data=data, **kwargs)
    return group.create_dataset(name, data=data, fletcher32=True, **kwargs)


def _fast_dataset(
    group: h5py.Group, name: str, data: Any, shape: tuple, kwargs: dict
) -> h5py.Dataset | None:
    """:func:`create_checked`'s common cases through :func:`_new_dataset`: a scalar numeric or record
    value (its ``crc32`` attribute), or a chunked numeric dataset with no filter but the checksum;
    None for anything else (strings, objects, compression, empty shapes), which h5py then makes."""
    if h5py.get_config().track_order or set(kwargs) - {"shape", "dtype", "chunks"}:
        return None
    if len(shape) == 0:
        value = np.asarray(data) if data is not None else None
        if (
            value is None
            or value.dtype.hasobject
            or value.dtype.kind not in "biufV"
            or (value.dtype.kind == "V" and not value.dtype.names)
            or value.shape != ()
        ):
            return None
        dataset = _new_dataset(group, name, (), value.dtype, None, value)
        set_attrs(dataset, {"crc32": zlib.crc32(value.tobytes())})
        return dataset
    chunks = kwargs.get("chunks")
    dtype = (
        np.dtype(kwargs["dtype"])
        if "dtype" in kwargs
        else (np.asarray(data).dtype if data is not None else None)
    )
    if 0 in shape or dtype is None or dtype.kind not in "biuf" or (data is None and chunks is None):
        return None
    if data is not None:
        data = np.ascontiguousarray(data, dtype=dtype)
        if (
            chunks is None
        ):  # h5py's own choice of chunk shape, as create_dataset(fletcher32=True) makes
            guess = getattr(getattr(h5py, "_hl", None) and h5py._hl.filters, "guess_chunk", None)
            if guess is None:
                return None
            chunks = guess(data.shape, None, dtype.itemsize)
    assert chunks is not None  # given, or guessed for the data (neither returned above)
    return _new_dataset(group, name, tuple(shape), dtype, tuple(chunks), data)


def read_checked(dataset: h5py.Dataset, index: Any = Ellipsis) -> np.ndarray:
    """``dataset[index]``, with a failed checksum (or any read error) turned into a
    :class:`CorruptDataError` that names the file and the dataset. A dataset written with a plugin
    filter (``--compression lz4 / zstd``) loads hdf5plugin on first need, or says it is missing."""
    try:
        values = dataset[index]
    except OSError as exc:
        values = _read_with_plugin(dataset, index, exc)
    crc = dataset.attrs.get("crc32") if dataset.shape == () else None
    if crc is not None and zlib.crc32(np.asarray(values).tobytes()) != int(crc):
        raise CorruptDataError(
            f"{dataset.file.filename}: dataset {dataset.name} is damaged (crc32 mismatch); "
            "copy it again or capture again"
        )
    return values


def _read_with_plugin(dataset: h5py.Dataset, index: Any, exc: OSError) -> np.ndarray:
    plugins = [
        int(key) for key in dataset._filters if str(key).isdigit() and int(key) in PLUGIN_FILTERS
    ]
    where = dataset.file.filename
    if (
        dataset.is_virtual
    ):  # a multi-rank manifest: the filters, and any damage, are the rank files'
        where += " (read from the rank files of its directory: hwdiff inspect --verify DIR names the file)"
        plugins = _source_plugins(dataset)
    if plugins:
        try:
            import hdf5plugin  # noqa: F401  (registers its filters with HDF5)
        except ImportError:
            pass
        missing = [PLUGIN_FILTERS[key] for key in plugins if not h5py.h5z.filter_avail(key)]
        if missing:
            raise HwdiffError(
                f"{dataset.file.filename}: dataset {dataset.name} is compressed with {missing[0]}, "
                "which needs the hdf5plugin package here: pip install hdf5plugin"
            ) from exc
        try:
            return dataset[index]
        except OSError as again:
            exc = again
    raise CorruptDataError(
        f"{where}: dataset {dataset.name} is damaged ({_h5_reason(exc)}); the file changed "
        "after it was written: copy it again or capture again (hwdiff inspect --verify lists every damaged dataset)"
    ) from exc


def _source_plugins(dataset: h5py.Dataset) -> list[int]:
    """The plugin filters (:data:`PLUGIN_FILTERS`) of a virtual dataset's first source (the rank
    files of one capture are written alike); every plugin filter when the source cannot be opened."""
    try:
        source = dataset.virtual_sources()[0]
        path = Path(dataset.file.filename).parent / source.file_name
        with h5py.File(path, "r") as handle:
            return [
                int(key)
                for key in handle[source.dset_name]._filters
                if str(key).isdigit() and int(key) in PLUGIN_FILTERS
            ]
    except (OSError, KeyError, IndexError):
        return list(PLUGIN_FILTERS)


def _h5_reason(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return (
        "checksum failed"
        if "filter returned failure" in text or "checksum" in text.lower()
        else text
    )


def _open_h5(path: Path) -> h5py.File:
    if not path.exists():
        raise CaptureFormatError(f"{path}: no such file")
    if path.is_dir():
        raise CaptureFormatError(f"{path} is a directory, not a capture file")
    try:
        # No HDF5 chunk cache: readers take whole rows (whole chunks) once, and the cache only copied
        # every chunk once more and held ~1 MB per open dataset (4x slower reads of a capture).
        return h5py.File(path, "r", rdcc_nbytes=0)
    except OSError as exc:
        detail = "truncated" if "truncated" in str(exc) else "not an HDF5 file or damaged"
        raise CaptureFormatError(f"{path} is not a readable capture ({detail}: {exc})") from exc

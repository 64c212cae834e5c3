"""Class-name files beside a fine-tuned checkpoint, written and read without pickle.

The reference wrote two pickles in its working directory: `label_dict` (`np.unique` of the cell types: a numpy array
of class names) and `label` (each training cell's class index). Loading a pickle runs whatever code the file names, so
this project writes neither; it writes:

- `<prefix>label_dict.txt`: UTF-8 text, one class name per line, in class-index order (line i is class i), so a person
  can read it and any tool can parse it;
- `<prefix>label.npy`: int64 class index of each training cell (`np.save(..., allow_pickle=False)`; read it back with
  `np.load(path)`, no pickle involved).

Our checkpoints carry the class names themselves; these files are for people and for other tools.

`read_label_dict` reads a class list from our text file, a JSON list of strings, a `.npy` array of strings, or the
reference's `label_dict` pickle. The pickle goes through a restricted unpickler that can rebuild a numpy array and
nothing else (every other global is refused before anything is called), and the result must be a 1-D array of
strings.
"""

from __future__ import annotations

import codecs
import io
import json
import os
import pickle
from collections.abc import Sequence

import numpy as np

from utils import ScbertError, atomic_write_bytes

__all__ = ["LABEL_DICT_NAME", "LABEL_NAME", "read_label_dict", "write_label_files"]

LABEL_DICT_NAME = "label_dict.txt"
LABEL_NAME = "label.npy"

# A class list is a few kilobytes; refuse anything far larger before reading it into memory.
_MAX_BYTES = 64 * 1024 * 1024
_NPY_MAGIC = b"\x93NUMPY"


def _check_names(names: Sequence[str], source: str) -> list[str]:
    """Class names must be non-empty, unique strings; returns them as a plain list of str."""
    names = [str(name) for name in names]
    if not names:
        raise ScbertError(f"{source} holds no class names: pass the label_dict written with the checkpoint")
    if any(name == "" for name in names):
        raise ScbertError(f"{source} holds an empty class name: every class needs a name")
    if len(set(names)) != len(names):
        dupes = sorted({n for n in names if names.count(n) > 1})[:5]
        raise ScbertError(f"{source} names some classes twice ({dupes}): class names must be unique")
    return names


def write_label_files(
    folder: str,
    classes: Sequence[str],
    labels: Sequence[int] | Sequence[str] | np.ndarray | None = None,
    prefix: str = "",
) -> tuple[str, str | None]:
    """Write `<prefix>label_dict.txt` (one class name per line) and, when `labels` is given, `<prefix>label.npy`.

    classes: class names in class-index order (finetune.py: sorted unique cell types, as the reference's np.unique).
    labels: each cell's class, as indices into `classes` or as names (mapped to indices).
    Returns (label_dict_path, label_path or None). Files are replaced atomically (temporary file, then rename).
    """
    names = _check_names(classes, "the class list")
    bad = [name for name in names if "\n" in name or "\r" in name]
    if bad:
        raise ScbertError(f"class name {bad[0]!r} contains a line break: rename the cell types in obs before training")
    os.makedirs(folder, exist_ok=True)
    dict_path = os.path.join(folder, f"{prefix}{LABEL_DICT_NAME}")
    atomic_write_bytes(dict_path, ("\n".join(names) + "\n").encode("utf-8"))
    if labels is None:
        return dict_path, None
    values = np.asarray(labels)
    if values.dtype.kind in "iu":
        index = values.astype(np.int64)
        if index.size and (index.min() < 0 or index.max() >= len(names)):
            raise ScbertError(
                f"labels hold class indices outside 0..{len(names) - 1}: pass indices into the class list or names"
            )
    else:
        lookup = {name: i for i, name in enumerate(names)}
        unknown = sorted({str(v) for v in values.ravel()} - lookup.keys())
        if unknown:
            raise ScbertError(f"labels name classes that are not in the class list ({unknown[:5]}): pass all classes")
        index = np.fromiter((lookup[str(v)] for v in values.ravel()), dtype=np.int64, count=values.size)
    label_path = os.path.join(folder, f"{prefix}{LABEL_NAME}")
    buffer = io.BytesIO()
    np.save(buffer, index.reshape(-1), allow_pickle=False)
    atomic_write_bytes(label_path, buffer.getvalue())
    return dict_path, label_path


# ---------------------------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------------------------


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    """Protocol-2 pickles store an array's raw bytes as `_codecs.encode(<str>, 'latin1')`; allow exactly that."""
    if not isinstance(text, str) or codecs.lookup(encoding).name != "iso8859-1":
        raise pickle.UnpicklingError("_codecs.encode is allowed only to turn a latin-1 string into bytes")
    return text.encode("latin-1")


def _numpy_globals() -> dict[tuple[str, str], object]:
    """The only globals a pickled numpy array of strings needs, resolved here (never imported by name from the file).

    numpy < 2 pickles name `numpy.core.*`, numpy >= 2 `numpy._core.*`; both map to the functions of the installed numpy.
    `_frombuffer` rebuilds arrays under protocol 5; `scalar` rebuilds numpy string scalars inside object arrays.
    """
    from numpy._core import multiarray, numeric

    allowed: dict[tuple[str, str], object] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1_encode,
    }
    for core in ("numpy.core", "numpy._core"):
        allowed[(f"{core}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{core}.multiarray", "scalar")] = multiarray.scalar
        allowed[(f"{core}.numeric", "_frombuffer")] = numeric._frombuffer
    return allowed


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Rebuilds numpy arrays and refuses every other global before it can be called."""

    _allowed = None

    def find_class(self, module: str, name: str):
        if _ArrayOnlyUnpickler._allowed is None:
            _ArrayOnlyUnpickler._allowed = _numpy_globals()
        try:
            return _ArrayOnlyUnpickler._allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}") from None

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("refusing persistent references")


def _names_from_array(value: object, source: str) -> list[str]:
    """A 1-D numpy array (or list) whose every element is a str, else refused."""
    if isinstance(value, np.ndarray):
        if value.ndim != 1:
            raise ScbertError(f"{source} holds a {value.ndim}-D array, not a 1-D array of class names")
        if value.dtype.kind not in "UO":
            raise ScbertError(
                f"{source} holds an array of {value.dtype} values, not of class names (strings): pass the label_dict "
                "file written at fine-tuning"
            )
        items = value.tolist()
    elif isinstance(value, list):
        items = value
    else:
        raise ScbertError(f"{source} holds a {type(value).__name__}, not an array of class names")
    if not all(isinstance(item, str) for item in items):
        kinds = sorted({type(item).__name__ for item in items if not isinstance(item, str)})
        raise ScbertError(f"{source} holds {', '.join(kinds)} values, not only class names (strings)")
    return _check_names(items, source)


def _read_pickle(data: bytes, source: str) -> list[str]:
    try:
        value = _ArrayOnlyUnpickler(io.BytesIO(data), encoding="latin1").load()
    except pickle.UnpicklingError as err:
        raise ScbertError(
            f"{source} is a pickle that does not hold just an array of class names ({err}); it was not loaded: pass "
            "the reference's label_dict or a text file with one class name per line"
        ) from None
    except Exception as err:  # truncated or malformed pickles raise EOFError, ValueError, TypeError, ...
        raise ScbertError(
            f"{source} is not a readable label_dict pickle ({type(err).__name__}): pass the reference's label_dict "
            "or a text file with one class name per line"
        ) from None
    return _names_from_array(value, source)


def _read_npy(data: bytes, source: str) -> list[str]:
    try:
        value = np.load(io.BytesIO(data), allow_pickle=False)
    except ValueError as err:
        raise ScbertError(
            f"{source} is a .npy file that is not a plain array of strings ({err}): save class names as a unicode array"
        ) from None
    return _names_from_array(value, source)


def _looks_like_pickle(data: bytes, path: str) -> bool:
    # Protocols 2+ start with PROTO (0x80); protocol 0/1 numpy pickles name `_reconstruct` in plain text.
    return data.startswith(b"\x80") or (
        os.path.splitext(path)[1].lower() in {".pkl", ".pickle", ".p"} or b"_reconstruct" in data[:4096]
    )


def read_label_dict(path: str) -> list[str]:
    """Class names, in class-index order, from `path`.

    Accepts: our `label_dict.txt` (one name per line), a JSON list of strings, a `.npy` array of strings, and the
    reference's `label_dict` pickle (a numpy array of strings, dtype object or unicode). Pickles are read by an
    unpickler that can only rebuild numpy arrays; nothing in the file is executed. Raises ScbertError otherwise.
    """
    source = f"the label_dict file {path!r}"
    if not os.path.isfile(path):
        raise ScbertError(f"{source} does not exist: check --label_dict")
    size = os.path.getsize(path)
    if size > _MAX_BYTES:
        raise ScbertError(f"{source} is {size / 2**20:.0f} MiB, far too large for a list of class names")
    with open(path, "rb") as fh:
        data = fh.read()
    if data.startswith(_NPY_MAGIC):
        return _read_npy(data, source)
    if _looks_like_pickle(data, path):
        return _read_pickle(data, source)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ScbertError(
            f"{source} is neither text, JSON, .npy nor a numpy pickle: pass the label_dict written with the checkpoint"
        ) from None
    if text.lstrip().startswith("["):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as err:
            raise ScbertError(f"{source} looks like JSON but does not parse ({err}): fix the file") from None
        return _names_from_array(value, source)
    lines = [line.rstrip("\r") for line in text.split("\n")]
    while lines and lines[-1] == "":
        lines.pop()
    return _check_names(lines, source)

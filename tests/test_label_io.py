"""Class-name files: written without pickle, read back from every format a user may have, unsafe pickles refused."""

import json
import os
import pickle

import numpy as np
import pytest

from label_io import read_label_dict, write_label_files
from utils import ScbertError

CELLTYPES = ["T cell", "B cell", "NK", "T cell", "Monocyte CD14+", "B cell"]
CLASSES = ["B cell", "Monocyte CD14+", "NK", "T cell"]


def test_write_then_read_round_trip_without_pickle(tmp_path):
    dict_path, label_path = write_label_files(str(tmp_path), CLASSES, labels=CELLTYPES, prefix="run1_")
    assert os.path.basename(dict_path) == "run1_label_dict.txt" and os.path.basename(label_path) == "run1_label.npy"
    assert (tmp_path / "run1_label_dict.txt").read_text(encoding="utf-8") == "\n".join(CLASSES) + "\n"
    assert read_label_dict(dict_path) == CLASSES
    labels = np.load(label_path)  # allow_pickle defaults to False
    assert labels.dtype == np.int64
    assert [CLASSES[i] for i in labels] == CELLTYPES


def test_write_accepts_indices_and_refuses_bad_input(tmp_path):
    _, label_path = write_label_files(str(tmp_path), CLASSES, labels=[0, 3, 3])
    assert np.load(label_path).tolist() == [0, 3, 3]
    assert write_label_files(str(tmp_path), CLASSES)[1] is None
    with pytest.raises(ScbertError, match="outside 0..3"):
        write_label_files(str(tmp_path), CLASSES, labels=[4])
    with pytest.raises(ScbertError, match="not in the class list"):
        write_label_files(str(tmp_path), CLASSES, labels=["Platelet"])
    with pytest.raises(ScbertError, match="line break"):
        write_label_files(str(tmp_path), ["a\nb"])
    with pytest.raises(ScbertError, match="twice"):
        write_label_files(str(tmp_path), ["a", "a"])


@pytest.mark.parametrize("dtype", [object, str], ids=["object-array", "unicode-array"])
@pytest.mark.parametrize("protocol", [2, pickle.DEFAULT_PROTOCOL, 5], ids=lambda p: f"protocol{p}")
def test_reference_label_dict_pickle_is_read(tmp_path, dtype, protocol):
    path = tmp_path / "label_dict"
    with open(path, "wb") as fh:  # what the reference wrote: pickle.dump(np.unique(celltypes), f)
        pickle.dump(np.unique(np.array(CELLTYPES, dtype=dtype)), fh, protocol=protocol)
    names = read_label_dict(str(path))
    assert names == CLASSES and all(type(n) is str for n in names)


def test_object_array_of_numpy_strings_is_read(tmp_path):
    path = tmp_path / "label_dict"
    path.write_bytes(pickle.dumps(np.array([np.str_("a"), np.str_("b")], dtype=object)))
    assert read_label_dict(str(path)) == ["a", "b"]


class _Exploit:
    def __init__(self, call, arg):
        self.call, self.arg = call, arg

    def __reduce__(self):
        return self.call, (self.arg,)


@pytest.mark.parametrize("call", [os.system, print], ids=["os.system", "print"])
def test_pickle_that_would_run_code_is_refused_and_not_run(tmp_path, capfd, call):
    marker = tmp_path / "ran"
    payload = f"touch {marker}" if call is os.system else "PAYLOAD-RAN"
    path = tmp_path / "label_dict"
    path.write_bytes(pickle.dumps(_Exploit(call, payload)))
    with pytest.raises(ScbertError, match="refusing to load"):
        read_label_dict(str(path))
    assert not marker.exists()
    assert "PAYLOAD-RAN" not in capfd.readouterr().out


def test_code_hidden_inside_an_array_is_refused(tmp_path):
    path = tmp_path / "label_dict"
    path.write_bytes(pickle.dumps(np.array([_Exploit(print, "PAYLOAD-RAN")], dtype=object)))
    with pytest.raises(ScbertError, match="refusing to load"):
        read_label_dict(str(path))


@pytest.mark.parametrize(
    "value, match",
    [
        ([1, 2, 3], "int values"),
        (np.array([1, 2, 3]), "array of int64"),
        (np.array([["a", "b"]]), "2-D"),
        ({"a": 1}, "dict"),
        (np.array(["a", 1], dtype=object), "int values"),
    ],
    ids=["list-of-ints", "int-array", "2d-array", "dict", "mixed-object-array"],
)
def test_pickle_holding_something_else_is_refused(tmp_path, value, match):
    path = tmp_path / "label_dict.pkl"
    path.write_bytes(pickle.dumps(value))
    with pytest.raises(ScbertError, match=match):
        read_label_dict(str(path))


def test_json_npy_and_text_formats(tmp_path):
    (tmp_path / "classes.json").write_text(json.dumps(CLASSES))
    assert read_label_dict(str(tmp_path / "classes.json")) == CLASSES
    np.save(tmp_path / "classes.npy", np.array(CLASSES))
    assert read_label_dict(str(tmp_path / "classes.npy")) == CLASSES
    (tmp_path / "classes.txt").write_text("\r\n".join(CLASSES) + "\r\n\n")
    assert read_label_dict(str(tmp_path / "classes.txt")) == CLASSES
    # A text file whose first class starts with "c" (pickle's GLOBAL opcode) is still read as text.
    (tmp_path / "c.txt").write_text("cd4 T\ncd8 T\n")
    assert read_label_dict(str(tmp_path / "c.txt")) == ["cd4 T", "cd8 T"]


def test_bad_files_are_refused(tmp_path):
    with pytest.raises(ScbertError, match="does not exist"):
        read_label_dict(str(tmp_path / "missing"))
    (tmp_path / "ints.json").write_text("[1, 2]")
    with pytest.raises(ScbertError, match="int values"):
        read_label_dict(str(tmp_path / "ints.json"))
    np.save(tmp_path / "obj.npy", np.array(["a", 1], dtype=object), allow_pickle=True)
    with pytest.raises(ScbertError, match="not a plain array"):
        read_label_dict(str(tmp_path / "obj.npy"))
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(ScbertError, match="no class names"):
        read_label_dict(str(tmp_path / "empty.txt"))
    (tmp_path / "trunc").write_bytes(pickle.dumps(np.array(CLASSES, dtype=object))[:30])
    with pytest.raises(ScbertError, match="label_dict"):
        read_label_dict(str(tmp_path / "trunc"))

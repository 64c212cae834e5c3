"""The one checkpoint reader: formats, prefixes, inferred architecture and errors a user can act on."""

import pickle

import pytest
import torch

from performer_pytorch import (
    CheckpointError,
    ClassificationHead,
    PerformerLM,
    build_model,
    checkpoint_payload,
    load_checkpoint,
    save_checkpoint,
)
from performer_pytorch.checkpoint import infer_config
from utils import ScbertError


def test_reference_format_infers_architecture(reference, tmp_path):
    path = tmp_path / "ref.pth"
    torch.save(reference["finetune_checkpoint"], path)
    ckpt = load_checkpoint(str(path))
    assert ckpt.source == "reference"
    cfg = reference["config"]
    for key in ("num_tokens", "dim", "depth", "heads", "max_seq_len"):
        assert ckpt.config[key] == cfg[key], key
    assert ckpt.config["nb_features"] == 266 and ckpt.config["dim_head"] == 64
    assert ckpt.head["type"] == "classifier" and ckpt.head["n_classes"] == cfg["n_classes"]
    assert ckpt.head["h_dim"] == cfg["head_h_dim"]
    assert ckpt.genes is None and ckpt.classes is None


def test_prefixes_from_ddp_and_compile_are_stripped(reference, tmp_path):
    state = reference["finetune_checkpoint"]["model_state_dict"]
    wrapped = {f"module._orig_mod.{k}": v for k, v in state.items()}
    path = tmp_path / "ddp.pth"
    torch.save({"model_state_dict": wrapped, "epoch": 3}, path)
    model = build_model(load_checkpoint(str(path)))
    assert torch.equal(model.token_emb.weight, state["token_emb.weight"])


def test_bare_state_dict_is_accepted(reference_lm_state_dict, tmp_path):
    path = tmp_path / "bare.pth"
    torch.save(reference_lm_state_dict, path)
    ckpt = load_checkpoint(str(path))
    assert ckpt.head == {"type": "lm"}
    model = build_model(ckpt, head="lm")
    assert isinstance(model.to_out, torch.nn.Linear)


def test_our_format_round_trips_config_genes_and_classes(tmp_path):
    torch.manual_seed(0)
    genes = [f"G{i}" for i in range(16)]
    table = torch.randn(16, 16)
    model = PerformerLM(num_tokens=7, max_seq_len=17, dim=16, depth=1, heads=2, dim_head=8, gene2vec=table)
    model.to_out = ClassificationHead(seq_len=17, dim=16, n_classes=3, h_dim=8, hidden=12)
    path = tmp_path / "ours.pth"
    save_checkpoint(checkpoint_payload(model, genes=genes, classes=["a", "b", "c"], epoch=4), str(path))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no temporary file left behind"
    ckpt = load_checkpoint(str(path))
    assert ckpt.source == "scbert" and ckpt.genes == genes and ckpt.classes == ["a", "b", "c"]
    assert ckpt.payload["epoch"] == 4
    rebuilt = build_model(ckpt).eval()
    tokens = torch.randint(0, 6, (2, 17))
    with torch.no_grad():
        assert torch.equal(rebuilt(tokens), model.eval()(tokens))
    trunk = build_model(ckpt, head="none")
    assert trunk.to_out is None


def test_heads_flag_is_checked_against_the_weights(reference, tmp_path):
    path = tmp_path / "ref.pth"
    torch.save(reference["finetune_checkpoint"], path)
    assert load_checkpoint(str(path), heads=2).config["heads"] == 2
    with pytest.raises(CheckpointError, match="heads=10 does not fit"):
        load_checkpoint(str(path), heads=10)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(str(tmp_path / "nope.pth"))


def test_file_that_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "notes.pth"
    path.write_text("these are not weights\n")
    with pytest.raises(CheckpointError, match="not a .*PyTorch checkpoint"):
        load_checkpoint(str(path))


def test_truncated_checkpoint(reference, tmp_path):
    path = tmp_path / "cut.pth"
    torch.save(reference["finetune_checkpoint"], path)
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="re-copy"):
        load_checkpoint(str(path))


class Payload:
    """Any class: a pickle holding it must never be unpickled from a user's file."""

    def __reduce__(self):
        return (print, ("this must never run",))


def test_pickled_objects_are_refused_not_run(tmp_path, capsys):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as fh:
        pickle.dump({"model_state_dict": Payload()}, fh)
    with pytest.raises(CheckpointError):
        load_checkpoint(str(path))
    assert "must never run" not in capsys.readouterr().out


def test_dict_without_weights(tmp_path):
    path = tmp_path / "opt.pth"
    torch.save({"optimizer_state_dict": {"state": {}}, "epoch": 1}, path)
    with pytest.raises(CheckpointError, match="no model weights"):
        load_checkpoint(str(path))


def test_weights_that_are_not_a_performer(tmp_path):
    path = tmp_path / "linear.pth"
    torch.save({"model_state_dict": torch.nn.Linear(3, 4).state_dict()}, path)
    with pytest.raises(CheckpointError, match="not an scBERT Performer"):
        load_checkpoint(str(path))


def test_weights_that_do_not_fit_the_requested_model(reference, tmp_path):
    path = tmp_path / "ref.pth"
    torch.save(reference["finetune_checkpoint"], path)
    ckpt = load_checkpoint(str(path))
    ckpt.config["depth"] = 3
    with pytest.raises(CheckpointError, match="do not fit the requested model"):
        build_model(ckpt)


def test_checkpoint_errors_are_user_errors():
    """Scripts catch ScbertError to print one line and exit 2; checkpoint errors must be among them."""
    assert issubclass(CheckpointError, ScbertError)


def test_trunk_without_gene2vec_or_head_needs_gene_list(reference_lm_state_dict):
    state = {k: v for k, v in reference_lm_state_dict.items() if not k.startswith(("pos_emb", "to_out"))}
    with pytest.raises(CheckpointError, match="sequence length is unknown"):
        infer_config(state)
    assert infer_config(state, max_seq_len=101)["g2v_position_emb"] is False

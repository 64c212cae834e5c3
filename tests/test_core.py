"""The model interface and registry, the classification core and the one metrics module."""

import numpy as np
import pytest
import torch
from torch import nn

import models
from classification import ClassList, EarlyStopping, grow_head, set_trainable
from metrics import annotation_metrics, classification_metrics, confusion, macro_f1
from performer_pytorch import checkpoint_payload, load_checkpoint, save_checkpoint
from utils import ScbertError


def tiny(n_classes=None, **overrides):
    torch.manual_seed(0)
    config = dict(num_tokens=7, max_seq_len=9, dim=8, depth=2, heads=2, dim_head=4, g2v_position_emb=False)
    config.update(overrides)
    model = models.build_model("performer", config, lm_head=n_classes is None)
    if n_classes is not None:
        model.attach_head(n_classes)
    return model.eval()


def test_registry_builds_by_name_and_refuses_unknown_types():
    assert models.MODEL_TYPES["performer"] is models.ScbertPerformer
    model = tiny()
    assert model.model_type == "performer"
    again = models.build_model(model.model_type, model.config)
    assert again.config == model.config
    with pytest.raises(ScbertError, match="unknown model type 'gpt'.*performer"):
        models.build_model("gpt", {})


def test_vocab_owns_the_token_arithmetic():
    vocab = models.BinVocab(bin_num=5, gene_num=16906)
    assert (vocab.num_tokens, vocab.seq_len, vocab.mask_token, vocab.pad_token) == (7, 16907, 6, 6)
    assert models.BinVocab.from_config(vocab.config()) == vocab
    batch = vocab.make_batch(np.array([[0.0, 1.5, 9.0]]))
    assert batch["tokens"].tolist() == [[0, 1, 5, 0]]  # floor, capped at bin_num, one appended 0


def test_interface_encode_pool_classify_agree_with_the_forward():
    model = tiny(n_classes=3)
    values = np.abs(np.random.default_rng(0).normal(size=(4, 8))) * 3
    values[1] = 0.0  # a cell expressing nothing pools over all genes
    batch = model.make_batch(values)
    with torch.no_grad():
        encodings = model.encode(batch)
        logits, hidden = model.classify(batch, return_hidden=True)
        assert encodings.shape == (4, 9, 8) and logits.shape == (4, 3) and hidden.shape == (4, 128)
        assert torch.allclose(model(batch), logits) and torch.allclose(model(batch["tokens"]), logits)
        assert torch.allclose(model.head.fc3(hidden), logits)
        pooled = model.pool(encodings, batch)
    assert pooled.shape == (4, 8)
    expressed = batch["tokens"][0, :-1] > 0
    assert torch.allclose(pooled[0], encodings[0, :-1][expressed].mean(dim=0), atol=1e-6)
    assert torch.allclose(pooled[1], encodings[1, :-1].mean(dim=0), atol=1e-6)
    assert [name for name, _ in model.named_blocks()] == ["block0", "block1"]


def test_checkpoints_record_the_model_type_and_older_ones_read_as_performer(tmp_path):
    model = tiny(n_classes=2)
    payload = checkpoint_payload(model, genes=[f"g{i}" for i in range(8)], classes=["a", "b"])
    assert payload["model_type"] == "performer"
    save_checkpoint(payload, str(tmp_path / "ours.pth"))
    older = {k: v for k, v in payload.items() if k != "model_type"}
    save_checkpoint(older, str(tmp_path / "older.pth"))
    tokens = torch.randint(0, 6, (2, 9))
    for name in ("ours.pth", "older.pth"):
        ckpt = load_checkpoint(str(tmp_path / name))
        assert ckpt.model_type == "performer"
        loaded = models.load_model(ckpt).eval()
        assert isinstance(loaded, models.ScbertPerformer)
        with torch.no_grad():
            assert torch.equal(loaded(tokens), model(tokens))


def test_reference_checkpoint_loads_through_the_registry(reference, tmp_path):
    path = tmp_path / "reference_best.pth"
    torch.save(reference["finetune_checkpoint"], path)
    ckpt = load_checkpoint(str(path))
    assert ckpt.source == "reference" and ckpt.model_type == "performer"
    model = models.load_model(ckpt).eval()
    with torch.no_grad():
        logits = model.classify({"tokens": reference["tokens"]})
    expected = reference["expected_class_logits"]
    assert ((logits - expected).abs().max() / expected.abs().max()).item() < 1e-5


def test_class_list_is_append_only():
    classes = ClassList(["B", "T"])
    added = classes.extend(["NK", "T", "Mono", "NK"])
    assert added == ["Mono", "NK"] and list(classes) == ["B", "T", "Mono", "NK"]
    assert classes.index("T") == 1 and classes.encode(["NK", "B"]).tolist() == [3, 0]
    with pytest.raises(ScbertError, match="not among the model's classes"):
        classes.encode(["DC"])
    restored = ClassList()
    restored.load_state_dict(classes.state_dict())
    assert restored == classes and ClassList.from_labels(["x", "a", "x"]) == ["a", "x"]


def test_grow_head_keeps_old_logits_and_adds_fresh_rows(tmp_path):
    model = tiny(n_classes=3)
    tokens = torch.randint(0, 6, (5, 9))
    with torch.no_grad():
        before = model(tokens)
        grow_head(model, 2)
        after, hidden = model.classify({"tokens": tokens}, return_hidden=True)
    assert after.shape == (5, 5) and model.head_config["n_classes"] == 5
    assert torch.allclose(after[:, :3], before, atol=1e-6)  # the same rows (a wider matmul may round differently)
    assert not torch.equal(model.head.fc3.weight[3:], torch.zeros(2, 128))
    save_checkpoint(checkpoint_payload(model, genes=None), str(tmp_path / "grown.pth"))
    rebuilt = models.load_model(str(tmp_path / "grown.pth"))
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(tokens), after)


def test_set_trainable_goes_through_the_interface():
    model = tiny(n_classes=2, depth=3)

    def training(spec):
        set_trainable(model, spec)
        return {n for n, p in model.named_parameters() if p.requires_grad}

    assert all(n.startswith(("norm.", "performer.net.layers.1.", "to_out.")) for n in training("1"))
    assert not any(n.startswith("token_emb") for n in training("none"))
    assert any(n.startswith("token_emb") for n in training("all"))


def test_early_stopping_is_stateful():
    stopper = EarlyStopping(patience=2)
    assert stopper.update(0.5, 1, {"accuracy": 0.5}) and not stopper.update(0.5, 2)
    copy = EarlyStopping(patience=2)
    copy.load_state_dict(stopper.state_dict())
    assert copy.best_metrics == {"epoch": 1, "accuracy": 0.5} and not copy.should_stop
    copy.update(0.4, 3)
    assert copy.should_stop


def test_one_macro_f1_for_fine_tuning_prediction_and_the_demo():
    import demo

    classes = ["a", "b", "c"]
    y_true = np.array([0, 0, 1, 1, 2, 2, 2])
    y_pred = np.array([0, 1, 1, 1, 2, 0, 2])
    by_index = classification_metrics(y_true, y_pred, classes)
    names_true, names_pred = np.asarray(classes)[y_true], np.asarray(classes)[y_pred]
    by_name, table = annotation_metrics(names_true, names_pred, classes, novel_type=False)
    # a: P 1/2 R 1/2; b: P 2/3 R 1; c: P 1 R 2/3 -> F1 1/2, 4/5, 4/5.
    assert by_index["macro_f1"] == pytest.approx((1 / 2 + 4 / 5 + 4 / 5) / 3)
    assert by_name["macro_f1"] == by_index["macro_f1"] == demo.summarise(names_true, names_pred, classes)["macro_f1"]
    assert by_name["accuracy"] == by_index["accuracy"] == pytest.approx(5 / 7)
    assert table.to_numpy().tolist() == by_index["confusion_matrix"]
    assert by_name["per_class"] == by_index["per_class"]
    assert macro_f1(names_true, names_pred, classes) == by_index["macro_f1"]
    assert confusion(["x", "a"], ["a", "a"], ["a"], ["a"]).tolist() == [[1]]  # labels outside the lists are not counted


def test_a_family_is_a_module_plus_a_registration():
    @models.register_model("toy")
    class Toy(nn.Module):
        def __init__(self, width):
            super().__init__()
            self.config = {"width": width}
            self.lin = nn.Linear(width, width)

    try:
        assert models.build_model("toy", {"width": 3}).lin.in_features == 3 and Toy.model_type == "toy"
        with pytest.raises(ValueError, match="already registered"):
            models.register_model("toy")(nn.Linear)
    finally:
        models.MODEL_TYPES.pop("toy")

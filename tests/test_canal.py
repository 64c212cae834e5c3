"""canal.py: the example bank (quotas, handing on, the head's own prototype index), head growth that keeps old logits
bit-identical (classification.grow_head), the loss and its frozen teacher, and the novel-cell threshold's orientation
on a held-out type."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import canal
import models
from classification import grow_head
from performer_pytorch import ClassificationHead, PerformerLM, checkpoint_payload, save_checkpoint
from utils import ScbertError

# ---------------------------------------------------------------------------------------------------------------------
# Example bank
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("counts", "bank_size", "expected"),
    [
        ([50, 50, 50], 30, [10, 10, 10]),  # equal quota floor(30 / 3)
        ([50, 50, 50], 10, [3, 3, 3]),  # floor(10 / 3) = 3 each; the remainder is no one's quota
        ([2, 50, 50], 30, [2, 14, 14]),  # class 0 leaves 8, shared equally by the two with more cells
        ([1, 50, 50], 30, [1, 15, 14]),  # class 0 leaves 9: 4 each, the odd unit to the first class with the most left
        ([2, 3, 50, 50], 40, [2, 3, 18, 17]),  # 8 + 7 left: 7 each, the odd unit to class 2
        ([4, 5, 0], 30, [4, 5, 0]),  # fewer cells than the bank: all kept; a class with no cell keeps none
    ],
)
def test_bank_quotas_equal_with_unused_quota_handed_on(counts, bank_size, expected):
    quotas = canal.bank_quotas(counts, bank_size)
    assert quotas.tolist() == expected
    assert quotas.sum() <= bank_size
    assert np.all(quotas <= np.asarray(counts))


def test_bank_size_below_the_class_count_is_refused():
    with pytest.raises(ScbertError, match="--bank_size 2 is smaller than the 3 classes"):
        canal.bank_quotas([10, 10, 10], 2)


def test_bank_keeps_the_top_cells_by_the_heads_own_prototype_row():
    """The head's class list is ['T cell', 'B cell'] (arrival order), so sorted order would swap the two rows.

    Prototype row 0 ('T cell') points along dimension 0, row 1 ('B cell') along dimension 1. Each class's cells are
    built so that its top cells by its own row differ from its top cells by the other row: indexing the prototypes by
    the sorted label order (the authors' defect) would keep other cells.
    """
    prototypes = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    z = torch.tensor([
        [5.0, 0.0],  # 0: T, score 5 by its row (0)
        [1.0, 9.0],  # 1: T, score 1 (9 by the wrong row)
        [4.0, 1.0],  # 2: T, score 4
        [0.0, 8.0],  # 3: T, score 0 (8 by the wrong row)
        [9.0, 1.0],  # 4: B, score 1 by its row (1)
        [0.0, 6.0],  # 5: B, score 6
        [8.0, 0.0],  # 6: B, score 0
        [1.0, 7.0],  # 7: B, score 7
    ])
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])  # head indices: 0 = 'T cell', 1 = 'B cell'
    picked = canal.select_bank(z, labels, prototypes, bank_size=4)
    assert picked.tolist() == [0, 2, 7, 5]  # per class in head order, best first
    sorted_order = canal.select_bank(z, labels, prototypes[[1, 0]], bank_size=4)
    assert set(sorted_order.tolist()) == {1, 3, 4, 6}  # what the mis-indexed prototypes would have kept


def test_bank_rescores_old_and_new_cells_together_and_stays_within_size():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(300, 8))
    labels = rng.integers(0, 5, size=300)
    labels[:6] = 4  # class 4 has at least 6 cells
    prototypes = rng.normal(size=(5, 8))
    picked = canal.select_bank(z, labels, prototypes, bank_size=50)
    assert len(picked) == 50 and len(set(picked.tolist())) == 50
    assert np.bincount(labels[picked], minlength=5).tolist() == [10] * 5
    for c in range(5):
        members = np.flatnonzero(labels == c)
        scores = z[members] @ prototypes[c]
        kept = z[picked[labels[picked] == c]] @ prototypes[c]
        assert np.allclose(np.sort(kept)[::-1], np.sort(scores)[::-1][:10])  # the exact top 10, none tied away


def test_bank_ties_are_kept_up_to_the_quota():
    """The authors dropped every example tied at the cut; here a class keeps exactly its quota."""
    z = np.ones((6, 2))
    labels = np.array([0, 0, 0, 1, 1, 1])
    picked = canal.select_bank(z, labels, np.ones((2, 2)), bank_size=4)
    assert picked.tolist() == [0, 1, 3, 4]


# ---------------------------------------------------------------------------------------------------------------------
# Head growth
# ---------------------------------------------------------------------------------------------------------------------


def _classifier(n_classes, seed=0):
    torch.manual_seed(seed)
    model = models.build_model("performer", dict(num_tokens=7, max_seq_len=9, dim=6, depth=2, heads=2, dim_head=4,
                                                 g2v_position_emb=False), lm_head=False)
    return model.attach_head(n_classes, h_dim=12, hidden=20).eval()


def test_grow_head_copies_old_rows_and_initialises_new_ones():
    model = _classifier(3)
    old = copy.deepcopy(model.head.fc3)
    grow_head(model, 2)
    grown = model.head.fc3
    assert grown.weight.shape == (5, 12) and grown.bias.shape == (5,) and grown.blocks == (3, 2)
    assert torch.equal(grown.weight[:3], old.weight) and torch.equal(grown.bias[:3], old.bias)
    bound = 1 / 12**0.5  # nn.Linear's uniform(-1/sqrt(fan_in), 1/sqrt(fan_in))
    new = grown.weight[3:]
    assert new.abs().max() <= bound and new.abs().min() > 0 and not torch.equal(new[0], new[1])
    assert model.head_config["n_classes"] == 5 and model.head_config["class_blocks"] == [3, 2]


def test_old_logits_are_bit_identical_after_growth_over_three_stages(tmp_path):
    """A plain Linear over the grown matrix differs from the old one by float rounding; the grown layer does not,
    and a model rebuilt from the checkpoint computes the same bits."""
    model = _classifier(3)
    batch = {"tokens": torch.randint(0, 6, (14, 9))}
    with torch.no_grad():
        before = model.classify(batch)
        grow_head(model, 2)
        after_stage2 = model.classify(batch)
        save_checkpoint(checkpoint_payload(model, genes=None), str(tmp_path / "stage2.pth"))
        stage3 = models.load_model(str(tmp_path / "stage2.pth")).eval()
        assert torch.equal(stage3.classify(batch), after_stage2)
        grow_head(stage3, 4)
        after_stage3 = stage3.classify(batch)
    assert after_stage2.shape == (14, 5) and after_stage3.shape == (14, 9)
    assert torch.equal(after_stage2[:, :3], before)
    assert torch.equal(after_stage3[:, :5], after_stage2)
    assert stage3.head.fc3.blocks == (3, 2, 4)
    plain = nn.Linear(12, 9)
    plain.load_state_dict(stage3.head.fc3.state_dict())  # nn.Linear's parameter names
    with torch.no_grad():
        z = stage3.classify(batch, return_hidden=True)[1]
        torch.testing.assert_close(plain(z), after_stage3, rtol=1e-5, atol=1e-5)


def test_grown_layer_trains_every_row():
    model = _classifier(2)
    grow_head(model, 3)
    model.classify({"tokens": torch.randint(0, 6, (5, 9))}).square().sum().backward()
    assert model.head.fc3.weight.grad.abs().sum(dim=1).gt(0).all()


# ---------------------------------------------------------------------------------------------------------------------
# Loss and teacher
# ---------------------------------------------------------------------------------------------------------------------


def test_kd_weight_is_lambda_times_old_share_and_zero_at_stage_one():
    assert canal.kd_weight(0, 7) == 0.0
    assert canal.kd_weight(7, 10) == pytest.approx(0.07)
    assert canal.kd_weight(3, 4, lambda_kd=1.0) == pytest.approx(0.75)


def test_stage_one_loss_is_label_smoothed_cross_entropy_alone():
    torch.manual_seed(0)
    logits, labels = torch.randn(6, 4), torch.tensor([0, 1, 2, 3, 0, 1])
    loss, parts = canal.canal_loss(logits, labels, n_old=0)
    target = 0.9 * F.one_hot(labels, 4) + 0.1 / 4  # (1 - eps) onehot + eps / K
    manual = -(target * logits.log_softmax(dim=-1)).sum(dim=-1).mean()
    torch.testing.assert_close(loss, manual)
    assert parts["kd"] == 0 and float(parts["lambda"]) == 0.0


def test_distillation_term_is_the_weighted_mse_of_the_embeddings():
    torch.manual_seed(0)
    logits, labels = torch.randn(6, 5), torch.randint(0, 5, (6,))
    zs, zt = torch.randn(6, 3), torch.randn(6, 3)
    loss, parts = canal.canal_loss(logits, labels, zs, zt, n_old=3, lambda_kd=0.1)
    torch.testing.assert_close(parts["kd"], ((zs - zt) ** 2).mean())
    torch.testing.assert_close(loss, parts["ce"] + 0.1 * 3 / 5 * parts["kd"])


def _tiny_classifier(seed=0, dropout=0.3):
    torch.manual_seed(seed)
    model = PerformerLM(num_tokens=7, max_seq_len=11, dim=8, depth=2, heads=2, dim_head=4, nb_features=6,
                        feature_redraw_interval=1, ff_dropout=dropout, attn_dropout=dropout,
                        g2v_position_emb=False, lm_head=False)
    model.to_out = ClassificationHead(seq_len=11, dim=8, n_classes=3, hidden=10, h_dim=6, dropout=dropout)
    return model


def _z(model, tokens):
    return canal.head_forward(model.to_out, model(tokens, return_encodings=True))[1]


def test_teacher_outputs_do_not_change_across_calls_while_the_student_trains():
    """Dropout and FAVOR+ redraws on every training call (interval 1) would move a teacher left in train mode."""
    student = _tiny_classifier()
    tokens = torch.randint(0, 6, (4, 11))
    teacher = canal.FrozenTeacher(student)
    first = teacher.run(_z, tokens)
    assert not first.requires_grad
    student.train()
    teacher.train()  # a no-op: stays in eval mode
    opt = torch.optim.Adam(student.parameters(), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        _z(student, tokens).sum().backward()
        opt.step()
        assert torch.equal(teacher.run(_z, tokens), first)
        assert torch.equal(teacher(tokens), teacher(tokens))
    assert not teacher.module.training and all(not p.requires_grad for p in teacher.parameters())
    careless = copy.deepcopy(student).train()  # the authors' teacher: frozen weights, but in train mode
    with torch.no_grad():
        assert not torch.equal(_z(careless, tokens), _z(careless, tokens))


def test_distillation_term_is_zero_when_the_student_is_the_teacher():
    student = _tiny_classifier()
    teacher = canal.FrozenTeacher(student)
    tokens = torch.randint(0, 6, (5, 11))
    labels = torch.tensor([0, 1, 2, 0, 1])
    student.eval()
    encodings = student(tokens, return_encodings=True)
    _, z, logits = canal.head_forward(student.to_out, encodings)
    loss, parts = canal.canal_loss(logits, labels, z, teacher.run(_z, tokens), n_old=2)
    assert float(parts["kd"]) == 0.0
    assert torch.equal(loss, parts["ce"])


# ---------------------------------------------------------------------------------------------------------------------
# Novel cells
# ---------------------------------------------------------------------------------------------------------------------


def test_manifold_mixup_is_seeded_and_mixes_within_each_dimension():
    h = torch.rand(50, 7) * 3
    state = torch.get_rng_state()
    a, b = canal.manifold_mixup(h, seed=3), canal.manifold_mixup(h, seed=3)
    assert torch.equal(torch.get_rng_state(), state)  # its own generator: global random state untouched
    assert torch.equal(a, b) and not torch.equal(a, canal.manifold_mixup(h, seed=4))
    assert (a >= h.min(dim=0).values - 1e-6).all() and (a <= h.max(dim=0).values + 1e-6).all()
    assert not torch.equal(a, h)


def test_energy_and_score_ranges():
    logits = torch.tensor([[10.0, 0.0, 0.0], [0.1, 0.0, 0.05]])
    e = canal.energy(logits, 0.8)
    torch.testing.assert_close(e, -0.8 * torch.logsumexp(logits.double() / 0.8, dim=-1))
    assert e[0] < e[1]  # a confident cell has the lower energy
    result = canal.canal_novelty(torch.rand(30, 5), nn.Linear(5, 3), seed=0)
    assert result.score.shape == (30,) and 0 <= result.score.min() and result.score.max() <= 1
    assert 0 <= result.threshold <= 1
    assert torch.equal(result.novel, result.score > result.threshold)


def _gaussian_types(seed, *, n_types=4, per_type=100, seq_len=12, dim=4, separation=1.5):
    """Encodings of cell types as Gaussian clouds around fixed means (the same means for every seed)."""
    means = torch.randn(n_types, seq_len, dim, generator=torch.Generator().manual_seed(99)) * separation
    gen = torch.Generator().manual_seed(seed)
    x = torch.cat([means[k] + torch.randn(per_type, seq_len, dim, generator=gen) for k in range(n_types)])
    return x, torch.arange(n_types).repeat_interleave(per_type)


def _open_set_scores(trial, orientation):
    """Train a head on types 0-2, call novel cells on fresh cells of types 0-3: (known accuracy, novel recall, H)."""
    torch.manual_seed(trial)
    x_train, y_train = _gaussian_types(1 + 10 * trial)
    x_test, y_test = _gaussian_types(2 + 10 * trial)
    head = ClassificationHead(seq_len=12, dim=4, n_classes=3, hidden=32, h_dim=16)
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    known_train = y_train < 3
    for _ in range(300):
        opt.zero_grad()
        F.cross_entropy(head(x_train[known_train]), y_train[known_train]).backward()
        opt.step()
    with torch.no_grad():
        h = canal.head_first_hidden(head, x_test)
        rest = lambda hidden: canal.head_from_first_hidden(head, hidden)[1]
        pred = rest(h).argmax(dim=-1)
        result = canal.canal_novelty(h, rest, seed=0, orientation=orientation)
    known = y_test < 3
    known_acc = float(((pred == y_test) & ~result.novel)[known].float().mean())
    recall = float(result.novel[~known].float().mean())
    return known_acc, recall, 2 * known_acc * recall / max(known_acc + recall, 1e-12)


def test_novel_threshold_orientation_on_a_held_out_type():
    """The kept orientation (threshold = the virtual outliers' mean uncertainty) finds the held-out type; the
    authors' (their mean certainty, compared with an uncertainty) calls almost no cell novel."""
    kept = np.array([_open_set_scores(t, "uncertainty") for t in range(3)])
    authors = np.array([_open_set_scores(t, "authors") for t in range(3)])
    assert kept[:, 2].mean() > authors[:, 2].mean() + 0.3
    assert kept[:, 1].mean() > 0.4  # most of the novel type is found ...
    assert kept[:, 0].mean() > 0.7  # ... while most known cells keep their right label
    assert authors[:, 1].mean() < 0.2

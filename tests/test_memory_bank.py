"""ctt.memory_bank against per-class deque / loop references written here."""

from __future__ import annotations

from collections import deque

import pytest
import torch

from ctt.memory_bank import MemoryBank, bank_ready, select_bank_candidates

C, Q, D = 4, 5, 3


def random_pushes(seed=0, pushes=12):
    """Pushes of varied size; push 3 holds 8 rows of class 1 (more than Q in one push)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(pushes):
        n = int(torch.randint(0, 9, (1,), generator=g))
        classes = torch.randint(0, C - 1, (n,), generator=g)  # class C-1 never pushed
        if i == 3:
            classes = torch.cat([classes, torch.ones(8, dtype=torch.long)])
        feats = torch.randn(classes.numel(), D, generator=g)
        out.append((feats, classes))
    return out


def check_against_deques(bank, ref):
    for c in range(C):
        expected = torch.stack(list(ref[c])) if ref[c] else torch.zeros(0, D)
        torch.testing.assert_close(bank.ordered(c), expected, rtol=0, atol=0)
        # the valid slots hold exactly these rows (ring order, so compare as sets of rows)
        in_slots = bank.features[c][bank.valid[c]]
        assert sorted(map(tuple, in_slots.tolist())) == sorted(map(tuple, expected.tolist()))
    assert bank.counts.tolist() == [len(ref[c]) for c in range(C)]
    assert bank.valid.sum(1).tolist() == bank.counts.tolist()
    assert bank.full == all(len(ref[c]) == Q for c in range(C))
    assert bank.fill == pytest.approx(sum(len(ref[c]) for c in range(C)) / (C * Q))


def test_push_is_a_per_class_fifo():
    bank = MemoryBank(C, Q, D)
    ref = [deque(maxlen=Q) for _ in range(C)]
    for feats, classes in random_pushes():
        bank.push(feats, classes)
        for f, c in zip(feats, classes.tolist()):
            ref[c].append(f)
        check_against_deques(bank, ref)
    assert bank.counts[1] == Q and bank.counts[C - 1] == 0 and not bank.full


def test_more_than_q_rows_in_one_push_keeps_the_last_q():
    bank = MemoryBank(C, Q, D)
    bank.push(torch.full((2, D), -1.0), torch.tensor([2, 2]))
    feats = torch.arange(9 * D, dtype=torch.float32).view(9, D)
    bank.push(feats, torch.full((9,), 2))
    torch.testing.assert_close(bank.ordered(2), feats[-Q:])
    assert bank.counts.tolist() == [0, 0, Q, 0]


def test_full_and_fill():
    bank = MemoryBank(2, 3, 1)
    assert bank.fill == 0.0 and not bank.full and not bank.valid.any()
    bank.push(torch.zeros(3, 1), torch.tensor([0, 0, 0]))
    assert bank.fill == 0.5 and not bank.full
    bank.push(torch.zeros(4, 1), torch.tensor([1, 1, 1, 1]))
    assert bank.fill == 1.0 and bank.full and bank.valid.all()


def test_push_stores_detached_in_bank_dtype():
    bank = MemoryBank(C, Q, D)
    feats = torch.randn(3, D, dtype=torch.float64, requires_grad=True)
    bank.push(feats, torch.tensor([0, 1, 0]))
    assert bank.queue.dtype == torch.float32 and not bank.queue.requires_grad
    torch.testing.assert_close(bank.ordered(0), feats.detach().float()[[0, 2]])


def test_push_rejects_bad_input():
    bank = MemoryBank(C, Q, D)
    with pytest.raises(ValueError, match="255"):
        bank.push(torch.zeros(2, D), torch.tensor([0, 255]))
    with pytest.raises(ValueError, match=r"\[N, 3\]"):
        bank.push(torch.zeros(2, D + 1), torch.tensor([0, 1]))
    bank.push(torch.zeros(0, D), torch.zeros(0, dtype=torch.long))  # empty push is a no-op
    assert bank.counts.sum() == 0


def test_state_dict_round_trip_continues_identically():
    pushes = random_pushes(seed=1)
    a = MemoryBank(C, Q, D)
    for feats, classes in pushes[:6]:
        a.push(feats, classes)
    b = MemoryBank(C, Q, D)
    b.load_state_dict(a.state_dict())
    assert set(a.state_dict()) == {"queue", "ptr", "count"}
    for feats, classes in pushes[6:]:
        a.push(feats, classes)
        b.push(feats, classes)
    for name in ("queue", "ptr", "count"):
        assert torch.equal(getattr(a, name), getattr(b, name))


# ---------------------------------------------------------------------------- selection


def ref_select(feats, probs, labels, tau, k):
    """Loop reference: per class, qualifying pixels sorted by (conf desc, flat index asc),
    the first k, emitted least confident first."""
    b, d, h, w = feats.shape
    by_class = {}
    flat = 0
    for i in range(b):
        for y in range(h):
            for x in range(w):
                lab = int(labels[i, y, x])
                p = probs[i, :, y, x]
                conf, pred = float(p.max()), int(p.argmax())
                if lab != 255 and pred == lab and conf >= tau:
                    by_class.setdefault(lab, []).append((-conf, flat, feats[i, :, y, x]))
                flat += 1
    out_f, out_c = [], []
    for c in sorted(by_class):
        chosen = sorted(by_class[c], key=lambda t: (t[0], t[1]))[:k]
        for _, _, f in reversed(chosen):
            out_f.append(f)
            out_c.append(c)
    if not out_f:
        return torch.zeros(0, feats.shape[1]), torch.zeros(0, dtype=torch.long)
    return torch.stack(out_f), torch.tensor(out_c)


def selection_case(seed=0):
    g = torch.Generator().manual_seed(seed)
    b, c, h, w = 2, 4, 5, 6
    logits = torch.randn(b, c, h, w, generator=g) * 4
    probs = logits.softmax(1)
    # quantise so ties in confidence really occur
    probs = (probs * 20).round() / 20
    labels = probs.argmax(1)
    wrong = torch.rand(b, h, w, generator=g) < 0.2
    labels[wrong] = (labels[wrong] + 1) % c
    labels[0, 0, :] = 255
    feats = torch.randn(b, 8, h, w, generator=g)
    return feats, probs, labels


@pytest.mark.parametrize("seed,k", [(0, 2), (1, 3), (2, 100)])
def test_select_matches_loop_reference(seed, k):
    feats, probs, labels = selection_case(seed)
    got_f, got_c = select_bank_candidates(feats, probs, labels, 0.6, k)
    ref_f, ref_c = ref_select(feats, probs, labels, 0.6, k)
    assert got_c.numel() > 0
    assert torch.equal(got_c, ref_c)
    torch.testing.assert_close(got_f, ref_f, rtol=0, atol=0)


def test_select_excludes_wrong_ignored_and_logit_confident_pixels():
    # 1 x 2 x 1 x 4 pixels, D = 1 (feature = pixel id)
    feats = torch.arange(4.0).view(1, 1, 1, 4)
    logits = torch.tensor([[4.0, 1.2, 9.0, 9.0], [0.0, 0.0, 0.0, 0.0]]).view(1, 2, 1, 4)
    probs = logits.softmax(1)
    labels = torch.tensor([[[0, 0, 1, 255]]])
    # pixel 0: prob 0.98 correct -> kept; pixel 1: logit 1.2 > 0.95 but prob 0.77 -> excluded;
    # pixel 2: confident but wrong -> excluded; pixel 3: ignore -> excluded.
    f, c = select_bank_candidates(feats, probs, labels, 0.95, 10)
    assert f.flatten().tolist() == [0.0] and c.tolist() == [0]


def test_select_most_confident_is_newest_after_push():
    feats = torch.arange(3.0).view(1, 1, 1, 3)
    probs = torch.tensor([[0.96, 0.99, 0.97], [0.04, 0.01, 0.03]]).view(1, 2, 1, 3)
    labels = torch.zeros(1, 1, 3, dtype=torch.long)
    f, c = select_bank_candidates(feats, probs, labels, 0.95, 2)
    bank = MemoryBank(2, 4, 1)
    bank.push(f, c)
    assert bank.ordered(0).flatten().tolist() == [2.0, 1.0]  # 0.97 then 0.99 (newest)


def test_select_empty_and_errors():
    feats, probs, labels = selection_case()
    f, c = select_bank_candidates(feats, probs, labels, 1.01, 3)
    assert f.shape == (0, 8) and c.shape == (0,)
    with pytest.raises(ValueError, match="k must be"):
        select_bank_candidates(feats, probs, labels, 0.5, 0)
    with pytest.raises(ValueError, match="resize"):
        select_bank_candidates(feats, probs, labels[:, :2], 0.5, 3)


# ---------------------------------------------------------------------------- readiness


def test_bank_ready_modes():
    a, b = MemoryBank(3, 4, 1), MemoryBank(3, 4, 1)
    assert not bank_ready([a, b], "min_fill", 2)  # nothing seen yet
    a.push(torch.zeros(2, 1), torch.tensor([0, 0]))
    assert not bank_ready([a, b], "min_fill", 2)  # class 0 seen in a, empty in b
    b.push(torch.zeros(3, 1), torch.tensor([0, 0, 0]))
    assert bank_ready([a, b], "min_fill", 2)  # classes 1, 2 never seen: they do not block
    assert not bank_ready([a, b], "min_fill", 3)
    b.push(torch.zeros(1, 1), torch.tensor([2]))
    assert not bank_ready([a, b], "min_fill", 1)  # class 2 seen in b, missing in a
    assert not bank_ready([a, b], "all_full", 1)
    for bank in (a, b):
        bank.push(torch.zeros(12, 1), torch.arange(3).repeat(4))
    assert bank_ready([a, b], "all_full", 1) and bank_ready([a, b], "min_fill", 4)
    with pytest.raises(ValueError, match="all_full"):
        bank_ready([a, b], "full", 1)
    with pytest.raises(ValueError, match="bank_min_fill"):
        bank_ready([a, b], "min_fill", 5)

import numpy as np
import pytest
import torch

from noisymix.mixing.losses import one_hot
from noisymix.mixing.selectmix import ClassReservoir, SelectMixTargets, selectmix_soft_label
from noisymix.selection.mismatch import build_mixing_table

C = 3


def test_soft_label_sums_to_one_with_lambda_on_given_and_rest_on_predicted():
    lam = torch.tensor([0.3, 0.8])
    t = selectmix_soft_label(one_hot(torch.tensor([0, 2]), C), torch.tensor([1, 0]), lam, C)
    assert torch.allclose(t.sum(1), torch.ones(2))
    assert torch.allclose(t, torch.tensor([[0.3, 0.7, 0.0], [0.2, 0.0, 0.8]]))


def make_table(n=60, seed=0):
    """ids 0..n-1: given labels cycle over classes; every 4th sample is predicted one class further."""
    rng = np.random.default_rng(seed)
    given = np.arange(n) % C
    predicted = given.copy()
    predicted[::4] = (given[::4] + 1) % C
    probs = np.full((n, C), 0.05, dtype=np.float32)
    probs[np.arange(n), predicted] = rng.uniform(0.6, 0.9, n)
    probs /= probs.sum(1, keepdims=True)
    return build_mixing_table(probs, given), given


def method(table, **kw):
    return SelectMixTargets(C, table.uncertain, table.predicted, table.probs, table.pools, **kw)


def batch_of(ids, given):
    ids = np.asarray(ids)
    # input k is filled with its id, so a mix reveals which partner was used
    inputs = torch.from_numpy(ids).float()[:, None, None, None].expand(len(ids), 1, 2, 2).clone()
    return torch.from_numpy(ids), inputs, torch.from_numpy(given[ids])


def fetch_by_id(ids, rng):
    return torch.from_numpy(np.asarray(ids)).float()[:, None, None, None].expand(len(ids), 1, 2, 2).clone()


@pytest.mark.parametrize("source", ["global", "batch", "buffer"])
def test_flagged_samples_mix_with_trusted_partners_of_their_predicted_class(source):
    table, given = make_table()
    m = method(table, partner_source=source, fetch_inputs=fetch_by_id)
    rng = np.random.default_rng(0)
    for start in range(0, 60, 20):
        ids, x, y = batch_of(np.arange(start, start + 20), given)
        out_x, out_t = m.batch(ids, x, y, rng)
        assert torch.allclose(out_t.sum(1), torch.ones(20))
        for k, i in enumerate(ids.tolist()):
            if not table.uncertain[i]:
                assert torch.equal(out_x[k], x[k]) and torch.equal(out_t[k], one_hot(y[k:k + 1], C)[0])
                continue
            c = table.predicted[i]
            lam = float(out_t[k, given[i]])
            assert out_t[k, c] == pytest.approx(1 - lam, abs=1e-6)
            if lam < 0.999:
                partner = (float(out_x[k, 0, 0, 0]) - lam * i) / (1 - lam)
                assert round(partner) in set(table.pools[c].tolist()), "partner comes from T[c_i]"
    assert m.counts["flagged"] == int(table.uncertain.sum())
    if source == "global":
        assert m.counts["no_partner"] == 0


def test_batch_source_without_a_partner_keeps_the_input_and_moves_the_label():
    table, given = make_table()
    m = method(table, partner_source="batch")
    ids, x, y = batch_of([0], given)  # flagged, alone in its batch
    out_x, out_t = m.batch(ids, x, y, np.random.default_rng(0))
    assert torch.equal(out_x, x) and out_t[0, table.predicted[0]] > 0
    assert m.counts == {"flagged": 1, "mixed": 0, "no_partner": 1}


def test_random_partners_is_mixup_on_the_flagged_set():
    table, given = make_table()
    m = method(table, partners="random")
    ids, x, y = batch_of(np.arange(20), given)
    out_x, out_t = m.batch(ids, x, y, np.random.default_rng(1))
    unflagged = ~table.uncertain[:20]
    assert torch.equal(out_x[unflagged], x[unflagged])
    assert torch.allclose(out_t.sum(1), torch.ones(20))


def test_selection_only_zeroes_untrusted_rows():
    table, given = make_table()
    m = method(table, partners="none")
    ids, x, y = batch_of(np.arange(20), given)
    _, out_t = m.batch(ids, x, y, np.random.default_rng(0))
    assert torch.equal(out_t.sum(1) > 0, torch.from_numpy(~table.uncertain[:20]))


def test_hard_and_soft_label_variants():
    table, given = make_table()
    ids, x, y = batch_of([0, 4], given)
    _, hard = method(table, label="hard", fetch_inputs=fetch_by_id).batch(ids, x, y, np.random.default_rng(0))
    assert torch.equal(hard, one_hot(y, C))
    _, soft = method(table, label="soft", fetch_inputs=fetch_by_id).batch(ids, x, y, np.random.default_rng(0))
    assert torch.allclose(soft.sum(1), torch.ones(2)) and (soft > 0).sum() > (hard > 0).sum()


def test_per_batch_lambda_is_shared():
    table, given = make_table()
    ids, x, y = batch_of(np.arange(0, 20, 4), given)  # all flagged
    _, t = method(table, lambda_per="batch", fetch_inputs=fetch_by_id).batch(ids, x, y, np.random.default_rng(0))
    lams = t[torch.arange(len(ids)), y]
    assert torch.allclose(lams, lams[0].expand_as(lams))


def test_reservoir_keeps_a_bounded_uniform_sample():
    reservoir = ClassReservoir(2, capacity=4)
    rng = np.random.default_rng(0)
    for start in range(0, 100, 10):
        reservoir.add(torch.arange(start, start + 10).float()[:, None], np.zeros(10, dtype=np.int64), rng)
    assert reservoir.filled.tolist() == [4, 0] and reservoir.seen.tolist() == [100, 0]
    drawn, found = reservoir.draw(np.array([0, 1]), rng, torch.zeros(1, 1))
    assert found.tolist() == [True, False] and 0 <= float(drawn[0, 0]) < 100


@pytest.mark.parametrize("kw, message", [({"alpha": 0.0}, "alpha"), ({"partners": "any"}, "partners"),
                                         ({"partner_source": "disk"}, "partner_source"),
                                         ({"partner_source": "global"}, "fetch_inputs")])
def test_bad_options(kw, message):
    table, _ = make_table()
    with pytest.raises(ValueError, match=message):
        method(table, **kw)


def test_the_reservoir_keeps_within_its_byte_cap_and_one_slot_per_class_at_least():
    rng = np.random.default_rng(0)
    capped = ClassReservoir(4, capacity=256, max_bytes=4 * 10 * 3 * 8 * 8 * 4)   # room for 10 inputs per class
    capped.add(torch.zeros(40, 3, 8, 8), np.arange(40) % 4, rng)
    assert capped.capacity == 10 and capped.filled.tolist() == [10, 10, 10, 10]
    tiny = ClassReservoir(4, capacity=256, max_bytes=1)
    tiny.add(torch.zeros(8, 3, 8, 8), np.arange(8) % 4, rng)
    assert tiny.capacity == 1 and sum(s.numel() for s in tiny.slots) == 4 * 3 * 8 * 8

"""Compact soft targets: exact where nothing is dropped, a uniform remainder where top-k drops classes."""

import pytest
import torch

from noisymix.mixing.soft_targets import TargetCodec


def rows(n=50, c=10):
    return torch.distributions.Dirichlet(torch.full((c,), 0.3)).sample(torch.Size([n])).float()


def test_dense_float32_and_top_k_of_at_least_c_are_exact():
    torch.manual_seed(0)
    t = rows()
    for codec in (TargetCodec(10), TargetCodec(10, topk=10), TargetCodec(10, topk=16)):
        assert not codec.sparse and codec.width == 10
        assert torch.allclose(codec.decode(codec.encode(t)), t, atol=1e-6)


def test_sixteen_bit_storage_halves_the_bytes_and_stays_a_distribution():
    torch.manual_seed(0)
    t = rows()
    for dtype in ("float16", "bfloat16"):
        codec = TargetCodec(10, dtype=dtype)
        back = codec.decode(codec.encode(t))
        assert codec.bytes_per_row == 20 and torch.allclose(back.sum(1), torch.ones(50), atol=1e-6)
        assert (back - t).abs().max() < (1e-3 if dtype == "float16" else 1e-2)


def test_top_k_keeps_the_k_largest_and_spreads_the_rest_evenly():
    t = torch.tensor([[0.5, 0.3, 0.1, 0.06, 0.04], [0.0, 0.0, 0.0, 0.0, 1.0]])
    codec = TargetCodec(5, topk=2)
    back = codec.decode(codec.encode(t))
    assert torch.allclose(back[0], torch.tensor([0.5, 0.3, 0.2 / 3, 0.2 / 3, 0.2 / 3]))
    assert torch.allclose(back[1], t[1]) and torch.equal(back.argmax(1), t.argmax(1))
    assert codec.encode(t).dtype == torch.int32 and codec.bytes_per_row == 16
    pairs = torch.tensor([[0, 1], [1, 0]])
    stacked = codec.encode(t)[pairs]                 # (batch, K neighbours, width), as MixNN asks for them
    assert stacked.shape == (2, 2, 4) and torch.equal(codec.decode(stacked), back[pairs])


def test_webvision_sized_rows_at_top_16_in_float16_take_64_bytes():
    codec = TargetCodec(1000, topk=16, dtype="float16")
    torch.manual_seed(1)
    t = torch.softmax(torch.randn(8, 1000) * 4, dim=1)
    encoded = codec.encode(t)
    assert encoded.dtype == torch.int16 and encoded.shape == (8, 32) and codec.bytes_per_row == 64
    back = codec.decode(encoded)
    assert torch.equal(back.argmax(1), t.argmax(1)) and torch.allclose(back.sum(1), torch.ones(8), atol=1e-5)
    top = t.topk(16, dim=1)
    assert torch.allclose(back.gather(1, top.indices), top.values, rtol=2e-3, atol=1e-4)


@pytest.mark.parametrize("args, message", [
    ((0,), "num_classes must be >= 1"), ((5, -1), "topk >= 0"), ((5, 2, "float64"), "not one of float32"),
    ((40_000, 16, "float16"), "do not fit the float16 top-k index"),
])
def test_bad_codecs_are_refused(args, message):
    with pytest.raises(ValueError, match=message):
        TargetCodec(*args)


def test_rows_of_the_wrong_width_are_refused():
    with pytest.raises(ValueError, match=r"must be \(n, 5\)"):
        TargetCodec(5).encode(torch.ones(2, 4))

import torch

from moonbase.model.sampler import sample


def _draw(logits, t, p, n=4000, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = logits.expand(n, -1)
    return sample(rows, torch.full((n,), t), torch.full((n,), p), [g] * n)


def test_temperature_zero_is_argmax():
    logits = torch.tensor([[0.1, 3.0, 2.9], [5.0, 0.0, 0.0]])
    assert sample(logits, torch.zeros(2), torch.ones(2)).tolist() == [1, 0]


def test_top_p_keeps_tokens_while_mass_before_them_is_within_top_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    # mass before token 1 is 0.5 <= 0.5: kept; before token 2 is 0.8 > 0.5: dropped
    assert set(_draw(logits, 1.0, 0.5).tolist()) == {0, 1}
    assert set(_draw(logits, 1.0, 0.49).tolist()) == {0}  # the top token is always kept
    assert set(_draw(logits, 1.0, 1.0).tolist()) == {0, 1, 2, 3}


def test_sampling_follows_the_renormalized_nucleus():
    logits = torch.tensor([[0.6, 0.3, 0.1]]).log()
    draws = _draw(logits, 1.0, 0.8, n=20000)
    share = (draws == 0).float().mean().item()
    assert abs(share - 0.6 / 0.9) < 0.02


def test_temperature_sharpens():
    logits = torch.tensor([[1.0, 0.0]])
    hot, cold = _draw(logits, 2.0, 1.0), _draw(logits, 0.25, 1.0)
    assert (cold == 0).float().mean() > (hot == 0).float().mean()


def test_seeded_rows_are_reproducible_and_independent():
    logits = torch.randn(3, 50)
    t, p = torch.ones(3), torch.ones(3)
    a = sample(logits, t, p, [torch.Generator().manual_seed(s) for s in (1, 2, 3)])
    b = sample(logits, t, p, [torch.Generator().manual_seed(s) for s in (1, 2, 3)])
    assert torch.equal(a, b)
    mixed = sample(logits, torch.tensor([0.0, 1.0, 1.0]), p, [torch.Generator().manual_seed(s) for s in (1, 2, 3)])
    assert mixed[0] == logits[0].argmax()


def test_masked_logits_are_never_drawn():
    logits = torch.zeros(1, 5)
    logits[0, 2] = float("-inf")
    assert 2 not in _draw(logits, 1.0, 1.0).tolist()

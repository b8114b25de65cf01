"""Model facts of upstream nanochat (early November 2025), the fused soft-capped cross-entropy, and KV-cache generation."""

import math

import pytest
import torch
import torch.nn.functional as F

from nanochat.engine import Engine
from nanochat.gpt import GPT, GPTConfig, SOFTCAP, SoftcapCrossEntropyMean, apply_rotary_emb, softcap_cross_entropy_chunks
from tests.conftest import perturb_zero_inits, tiny_model
from tests.helpers import generate_no_cache


@pytest.mark.parametrize("depth,params", [(4, 36_700_160), (20, 560_988_160)])
def test_parameter_count_matches_formula(depth, params):
    with torch.device("meta"):
        model = GPT(GPTConfig.from_depth(depth, 65536, 2048))
    d = 64 * depth
    assert model.num_params() == params == 2 * 65536 * d + 12 * depth * d * d


def test_sizing_from_depth():
    for depth in (1, 2, 4, 6, 20, 26):
        c = GPTConfig.from_depth(depth, 1000, 128)
        assert c.n_embd == 64 * depth
        assert c.n_head == math.ceil(64 * depth / 128) and c.n_kv_head == c.n_head
        assert c.n_embd % c.n_head == 0


def test_flops_formula():
    with torch.device("meta"):
        model = GPT(GPTConfig.from_depth(4, 65536, 512))
    n, emb = 36_700_160, 65536 * 256
    assert model.estimate_flops() == 6 * (n - emb) + 12 * 4 * 2 * 128 * 512


def test_init_facts_and_first_loss():
    model = tiny_model(vocab=1000, seq=64)
    for block in model.transformer.h:
        assert block.attn.c_proj.weight.abs().sum() == 0 and block.mlp.c_proj.weight.abs().sum() == 0
        w = block.attn.c_q.weight
        assert abs(w.std().item() - 1 / math.sqrt(w.shape[1])) < 0.01
        w = block.mlp.c_fc.weight  # fan_out 4x fan_in -> min(1, sqrt(4)) = 1
        assert abs(w.std().item() - 1 / math.sqrt(w.shape[1])) < 0.01
    assert model.lm_head.weight.abs().sum() == 0
    assert abs(model.transformer.wte.weight.std().item() - 1.0) < 0.02
    x = torch.randint(0, 1000, (2, 64))
    loss = model(x, x)
    assert abs(loss.item() - math.log(1000)) < 1e-3


def reference_loss(model, idx, targets):
    logits = model(idx).float()
    return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)


def test_chunked_cross_entropy_matches_unchunked():
    torch.manual_seed(0)
    x, w = torch.randn(37, 16), torch.randn(300, 16)
    t = torch.randint(0, 300, (37,))
    t[4] = -1
    full = softcap_cross_entropy_chunks(x, w, t, True)
    small = softcap_cross_entropy_chunks(x, w, t, True, max_elements=300 * 5)  # chunks of 5 rows
    for a, b in zip(full, small):
        assert torch.allclose(a, b, atol=1e-6)


def test_fused_cross_entropy_matches_autograd():
    torch.manual_seed(0)
    x = torch.randn(37, 16, requires_grad=True)
    w = torch.randn(300, 16, requires_grad=True) * 3
    w = w.detach().requires_grad_(True)
    t = torch.randint(0, 300, (37,))
    t[[3, 10]] = -1
    loss = SoftcapCrossEntropyMean.apply(x, w, t)
    (2.5 * loss).backward()
    gx, gw = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    ref = F.cross_entropy(SOFTCAP * torch.tanh(x @ w.T / SOFTCAP), t, ignore_index=-1)
    (2.5 * ref).backward()
    assert torch.allclose(loss, ref, atol=1e-6)
    assert torch.allclose(gx, x.grad, atol=1e-6) and torch.allclose(gw, w.grad, atol=1e-6)


def test_model_loss_and_per_token_losses_match_reference():
    model = tiny_model(vocab=512, seq=64)
    perturb_zero_inits(model)
    idx = torch.randint(0, 512, (2, 64))
    tgt = torch.randint(0, 512, (2, 64))
    tgt[0, :5] = -1
    assert torch.allclose(model(idx, tgt), reference_loss(model, idx, tgt), atol=1e-5)
    per_tok = model(idx, tgt, loss_reduction="none")
    logits = model(idx).float()
    ref = F.cross_entropy(logits.view(-1, 512), tgt.view(-1), ignore_index=-1, reduction="none").view(2, 64)
    assert torch.allclose(per_tok, ref, atol=1e-5)


def test_rotary_is_a_rotation():
    x = torch.randn(1, 8, 2, 16)
    ang = torch.rand(1, 8, 1, 8)
    y = apply_rotary_emb(x, ang.cos(), ang.sin())
    assert torch.allclose(x.norm(dim=-1), y.norm(dim=-1), atol=1e-5)
    assert torch.allclose(apply_rotary_emb(x, torch.ones_like(ang), torch.zeros_like(ang)), x)


def test_causality():
    model = tiny_model(vocab=512, seq=64)
    perturb_zero_inits(model)
    idx = torch.randint(0, 512, (1, 32))
    out1 = model(idx)
    idx2 = idx.clone()
    idx2[0, 20:] = (idx2[0, 20:] + 1) % 512
    out2 = model(idx2)
    assert torch.allclose(out1[0, :20], out2[0, :20], atol=1e-5)


class _FakeTokenizer:
    def get_bos_token_id(self):
        return -100

    def encode_special(self, name):
        return -101


def test_kv_cache_generation_equals_no_cache():
    model = tiny_model(vocab=512, seq=64)
    perturb_zero_inits(model)
    model.eval()
    prompt = [5, 17, 33, 2, 99]
    results, masks = Engine(model, _FakeTokenizer()).generate_batch(prompt, num_samples=2, max_tokens=20, temperature=0)
    reference = generate_no_cache(model, prompt, 20)
    assert results[0] == reference and results[1] == reference
    assert masks[0] == [0] * 5 + [1] * 20


def test_sampling_is_seeded():
    model = tiny_model(vocab=512, seq=64)
    perturb_zero_inits(model)
    eng = Engine(model, _FakeTokenizer())
    a, _ = eng.generate_batch([1, 2, 3], num_samples=3, max_tokens=8, temperature=1.0, seed=7)
    b, _ = eng.generate_batch([1, 2, 3], num_samples=3, max_tokens=8, temperature=1.0, seed=7)
    assert a == b

"""Plain use of the decoder (no Quiet-STaR layout) is exactly stock SDPA: padded batches, a KV cache,
greedy `generate`. The "quietstar" attention registers SDPA's mask function and hands such calls to
transformers' own SDPA attention; these tests compare with a twin of the same weights run with
attn_implementation="sdpa" (fp32)."""
import copy

import pytest
import torch

from quietstar import ModelConfig, build_decoder

V = 101


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    mc = ModelConfig(hidden_size=48, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=12, intermediate_size=96,
                     vocab_size=V, max_position_embeddings=128)
    ours = build_decoder(mc).eval()
    stock = copy.deepcopy(ours)
    stock.config._attn_implementation = "sdpa"
    assert ours.config._attn_implementation == "quietstar"
    return ours, stock


def _batch(pad_side, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (3, 11), generator=g)
    mask = torch.ones_like(ids)
    lengths = (11, 8, 5)
    for i, n in enumerate(lengths):
        if pad_side == "left":
            mask[i, : 11 - n] = 0
            ids[i, : 11 - n] = 0
        else:
            mask[i, n:] = 0
            ids[i, n:] = 0
    return ids, mask, lengths


@pytest.mark.parametrize("pad_side", ["left", "right"])
def test_padded_batch_equals_stock_sdpa_and_unpadded_rows(pair, pad_side):
    ours, stock = pair
    ids, mask, lengths = _batch(pad_side)
    with torch.no_grad():
        a = ours(input_ids=ids, attention_mask=mask).logits
        b = stock(input_ids=ids, attention_mask=mask).logits
        keep = mask.bool()
        assert (a[keep] - b[keep]).abs().max() < 1e-5
        for i, n in enumerate(lengths):   # each row as if alone, unpadded
            row = ids[i][mask[i].bool()][None]
            alone = ours(input_ids=row).logits[0]
            assert (a[i][mask[i].bool()] - alone).abs().max() < 1e-5, f"row {i} depends on its padding"


def test_cached_decoding_equals_full_forward(pair):
    ours, stock = pair
    ids, mask, _ = _batch("left", seed=2)
    with torch.no_grad():
        full = ours(input_ids=ids, attention_mask=mask).logits[:, -1]
        pre = ours(input_ids=ids[:, :-3], attention_mask=mask[:, :-3], use_cache=True)
        cache = pre.past_key_values
        for j in (3, 2):               # two single-token steps, then the last one
            step = ours(input_ids=ids[:, -j:-j + 1], attention_mask=mask[:, : -j + 1], past_key_values=cache,
                        use_cache=True)
            cache = step.past_key_values
        last = ours(input_ids=ids[:, -1:], attention_mask=mask, past_key_values=cache, use_cache=True).logits[:, -1]
        ref = stock(input_ids=ids, attention_mask=mask).logits[:, -1]
    assert (last - full).abs().max() < 1e-5
    assert (last - ref).abs().max() < 1e-5


def test_greedy_generate_equals_stock(pair):
    ours, stock = pair
    ids, mask, _ = _batch("left", seed=3)
    kw = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        a = ours.generate(ids, **kw)
        b = stock.generate(ids, **kw)
        sa = ours.generate(ids, output_scores=True, return_dict_in_generate=True, **kw).scores
        sb = stock.generate(ids, output_scores=True, return_dict_in_generate=True, **kw).scores
    assert a.shape == (3, 11 + 12) and torch.equal(a, b)
    assert max((x - y).abs().max().item() for x, y in zip(sa, sb)) < 1e-5

"""The MFU formula of quietstar/flops.py (training log and bench_train_step)."""
import torch

from quietstar import ModelConfig, build_decoder
from quietstar.flops import PEAK_BF16, matmul_params, peak_bf16_flops, step_flops


def _model(tied: bool):
    mc = ModelConfig(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, intermediate_size=64,
                     vocab_size=97, tie_word_embeddings=tied)
    return build_decoder(mc)


def test_matmul_params_count_the_lm_head_once_tied_or_not():
    for tied in (False, True):
        lm = _model(tied)
        layers = sum(p.numel() for p in lm.model.layers.parameters()) + lm.model.norm.weight.numel()
        assert matmul_params(lm) == layers + 97 * 32, tied
    assert step_flops(_model(False), B=2, T=16, M=3, P=2, L=6) == \
        matmul_params(_model(False)) * (6 * (2 * 16 + 2 * 2 * 16 * 6) + 2 * 3 * 2 * 2 * 16)


def test_peak_is_known_only_for_listed_gpus(monkeypatch):
    assert peak_bf16_flops("cpu") is None
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA H100 PCIe")
    assert peak_bf16_flops("cuda") == 756e12
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA H100 80GB HBM3")
    assert peak_bf16_flops("cuda") == 989e12 == dict(PEAK_BF16)["H100"]
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "Some Future GPU")
    assert peak_bf16_flops("cuda") is None

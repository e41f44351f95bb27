"""Test configuration: on a machine without CUDA, Triton kernels run in the CPU interpreter.

TRITON_INTERPRET must be set before triton is first imported, so it is set here, at collection.
"""
import json
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _release_cuda_cache():
    """On a GPU, give each test's cached blocks back after it: the suite runs 8 workers on one GPU
    (pytest -n 8), and a worker's cache would otherwise keep its largest test's peak reserved."""
    yield
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@pytest.fixture
def device():
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def tiny_export(tmp_path):
    """Factory: a 1-layer random-init QuietStarModel (seed 0) saved with the Mistral tokenizer by
    `save_pretrained` under tmp_path/exp; returns the folder. Argument: the thought count P."""
    def make(P: int):
        from quietstar import ModelConfig, QuietStarModel, ThoughtConfig, build_decoder
        from quietstar.assets import mistral_tokenizer
        torch.manual_seed(0)
        mc = ModelConfig(hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=8, intermediate_size=64)
        model = QuietStarModel(build_decoder(mc), ThoughtConfig(M=2, K=2, P=P), marker_init_id=5)
        return model.save_pretrained(tmp_path / "exp", tokenizer=mistral_tokenizer())
    return make


@pytest.fixture
def base_folder(tmp_path):
    """Factory: a 1-layer random-init stock Mistral decoder (seed 0) saved as a local Hugging Face folder with
    the Mistral tokenizer and a non-default generation config, under tmp_path/base; returns the folder. Argument:
    tie_word_embeddings, or "config-only": a config that says tied over two different embedding tensors (as some
    published models have; transformers loads them untied). A run's `--model`; tests delete its weight files to
    show what no longer reads them."""
    def make(tied):
        from quietstar import ModelConfig, build_decoder
        from quietstar.assets import mistral_tokenizer
        torch.manual_seed(0)
        mc = ModelConfig(hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=8, intermediate_size=64,
                         tie_word_embeddings=tied is True)
        lm = build_decoder(mc)
        gc = lm.generation_config
        gc.do_sample, gc.temperature, gc.eos_token_id = True, 0.6, [2, 7]
        folder = tmp_path / "base"
        lm.save_pretrained(folder)
        mistral_tokenizer().save_pretrained(folder)
        if tied == "config-only":
            cfg = json.loads((folder / "config.json").read_text())
            cfg["tie_word_embeddings"] = True
            (folder / "config.json").write_text(json.dumps(cfg))
        return folder
    return make

"""QuietStarModel.save_pretrained / from_pretrained: the decoder as a standard Hugging Face folder (stock
transformers loads it on its own), the tokenizer, the Quiet-STaR extras; a round trip gives the same
model; bad folders get clear errors; quietstar-train writes the export."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from quietstar import Backends, LossConfig, ModelConfig, QuietStarModel, ThoughtConfig, build_decoder
from quietstar.assets import mistral_tokenizer
from quietstar.thoughts import quietstar_forward, sample_thoughts

REPO = Path(__file__).resolve().parents[1]


def _model(V=32000, seed=0):
    torch.manual_seed(seed)
    mc = ModelConfig(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, intermediate_size=64,
                     vocab_size=V, max_position_embeddings=64)
    model = QuietStarModel(build_decoder(mc), ThoughtConfig(M=2, K=2, P=2, tau_reinforce=2.5,
                                                            banned_ids=(7,)), marker_init_id=5)
    with torch.no_grad():   # nothing at its initial value: the round trip must carry every tensor
        model.markers.normal_()
        for p in model.mixing_head.parameters():
            p.normal_(0, 0.3)
    return model


def _loss(model, ids, thoughts):
    loss, _, _ = quietstar_forward(model, ids, None, LossConfig(beta_policy=3.0), "sample-then-train",
                                   Backends("split", "chunked"), thoughts=thoughts)
    return loss


def test_round_trip_gives_the_same_model(tmp_path):
    model = _model()
    out = model.save_pretrained(tmp_path / "exp", tokenizer=mistral_tokenizer())
    assert {"config.json", "model.safetensors", "quietstar.safetensors", "quietstar.json",
            "tokenizer.json"} <= set(os.listdir(out))
    loaded = QuietStarModel.from_pretrained(out)
    assert loaded.thought == model.thought and loaded.banned_ids == model.banned_ids
    sa, sb = model.state_dict(), loaded.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    ids = torch.randint(0, 32000, (2, 9), generator=torch.Generator().manual_seed(1))
    thoughts = sample_thoughts(model, ids, Backends("reference", "reference"), torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(_loss(model, ids, thoughts), _loss(loaded, ids, thoughts))


def test_stock_transformers_loads_the_decoder_alone(tmp_path):
    model = _model(V=97)
    out = model.save_pretrained(tmp_path / "exp")
    ids = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.save({"ids": ids, "logits": model.lm(input_ids=ids).logits}, tmp_path / "want.pt")
    code = ("import sys, torch\n"
            "from transformers import AutoModelForCausalLM\n"
            "assert 'quietstar' not in sys.modules\n"
            f"m = AutoModelForCausalLM.from_pretrained({str(out)!r}).eval()\n"
            f"w = torch.load({str(tmp_path / 'want.pt')!r})\n"
            "with torch.no_grad():\n"
            "    got = m(input_ids=w['ids']).logits\n"
            "print(m.config._attn_implementation, float((got - w['logits']).abs().max()))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    impl, err = r.stdout.split()[-2:]
    assert impl != "quietstar" and float(err) < 1e-5, r.stdout


def test_bad_folders_get_clear_errors(tmp_path):
    model = _model(V=97)
    model.lm.save_pretrained(tmp_path / "plain")           # a plain decoder folder: no extras
    with pytest.raises(FileNotFoundError, match="quietstar.safetensors"):
        QuietStarModel.from_pretrained(tmp_path / "plain")
    out = model.save_pretrained(tmp_path / "tok", tokenizer=mistral_tokenizer())    # 32000 ids, 97 rows
    with pytest.raises(ValueError, match="mismatched vocabulary"):
        QuietStarModel.from_pretrained(out)
    out = model.save_pretrained(tmp_path / "other")
    meta = json.loads((out / "quietstar.json").read_text())
    (out / "quietstar.json").write_text(json.dumps({**meta, "vocab_size": 96}))
    with pytest.raises(ValueError, match="vocabulary 97"):
        QuietStarModel.from_pretrained(out)


def test_quietstar_train_writes_the_export(tmp_path):
    from quietstar.train import config_from_args, train
    args = ["--model-hidden-size", "32", "--model-num-layers", "1", "--model-num-heads", "4", "--model-num-kv-heads",
            "2", "--model-head-dim", "8", "--model-intermediate-size", "64", "--M", "2", "--K", "2", "--P", "2",
            "--seq-len", "16", "--batch-size", "1", "--steps", "1", "--lm-head", "chunked", "--attention", "split",
            "--out-dir", str(tmp_path)]
    res = train(config_from_args(args), progress=False)
    loaded = QuietStarModel.from_pretrained(res["export"])
    sa, sb = res["model"].state_dict(), loaded.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert (Path(res["export"]) / "tokenizer.json").exists()


def test_training_from_an_export_continues_its_extras(tmp_path):
    """`quietstar-train --model EXPORT` continues a trained model: its decoder, and its markers and mixing head
    (which a plain decoder folder starts afresh); with another --marker-scale the effective markers are kept."""
    from quietstar.train import config_from_args, train
    model = _model()
    exp = model.save_pretrained(tmp_path / "exp", tokenizer=mistral_tokenizer())
    model.lm.save_pretrained(tmp_path / "plain")
    mistral_tokenizer().save_pretrained(tmp_path / "plain")
    base = ["--M", "2", "--K", "2", "--P", "2", "--seq-len", "16", "--batch-size", "1", "--steps", "1", "--lr", "0",
            "--lm-head", "chunked", "--attention", "split"]
    effective = model.markers.detach() * model.thought.marker_scale
    for scale in ("100", "25"):
        res = train(config_from_args(base + ["--model", str(exp), "--marker-scale", scale,
                                             "--out-dir", str(tmp_path / f"run{scale}")]), progress=False)
        got = res["model"]
        torch.testing.assert_close(got.markers.detach() * float(scale), effective, rtol=1e-6, atol=0)
        for (n, a), b in zip(got.mixing_head.state_dict().items(), model.mixing_head.state_dict().values()):
            assert torch.equal(a, b), n
    res = train(config_from_args(base + ["--model", str(tmp_path / "plain"), "--out-dir", str(tmp_path / "fresh")]),
                progress=False)
    assert not torch.equal(res["model"].markers.detach() * 100, effective)     # a decoder folder: fresh extras
    assert torch.count_nonzero(res["model"].mixing_head.net[-1].weight) == 0


def test_damaged_exports_are_one_error_naming_the_folder_and_the_file(tmp_path, tiny_export, monkeypatch):
    """Each damaged file of an export is one ValueError naming the folder and the file (not a JSONDecodeError,
    KeyError, TypeError, SafetensorError...); quietstar.json and config.json are checked before the decoder is built
    (a GPT-2 config.json is not built at all); a missing model.safetensors is in the missing-files check."""
    import shutil
    import transformers
    from safetensors.torch import load_file, save_file
    src = tiny_export(P=1)

    def write(name, text):
        return lambda d: (d / name).write_text(text)

    def edit(name, fn):
        def go(d):
            j = json.loads((d / name).read_text())
            fn(j)
            (d / name).write_text(json.dumps(j))
        return go

    def drop_head_tensor(d):
        e = load_file(str(d / "quietstar.safetensors"))
        e.pop("mixing_head.net.0.weight")
        save_file(e, str(d / "quietstar.safetensors"))

    def poison(*names):
        def go(d):
            e = load_file(str(d / "quietstar.safetensors"))
            for n in names:
                e[n].view(-1)[1] = float("nan") if n == "markers" else float("inf")
            save_file(e, str(d / "quietstar.safetensors"))
        return go

    Q, built = "quietstar.json", False      # built: whether the decoder may be built before the error
    cases = [(Q, write(Q, ""), built, "not JSON"), (Q, write(Q, "{not json"), built, "not JSON"),
             (Q, write(Q, "[]"), built, "expected a JSON object, got a list"),
             (Q, edit(Q, lambda j: j.pop("thought")), built, "thought missing"),
             (Q, edit(Q, lambda j: j.pop("vocab_size")), built, "vocab_size missing"),
             (Q, edit(Q, lambda j: j.pop("banned_ids")), built, "banned_ids missing"),
             (Q, edit(Q, lambda j: j["thought"].update(foo=1)), built, r"thought has unknown keys \['foo'\]"),
             (Q, edit(Q, lambda j: j["thought"].update(M="3")), built, "ThoughtConfig.M must be an int"),
             (Q, edit(Q, lambda j: j["thought"].pop("M")), built, "thought has no M"),
             (Q, edit(Q, lambda j: j.update(vocab_size="32000")), built, "vocab_size must be a positive int"),
             (Q, edit(Q, lambda j: (j["thought"].update(banned_ids=[99999]), j.update(banned_ids=[99999]))), True,
              r"banned_ids \[99999\] are outside the vocabulary"),
             ("config.json", write("config.json", "{"), built, "its config.json cannot be read"),
             ("config.json", edit("config.json", lambda j: j.update(model_type="gpt2")), built,
              "expected a Mistral- or Llama-architecture folder, got model_type='gpt2' in its config.json"),
             ("model.safetensors", write("model.safetensors", "xx"), True,
              r"its decoder weights \(model.safetensors\) cannot be loaded"),
             ("tokenizer.json", write("tokenizer.json", "{"), True, "not a tokenizers tokenizer.json"),
             ("quietstar.safetensors", write("quietstar.safetensors", "garbage"), True, "not a safetensors file"),
             ("quietstar.safetensors", drop_head_tensor, True,
              "mixing head does not fit this model: net.0.weight missing"),
             ("quietstar.safetensors", poison("markers"), True, r"non-finite values \(NaN or inf\) in markers$"),
             ("quietstar.safetensors", poison("markers", "mixing_head.net.0.bias"), True,
              r"non-finite values \(NaN or inf\) in markers, mixing_head.net.0.bias$")]
    real = transformers.AutoModelForCausalLM.from_pretrained
    for i, (name, damage, may_build, msg) in enumerate(cases):
        d = tmp_path / f"v{i}"
        shutil.copytree(src, d)
        damage(d)
        monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                            real if may_build else lambda *a, **k: pytest.fail(f"{name}: the decoder was built"))
        where = re.escape(f"{d}: " if name in ("config.json", "model.safetensors") else f"{d / name}: ")
        with pytest.raises(ValueError, match=f"^{where}.*{msg}"):   # "{d}: its config.json ...": file in msg
            QuietStarModel.from_pretrained(d)
    monkeypatch.undo()
    from quietstar.model import load_export_tokenizer
    bad_tok = tmp_path / f"v{[c[0] for c in cases].index('tokenizer.json')}"
    with pytest.raises(ValueError, match=f"^{re.escape(str(bad_tok / 'tokenizer.json'))}: cannot be read as a"):
        load_export_tokenizer(bad_tok)
    d = tmp_path / "no-weights"
    shutil.copytree(src, d)
    (d / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=f"{re.escape(str(d))} is not a Quiet-STaR export: model.safetensors "
                                                "missing"):
        QuietStarModel.from_pretrained(d)


def test_from_pretrained_dtype_names_and_bad_dtypes(tiny_export):
    """dtype: a floating torch dtype or its name ("float32", "float16", "bfloat16"), or "auto" (the saved dtype,
    float32 here); "fp16" was "module 'torch' has no attribute 'fp16'"."""
    out = tiny_export(P=1)
    for dtype, want in (("bfloat16", torch.bfloat16), ("float16", torch.float16), (torch.bfloat16, torch.bfloat16),
                        ("float32", torch.float32), ("auto", torch.float32), (None, torch.float32)):
        assert {p.dtype for p in QuietStarModel.from_pretrained(out, dtype=dtype).parameters()} == {want}, dtype
    for bad, err in (("fp16", ValueError), (torch.int32, ValueError), (16, TypeError)):
        with pytest.raises(err, match="dtype must be a floating torch dtype"):
            QuietStarModel.from_pretrained(out, dtype=bad)


def test_save_pretrained_checks_the_tokenizer_before_writing(tmp_path):
    """A tokenizer that is not one (a name, say) is refused before any file is written: it was an AttributeError
    after the decoder's files, a half-written export."""
    model = _model(V=97)
    with pytest.raises(TypeError, match="tokenizer must be a Hugging Face tokenizer .*got str 'mistral'"):
        model.save_pretrained(tmp_path / "exp", tokenizer="mistral")
    assert not (tmp_path / "exp").exists()

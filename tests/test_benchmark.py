"""models.bench (what the benchmarks report, on tiny shapes; not how fast), sparq_jax.stages (sparq's
recorded parts) against attend and NumPy, scripts/benchmark.py's command line, scripts/row_reads.c
and scripts/device_check.sh --smoke."""
import json
import os
import shutil
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

import sparq_jax as sq
from models.bench import hlo
from models.bench.attention import AttentionOptions, run_attention
from models.bench.decode import DecodeOptions
from models.bench.model import ModelOptions, run_model
from models.bench.timing import drop_failing
from sparq_jax import native, stages
from sparq_jax.sparq import approx_scores

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _script(*args):
    """scripts/benchmark.py run as a user runs it, importing this checkout's packages."""
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "benchmark.py"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_attention_case_reports_consistent_numbers():
    doc = run_attention(AttentionOptions(batch=2, q_heads=4, kv_heads=2, seq_len=512, head_dim=16, rank=4, top_k=64,
                                         local_window=8, reps=1, warmup=1, breakdown=True))
    assert json.loads(json.dumps(doc)) == doc                      # what the script writes as JSON
    c = doc["config"]
    assert (c["rank"], c["top_k"], c["local_window"], c["reallocate_mean"], c["seq_len"]) == (4, 64, 8, True, 512)
    rows = {r["method"]: r for r in doc["rows"]}
    assert [r["method"] for r in doc["rows"]] == ["dense", "sparq"] and all(r["impl"] == "xla" for r in doc["rows"])
    # against references that are not the timed code: sparq_reference, a plain softmax for dense
    assert all(r["rel_err"] < 1e-5 for r in doc["rows"]), doc["rows"]
    # Eq. 3 and Eq. 11 per (row, KV head), fp32: dense 2*S*d + 2*d, SparQ S*r + 2*k*d + 4*d
    dense, sparq = 2 * 512 * 16 + 2 * 16, 512 * 4 + 2 * 64 * 16 + 4 * 16
    assert (rows["dense"]["bytes"], rows["sparq"]["bytes"]) == (2 * 2 * dense * 4, 2 * 2 * sparq * 4)
    assert doc["transfer_ratio"] == pytest.approx(sparq / dense, rel=1e-12)
    for r in doc["rows"]:
        assert r["gbps"] == pytest.approx(r["bytes"] / r["ms"] / 1e6)
    assert (doc["dense_ms"], doc["sparq_ms"]) == (rows["dense"]["ms"], rows["sparq"]["ms"])
    assert doc["speedup"] == pytest.approx(doc["dense_ms"] / doc["sparq_ms"])
    stages_ = doc["breakdown"]["xla"]
    want = {"scores", "top-k", "v_bar", "steps 2+3", "top-k: counting (XLA)", "top-k: lax.top_k, sorted"} | (
        {"top-k: native (CPU)"} if native.available()[0] else set())
    assert set(stages_) == want
    # step 1 reads r rows of S per (row, KV head); steps 2+3 read k rows of K and of V (fp32)
    assert stages_["scores"]["bytes"] == 2 * 2 * 4 * 512 * 4
    assert stages_["steps 2+3"]["bytes"] == 2 * 2 * 2 * 64 * 16 * 4
    for st in stages_.values():
        assert st["gbps"] == pytest.approx(st["bytes"] / st["ms"] / 1e6)


def test_attention_options_name_the_sparq_they_run_and_reject_bad_flags():
    assert AttentionOptions(head_dim=16).method(512) == sq.method_from_name("sparq-mean", 0.125, 16, 512)
    plain = AttentionOptions(head_dim=16, reallocate_mean=False, compression=0.25).method(512)
    assert plain == sq.method_from_name("sparq", 0.25, 16, 512) and not plain.reallocate_mean
    assert AttentionOptions(head_dim=16, rank=4, top_k=9, local_window=2).method(512) == sq.SparQ(4, 9, 2)
    for bad, message in [({"q_heads": 3, "kv_heads": 2}, "--q-heads=3 must be a multiple of --kv-heads=2"),
                         ({"rank": 4}, "--rank and --top-k go together"),
                         ({"rank": 17, "top_k": 8, "head_dim": 16}, "--rank=17 must be <= --head-dim=16"),
                         ({"rank": 4, "top_k": 8, "local_window": 9}, "local_window must be <= top_k"),
                         ({"plot": "x.png"}, "--plot needs --sweep")]:
        with pytest.raises(ValueError, match=message):
            AttentionOptions(**bad)


def test_decode_options_override_the_preset():
    config = DecodeOptions(preset="smollm2-135m", layers=2, vocab=256, seq_lens=(64, 128), steps=3).config()
    assert (config.num_hidden_layers, config.vocab_size, config.hidden_size, config.num_attention_heads,
            config.num_key_value_heads, config.head_dim, config.tie_word_embeddings,
            config.max_position_embeddings) == (2, 256, 576, 9, 3, 64, True, 128 + 3 + 1)
    with pytest.raises(ValueError, match="--q-heads=4 must be a multiple of --kv-heads=3"):
        DecodeOptions(preset="smollm2-135m", q_heads=4)


def test_a_failing_candidate_is_left_out(capsys):
    """A kernel that does not compile on the device costs its own row, not the run."""
    def broken():
        raise RuntimeError("no such kernel")

    fns, args, rows = {"ok": lambda: jnp.ones(2), "bad": broken}, {"ok": (), "bad": ()}, {"ok": 1, "bad": 2}
    drop_failing(fns, args, rows)
    assert list(fns) == list(args) == list(rows) == ["ok"]
    assert "bad failed and is left out: RuntimeError: no such kernel" in capsys.readouterr().err


def test_model_benchmark_reports_ours_and_torch(tmp_path):
    import models

    pytest.importorskip("transformers")
    config = models.ModelConfig(model_type="llama", vocab_size=300, hidden_size=64, intermediate_size=48,
                                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                max_position_embeddings=256)
    models.save_pretrained(models.init_model(config, seed=0), str(tmp_path / "model"))
    doc = run_model(ModelOptions(model=str(tmp_path / "model"), contexts=(96, 160), batches=(1, 2), reps=1,
                                 new_tokens=3))
    assert json.loads(json.dumps(doc)) == doc
    assert doc["config"]["torch_peer"] == "transformers" and doc["config"]["compression"] == 0.125
    assert [(r["batch"], r["context"]) for r in doc["results"]] == [(1, 96), (2, 96), (1, 160), (2, 160)]
    for r in doc["results"]:
        sparq = sq.method_from_name("sparq", 0.125, 16, r["context"])
        assert r["sparq_method"] == {"rank": sparq.rank, "top_k": sparq.top_k, "local_window": sparq.local_window}
        assert r["new_tokens"] == 3
        for name in ("dense", "sparq", "torch"):
            assert r[name]["tokens_per_s"] == pytest.approx(r["batch"] * 1e3 / r[name]["step_ms"])
        assert r["sparq_speedup"] == pytest.approx(r["dense"]["step_ms"] / r["sparq"]["step_ms"])


def test_model_benchmark_dtypes_side_by_side(tmp_path):
    """--dtypes float32,bfloat16: both dtypes in one run, each with its logit error against float32
    (ours and transformers'), the ratios computed from the rows; bad combinations refused."""
    import models

    pytest.importorskip("transformers")
    config = models.ModelConfig(model_type="llama", vocab_size=300, hidden_size=64, intermediate_size=48,
                                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                max_position_embeddings=256)
    models.save_pretrained(models.init_model(config, seed=0), str(tmp_path / "model"))
    doc = run_model(ModelOptions(model=str(tmp_path / "model"), contexts=(96,), batches=(1,), reps=1, new_tokens=3,
                                 dtypes=("float32", "bfloat16")))
    assert json.loads(json.dumps(doc)) == doc and doc["config"]["dtypes"] == ["float32", "bfloat16"]
    (row,) = doc["results"]
    assert row["float32"]["logit_error"] == {"max_abs": 0.0, "rms": 0.0}
    assert row["float32"]["torch_logit_error"] == {"max_abs": 0.0, "rms": 0.0}
    for key in ("logit_error", "torch_logit_error"):
        assert 0 < row["bfloat16"][key]["rms"] <= row["bfloat16"][key]["max_abs"] < 1
    ratios = row["bfloat16_vs_float32"]
    assert ratios["decode"] == pytest.approx(row["bfloat16"]["dense"]["tokens_per_s"] / row["float32"]["dense"]["tokens_per_s"])
    assert ratios["prefill"] == pytest.approx(row["bfloat16"]["prefill_tokens_per_s"] / row["float32"]["prefill_tokens_per_s"])
    assert ratios["logit_error_vs_torch"]["rms"] == pytest.approx(
        row["bfloat16"]["logit_error"]["rms"] / row["bfloat16"]["torch_logit_error"]["rms"])
    with pytest.raises(ValueError, match="--dtypes must name float32"):
        ModelOptions(model="x", dtypes=("bfloat16", "float16"))
    with pytest.raises(ValueError, match="--dtype\\(s\\) must be among"):
        ModelOptions(model="x", dtypes=("float32", "int8"))
    refused = _script("model", "--model", "x", "--dtype", "bfloat16", "--dtypes", "float32,bfloat16")
    assert refused.returncode == 2 and "--dtypes does not apply with --dtype" in refused.stderr


def _random_cache(rng, b, hkv, s, d, lengths, transposed_keys=True):
    k = rng.standard_normal((b, hkv, s, d)).astype(np.float32)
    v = rng.standard_normal((b, hkv, s, d)).astype(np.float32)
    return sq.KVCache.from_kv(k, v, jnp.asarray(lengths, jnp.int32), transposed_keys=transposed_keys)


def test_stages_compose_to_attend():
    """stages.run (sparq with record=True: what the benchmark's breakdown times) gives attend's output,
    for each SparQ variant, with K^T or K alone, a sliding window and rows of different lengths, and
    each recorded part runs again to its recorded output."""
    rng = np.random.default_rng(0)
    b, hq, hkv, s, d = 2, 4, 2, 64, 16
    q = jnp.asarray(rng.standard_normal((b, hq, d)), jnp.float32)
    caches = {kt: _random_cache(np.random.default_rng(1), b, hkv, s, d, [64, 37], kt) for kt in (True, False)}
    for method, window, kt in [(sq.SparQ(4, 12, 3), None, True), (sq.SparQ(4, 12, 3, reallocate_mean=False), 20, False),
                               (sq.SparQ(3, 10, 2, group_scores="logits"), 20, True), (sq.SparQ(16, 80), None, False)]:
        out, parts = stages.run(q, caches[kt], method, window=window)
        want = sq.attend(q, caches[kt], method, window=window, impl="xla")[0]
        assert out.shape == (b, hq, d) and out.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(out), np.asarray(want), rtol=1e-5, atol=1e-6,
                                   err_msg=f"{method}, window={window}, transposed_keys={kt}")
        assert list(parts) == ["scores", "top-k"] + ["v_bar"] * method.reallocate_mean + ["steps 2+3"]
        last = parts["steps 2+3"]
        np.testing.assert_array_equal(np.asarray(last.fn(*last.args)).reshape(out.shape), np.asarray(out))


def test_stages_against_numpy():
    """The recorded parts against a NumPy transcription of the paper's steps: s_hat from the r
    components of largest |q| (summed over the group) and the temperature, the top-k of the scores,
    and the mean value."""
    rng = np.random.default_rng(1)
    b, hq, hkv, s, d, r, k = 2, 6, 2, 48, 8, 3, 10
    cache = _random_cache(rng, b, hkv, s, d, [48, 30])
    keys, values = np.asarray(cache.k, np.float64), np.asarray(cache.v, np.float64)     # zero past each row's length
    q = rng.standard_normal((b, hq, d)).astype(np.float32)
    _, parts = stages.run(jnp.asarray(q), cache, sq.SparQ(r, k, 2, reallocate_mean=True))
    score, s_hat = (np.asarray(x) for x in parts["scores"].out)
    qg = q.reshape(b, hkv, hq // hkv, d).astype(np.float64)
    i1 = np.argsort(-np.abs(qg).sum(2), axis=-1, kind="stable")[..., :r]
    q1 = np.take_along_axis(qg, i1[:, :, None, :], axis=-1)
    k1 = np.take_along_axis(keys, i1[:, :, None, :], axis=-1)                           # [B, Hkv, S, r]
    tau = np.sqrt(d * np.abs(q1).sum(-1) / np.abs(qg).sum(-1))
    lengths = np.array([48, 30])
    valid = np.arange(s)[None, :] < lengths[:, None]
    z = np.where(valid[:, None, None, :], np.einsum("bhgr,bhsr->bhgs", q1, k1) / tau[..., None], -np.inf)
    want = np.exp(z - z.max(-1, keepdims=True))
    np.testing.assert_allclose(s_hat, want / want.sum(-1, keepdims=True), rtol=1e-4, atol=1e-6)
    i2 = np.asarray(parts["top-k"].out)
    np.testing.assert_array_equal(i2, np.sort(np.argsort(-score, axis=-1, kind="stable")[..., :k], axis=-1))
    v_bar = values.sum(2) / lengths[:, None, None]
    np.testing.assert_allclose(np.asarray(parts["v_bar"].out), v_bar, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="backend must be one of"):
        stages.run(jnp.asarray(q), cache, sq.SparQ(r, k), backend="cuda")


def test_approx_scores_match_the_paper():
    """sparq.approx_scores (the XLA backends' scores part) against a NumPy transcription of Eq. 9 and
    the group-summed softmax, with the local window forced in and masked positions last."""
    rng = np.random.default_rng(0)
    b, h, g, d, r, s = 2, 2, 3, 8, 3, 20
    qf = rng.standard_normal((b, h, g, d)).astype(np.float32)
    i1 = np.argsort(-np.abs(qf).sum(2), axis=-1)[..., :r]
    q1 = np.take_along_axis(qf, i1[:, :, None, :], axis=-1)
    logits1 = rng.standard_normal((b, h, g, s)).astype(np.float32)
    lengths = np.array([20, 13])
    mask = np.arange(s)[None, :] < lengths[:, None]
    s_hat, score = approx_scores(jnp.asarray(qf), jnp.asarray(q1), jnp.asarray(logits1), jnp.asarray(mask),
                                        jnp.asarray(lengths), 4)
    tau = np.sqrt(d * np.abs(q1).sum(-1) / np.abs(qf).sum(-1))
    z = np.where(mask[:, None, None, :], logits1 / tau[..., None], -np.inf)
    want = np.exp(z - z.max(-1, keepdims=True))
    want /= want.sum(-1, keepdims=True)
    np.testing.assert_allclose(np.asarray(s_hat), want, rtol=1e-5, atol=1e-7)
    want_score = want.sum(2)
    for row, n in enumerate(lengths):
        want_score[row, :, n - 4:n] = np.inf
        want_score[row, :, n:] = -np.inf
    np.testing.assert_allclose(np.asarray(score), want_score, rtol=1e-5, atol=1e-7)


# An optimized module in the shape XLA:GPU prints: a decode loop whose body holds fusions, a Triton
# call, a cuBLAS call, a nested loop (its body: 2 launches, its condition: 1) and a conditional.
_HLO = """HloModule jit__decode_loop, is_scheduled=true

%fused_a (p: f32[4]) -> f32[4] {
  %p = f32[4]{0} parameter(0)
  ROOT %n = f32[4]{0} negate(%p)
}

%inner_body (t: (s32[], f32[4])) -> (s32[], f32[4]) {
  %t = (s32[], f32[4]{0}) parameter(0)
  %i = s32[] get-tuple-element(%t), index=0
  %x = f32[4]{0} get-tuple-element(%t), index=1
  %f1 = f32[4]{0} fusion(%x), kind=kLoop, calls=%fused_a
  %inc = s32[] fusion(%i), kind=kLoop, calls=%fused_a
  ROOT %r = (s32[], f32[4]{0}) tuple(%inc, %f1)
}

%inner_cond (t: (s32[], f32[4])) -> pred[] {
  %t = (s32[], f32[4]{0}) parameter(0)
  ROOT %c = pred[] fusion(%t), kind=kLoop, calls=%fused_a
}

%branch_small (x: f32[4]) -> f32[4] {
  %x = f32[4]{0} parameter(0)
  ROOT %b = f32[4]{0} fusion(%x), kind=kLoop, calls=%fused_a
}

%branch_big (x: f32[4]) -> f32[4] {
  %x = f32[4]{0} parameter(0)
  %b1 = f32[4]{0} fusion(%x), kind=kLoop, calls=%fused_a
  %b2 = f32[4]{0} copy(%b1)
  ROOT %b3 = f32[4]{0} sort(%b2), dimensions={0}, to_apply=%fused_a
}

%body (s: (s32[], f32[4])) -> (s32[], f32[4]) {
  %s = (s32[], f32[4]{0}) parameter(0)
  %x = f32[4]{0} get-tuple-element(%s), index=1
  %k = f32[4]{0} custom-call(%x), custom_call_target="__gpu$xla.gpu.triton", backend_config={"name":"sparq_top_k"}
  %g = (f32[4]{0}, s8[0]{0}) custom-call(%k, %x), custom_call_target="__cublas$gemm"
  %g0 = f32[4]{0} get-tuple-element(%g), index=0
  %w = (s32[], f32[4]{0}) while(%s), condition=%inner_cond, body=%inner_body
  %wx = f32[4]{0} get-tuple-element(%w), index=1
  %p = pred[] constant(true)
  %c = f32[4]{0} conditional(%p, %wx, %wx), true_computation=%branch_big, false_computation=%branch_small
  %b = f32[4]{0} bitcast(%c)
  ROOT %r = (s32[], f32[4]{0}) tuple(%g0, %b)
}

%cond (s: (s32[], f32[4])) -> pred[] {
  %s = (s32[], f32[4]{0}) parameter(0)
  ROOT %lt = pred[] fusion(%s), kind=kLoop, calls=%fused_a
}

ENTRY %main (a: f32[4]) -> f32[4] {
  %a = f32[4]{0} parameter(0)
  %init = (s32[], f32[4]{0}) tuple(%a, %a)
  %small = (s32[], f32[4]{0}) while(%init), condition=%inner_cond, body=%inner_body
  %loop = (s32[], f32[4]{0}) while(%small), condition=%cond, body=%body
  ROOT %out = f32[4]{0} get-tuple-element(%loop), index=1
}
"""


def test_hlo_launches_counts_one_decode_step():
    # body: triton + gemm + (nested loop: 2 + 1) + (larger branch: 3) = 8; condition: 1
    assert hlo.hlo_launches(_HLO) == {"launches": 9, "pallas": 1, "nested_loops": 1}
    assert hlo.hlo_launches("HloModule m\n\nENTRY %main (a: f32[]) -> f32[] {\n"
                            "  ROOT %a = f32[] parameter(0)\n}\n") == {"launches": 0, "pallas": 0, "nested_loops": 0}


def test_dump_launches_reads_an_xla_dump(tmp_path):
    (tmp_path / "module_0001.jit__decode_loop.sm_9.0_gpu_after_optimizations.txt").write_text(_HLO)
    (tmp_path / "module_0002.jit_other.sm_9.0_gpu_after_optimizations.txt").write_text(_HLO)
    (row,) = hlo.dump_launches(str(tmp_path), 3)
    assert row["launches"] == 9 and row["per_layer"] == 3.0 and row["file"].startswith("module_0001")
    assert [r["file"] for r in hlo.dump_launches(str(tmp_path), 3, module="other")] == [
        "module_0002.jit_other.sm_9.0_gpu_after_optimizations.txt"]
    with pytest.raises(FileNotFoundError, match="no '\\*decode_loop\\*after_optimizations.txt'"):
        hlo.dump_launches(str(tmp_path / "missing"), 3)


def test_command_line_errors_name_the_flag():
    """The options' checks reach the user as argparse errors (device_check --smoke runs the rest)."""
    bad = _script("attention", "--q-heads", "3", "--kv-heads", "2")
    assert bad.returncode == 2 and "error: --q-heads=3 must be a multiple of --kv-heads=2" in bad.stderr


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler")
def test_row_reads_probe_runs_and_rejects_bad_arguments(tmp_path):
    exe = tmp_path / "row_reads"
    subprocess.run(["cc", "-O2", os.path.join(ROOT, "scripts", "row_reads.c"), "-o", str(exe), "-lm"],
                   check=True, capture_output=True)
    ok = subprocess.run([str(exe), "--prefetch", "4", "4", "256", "32", "16"], capture_output=True, text=True,
                        env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert ok.returncode == 0, ok.stderr
    assert "4 heads, S=256, k=32 rows of D=16" in ok.stdout and "random rows + attention" in ok.stdout
    bad = subprocess.run([str(exe), "4", "16", "32", "16"], capture_output=True, text=True)
    assert bad.returncode == 2 and "k <= S" in bad.stderr and "4 16 32 16" in bad.stderr
    assert subprocess.run([str(exe), "--help"], capture_output=True).returncode == 0


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
def test_device_check_smoke_runs_every_stage(tmp_path):
    """scripts/device_check.sh --smoke: every stage of the GPU run at tiny shapes on CPU (the kernels
    interpreted), so the prepared script has no Python piece that fails before it reaches a GPU."""
    env = {**os.environ, "OUT": str(tmp_path), "PY": sys.executable}
    run = subprocess.run(["bash", os.path.join(ROOT, "scripts", "device_check.sh"), "--smoke"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "rc=0" in run.stdout and "rc=1" not in run.stdout and "Traceback" not in run.stdout, run.stdout[-4000:]
    docs = json.loads((tmp_path / "decode_gpu.json").read_text())
    assert [d["config"]["batch"] for d in docs] == [1, 2]
    assert all(r["speedup"] == pytest.approx(r["dense"]["loop_ms"] / r["sparq"]["loop_ms"])
               for d in docs for r in d["results"])
    for name in ("decode_smollm2_gpu", "decode_gpu_xla_command_buffers"):
        doc = json.loads((tmp_path / f"{name}.json").read_text())
        assert doc["config"]["batch"] == 1 and [r["seq_len"] for r in doc["results"]] == [64]
    # SmolLM2-135M's widths, its depth and vocabulary overridden
    smol = json.loads((tmp_path / "decode_smollm2_gpu.json").read_text())
    c = smol["config"]
    assert (c["num_hidden_layers"], c["vocab_size"], c["hidden_size"], c["num_attention_heads"],
            c["num_key_value_heads"], c["head_dim"], c["intermediate_size"], c["tie_word_embeddings"]) == \
        (2, 256, 576, 9, 3, 64, 1536, True)
    (row,) = smol["results"]
    assert (row["seq_len"], row["batch"], row["steps"]) == (64, 1, 3)
    for name in ("dense", "sparq"):
        r = row[name]
        assert r["attention_share"] == pytest.approx(r["attention_ms"] / r["step_ms"])
        assert r["step_ms"] == pytest.approx(r["loop_ms"] / 3)
        assert r["tokens_per_s"] == pytest.approx(1e3 / r["step_ms"])
    assert row["speedup"] == pytest.approx(row["dense"]["loop_ms"] / row["sparq"]["loop_ms"])
    assert 0 <= row["tokens_agree"] <= 1
    assert (row["sparq_config"]["rank"], row["sparq_config"]["top_k"]) == (16, 6)   # for_compression(1/4, 64, 64)
    for name in ("a", "b"):
        bench = json.loads((tmp_path / f"bench_gpu_{name}.json").read_text())
        rows = {(r["method"], r["impl"]): r for r in bench["rows"]}
        assert rows[("sparq", "pallas_gpu")]["rel_err"] < 1e-5   # against sparq_reference, fp32 on CPU
    breakdown = json.loads((tmp_path / "bench_gpu_b.json").read_text())["breakdown"]
    assert {"scores", "top-k", "steps 2+3", "top-k: Pallas, a program per row"} <= set(breakdown["pallas_gpu"])
    assert {"scores", "top-k", "steps 2+3"} <= set(breakdown["pallas_gpu_unfused"])
    launches = json.loads((tmp_path / "launches.json").read_text())
    assert len(launches) == 4 and all(r["launches"] > 0 for r in launches)   # 2 methods x 2 batch sizes
    assert len(list((tmp_path / "xla_dump").glob("*decode_loop*after_optimizations.txt"))) == 4

"""scripts/benchmark.py on tiny shapes (what it reports, not how fast) and scripts/row_reads.c."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import benchmark  # noqa: E402


def test_attention_breakdown_times_every_stage(tmp_path):
    out = tmp_path / "bench.json"
    benchmark.main(["attention", "--batch", "2", "--q-heads", "4", "--kv-heads", "2", "--seq-len", "512",
                    "--head-dim", "16", "--rank", "4", "--top-k", "64", "--local-window", "8",
                    "--reps", "1", "--warmup", "1", "--breakdown", "--json", str(out)])
    result = json.loads(out.read_text())
    assert [r["method"] for r in result["rows"]] == ["dense", "sparq"]
    assert all(r["rel_err_vs_xla"] == 0 for r in result["rows"])
    stages = result["breakdown"]["xla"]
    from sparq_jax import native
    want = {"step 1", "softmax + group sum", "top-k: counting (XLA)", "top-k: lax.top_k", "alpha (s_hat at top-k)",
            "steps 2+3"} | ({"top-k: native (CPU)"} if native.available()[0] else set())
    assert set(stages) == want
    assert all(s["ms"] > 0 and s["bytes"] > 0 for s in stages.values())
    # step 1 reads r rows of S per (row, KV head); steps 2+3 read k rows of K and of V (fp32)
    assert stages["step 1"]["bytes"] == 2 * 2 * 4 * 512 * 4
    assert stages["steps 2+3"]["bytes"] == 2 * 2 * 2 * 64 * 16 * 4


def test_a_failing_candidate_is_left_out(capsys):
    """A kernel that does not compile on the device costs its own row, not the run."""
    import jax.numpy as jnp

    def broken():
        raise RuntimeError("no such kernel")

    fns, args, rows = {"ok": lambda: jnp.ones(2), "bad": broken}, {"ok": (), "bad": ()}, {"ok": 1, "bad": 2}
    benchmark.drop_failing(fns, args, rows)
    assert list(fns) == list(args) == list(rows) == ["ok"]
    assert "bad failed and is left out: RuntimeError: no such kernel" in capsys.readouterr().err


def test_model_benchmark_reports_ours_and_torch(tmp_path):
    import models

    pytest.importorskip("transformers")
    config = models.ModelConfig(model_type="llama", vocab_size=300, hidden_size=64, intermediate_size=48,
                                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                max_position_embeddings=256)
    models.save_pretrained(models.init_model(config, seed=0), str(tmp_path / "model"))
    out = tmp_path / "bench.json"
    benchmark.main(["model", "--model", str(tmp_path / "model"), "--contexts", "96,160", "--batches", "1,2",
                    "--reps", "1", "--new-tokens", "3", "--json", str(out)])
    result = json.loads(out.read_text())
    assert result["config"]["torch_peer"] == "transformers"
    assert [(r["batch"], r["context"]) for r in result["results"]] == [(1, 96), (2, 96), (1, 160), (2, 160)]
    for r in result["results"]:
        assert r["prefill_tokens_per_s"] > 0 and r["torch"]["prefill_tokens_per_s"] > 0
        assert r["dense"]["tokens_per_s"] > 0 and r["sparq"]["tokens_per_s"] > 0 and r["torch"]["tokens_per_s"] > 0
        assert r["sparq_method"]["top_k"] < r["context"]


def test_approx_scores_match_the_paper():
    """attention._approx_scores (what the breakdown times) against a NumPy transcription of Eq. 9 and
    the group-summed softmax, with the local window forced in and masked positions last."""
    import jax.numpy as jnp
    from sparq_jax import attention as att

    rng = np.random.default_rng(0)
    b, h, g, d, r, s = 2, 2, 3, 8, 3, 20
    qf = rng.standard_normal((b, h, g, d)).astype(np.float32)
    i1 = np.argsort(-np.abs(qf).sum(2), axis=-1)[..., :r]
    q1 = np.take_along_axis(qf, i1[:, :, None, :], axis=-1)
    logits1 = rng.standard_normal((b, h, g, s)).astype(np.float32)
    lengths = np.array([20, 13])
    mask = np.arange(s)[None, :] < lengths[:, None]
    s_hat, score = att._approx_scores(jnp.asarray(qf), jnp.asarray(q1), jnp.asarray(logits1), jnp.asarray(mask),
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
    assert benchmark.hlo_launches(_HLO) == {"launches": 9, "pallas": 1, "nested_loops": 1}
    assert benchmark.hlo_launches("HloModule m\n\nENTRY %main (a: f32[]) -> f32[] {\n"
                                  "  ROOT %a = f32[] parameter(0)\n}\n") == {"launches": 0, "pallas": 0,
                                                                             "nested_loops": 0}


def test_launches_reads_an_xla_dump(tmp_path):
    (tmp_path / "module_0001.jit__decode_loop.sm_9.0_gpu_after_optimizations.txt").write_text(_HLO)
    (tmp_path / "module_0002.jit_other.sm_9.0_gpu_after_optimizations.txt").write_text(_HLO)
    out = tmp_path / "launches.json"
    benchmark.main(["launches", str(tmp_path), "--layers", "3", "--json", str(out)])
    (row,) = json.loads(out.read_text())
    assert row["launches"] == 9 and row["per_layer"] == 3.0 and row["file"].startswith("module_0001")
    with pytest.raises(SystemExit, match="no '\\*decode_loop\\*after_optimizations.txt'"):
        benchmark.main(["launches", str(tmp_path / "missing"), "--layers", "3"])


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
    assert all(r["speedup"] > 0 for d in docs for r in d["results"])
    for name in ("decode_smollm2_gpu", "decode_gpu_xla_command_buffers"):
        doc = json.loads((tmp_path / f"{name}.json").read_text())
        assert doc["config"]["batch"] == 1 and doc["results"][0]["speedup"] > 0
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
        assert r["loop_ms"] > 0 and r["attention_ms"] > 0
        assert r["step_ms"] == pytest.approx(r["loop_ms"] / 3)
        assert r["tokens_per_s"] == pytest.approx(1e3 / r["step_ms"])
    assert row["speedup"] == pytest.approx(row["dense"]["loop_ms"] / row["sparq"]["loop_ms"])
    assert 0 <= row["tokens_agree"] <= 1 and row["cache_copy_ms"] > 0
    assert (row["sparq_config"]["rank"], row["sparq_config"]["top_k"]) == (16, 6)   # for_compression(1/4, 64, 64)
    for name in ("a", "b"):
        bench = json.loads((tmp_path / f"bench_gpu_{name}.json").read_text())
        rows = {(r["method"], r["impl"]): r for r in bench["rows"]}
        assert rows[("sparq", "pallas_gpu")]["rel_err_vs_xla"] < 1e-5   # fp32 on CPU
    stages = json.loads((tmp_path / "bench_gpu_b.json").read_text())["breakdown"]["pallas_gpu"]
    assert {"step 1 + scores, fused", "steps 2+3 + alpha, fused", "top-k: Pallas, a program per row"} <= set(stages)
    launches = json.loads((tmp_path / "launches.json").read_text())
    assert len(launches) == 4 and all(r["launches"] > 0 for r in launches)   # 2 methods x 2 batch sizes
    assert len(list((tmp_path / "xla_dump").glob("*decode_loop*after_optimizations.txt"))) == 4

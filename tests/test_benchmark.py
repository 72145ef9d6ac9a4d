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

"""The evaluation API: SparQ and the baselines scored on a LanguageModel, every scored token out of a
decode step run with the method, from one dense prefill shared by all methods.

    import models
    from models import evaluation

    lm = models.from_pretrained("smollm2-135m-instruct")
    rows = evaluation.evaluate(lm, ["passkey"], ["dense", "sparq", "h2o"], ratios=[1 / 8],
                               limit=10, context_length=1024)
    print(evaluation.format_table(rows))

- evaluate(lm, tasks, methods, ratios, ...) -> rows; prepare(...): its checks, before any weight is read;
  the tasks' prefill_* / run_* pairs (RUNNERS)
- compare_methods(lm, prompts, methods, ...): the main job (answers, tokens/s, transfer ratios)
- prompts: heldout_text, build_samples, fact_prompts, passkey_prompts (the builders are models.evaluation.tasks)
- results: ResultsFile (resumable JSON, stored per cell), check_output_path, format_table, plot
Methods by name: sparq_jax.method_from_name / METHOD_NAMES.
"""
from sparq_jax import METHOD_NAMES, method_from_name

from .compare import (Comparison, MethodRun, chat_prompts, compare_methods, default_prompts, prepare_comparison,
                      tokenize_prompts)
from .harness import (BPC_SCORED, COMPRESSION, DEFAULT_N, RUNNERS, Decoding, Grid, Prefilled, configurations, evaluate,
                      prepare, still_matching, token_nll)
from .prompts import (FACT_NAMES, HELDOUT, MULTIKEY_KEYS, TASKS, build_samples, chars_per_token, fact_prompts,
                      heldout_text, passkey_prompts)
from .results import SCORE_LABEL, ResultsFile, check_output_path, format_table, plot, plot_needle

__all__ = ["BPC_SCORED", "COMPRESSION", "Comparison", "DEFAULT_N", "Decoding", "FACT_NAMES", "HELDOUT", "METHOD_NAMES",
           "Grid", "MULTIKEY_KEYS", "MethodRun", "Prefilled", "RUNNERS", "ResultsFile", "SCORE_LABEL", "TASKS", "build_samples",
           "chars_per_token", "chat_prompts", "check_output_path", "compare_methods", "configurations", "default_prompts", "evaluate",
           "fact_prompts", "format_table", "heldout_text", "method_from_name", "passkey_prompts", "plot", "plot_needle", "prepare", "prepare_comparison",
           "still_matching", "tokenize_prompts", "token_nll"]

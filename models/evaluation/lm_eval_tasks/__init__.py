"""lm-evaluation-harness task definitions shipped with sparq-jax (YAML; documents built offline at load
time by utils.py). The folder is models.evaluation.lm_eval.TASKS_DIR, passed to lm-eval as an include path."""

"""Issue 24's grid check: a 16-cell evaluation grid in one process, no jax.clear_caches: peak RSS vs a
single cell's (run with --single in its own process), and decode-step compiles per method."""
import json, resource, sys, time
import models
from models import evaluation
from models import lm as lmmod

single = "--single" in sys.argv
lm = models.from_pretrained("smollm2-135m-instruct")
methods = ["dense"] if single else ["dense", "sparq", "sparq-mean", "sparq-logits", "h2o", "streaming"]
t = time.time()
rows = evaluation.evaluate(lm, ["passkey"], methods, [1 / 4, 1 / 8, 1 / 16], limit=20, context_length=2048, batch=10,
                           progress=False)
out = {"single": single, "cells": len(rows), "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
       "decode_step_compiles": lmmod._decode_step_jit._cache_size(), "prefill_compiles": lmmod._prefill_jit._cache_size(),
       "seconds": time.time() - t, "rows": rows}
print(json.dumps(out))

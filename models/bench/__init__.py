"""The benchmarks behind scripts/benchmark.py, one module a subcommand.

- timing: interleaved median timing, dropping a candidate that fails, the environment of a result;
- attention: one decode step of attention, Dense vs SparQ (and its stages one by one);
- decode: whole jitted decode loops (lm.decode) of a random-weight model on random caches;
- model: prefill and decode of a real checkpoint, ours against transformers' torch model;
- hlo: kernel launches per decode step, read from an XLA dump of the optimized HLO.

Each run_* takes an options dataclass whose fields are the subcommand's flags (its defaults are the
flags' defaults) and returns the JSON document the script writes, printing a line per case as it goes.
"""

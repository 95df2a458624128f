"""Model sources for moec's CLI, benchmarks and tests: embedded MoE models (``builtin``), small
random transformers models (``hf``) and the SPEC strings that name them (``spec``)."""

"""Graph passes on the moec IR, one per file; ``pipeline.run_pipeline`` runs them in order."""

from moec.passes.pipeline import PASS_NAMES, PassRecord, run_pipeline  # noqa: F401

"""Evaluation: a suite of structured prompts, a deterministic image checker (with real OCR) and, in
`fluxkit.eval.run` (not imported here so `python -m fluxkit.eval.run` runs cleanly), the runner."""

from fluxkit.eval.checker import CheckResult, check, segment
from fluxkit.eval.ocr import OcrUnavailableError, char_accuracy, read_line
from fluxkit.eval.suite import CATEGORIES, EvalItem, build_suite

__all__ = ["CATEGORIES", "CheckResult", "EvalItem", "OcrUnavailableError", "build_suite", "char_accuracy", "check",
           "read_line", "segment"]

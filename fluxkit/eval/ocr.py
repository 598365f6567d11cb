"""Sign text reading with the real tesseract OCR binary (Debian package `tesseract-ocr`), called as a subprocess."""

from __future__ import annotations

import io
import os
import shutil
import subprocess

import numpy as np
from PIL import Image

UPPERCASE = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


class OcrUnavailableError(RuntimeError):
    """The tesseract binary is not installed."""


def tesseract_binary() -> str:
    path = shutil.which("tesseract")
    if path is None:
        raise OcrUnavailableError("the `tesseract` binary was not found on PATH; sign checks need real OCR: "
                                  "run `apt-get install tesseract-ocr` (Debian/Ubuntu)")
    return path


def prepare_crop(crop: np.ndarray, height: int = 64, pad: int = 20) -> Image.Image:
    """Grayscale, dark-on-light crop resized to `height` pixels with a light margin: what tesseract reads best
    (letters about 30 px tall; much larger ones read worse).

    crop: (h, w, 3) uint8 region holding one line of text on a board.
    """
    if crop.ndim != 3 or crop.shape[2] != 3 or crop.shape[0] < 2 or crop.shape[1] < 2:
        raise ValueError(f"crop must be (h, w, 3) with h, w >= 2, got shape {crop.shape}")
    gray = crop.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)  # (h, w) luma
    lo, hi = np.percentile(gray, 2), np.percentile(gray, 98)
    gray = np.clip((gray - lo) / max(hi - lo, 1.0), 0.0, 1.0)  # (h, w) stretched to [0, 1]
    if np.median(gray) < 0.5:  # the board (most of the crop) is dark: invert so letters are dark
        gray = 1.0 - gray
    image = Image.fromarray(np.rint(gray * 255).astype(np.uint8), "L")
    width = max(1, round(image.width * height / image.height))
    image = image.resize((width, height), Image.Resampling.BICUBIC)
    padded = Image.new("L", (image.width + 2 * pad, image.height + 2 * pad), 255)
    padded.paste(image, (pad, pad))
    return padded


def _tesseract(image: Image.Image, psm: int, whitelist: str, timeout_s: float) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    # One OpenMP thread: evaluation runs many small OCR calls, threads only add contention.
    env = {**os.environ, "OMP_THREAD_LIMIT": "1"}
    command = [tesseract_binary(), "stdin", "stdout", "--psm", str(psm), "-l", "eng",
               "-c", f"tessedit_char_whitelist={whitelist}"]
    done = subprocess.run(command, input=buffer.getvalue(), capture_output=True, timeout=timeout_s, env=env,
                          check=False)
    if done.returncode != 0:
        raise RuntimeError(f"tesseract failed (exit {done.returncode}): {done.stderr.decode(errors='replace')}")
    return "".join(ch for ch in done.stdout.decode(errors="replace") if ch in whitelist)


# (page segmentation mode, crop height) tried in order until one read is non-empty. Mode 7 (one text line) reads
# best, but its line finder sometimes drops a whole short word at one scale ('INN') that it reads at another;
# mode 13 (raw line, no layout analysis) is the last resort.
READ_ATTEMPTS = ((7, 64), (7, 40), (13, 40))


def read_line(crop: np.ndarray, whitelist: str = UPPERCASE, attempts: tuple[tuple[int, int], ...] = READ_ATTEMPTS,
              timeout_s: float = 30.0) -> str:
    """Text of a single line on a board crop, restricted to `whitelist`, spaces removed ("" if none read)."""
    if not attempts:
        raise ValueError("attempts must name at least one (psm, height)")
    text = ""
    for psm, height in attempts:
        text = _tesseract(prepare_crop(crop, height=height), psm, whitelist, timeout_s)
        if text:
            break
    return text


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insertions, deletions, substitutions each cost 1)."""
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        current = [i]
        for j, cb in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def char_accuracy(expected: str, read: str) -> float:
    """1 - edit distance / len(expected), floored at 0: 1.0 is an exact read."""
    if not expected:
        raise ValueError("expected text must be non-empty")
    return max(0.0, 1.0 - edit_distance(expected, read) / len(expected))

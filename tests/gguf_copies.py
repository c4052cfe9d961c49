"""A second real GGUF for tests and benchmarks: the embedded model requantized by llama.cpp's
own quantizer (through llama-cpp-python), so nothing is downloaded."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

_QUANTIZE = (
    "import sys, llama_cpp\n"
    "p = llama_cpp.llama_model_quantize_default_params()\n"
    "p.ftype, p.allow_requantize = llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0, True\n"
    "sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), p))"
)


def quantize_q8(source: Path, target: Path) -> None:
    """A Q8_0 copy of the GGUF `source` at `target`, made in a child (it prints every tensor)."""
    subprocess.run(
        [sys.executable, "-c", _QUANTIZE, str(source), str(target)],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

"""The ceiling for one stream: llama-cpp-python decoding in-process, no HTTP, no server.

Prints JSON: decode tokens/s over `--tokens` tokens after the first (prefill excluded), with the
same model and the same llama.cpp build the server uses.
"""

from __future__ import annotations

import argparse
import json
import os
import time

from llama_cpp import Llama

from vllm_obtain.weights.catalog import load_catalog, packaged_file


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    source = load_catalog()["models"]["smollm2-135m-instruct"]["llama.cpp"]
    model_path = packaged_file(source["package"], source["file"])
    llm = Llama(model_path=str(model_path), n_ctx=2048, n_threads=os.cpu_count(), verbose=False)
    prompt = llm.tokenize(
        b"<|im_start|>user\nWrite a short story about a lighthouse keeper.<|im_end|>\n"
        b"<|im_start|>assistant\n",
        add_bos=False,
        special=True,
    )
    rates = []
    for _ in range(args.runs):
        llm.reset()
        first = 0.0
        tokens = llm.generate(prompt, temp=0.7, top_p=1.0, top_k=0, min_p=0.0)
        for produced, _token in enumerate(tokens, start=1):
            if produced == 1:
                first = time.perf_counter()
            if produced > args.tokens:
                break
        rates.append(args.tokens / (time.perf_counter() - first))
    best = round(max(rates), 1)
    print(json.dumps({"decode_tokens_per_s": best, "runs": [round(r, 1) for r in rates]}))


if __name__ == "__main__":
    main()

"""The ceiling for a batching server: B sequences decoded in lockstep with llama-cpp-python's
low-level API, in-process, no HTTP, no scheduler.

The prompts are `vllm-obtain bench`'s chat prompts rendered with the model's own template (as
the server renders them); all B are prefilled in one llama_decode, then each step decodes one
token per sequence and samples every row at once in numpy (argmax when greedy; softmax and one
draw per row otherwise). Prints one JSON line per (streams, temperature): tokens/s over the
whole run, prefill included, as `bench` counts a server's.

Usage: raw_lockstep.py [--streams 1,16] [--tokens 128] [--temperatures 0,0.8] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import llama_cpp as L
import numpy as np
from llama_cpp._logger import set_verbose

from vllm_obtain.bench import PROMPTS
from vllm_obtain.core.templates import render_chat_prompt
from vllm_obtain.weights.catalog import load_catalog, packaged_file


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--streams", default="1,16")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--temperatures", default="0,0.8")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--runs", type=int, default=2)
    args = parser.parse_args()
    source = load_catalog()["models"]["smollm2-135m-instruct"]["llama.cpp"]
    path = packaged_file(source["package"], source["file"])
    set_verbose(False)
    L.llama_backend_init()
    model = L.llama_model_load_from_file(str(path).encode(), L.llama_model_default_params())
    vocab = L.llama_model_get_vocab(model)
    n_vocab = L.llama_vocab_n_tokens(vocab)
    template = L.llama_model_chat_template(model, None).decode()
    prompts = []
    for i in range(max(int(s) for s in args.streams.split(","))):
        messages = [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]
        text = render_chat_prompt(template, messages).encode()
        buf = (L.llama_token * 1024)()
        n = L.llama_tokenize(vocab, text, len(text), buf, 1024, False, True)
        prompts.append(list(buf[:n]))
    for streams in (int(s) for s in args.streams.split(",")):
        for temperature in (float(t) for t in args.temperatures.split(",")):
            rates = [run(model, n_vocab, prompts[:streams], args, temperature)
                     for _ in range(args.runs + 1)][1:]  # fmt: skip  # the first warms up
            print(json.dumps({
                "streams": streams, "temperature": temperature, "tokens_per_stream": args.tokens,
                "tokens_per_s": round(max(rates), 1), "runs": [round(r, 1) for r in rates],
            }), flush=True)  # fmt: skip
    L.llama_model_free(model)


def run(model: object, n_vocab: int, prompts: list[list[int]], args: argparse.Namespace,
        temperature: float) -> float:  # fmt: skip
    params = L.llama_context_default_params()
    params.n_seq_max = len(prompts)
    params.n_ctx = max(1024, sum(len(p) for p in prompts) + len(prompts) * (args.tokens + 16))
    params.n_batch = params.n_ubatch = 512
    params.kv_unified = True
    params.n_threads = params.n_threads_batch = args.threads
    ctx = L.llama_init_from_model(model, params)
    batch = L.llama_batch_init(512, 0, 1)
    rng = [np.random.default_rng(i) for i in range(len(prompts))]

    def decode(entries: list[tuple[int, int, int, bool]]) -> None:
        batch.n_tokens = len(entries)
        for i, (token, pos, seq, logits) in enumerate(entries):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, pos, 1
            batch.seq_id[i][0], batch.logits[i] = seq, logits
        assert L.llama_decode(ctx, batch) == 0

    def sample(seqs: list[int]) -> list[int]:
        """Tokens for `seqs`, whose logits are the rows of the last call, in order."""
        logits = np.ctypeslib.as_array(L.llama_get_logits(ctx), shape=(len(seqs), n_vocab))
        if temperature == 0:
            return logits.argmax(axis=1).tolist()
        probs = np.exp((logits - logits.max(axis=1, keepdims=True)) / temperature)
        cdf = np.cumsum(probs, axis=1)
        return [min(int(np.searchsorted(cdf[r], rng[s].random() * cdf[r, -1], side="right")),
                    n_vocab - 1) for r, s in enumerate(seqs)]  # fmt: skip

    started = time.perf_counter()
    # Prefill in batch-sized calls; a sequence is sampled after the call holding its last token.
    entries = [(t, pos, seq, pos == len(p) - 1) for seq, p in enumerate(prompts)
               for pos, t in enumerate(p)]  # fmt: skip
    tokens = [0] * len(prompts)
    for start in range(0, len(entries), 512):
        part = entries[start : start + 512]
        decode(part)
        ending = [seq for _, _, seq, last in part if last]
        for seq, token in zip(ending, sample(ending), strict=True):
            tokens[seq] = token
    positions = [len(p) for p in prompts]
    everyone = list(range(len(prompts)))
    for _ in range(args.tokens - 1):
        decode([(tokens[s], positions[s], s, True) for s in everyone])
        tokens = sample(everyone)
        positions = [p + 1 for p in positions]
    elapsed = time.perf_counter() - started
    L.llama_batch_free(batch)
    L.llama_free(ctx)
    return len(prompts) * args.tokens / elapsed


if __name__ == "__main__":
    main()

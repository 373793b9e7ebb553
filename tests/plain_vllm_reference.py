"""Generate reference outputs with plain vLLM (no Lethe in front), one request at a time.

Run as a script in its own process (vLLM on CPU spawns workers, which needs the ``__main__`` guard):
    python tests/plain_vllm_reference.py MODEL_DIR CASES_JSON OUT_JSON
Each case is ``{"kind": "chat", "messages": [...], "max_tokens": N}`` or ``{"kind": "completion", "prompt": "...",
"max_tokens": N}``; chat uses vLLM's own chat-template rendering, so the comparison also checks Lethe's renderer.
"""

from __future__ import annotations

import json
import os
import sys


def main(model_dir: str, cases_path: str, out_path: str) -> None:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams

    llm = LLM(model=model_dir, dtype="float32", max_model_len=1024, enforce_eager=True, seed=0)
    results = []
    with open(cases_path) as handle:
        cases = json.load(handle)
    for case in cases:
        params = SamplingParams(temperature=0.0, max_tokens=case["max_tokens"])
        if case["kind"] == "chat":
            output = llm.chat(case["messages"], params, use_tqdm=False)[0]
        else:
            output = llm.generate([case["prompt"]], params, use_tqdm=False)[0]
        completion = output.outputs[0]
        results.append({"text": completion.text, "token_ids": list(completion.token_ids),
                        "prompt_token_ids": list(output.prompt_token_ids or [])})
    with open(out_path, "w") as handle:
        json.dump(results, handle)


if __name__ == "__main__":
    main(*sys.argv[1:4])

"""Drive Lethe's ``Engine`` directly: warm ULD assistants through ``collective_rpc``, then serve requests that use them.

Run as a script in its own process (vLLM on CPU spawns workers, which needs the ``__main__`` guard):
    python tests/engine_warmup_check.py MODEL_DIR ASSISTANTS_DIR OUT_JSON
``ASSISTANTS_DIR`` holds copies of an assistant (any model with the served vocabulary: the test copies the served model
itself). Writes {"warmed": [...], "wanted": n, "seconds_to_load": s, "cycled": [{"text", "tokens", "seconds"}],
"unloaded": {"text", "tokens", "seconds"}}.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path


async def run(model_dir: Path, assistants_dir: Path, out_path: Path) -> None:
    from vllm.sampling_params import RequestOutputKind, SamplingParams

    from server.config import Settings
    from server.engine import Engine

    engine = Engine(Settings(), model_dir, "model")
    engine.start()
    try:
        paths = sorted(str(path) for path in assistants_dir.iterdir() if path.name.startswith("assistant-"))
        request = {"assistants": paths, "memory_bytes": 8 * 1024**3}
        started = time.perf_counter()
        warmed = await engine.warm("uld", request)
        while len(warmed) < len(paths) and time.perf_counter() - started < 300:
            await asyncio.sleep(0.2)
            warmed = await engine.warm("uld", request)
        loaded_after = time.perf_counter() - started

        async def reply(assistant: str, request_id: str) -> dict:
            params = SamplingParams(temperature=0.0, max_tokens=8, output_kind=RequestOutputKind.FINAL_ONLY,
                                    extra_args={"lethe": {"uld": [{"assistant": assistant, "alpha": 0.8,
                                                                   "tau": 0.1}]}})
            began = time.perf_counter()
            output = None
            async for output in engine.generate({"prompt_token_ids": [1, 2, 3, 4]}, params, request_id):
                pass
            completion = output.outputs[0]
            return {"text": completion.text, "tokens": len(completion.token_ids),
                    "seconds": time.perf_counter() - began}

        cycled = [await reply(path, f"cycle-{round_}-{i}") for round_ in range(2) for i, path in enumerate(paths)]
        unloaded = await reply(str(assistants_dir / "never-warmed"), "unloaded")
        out_path.write_text(json.dumps({"warmed": warmed, "wanted": len(paths), "seconds_to_load": loaded_after,
                                        "cycled": cycled, "unloaded": unloaded}))
    finally:
        engine.shutdown()


if __name__ == "__main__":
    asyncio.run(run(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])))

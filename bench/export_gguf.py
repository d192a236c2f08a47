"""Does an adapter exported with `lorastack adapters export NAME DIR --gguf` work in llama.cpp?

    pip install -e '.[bench]'          # llama-cpp-python (a ~10 minute source build)
    python bench/export_gguf.py --adapter reverse_words [--task reverse_words] [--n 50]

Exports the library adapter to a llama.cpp LoRA GGUF, loads the embedded base's own GGUF in
llama.cpp with and without it, and prints exact match on the task's test inputs for:
llama.cpp bare base, llama.cpp + the exported LoRA, and lorastack's engine with the adapter,
plus how often llama.cpp + LoRA and lorastack give the same answer. Greedy decoding; the
prompt is rendered as lorastack renders it (an empty system turn, then the user turn).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lorastack.atomic import scratch_dir  # noqa: E402
from lorastack.base import embedded_gguf_path  # noqa: E402
from lorastack.engine.sampling import Sampling  # noqa: E402
from lorastack.export import export  # noqa: E402
from lorastack.runtime import Runtime  # noqa: E402
from lorastack.tasks import get_task  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapter", required=True)
    ap.add_argument("--task", default=None, help="built-in task whose test inputs to use (default: the adapter's name)")
    ap.add_argument("--n", type=int, default=50)
    ap.add_argument("--max-tokens", type=int, default=32)
    args = ap.parse_args()
    try:
        import llama_cpp
    except ImportError:
        raise SystemExit("llama-cpp-python is not installed: pip install -e '.[bench]'") from None
    task = get_task(args.task or args.adapter)
    records = task.generate(args.n, "test", seed=0)
    rt = Runtime.open()
    with scratch_dir("lorastack-bench-") as tmp:
        out = tmp / "gguf"
        export(rt.library, args.adapter, out, mode="gguf", base=rt.base)
        lora = next(out.glob("*.gguf"))

        def llama(lora_path: str | None) -> list[str]:
            llm = llama_cpp.Llama(model_path=str(embedded_gguf_path()), lora_path=lora_path, n_ctx=512, n_threads=1,
                                  verbose=False, seed=0)
            texts = []
            for r in records:
                prompt = f"<|im_start|>system\n<|im_end|>\n<|im_start|>user\n{r['prompt']}<|im_end|>\n<|im_start|>assistant\n"
                texts.append(llm(prompt, max_tokens=args.max_tokens, temperature=0, stop=["<|im_end|>"])["choices"][0]["text"])
            return texts

        bare, with_lora = llama(None), llama(str(lora))
        handles = [rt.start(args.adapter, r["prompt"], Sampling(max_tokens=args.max_tokens)) for r in records]
        ours = [h.result().text for h in handles]
        score = lambda texts: sum(task.score(t, r) for t, r in zip(texts, records))  # noqa: E731
        print(f"{args.adapter} on {len(records)} {task.name} test inputs (exact match):")
        print(f"  llama.cpp, bare base          {score(bare):4d}")
        print(f"  llama.cpp + exported LoRA     {score(with_lora):4d}")
        print(f"  lorastack engine + adapter    {score(ours):4d}")
        same = sum(a.strip() == b.strip() for a, b in zip(with_lora, ours))
        print(f"  llama.cpp + LoRA and lorastack give the same answer on {same}/{len(records)}")


if __name__ == "__main__":
    main()

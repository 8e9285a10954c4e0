"""`rvllm chat`: an interactive chat on a terminal; history is kept, /exit leaves."""
from __future__ import annotations

import sys

from rvllm.config import EngineConfig


def run_chat(config: EngineConfig, args) -> int:
    from rvllm import SamplingParams
    from rvllm.llm import LLM

    llm = LLM(**{k: v for k, v in vars(config).items() if k != "extra"})
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature)
    history = [{"role": "system", "content": args.system}] if args.system else []
    print("rvllm chat — /exit leaves, /reset clears the history, /history shows it.", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            print(file=sys.stderr)
            return 0
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return 0
        if line == "/reset":
            history = history[:1] if args.system else []
            continue
        if line == "/history":
            for turn in history:
                print(f"[{turn['role']}] {turn['content']}")
            continue
        history.append({"role": "user", "content": line})
        reply = llm.chat(history, params)[0].outputs[0].text
        print(reply, flush=True)
        history.append({"role": "assistant", "content": reply})

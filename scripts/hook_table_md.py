"""Print the Markdown hook table of a model family (block indices collapsed to {i} / {j}).

    python scripts/hook_table_md.py tiny-qwen2.5-vl
"""

from __future__ import annotations

import re
import sys


def hook_table_markdown(name: str) -> str:
    from hooked_vlm.hook_table import describe_hook
    from hooked_vlm.tiny import tiny_model

    model = tiny_model(name)
    rows: dict[str, str] = {}
    for hook in model.hook_dict:
        generic = re.sub(r"^vision\.blocks\.\d+\.", "vision.blocks.{j}.", hook)
        generic = re.sub(r"^blocks\.\d+\.", "blocks.{i}.", generic)
        rows.setdefault(generic, describe_hook(hook))
    lines = ["| hook | shape |", "|---|---|"]
    lines += [f"| `{h}` | {s} |" for h, s in rows.items()]
    return "\n".join(lines)


if __name__ == "__main__":
    print(hook_table_markdown(sys.argv[1] if len(sys.argv) > 1 else "tiny-qwen2.5-vl"))

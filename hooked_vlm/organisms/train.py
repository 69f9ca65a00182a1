"""``python -m hooked_vlm.organisms.train NAME [--out DIR] [--seed S] [--steps N]``: train one organism."""

from __future__ import annotations

import sys

from hooked_vlm.organisms.cli import main

if __name__ == "__main__":
    sys.exit(main(["organisms", "train", *sys.argv[1:]]))

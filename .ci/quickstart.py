"""Print one command of README.md's Quick start: `install` (the first line) or `test` (the second)."""

import re
import sys
from pathlib import Path

text = Path(__file__).resolve().parents[1].joinpath("README.md").read_text()
block = re.search(r"## Quick start.*?```(?:bash|sh)\n(.*?)```", text, re.S)
if not block:
    sys.exit("README.md has no Quick start code block")
commands = [line for line in block.group(1).splitlines() if line.strip() and not line.startswith("#")]
if len(commands) != 2:
    sys.exit(f"README.md's Quick start must hold exactly two commands, found {len(commands)}")
print(commands[{"install": 0, "test": 1}[sys.argv[1]]])

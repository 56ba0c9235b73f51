"""Assemble BENCHMARKS.md from the per-topic result files in benchmarks/*.md.

Each topic script (kd_digits.py, sparse_kernels.py, prune_latency.py, quant_vs_ort.py, ...)
writes its own ``benchmarks/<topic>.md`` with the exact command that produced it; this
script only concatenates them, in a fixed order, under one header.

    python benchmarks/assemble.py
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent
ORDER = ["prune.md", "sparse.md", "quant.md", "kd_digits.md"]

HEADER = """# nnsculpt benchmarks

Every number below was produced by the command shown in its section, on the project's
development machine (2 shared CPU cores, no GPU). These machines are noisy: speed is reported
as ratios measured in the same run (medians of several runs), side by side with the peer tool
where there is one. Regenerate a section with its command, then `python benchmarks/assemble.py`.
"""


def main() -> None:
    parts = [HEADER]
    files = [ROOT / n for n in ORDER if (ROOT / n).exists()]
    files += sorted(p for p in ROOT.glob("*.md") if p.name not in ORDER)
    for p in files:
        # a topic page may keep its raw results in a trailing ``<!-- results-json ... -->``
        # comment (so a partial re-run can keep the other rows): not part of BENCHMARKS.md
        text = re.sub(r"<!-- results-json.*?-->", "", p.read_text(), flags=re.S).strip()
        # demote the topic's own headings by one level under the global title
        lines, fence = [], False
        for line in text.splitlines():
            if line.startswith("```"):
                fence = not fence
            lines.append("#" + line if line.startswith("#") and not fence else line)
        text = "\n".join(lines)
        parts.append(f"<!-- from benchmarks/{p.name} -->\n{text}\n")
    (ROOT.parent / "BENCHMARKS.md").write_text("\n".join(parts))


if __name__ == "__main__":
    main()

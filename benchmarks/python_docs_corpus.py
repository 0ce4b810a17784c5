"""An openly licensed English corpus available offline: the Python documentation's reStructuredText
sources, as Debian's ``python3-doc`` package installs them (PSF License Version 2).

    apt-get install python3-doc
    python benchmarks/python_docs_corpus.py --out corpus/     # writes train.txt and heldout.txt

Documents are shuffled with a fixed seed (so the training stream does not read one manual section
after another) and every 20th goes to ``heldout.txt`` for evaluation. Markup-only lines (directives,
labels, heading underlines, comments) are dropped; prose, lists and code examples are kept.
"""

from __future__ import annotations

import argparse
import random
import re
from pathlib import Path

DEFAULT_SOURCES = "/usr/share/doc/python3.11/html/_sources"
_MARKUP = re.compile(r"^\s*(\.\. |:[\w-]+:\s*$)|^\s*([=\-~*^#+\"'`]{3,})\s*$")


def clean(text: str) -> str:
    lines = [line for line in text.splitlines() if not _MARKUP.match(line)]
    text = "\n".join(lines)
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sources", default=DEFAULT_SOURCES, help="folder of *.rst.txt files")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--heldout-every", type=int, default=20)
    args = parser.parse_args()
    files = sorted(Path(args.sources).rglob("*.rst.txt"))
    if not files:
        raise SystemExit(f"no *.rst.txt under {args.sources}: install Debian's python3-doc, or pass --sources")
    random.Random(args.seed).shuffle(files)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sizes = {"train.txt": 0, "heldout.txt": 0}
    with (out / "train.txt").open("w", encoding="utf-8") as train, \
            (out / "heldout.txt").open("w", encoding="utf-8") as heldout:
        for i, path in enumerate(files):
            name = "heldout.txt" if i % args.heldout_every == 0 else "train.txt"
            text = clean(path.read_text(encoding="utf-8", errors="replace")) + "\n"
            (heldout if name == "heldout.txt" else train).write(text)
            sizes[name] += len(text)
    print(f"{len(files)} documents from {args.sources}: " + ", ".join(f"{k} {v / 1e6:.1f} M chars"
                                                                  for k, v in sizes.items()))


if __name__ == "__main__":
    main()

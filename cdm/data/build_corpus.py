"""Build the default text corpus: English prose from the Python standard library's docstrings.

``python -m cdm.data.build_corpus [OUT]`` walks the standard library of the
running interpreter (``sysconfig``'s ``stdlib`` path; ``test``, ``idlelib``,
``lib2to3`` and ``site-packages`` skipped), parses every module with ``ast``
and keeps the paragraphs of its module, class and function docstrings that read
as prose: ASCII, at least ``MIN_WORDS`` words, mostly letters, no doctest or
code lines. Each paragraph is reflowed onto one line; duplicates are dropped;
the order is that of the sorted file paths. The result is gzip-compressed with
a fixed timestamp, so one interpreter always writes the same bytes.

The shipped corpus (``cdm/assets/text-stdlib-docstrings.txt.gz``) was built
once with CPython 3.11; the data set reads that file, so every machine and
every Python version sees the same text. The text is the Python Software
Foundation's, under the PSF License Agreement (the licence of CPython's
sources).
"""

from __future__ import annotations

import ast
import gzip
import re
import sys
import sysconfig
from pathlib import Path

MIN_WORDS = 8
SKIPPED_PARTS = {"test", "tests", "idlelib", "lib2to3", "site-packages", "turtledemo", "__pycache__"}
CODE_HINTS = re.compile(r">>>|\.\.\. |::\s*$|^\s*[-=*~^]{3,}\s*$|[{}\[\]<>|\\]|\w\(.*\)\s*->|^\s*:\w+:", re.M)
WORD = re.compile(r"[A-Za-z]+")


def prose_paragraphs(docstring: str):
    """The paragraphs of a docstring that read as English prose, each on one line."""
    for paragraph in re.split(r"\n\s*\n", docstring):
        lines = paragraph.strip().splitlines()
        # indented continuation or a definition list reads as layout, not prose
        if not lines or any(line.startswith(("    ", "\t")) for line in lines[1:]):
            continue
        text = " ".join(line.strip() for line in lines)
        if not text.isascii() or CODE_HINTS.search(paragraph):
            continue
        words = WORD.findall(text)
        letters = sum(len(w) for w in words)
        if len(words) >= MIN_WORDS and letters >= 0.7 * len(text) and text[-1] in ".!?":
            yield text


def docstrings(source: str):
    """Module, class and function docstrings of a module's source, in source order."""
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            text = ast.get_docstring(node, clean=True)
            if text:
                yield text


def stdlib_prose(root: Path) -> list[str]:
    """Every distinct prose paragraph of the standard library under ``root``."""
    seen, paragraphs = set(), []
    for path in sorted(root.rglob("*.py")):
        if SKIPPED_PARTS & set(path.relative_to(root).parts):
            continue
        try:
            source = path.read_text(encoding="utf-8")
            strings = list(docstrings(source))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue  # a few stdlib files are deliberately invalid or not UTF-8
        for docstring in strings:
            for paragraph in prose_paragraphs(docstring):
                if paragraph not in seen:
                    seen.add(paragraph)
                    paragraphs.append(paragraph)
    return paragraphs


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    out = Path(argv[0]) if argv else Path(__file__).parents[1] / "assets" / "text-stdlib-docstrings.txt.gz"
    text = "\n".join(stdlib_prose(Path(sysconfig.get_paths()["stdlib"]))) + "\n"
    with open(out, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as compressed:
        compressed.write(text.encode("ascii"))
    print(f"{out}: {len(text)} characters, {text.count(chr(10))} paragraphs, {out.stat().st_size} bytes compressed")


if __name__ == "__main__":
    main()

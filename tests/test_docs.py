"""The README and docs/*.md: every relative link resolves to a file and, with a #anchor, to a heading there
(GitHub's slugs), and the README stays short enough to read in ten minutes."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[([^\]]*)\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def prose(path):
    """(line number, line) of a Markdown file's lines outside ``` code blocks."""
    lines, fenced = [], False
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced:
            lines.append((n, line))
    return lines


def slug(heading):
    """GitHub's anchor for a heading: its text without markup, lowercased, punctuation but - and _ dropped,
    spaces to -."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = re.sub(r"[`*]", "", text).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path):
    """Every heading's slug, with GitHub's -1, -2 suffixes for repeats."""
    seen, out = {}, set()
    for _, line in prose(path):
        m = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            s = slug(m.group(1))
            out.add(f"{s}-{seen[s]}" if s in seen else s)
            seen[s] = seen.get(s, 0) + 1
    return out


def links(path):
    """(line number, target) of every link in the file's prose; inline code is not a link."""
    for n, line in prose(path):
        for m in LINK.finditer(re.sub(r"`[^`]*`", "code", line)):
            yield n, m.group(2)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_resolve(page):
    broken = []
    for n, target in links(page):
        if re.match(r"(https?:|mailto:)", target):
            continue
        file, _, anchor = target.partition("#")
        dest = (page.parent / file).resolve() if file else page
        if not dest.exists():
            broken.append(f"line {n}: {target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"line {n}: {target}: no such heading in {dest.name}")
    assert not broken, f"{page.name}: " + "; ".join(broken)


def test_readme_is_short():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 320
    long = [n for n, line in prose(ROOT / "README.md") if len(line) > 200]
    assert not long, f"README.md lines over 200 characters outside code blocks: {long}"


def test_slug_follows_github():
    assert slug("Stage 1: the global value model (`gvm.py`)") == "stage-1-the-global-value-model-gvmpy"
    assert slug("What makes a good GVM (`experiments/gvm_sweep.py`)") == "what-makes-a-good-gvm-experimentsgvm_sweeppy"
    assert slug("Sampling is π") == "sampling-is-π"

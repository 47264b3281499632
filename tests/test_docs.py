"""The repository explains itself: no tracked file cites a document outside it, every relative Markdown link in
the docs, README.md and BENCHMARKS.md reaches an existing file (and heading), and every `docs/....md#anchor`
cited anywhere (code, presets, tests) resolves."""
import re
import subprocess
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# written in pieces so that this file does not match itself
FORBIDDEN = ["methods" + ".md", "shared" + "/reference", "../" + "shared", "seeds" + "/"]

LINK = re.compile(r"\]\(([^()\s]+)\)")
DOC_CITATION = re.compile(r"(?<![\w/.])docs/[\w./-]*?\.md(?:#[\w-]+)?|(?<![\w/.])docs/methods/(?![\w.-])")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
FENCE = re.compile(r"^\s*(```|~~~)")


@cache
def tracked_files() -> tuple[Path, ...]:
    """The files git tracks (the working tree's version of each), or every file outside .git without git."""
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
        names = [n for n in out.decode().split("\0") if n]
        paths = [ROOT / n for n in names]
    except (OSError, subprocess.CalledProcessError):
        paths = [p for p in ROOT.rglob("*") if ".git" not in p.relative_to(ROOT).parts]
    return tuple(p for p in paths if p.is_file() and not p.is_symlink())


@cache
def text(path: Path) -> str | None:
    data = path.read_bytes()
    if b"\0" in data:
        return None  # binary
    return data.decode("utf-8", errors="replace")


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: links reduced to their text, lowercase, punctuation dropped (letters, digits,
    '_', '-' and spaces kept), spaces to hyphens."""
    heading = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    heading = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return heading.replace(" ", "-")


def lines_outside_code(source: str):
    fenced = False
    for number, line in enumerate(source.splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            yield number, line


@cache
def anchors(path: Path) -> frozenset[str]:
    """Every heading anchor of a Markdown file, with GitHub's -1, -2 ... suffixes for repeated headings."""
    seen: dict[str, int] = {}
    out = set()
    for _, line in lines_outside_code(path.read_text(encoding="utf-8")):
        m = HEADING.match(line)
        if m:
            base = slug(m.group(2))
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
    return frozenset(out)


def resolve(target: str, base: Path) -> str | None:
    """None when `target` (path[#anchor], relative to the folder `base`) exists, else what is wrong."""
    path, _, anchor = target.partition("#")
    file = (base / path).resolve() if path else None
    if file is not None and not file.exists():
        return f"no file {path}"
    if anchor:
        md = file if file is not None else None
        if md is None or md.is_dir() or md.suffix != ".md":
            return None if md is not None else "an anchor without a file"
        if anchor not in anchors(md):
            return f"no heading #{anchor} in {md.relative_to(ROOT)}"
    return None


def markdown_files() -> list[Path]:
    return [p for p in tracked_files() if p.suffix == ".md"
            and (p.relative_to(ROOT).parts[0] == "docs" or p.relative_to(ROOT).as_posix() in ("README.md", "BENCHMARKS.md"))]


def tracked_lines():
    """(path, line number, line) of every tracked text file but this one."""
    me = Path(__file__).resolve()
    for path in tracked_files():
        if path.resolve() == me or (source := text(path)) is None:
            continue
        for number, line in enumerate(source.splitlines(), 1):
            yield path, number, line


def test_no_file_cites_a_document_outside_the_repository():
    bad = [f"{path.relative_to(ROOT)}:{number}: {word!r}"
           for path, number, line in tracked_lines() for word in FORBIDDEN if word in line]
    assert not bad, "outside references:\n" + "\n".join(bad)


def test_markdown_links_resolve():
    assert (ROOT / "docs" / "methods" / "README.md").is_file()
    bad = []
    for path in markdown_files():
        source = path.read_text(encoding="utf-8")
        for number, line in lines_outside_code(source):
            line = re.sub(r"`[^`]*`", "", line)  # code spans are not links
            for target in LINK.findall(line):
                if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                    continue
                target = target if not target.startswith("#") else path.name + target
                problem = resolve(target, path.parent)
                if problem:
                    bad.append(f"{path.relative_to(ROOT)}:{number}: ({target}) {problem}")
    assert not bad, "broken links:\n" + "\n".join(bad)


def test_cited_docs_pages_and_anchors_exist():
    bad = []
    for path, number, line in tracked_lines():
        for target in DOC_CITATION.findall(line):
            problem = resolve(target, ROOT)
            if problem:
                bad.append(f"{path.relative_to(ROOT)}:{number}: {target} ({problem})")
    assert not bad, "citations of missing docs:\n" + "\n".join(bad)

"""The protocol document exists and every section the code cites is in it."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CITATION = re.compile(r"docs/protocol\.md(?: section| §)? (\d+(?:\.\d+)?)")


def test_every_cited_section_exists():
    doc = (REPO / "docs" / "protocol.md").read_text()
    headings = set(re.findall(r"^#{2,3} (\d+(?:\.\d+)?)\.? ", doc, flags=re.MULTILINE))
    assert {"1", "2.1", "2.5", "3", "4.1", "4.2", "5", "6", "7", "8"} <= headings
    cited = {}
    for folder in ("wsol_bench", "methods", "datasets", "conf", "scripts", "tests"):
        for path in (REPO / folder).rglob("*"):
            if path.suffix in {".py", ".yaml", ".sh"}:
                for section in CITATION.findall(path.read_text()):
                    cited.setdefault(section, []).append(path.relative_to(REPO).as_posix())
    for page in (REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))):
        cited.update({s: [page.name] for s in CITATION.findall(page.read_text())})
    assert len(cited) >= 8
    missing = {s: where for s, where in cited.items() if s not in headings}
    assert not missing, f"cited sections absent from docs/protocol.md: {missing}"


def test_the_explainer_table_lists_every_method_as_registered():
    """Every built-in method has a row in docs/explainers.md's table whose class-specific,
    maps and passes-per-image columns are what the method's class says."""
    from wsol_bench.methods import method_table

    text = (REPO / "docs" / "explainers.md").read_text()
    section = text[:text.index("## Adding your own explainer")]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        if len(cells) == 5 and cells[0].startswith("`"):
            for name in re.findall(r"`(\w+)`", cells[0]):
                rows[name] = cells[2:]
    builtin = {r["name"]: r for r in method_table()
               if (REPO / "conf" / "method" / f"{r['name']}.yaml").is_file()}
    assert set(rows) == set(builtin)
    for name, (specific, maps, passes) in rows.items():
        r = builtin[name]
        assert (specific, maps, passes) == ("yes" if r["class_specific"] else "no", r["resolution"],
                                            r["passes_per_image"]), name


def _anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_link_of_the_readme_and_docs_resolves():
    """Each relative link and image of README.md and docs/*.md names a file that exists and, with
    a #fragment, a heading of that file."""
    pages = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    broken = []
    for page in pages:
        text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.MULTILINE | re.DOTALL)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+://", target):
                continue
            path, _, fragment = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            if not linked.exists():
                broken.append(f"{page.name}: {target} (no such file)")
            elif fragment and linked.suffix == ".md":
                headings = re.findall(r"^#+ (.+)$", linked.read_text(), flags=re.MULTILINE)
                if fragment not in {_anchor(h) for h in headings}:
                    broken.append(f"{page.name}: {target} (no such heading)")
    assert not broken, broken

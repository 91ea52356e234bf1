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
    cited.update({s: ["README.md"] for s in CITATION.findall((REPO / "README.md").read_text())})
    assert len(cited) >= 8
    missing = {s: where for s, where in cited.items() if s not in headings}
    assert not missing, f"cited sections absent from docs/protocol.md: {missing}"

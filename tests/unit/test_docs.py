"""README is short and every link in it and in docs/ leads somewhere (a moved section must not
leave a dead link behind)."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def links(page: Path):
    for m in re.finditer(r"\]\(([^)\s]+)\)", page.read_text()):
        target = m.group(1)
        if not target.startswith(("http://", "https://", "#", "mailto:")):
            yield target.split("#", 1)[0]


def test_readme_reads_in_five_minutes():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 150


def test_every_link_leads_to_a_file():
    dead = []
    for page in PAGES:
        for target in links(page):
            path = (page.parent / target).resolve()
            if ROOT in path.parents and not path.exists():     # (links beside the checkout: not ours)
                dead.append(f"{page.relative_to(ROOT)} -> {target}")
    assert not dead, dead


def test_every_docs_page_is_reachable_from_readme():
    readme = set(links(ROOT / "README.md"))
    assert {f"docs/{p.name}" for p in PAGES[1:]} <= readme

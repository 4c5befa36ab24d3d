"""What a newcomer meets first: `make install` picks torch's build from one variable and the extras from another,
and the README is a front door whose every link lands."""

from __future__ import annotations

import re
import subprocess

from tests.conftest import REPO

DOCS = ["configuration", "registry", "team", "scaling", "troubleshooting", "benchmarks", "development"]


def _make_n(*args: str) -> str:
    """What `make install` would run, without running it (the stamp is pointed elsewhere so nothing is up to date)."""
    out = subprocess.run(["make", "-n", "-B", "install", "VENV=/nonexistent/venv", *args], cwd=REPO,
                         capture_output=True, text=True, check=True)
    return out.stdout


def test_torch_comes_from_pip_configuration_unless_torch_index_url_is_set():
    plain = _make_n()
    assert "pip install -q torch==2.13.0" in plain and "--index-url" not in plain
    cpu = _make_n("TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu")
    assert "pip install -q --index-url https://download.pytorch.org/whl/cpu torch==2.13.0" in cpu


def test_extras_default_to_everything_and_a_worker_can_skip_them():
    assert '-e ".[dev,bench,sweep]"' in _make_n() and "/.installed\n" in _make_n() + "\n"
    worker = _make_n("EXTRAS=")
    assert '-e "."' in worker and ".installed-core" in worker
    assert '-e ".[sweep]"' in _make_n("EXTRAS=sweep")


def test_the_readme_is_a_front_door_and_every_link_lands():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    for page in DOCS:
        assert f"(docs/{page}.md)" in readme, f"README does not link docs/{page}.md"
    for md in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        text = md.read_text()
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if target.startswith(("http://", "https://", "mailto:")):
                continue
            path, _, anchor = target.partition("#")
            dest = (md.parent / path).resolve() if path else md
            assert dest.exists(), f"{md.name}: broken link {target}"
            if anchor and dest.suffix == ".md":
                assert anchor in _anchors(dest.read_text()), f"{md.name}: no heading for #{anchor} in {dest.name}"


def _anchors(markdown: str) -> set[str]:
    """GitHub's heading ids: lower case, punctuation dropped, spaces to hyphens (code fences skipped)."""
    text = re.sub(r"```.*?```", "", markdown, flags=re.S)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in re.findall(r"^#+ (.+)$", text, flags=re.M)}

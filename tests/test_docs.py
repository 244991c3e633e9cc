"""The documentation: README.md short, every relative link of README.md and docs/*.md resolves (file
and anchor), the mkdocs site builds with --strict (and --strict does fail on a broken link), and
docs/cli.md is what scripts/cli_reference.py generates from the commands' --help."""
from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from markdown.extensions.toc import slugify

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = sorted([ROOT / "README.md", *DOCS.glob("*.md")])
LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def _cli_reference():
    spec = importlib.util.spec_from_file_location("cli_reference", ROOT / "scripts" / "cli_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _prose(text: str) -> str:
    """The markdown without fenced code blocks and inline code (links there are not links)."""
    text = re.sub(r"^(```|~~~).*?^\1\s*$", "", text, flags=re.M | re.S)
    return re.sub(r"`[^`\n]*`", "", text)


def _anchors(page: Path) -> set[str]:
    """Heading ids as mkdocs' toc extension makes them (GitHub's are the same for these headings)."""
    ids: set[str] = set()
    fence = False
    for line in page.read_text().splitlines():
        if line.lstrip().startswith(("```", "~~~")):
            fence = not fence
        m = None if fence else re.match(r"^#{1,6}\s+(.*?)\s*$", line)
        if m:
            ids.add(slugify(m.group(1).replace("`", ""), "-"))
    return ids


def _links(page: Path) -> list[str]:
    return [t for t in LINK.findall(_prose(page.read_text()))
            if not re.match(r"^[a-z][a-z0-9+.-]*:", t)]  # http:, https:, mailto: are not checked here


def test_readme_is_at_most_250_lines():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250


def test_every_page_is_linked_from_the_readme_or_the_index():
    linked = {Path(t.split("#")[0]).name for p in (ROOT / "README.md", DOCS / "index.md") for t in _links(p)}
    pages = {p.name for p in DOCS.glob("*.md")} - {"index.md"}
    assert pages - linked == set()


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_relative_links_resolve_to_files_and_anchors(page):
    fences = [line for line in page.read_text().splitlines() if line.lstrip().startswith(("```", "~~~"))]
    assert len(fences) % 2 == 0, f"{page.name}: a code fence is not closed"
    bad = []
    for target in _links(page):
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            bad.append(f"{target}: no file {dest}")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            bad.append(f"{target}: no heading #{anchor} in {dest.name}")
        elif path and ROOT not in dest.parents:
            bad.append(f"{target}: outside the repository")
    assert bad == [], f"{page.relative_to(ROOT)}: " + "; ".join(bad)


def test_link_checker_sees_a_broken_file_and_anchor(tmp_path):
    (tmp_path / "a.md").write_text("# A page\n\n## Part two\n\n[ok](#part-two) [ok](b.md#b) `[code](nope.md)`\n"
                                   "[bad](missing.md) [bad anchor](b.md#nope)\n```\n[in code](nope.md)\n```\n")
    (tmp_path / "b.md").write_text("# B\n")
    links = _links(tmp_path / "a.md")
    assert links == ["#part-two", "b.md#b", "missing.md", "b.md#nope"]
    assert "part-two" in _anchors(tmp_path / "a.md") and "nope" not in _anchors(tmp_path / "b.md")


def _mkdocs(root: Path, site: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(root / "mkdocs.yml"),
         "--site-dir", str(site)],
        cwd=root, capture_output=True, text=True, timeout=300, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})


def test_mkdocs_build_strict(tmp_path):
    """The site builds with --strict: every nav page exists, every page is in the nav, every
    link and anchor between pages resolves (mkdocs.yml turns those into warnings)."""
    result = _mkdocs(ROOT, tmp_path / "site")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for page in DOCS.glob("*.md"):
        name = "index.html" if page.stem == "index" else f"{page.stem}/index.html"
        assert (tmp_path / "site" / name).is_file(), name


def test_mkdocs_strict_fails_on_a_broken_link_and_a_page_outside_the_nav(tmp_path):
    copy = tmp_path / "repo"
    shutil.copytree(DOCS, copy / "docs")
    shutil.copy(ROOT / "mkdocs.yml", copy / "mkdocs.yml")
    with open(copy / "docs" / "data.md", "a") as f:
        f.write("\nSee [the missing page](no-such-page.md) and [a gone part](training.md#no-such-part).\n")
    (copy / "docs" / "stray.md").write_text("# Not in the nav\n")
    result = _mkdocs(copy, tmp_path / "site")
    out = result.stdout + result.stderr
    assert result.returncode != 0
    assert "no-such-page.md" in out and "no-such-part" in out and "stray.md" in out


def test_cli_reference_normalises_known_subclasses_and_finds_subcommands():
    ref = _cli_reference()
    help_text = (
        "usage: focaldet data [-h] COMMAND ...\n\npositional arguments:\n  COMMAND\n"
        "    synth     write the synthetic shapes\n    check     validate a COCO dataset and report\n"
        "              statistics\n\noptions:\n  -h, --help  show this help message and exit\n"
        "  --model.model.backbone BACKBONE\n"
        "                        (type: Module | null, default: null, known subclasses: torch.nn.Module,\n"
        "                        torch.nn.Identity, focaldet.modeling.ResNetBackbone,\n"
        "                        timm.layers.Foo, lightning.LightningModule)\n"
        "  --out OUT             folder\n\nsee focaldet data extra -h\n")
    assert ref._subcommands(help_text, "data") == ["synth", "check", "extra"]
    out = ref._normalise(help_text)
    assert ("known subclasses: focaldet.modeling.ResNetBackbone, lightning.LightningModule, ...)"
            in " ".join(line.strip() for line in out.splitlines()))
    assert "torch.nn.Identity" not in out and "timm" not in out
    assert "  --out OUT             folder" in out
    assert all(len(line) <= ref.WIDTH for line in out.splitlines())
    with pytest.raises(RuntimeError, match="prints the local path"):  # argparse wrapped it already:
        ref._normalise(f"  --data-dir D   default {ref.ROOT.parent}/shared/data\n")  # the page would depend on it
    assert ref._anchor("focaldet analyze loss-distribution") == slugify("focaldet analyze loss-distribution", "-")


@pytest.mark.slow
def test_cli_reference_page_is_current():
    """docs/cli.md is what scripts/cli_reference.py writes now: change a command, regenerate."""
    from warm import start_script

    result = start_script(ROOT / "scripts" / "cli_reference.py", "--check", cwd=ROOT).result(600)
    assert result.returncode == 0, result.stderr[-3000:]
    page = (DOCS / "cli.md").read_text()
    for command in ("fit", "validate", "test", "predict", "data check", "data anchors", "export evaluate",
                    "serve", "bench", "sweep", "equal-budget", "analyze loss-distribution"):
        assert f"## `focaldet {command}`" in page, command

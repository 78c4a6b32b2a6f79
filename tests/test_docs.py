"""The documentation: README.md and the site's pages under docs/ link only to files that exist, and the
site builds with ``mkdocs build --strict`` (which also checks anchors and the API reference's imports).
That every ``vitcompress.x.y`` path they show resolves is tests/test_layout.py's
``test_every_module_path_the_docs_show_resolves``."""
import glob
import importlib.util
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FENCE = re.compile(r"^(```|~~~).*?^\1", re.M | re.S)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HTML_SRC = re.compile(r"<(?:img|a)\b[^>]*?\b(?:src|href)=\"([^\"]+)\"", re.I)


def markdown_files():
    return [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "**", "*.md"), recursive=True))


def relative_links(path):
    """(line, target) of every relative link and image of a markdown file, code left out."""
    text = open(path, encoding="utf-8").read()
    text = FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)  # keep line numbers
    text = INLINE_CODE.sub("", text)
    for match in list(LINK.finditer(text)) + list(HTML_SRC.finditer(text)):
        target = match.group(1)
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("#"):
            continue  # http:, mailto:, an anchor on the same page
        yield text.count("\n", 0, match.start()) + 1, target


def test_the_docs_exist():
    pages = markdown_files()
    assert len(pages) > 15
    assert os.path.isfile(os.path.join(ROOT, "mkdocs.yml"))


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: os.path.relpath(p, ROOT))
def test_every_relative_link_and_image_exists(path):
    links = list(relative_links(path))
    missing = []
    for line, target in links:
        file = target.split("#", 1)[0].split("?", 1)[0]
        resolved = os.path.normpath(os.path.join(os.path.dirname(path), file))
        if not os.path.exists(resolved):
            missing.append(f"{os.path.relpath(path, ROOT)}:{line}: {target}")
        elif not resolved.startswith(ROOT + os.sep):
            missing.append(f"{os.path.relpath(path, ROOT)}:{line}: {target} (outside the repository)")
    assert not missing, "links to files that do not exist:\n" + "\n".join(missing)


def test_the_link_check_sees_links_images_and_skips_code(tmp_path):
    page = tmp_path / "page.md"
    page.write_text('[a](x.md) ![b](img/y.png "t") <img src="z.png"> [c](https://e.org) [d](#here)\n'
                    "`[e](inline.md)`\n```\n[f](fenced.md)\n```\n[g](w.md#anchor)\n", encoding="utf-8")
    assert list(relative_links(str(page))) == [(1, "x.md"), (1, "img/y.png"), (6, "w.md#anchor"), (1, "z.png")]


def test_every_page_is_in_the_nav():
    """A page left out of mkdocs.yml's nav is built but unreachable; the strict build only warns about it
    when validation says so, so check it here too."""
    nav = open(os.path.join(ROOT, "mkdocs.yml"), encoding="utf-8").read()
    pages = [os.path.relpath(p, os.path.join(ROOT, "docs")).replace(os.sep, "/")
             for p in glob.glob(os.path.join(ROOT, "docs", "**", "*.md"), recursive=True)]
    assert [p for p in pages if f": {p}\n" not in nav] == []


def test_mkdocs_build_strict(tmp_path):
    for module, package in [("mkdocs", "mkdocs"), ("material", "mkdocs-material"), ("mkdocstrings", "mkdocstrings"),
                            ("mkdocstrings_handlers.python", "mkdocstrings-python")]:
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            pytest.skip(f'{package} is not installed (pip install -e ".[docs]")')
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    out = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                         cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    assert (tmp_path / "site" / "index.html").is_file()
    api = (tmp_path / "site" / "api" / "index.html").read_text(encoding="utf-8")
    assert "Insert token reduction" in api  # compress's docstring made it into the API reference


@pytest.mark.parametrize("method", ["tome", "pitome", "zero_tprune", "focus_detr", "tokencorr", "quota", "ppt",
                                    "atc"])
def test_a_method_page_lists_the_options_describe_gives(method):
    """Each method page's options table is ``vitcompress.describe(method)``: every option, its default."""
    import vitcompress

    text = open(os.path.join(ROOT, "docs", "methods", f"{method}.md"), encoding="utf-8").read()
    shown = dict(re.findall(r"^\| `(\w+)` \| `([^`]*)` \|", text, re.M))
    described = {name: repr(option["default"]) for name, option in vitcompress.describe(method)["options"].items()}
    assert shown == described

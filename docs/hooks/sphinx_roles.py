"""MkDocs hook: the docstrings are written in the Sphinx style (``:class:`Plan```), which
mkdocstrings renders as text plus code; drop the role name so the API pages read ``Plan``."""
import re

ROLE = re.compile(r":(?:class|func|meth|attr|data|mod|exc|obj):(?=<code>)")


def on_page_content(html, **kwargs):
    return ROLE.sub("", html)

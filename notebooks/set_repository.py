"""Points the notebooks and the README at the repository that pyproject.toml names.

    python notebooks/set_repository.py https://github.com/ORG/res2net_jax   # set the URL, then rewrite
    python notebooks/set_repository.py                                       # rewrite from pyproject.toml

pyproject.toml's `[project.urls] Repository` is the one setting. Each notebook's first cell clones it
(`REPOSITORY = "..."`), each notebook opens with an "Open in Colab" link to its copy there, and the
README's notebook list links to the same pages; this script derives all of them from that URL.
"""

from __future__ import annotations

import json
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
URL_LINE = re.compile(r'^Repository = "([^"]*)"$', re.M)
CLONE_LINE = re.compile(r'^REPOSITORY = "[^"]*"', re.M)
BADGE = "[![Open in Colab](https://colab.research.google.com/assets/colab-badge.svg)]"


def repository(root: str = ROOT) -> str:
    """The repository URL in pyproject.toml."""
    with open(os.path.join(root, "pyproject.toml")) as f:
        return URL_LINE.search(f.read()).group(1)


def colab_url(repository_url: str, notebook: str) -> str:
    """Colab's address for notebooks/`notebook` on the main branch of a GitHub repository."""
    match = re.fullmatch(r"https://github\.com/([^/]+)/([^/]+?)(?:\.git)?/?", repository_url)
    if not match:
        raise SystemExit(f"error: {repository_url!r} is not https://github.com/OWNER/REPO, which Colab opens")
    owner, name = match.groups()
    return f"https://colab.research.google.com/github/{owner}/{name}/blob/main/notebooks/{notebook}"


def notebooks(root: str = ROOT) -> list[str]:
    return sorted(f for f in os.listdir(os.path.join(root, "notebooks")) if f.endswith(".ipynb"))


def _lines(text: str) -> list[str]:
    """A notebook cell's source as nbformat stores it: lines that keep their newline."""
    return text.splitlines(keepends=True)


def rewrite(root: str = ROOT) -> None:
    """Writes pyproject.toml's URL into every notebook (clone cell, Colab link) and the README."""
    url = repository(root)
    for name in notebooks(root):
        path = os.path.join(root, "notebooks", name)
        with open(path) as f:
            notebook = json.load(f)
        title, clone = notebook["cells"][0], notebook["cells"][1]
        lines = [line for line in _lines("".join(title["source"])) if not line.startswith(BADGE)]
        title["source"] = _lines(f"{BADGE}({colab_url(url, name)})\n\n" + "".join(lines).lstrip("\n"))
        clone["source"] = _lines(CLONE_LINE.sub(f'REPOSITORY = "{url}"', "".join(clone["source"]), count=1))
        with open(path, "w") as f:
            json.dump(notebook, f, indent=1, ensure_ascii=False)
            f.write("\n")
    readme = os.path.join(root, "README.md")
    with open(readme) as f:
        text = f.read()
    text = re.sub(
        r"\[open in Colab\]\((?:[^)]*/)?notebooks/([^)/]+\.ipynb)\)",
        lambda m: f"[open in Colab]({colab_url(url, m.group(1))})",
        text,
    )
    with open(readme, "w") as f:
        f.write(text)


def main(argv: list[str]) -> None:
    if any(arg in ("--help", "-h") for arg in argv[1:]):
        print(__doc__)
        return
    if len(argv) > 2:
        raise SystemExit("usage: python notebooks/set_repository.py [https://github.com/OWNER/REPO]")
    if len(argv) == 2:
        colab_url(argv[1], "check.ipynb")  # refuses a URL Colab cannot open, before anything is written
        path = os.path.join(ROOT, "pyproject.toml")
        with open(path) as f:
            text = f.read()
        with open(path, "w") as f:
            f.write(URL_LINE.sub(f'Repository = "{argv[1]}"', text, count=1))
    rewrite()


if __name__ == "__main__":
    main(sys.argv)

"""Prints the core install's lowest allowed versions as pins (pyproject.toml's `>=` floors as `==`), with
jaxlib pinned to jax's floor: CI installs them in a fresh venv and runs the tests the core serves."""

import re
from pathlib import Path

import tomllib

dependencies = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]["dependencies"]
for requirement in dependencies:
    name, floor = re.fullmatch(r"([A-Za-z0-9_.-]+)>=([0-9.]+)", requirement.split(";")[0].strip()).groups()
    print(f"{name}=={floor}")
    if name == "jax":
        print(f"jaxlib=={floor}")

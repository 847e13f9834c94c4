"""Packaging: the shipped recipes (and their README) are package data, so `pip install trace-trl` users have them."""

from __future__ import annotations

import configparser
from pathlib import Path

from trace_trl.scripts.train import list_recipes, recipes_dir


ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "trace_trl"


def package_data_globs() -> list[str]:
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    value = config["options.package_data"]["trace_trl"]
    return [glob.strip() for line in value.splitlines() for glob in line.split(",") if glob.strip()]


def is_package_data(path: Path) -> bool:
    """Whether setuptools' package_data globs (relative to the package, `*` not crossing `/`) pick up `path`."""
    return any(path.resolve() in {p.resolve() for p in PACKAGE.glob(glob)} for glob in package_data_globs())


def test_every_recipe_is_package_data():
    shipped = sorted((PACKAGE / "recipes").iterdir())
    assert any(p.suffix == ".yaml" for p in shipped)
    missing = [p.name for p in shipped if p.is_file() and not is_package_data(p)]
    assert not missing, f"Not matched by [options.package_data] in setup.cfg: {missing}"


def test_recipes_are_found_from_the_installed_package():
    assert recipes_dir().resolve() == (PACKAGE / "recipes").resolve()
    assert list_recipes() == sorted(p.stem for p in (PACKAGE / "recipes").glob("*.yaml"))


def test_recipe_readme_lists_every_recipe():
    readme = (PACKAGE / "recipes" / "README.md").read_text()
    for name in list_recipes():
        assert f"`{name}`" in readme, f"{name} is missing from trace_trl/recipes/README.md"


def test_console_script_and_typed_marker():
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    assert "trace-trl = trace_trl.cli:main" in config["options.entry_points"]["console_scripts"]
    assert (PACKAGE / "py.typed").is_file() and is_package_data(PACKAGE / "py.typed")

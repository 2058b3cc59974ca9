"""Where tokenmill finds its migrations: inside the package when installed from a wheel, the
repository's migrations/ in an editable install."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from tokenmill.db import MIGRATIONS_DIR, find_migrations_dir

REPO = Path(__file__).resolve().parents[2]


def test_an_installed_package_uses_its_own_copy(tmp_path: Path):
    package = tmp_path / "site-packages" / "tokenmill"
    (package / "migrations").mkdir(parents=True)
    (tmp_path / "migrations").mkdir()  # Never preferred over the packaged copy.
    assert find_migrations_dir(package) == package / "migrations"


def test_an_editable_install_uses_the_repository_migrations(tmp_path: Path):
    package = tmp_path / "libs" / "tokenmill"
    package.mkdir(parents=True)
    (tmp_path / "migrations").mkdir()
    assert find_migrations_dir(package) == tmp_path / "migrations"


def test_no_migrations_anywhere_is_a_clear_error(tmp_path: Path):
    package = tmp_path / "libs" / "tokenmill"
    package.mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no migrations"):
        find_migrations_dir(package)


def test_this_checkout_finds_the_top_level_migrations():
    assert MIGRATIONS_DIR == REPO / "migrations"
    assert (MIGRATIONS_DIR / "0001_core.sql").is_file()


def test_the_wheel_ships_the_top_level_migrations_inside_the_package():
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    force_include = config["tool"]["hatch"]["build"]["targets"]["wheel"]["force-include"]
    assert force_include == {"migrations": "tokenmill/migrations"}

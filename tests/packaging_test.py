"""Installing prints nothing a user cannot act on: pyproject fields in the forms setuptools no longer
warns about (a TOML-table license printed three deprecation boxes; a flat layout without a root
package dir printed an "Editable installation" box on every `pip install -e .`)."""

import os
import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_pyproject_uses_forms_setuptools_does_not_warn_about():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)
    assert project["project"]["license"] == "Apache-2.0"  # an SPDX string, not {text = ...}
    assert any(r.startswith("setuptools>=77") for r in project["build-system"]["requires"])
    assert project["tool"]["setuptools"]["package-dir"] == {"": "."}

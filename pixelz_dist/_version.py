"""The one version string: the package metadata reads it from here (pyproject.toml, ``[tool.setuptools.dynamic]``)."""

__version__ = "0.2.0"

"""The optional C extension only; everything else is in pyproject.toml.

``pixelz_dist.data._jpeg_region`` decodes one box of a JPEG with the system libjpeg(-turbo) (Debian:
``libjpeg62-turbo-dev``, plus a C compiler). Without them the build skips it (``optional=True``) and the library decodes
whole images as before.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "pixelz_dist.data._jpeg_region",
            sources=["pixelz_dist/data/_jpeg_region.c"],
            libraries=["jpeg"],
            optional=True,
        )
    ]
)

"""Packaging; metadata and dependencies are in setup.cfg.

This file only lists the packages: rlx and its subpackages, plus the
recipes of the clone's top-level configs/ installed as `rlx.configs`
(setup.cfg's `find:` cannot add a package from outside rlx/).
"""

import setuptools

setuptools.setup(
    packages=setuptools.find_packages(include=['rlx', 'rlx.*']) +
    ['rlx.configs'],
    package_dir={'rlx.configs': 'configs'},
)

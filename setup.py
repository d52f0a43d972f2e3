"""Which packages the wheel holds, and under which names (everything else is in pyproject.toml).

``plugins/`` and ``sim/`` keep their folders but install as ``epp_plugins`` and ``epp_sim``, so the wheel adds no
generic top-level name to site-packages; ``bench/`` is run from a checkout and not installed."""

from setuptools import find_packages, setup

INSTALLED_AS = {"plugins": "epp_plugins", "sim": "epp_sim"}

packages = find_packages(include=["epp", "epp.*"])
for folder, name in INSTALLED_AS.items():
    packages += [name + sub[len(folder):] for sub in find_packages(include=[folder, folder + ".*"])]

setup(packages=packages, package_dir={name: folder for folder, name in INSTALLED_AS.items()})

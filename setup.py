"""Maps the top-level `kernels/` and `patches/` folders into the single `ds_hexamoe` namespace.

A top-level import package named `kernels` must never be shipped: transformers probes for Hugging
Face's own `kernels` package by that name.
"""
from setuptools import find_packages, setup

_MAPPED = {"ds_hexamoe.kernels": "kernels", "ds_hexamoe.patches": "patches"}

packages = find_packages(include=["ds_hexamoe", "ds_hexamoe.*"])
package_dir = {"ds_hexamoe": "ds_hexamoe"}
for name, folder in _MAPPED.items():
    packages.append(name)
    package_dir[name] = folder
    for sub in find_packages(folder):
        packages.append(f"{name}.{sub}")
        package_dir[f"{name}.{sub}"] = f"{folder}/{sub.replace('.', '/')}"

setup(packages=packages, package_dir=package_dir)

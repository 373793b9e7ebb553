"""The TinyTOFU demo model: the packaged TOFU data and the builder that trains a small Llama on it (`demo.builder`).

A consumer of the serving core like the evaluation: nothing in `server/`, `guards/` or `classifiers/` imports it.
"""

"""sidrec: generative recommendation with bijective semantic IDs.

Pipeline: prepare data -> embed items -> tokenize (semantic IDs) -> train AR-NTP / FV-MLE /
parallel heads on one backbone -> decode (beam or exact) -> evaluate -> verify the theorem.

The Python API (`sidrec.Recommender`, `sidrec.load_data`, `sidrec.from_frame`, `sidrec.synthetic`)
is imported on first use, so `import sidrec` and the CLI's --help stay fast.
"""

from sidrec.version import __version__

_API = ("Recommender", "load_data", "from_frame", "synthetic")


def __getattr__(name: str):
    if name in _API:
        from sidrec import api

        return getattr(api, name)
    raise AttributeError(f"module 'sidrec' has no attribute {name!r}")


__all__ = ["__version__", *_API]

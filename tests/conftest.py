import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SIDREC_SHARED_DATA", ROOT.parent / "shared" / "data"))


def pytest_collection_modifyitems(config, items):
    """Tests that read ../shared/data carry the `shared` marker (those using the Beauty fixture get it
    here) and are skipped, with the reason counted in the summary, when it is not beside the repo."""
    for item in items:
        if "beauty_data" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.shared)
        if item.get_closest_marker("shared") and not SHARED.is_dir():
            item.add_marker(pytest.mark.skip(reason=f"needs the shared datasets ({SHARED})"))


def shared(rel: str) -> Path:
    p = SHARED / rel
    if not p.exists():
        pytest.skip(f"shared dataset missing: {p}")
    return p


@pytest.fixture(scope="session")
def beauty_data(tmp_path_factory):
    """Beauty prepared once per session (the real 22k-user dataset)."""
    from sidrec.data import prepare, read

    ds = read("seq", shared("amazon-beauty/s3rec/Beauty.txt"), shared("amazon-beauty/derived/items.jsonl"))
    data = prepare(ds, kcore_k=5)
    out = tmp_path_factory.mktemp("beauty") / "data"
    data.save(out)
    return data


if os.environ.get("PYTEST_XDIST_WORKER"):
    # two workers on two cores: one intra-op thread each, or OpenMP spin-waits oversubscribe the CPU
    import torch

    torch.set_num_threads(1)

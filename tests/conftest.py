"""What every test file shares: multi-rank calls run on pooled gloo ranks (``ds_hexamoe.testing.pool``: started
once per world size, reset between calls, discarded after any failure; ``HEXAMOE_FRESH_RANKS=1`` starts
fresh ranks for every call instead), and the fixtures more than one file uses."""
from __future__ import annotations

import pytest

from ds_hexamoe.testing import reuse_ranks


def pytest_configure(config):
    reuse_ranks(True)


@pytest.fixture
def one_rank_group():
    """A one-rank gloo default process group in the test process, destroyed afterwards."""
    import torch.distributed as dist

    from ds_hexamoe.distributed import free_port

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()

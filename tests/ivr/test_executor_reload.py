"""The IVR executor's reload (SIGHUP, sent by `pbx reload`): it takes the file's
`[ivrs.*]` for the next jump_ivr; a bad file changes nothing."""

from __future__ import annotations

from pathlib import Path

import zmq

from pbx.config import load_config
from pbx.ivr.provider import ProviderClient
from workers.ivr import Executor

IVRS = """
[logging]
dir = "{logs}"

[ivrs.sales]
url = "http://127.0.0.1:9/sales"
"""


def test_the_executor_takes_new_ivrs_and_refuses_a_bad_file(tmp_path: Path) -> None:
    config = tmp_path / "pbx.toml"
    config.write_text(IVRS.format(logs=tmp_path))
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        executor = Executor(load_config(str(config)), ctx, ProviderClient(), "ivr-test")
        assert set(executor.settings.ivrs) == {"sales"}

        config.write_text(IVRS.format(logs=tmp_path)
                          + '\n[ivrs.support]\nurl = "http://127.0.0.1:9/support"\n')
        executor.reload()
        assert set(executor.settings.ivrs) == {"sales", "support"}
        assert executor.settings.ivrs["support"].url == "http://127.0.0.1:9/support"

        config.write_text(IVRS.format(logs=tmp_path) + '\n[ivrs.bad]\nurl = "ftp://x"\n')
        executor.reload()
        assert set(executor.settings.ivrs) == {"sales", "support"}
        executor.close()
    finally:
        ctx.term()
